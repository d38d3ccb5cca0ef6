"""A generation run on the driver, after its inputs are valid: write or check ``run.json``, remove what interrupted
shards left, start (or connect to) Ray, run the uncommitted shards on actors, write the index, summarise; and the
dry run's plan description. Ray and the model code are imported only once a real run starts."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any, TextIO

from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import (
    OutputLease,
    bind_device,
    check_resume,
    clean_leftovers,
    prepare_output,
    read_committed_stats,
    read_run_json,
)
from seediff.pipeline.sources import AnnotatePlan, ImageInput
from seediff.pipeline.summary import RunSummary, human_bytes
from seediff.schemas.config import RunConfig, RuntimeOptions
from seediff.schemas.manifest import Manifest
from seediff.schemas.records import RUN_JSON, ShardStats, shard_name

log = logging.getLogger("seediff")

# Rough encoded bytes per pixel, for the dry-run size estimate when nothing is committed yet.
IMAGE_BYTES_PER_PIXEL = {"jpg": 0.35, "png": 1.6, "webp": 0.25}
MASK_BYTES_PER_PIXEL = 0.03
TAR_BYTES_PER_SAMPLE = 5 * 768  # five members, each a 512-byte header plus half a block of padding on average


def plan_of(manifest: Manifest, config: RunConfig) -> Plan:
    return Plan(manifest.rows, config.seed, config.samples_per_shard)


# ---- dry run ------------------------------------------------------------------------------------------------------


def format_plan(manifest: Manifest, config: RunConfig, overwrite: bool) -> str:
    """What a run would do, read-only: shards, samples, done/todo, example keys and seeds, estimated bytes.
    Raises RunConfigMismatch exactly when the real run would be refused."""
    plan = plan_of(manifest, config)
    committed = {} if overwrite else read_committed_stats(config)
    record = None if overwrite else read_run_json(config.output_url)
    if record is not None:
        check_resume(record, config, manifest, f"{config.output_url}/{RUN_JSON}")
    todo = [i for i in range(plan.num_shards) if i not in committed]
    todo_samples = sum(len(plan.shard_range(i)) for i in todo)
    first, last = shard_name(config.shard_prefix, 0, config.shard_digits), shard_name(
        config.shard_prefix, max(plan.num_shards - 1, 0), config.shard_digits
    )
    lines = [
        f"manifest: {manifest.source} ({len(manifest.rows)} rows, {len(manifest.classes)} classes, "
        f"sha256 {manifest.sha256[:12]})",
        f"model: {config.model} (family {config.family}; {config.size[0]}x{config.size[1]} px; SeeDiff cascade at "
        f"depths {list(config.layers.cascade or [])} below the latent, seeds from "
        f"{'/'.join(config.layers.seed_blocks)} cross-attention)",
        f"plan: {plan.num_samples} samples in {plan.num_shards} shards of up to {config.samples_per_shard} "
        f"({first}.tar .. {last}.tar)",
        f"output: {config.output_url} ({'overwrite' if overwrite else 'resume' if record else 'new'})",
        f"done: {len(committed)} shards committed; to generate: {len(todo)} shards, {todo_samples} samples",
        "examples:",
    ]
    examples = sorted({i for i in (0, 1, 2, plan.num_samples - 1) if 0 <= i < plan.num_samples})  # never a set of all ids
    for sample_id in examples:
        spec = plan.sample(sample_id)
        classes = ", ".join(f"{c.name}={c.class_id}" for c in spec.classes)
        lines.append(
            f"  key {spec.key}  shard {sample_id // config.samples_per_shard}  classes {classes}  "
            f"seed {spec.seed}  prompt {spec.prompt.text!r}"
        )
    per_sample, basis = _bytes_per_sample(config, committed.values())
    lines.append(
        f"estimated output: {human_bytes(per_sample * plan.num_samples)} ({human_bytes(per_sample)} per sample, {basis})"
    )
    return "\n".join(lines)


def _bytes_per_sample(config: RunConfig, committed: Any) -> tuple[float, str]:
    stats = list(committed)
    count = sum(s.count for s in stats)
    if count:
        return sum(s.tar_bytes + s.parquet_bytes for s in stats) / count, "measured on the committed shards"
    width, height = config.size
    guess = width * height * (IMAGE_BYTES_PER_PIXEL[config.image_format] + MASK_BYTES_PER_PIXEL) + TAR_BYTES_PER_SAMPLE
    return guess, f"rough guess for {config.image_format} at {width}x{height} px"


# ---- the run ------------------------------------------------------------------------------------------------------


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the actors are stopped; the message says how many shards are committed."""


def run_generation(
    source: Manifest | ImageInput,
    config: RunConfig,
    runtime: RuntimeOptions,
    *,
    overwrite: bool = False,
    actor_class: type | None = None,
    stream: TextIO = sys.stderr,
) -> RunSummary:
    """Take the output lease, write or check run.json, remove leftovers, run the uncommitted shards on Ray
    (connecting if not yet connected), write sizes.json/dataset.json. ``source``: the manifest (generate) or the
    images to label (annotate, ``AnnotatePlan``); run.json records it. ``actor_class`` (a ShardActor subclass)
    defaults to ShardActor, built in the actor process (``ModelFreeShardActor``). Ctrl-C raises RunInterrupted once
    the actors are stopped."""
    plan = AnnotatePlan(source, config) if isinstance(source, ImageInput) else plan_of(source, config)
    committed: dict[int, ShardStats] = {}  # read once under the lease, then each shard as this run commits it
    try:
        with OutputLease(config.output_url, uuid.uuid4().hex[:12]) as lease:
            return _run_under_lease(source, config, runtime, plan, lease, overwrite, actor_class, stream, committed)
    except KeyboardInterrupt:
        done = len(committed or read_committed_stats(config))  # empty: not read yet, or nothing there (no GET)
        raise RunInterrupted(
            f"interrupted: {done} of {plan.num_shards} shards committed; run the same command to resume"
        ) from None


def _run_under_lease(
    source: Manifest | ImageInput, config: RunConfig, runtime: RuntimeOptions, plan: Plan, lease: OutputLease,
    overwrite: bool, actor_class: type | None, stream: TextIO, committed: dict[int, ShardStats],
) -> RunSummary:
    committed.update(prepare_output(config, source, overwrite))
    already = len(committed)
    removed = clean_leftovers(config, committed)
    if removed:
        log.info("removed %d leftover files of interrupted shards", len(removed))
    todo = [plan.shard(i) for i in range(plan.num_shards) if i not in committed]
    log.info("run %s: %d of %d shards already committed; generating %d",
             lease.run_id, len(committed), plan.num_shards, len(todo))

    from seediff.pipeline.dispatch import DispatchResult, Dispatcher, ShardRecord, shard_actor_pool  # Ray from here
    from seediff.pipeline.index import write_index
    from seediff.pipeline.progress import PartialCounts, Progress

    progress = Progress(plan.num_samples, plan.num_samples - sum(len(s) for s in todo), stream)
    try:
        if todo:
            import ray

            progress.phase("starting Ray")
            _connect_ray(runtime)
            counts = ray.remote(PartialCounts).options(num_cpus=0).remote()
            pool = shard_actor_pool(
                actor_class or ModelFreeShardActor, config, plan, runtime, _against_cluster(runtime),
                progress=counts, run_id=lease.run_id,
            )
            bind_device(config, {"kind": pool.device, "dtype": config.resolved_dtype(pool.device)},
                        runtime.allow_device_change, committed)
            actors = pool.size()
            loading = f"loading the model on {actors} actor{'s' if actors > 1 else ''}"
            progress.phase(loading)

            def shard_done(record: ShardRecord) -> None:
                if record.ok:
                    committed[record.shard_id] = ShardStats(**record.stats)
                counts.close.remote(record.shard_id)  # ordered before the next tick's total()
                progress.shard_done(record)

            def tick() -> None:
                lease.check()
                progress.phase("generating" if dispatcher.ready_actors else loading)
                progress.tick(ray.get(counts.total.remote()))

            dispatcher = Dispatcher(todo, pool.make_actor, pool.size, runtime, shard_done, tick)
            try:
                result = dispatcher.run()
            finally:
                ray.kill(counts)
        else:
            result = DispatchResult({}, 0.0)
        progress.phase("writing the index")
        index = write_index(config, plan.num_shards, committed)
    finally:
        progress.close()
    run_json = f"{config.output_url.rstrip('/')}/{RUN_JSON}"
    return RunSummary.from_dispatch(config.output_url, result, already, index, {"run_json": run_json})


def _against_cluster(runtime: RuntimeOptions) -> bool:
    """Connecting to an existing cluster (--address or RAY_ADDRESS, as under ``ray job submit``), not starting one.
    ``local`` is Ray's name for "start a new local cluster", whose GPUs are known at once: nothing to wait for."""
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


class ModelFreeShardActor:
    """The class the driver hands to ``ray.remote``: it builds seediff.workers.actor.ShardActor inside the actor
    process. Naming ShardActor itself would import torch, diffusers and transformers into the driver, which needs
    none of them: their import printed library warnings on the driver and their teardown at interpreter exit kept
    the command alive for seconds after the summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from seediff.workers.actor import ShardActor

        self.actor = ShardActor(*args, **kwargs)

    def generate_shard(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.actor.generate_shard(*args, **kwargs)


def _connect_ray(runtime: RuntimeOptions) -> None:
    """--address / RAY_ADDRESS (ray.init reads the variable itself) or a new local cluster; reused if connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=runtime.address)
