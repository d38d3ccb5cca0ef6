"""A generation run on the driver, after its inputs are valid: write or check ``run.json``, remove what interrupted
shards left, start (or connect to) Ray, run the uncommitted shards on actors, write the index, summarise; and the
dry run's plan description. Ray and the model code are imported only once a real run starts."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import uuid
from typing import Any, TextIO

from seediff.pipeline.kinds import kind_of
from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import (
    OutputLease,
    bind_device,
    check_output_folder,
    check_resume,
    clean_leftovers,
    prepare_output,
    read_committed_stats,
    read_run_json,
    remove_temp_files,
)
from seediff.pipeline.sources import ImageInput
from seediff.pipeline.summary import RunSummary, human_bytes
from seediff.schemas.config import RunConfig, RuntimeOptions
from seediff.schemas.manifest import Manifest
from seediff.schemas.records import RUN_JSON, ShardStats, shard_name

log = logging.getLogger("seediff")

# The dry run's size estimate before anything is committed, measured on the tiny model at 64, 256 and 512 px (one
# class per sample, quality 95; bench/RESULTS.md): encoded image bytes per pixel; the label map's PNG grows with the
# boundary, about 0.7 x pixels^0.75; the json record; the tar's five 512-byte member headers and padding (the small
# txt and cls fields pad to a whole block); a parquet row. Per shard: the tar's end blocks and 10 KiB record padding
# (half on average), the parquet's schema and footer.
IMAGE_BYTES_PER_PIXEL = {"jpg": 0.8, "png": 2.4, "webp": 0.67}
MASK_BYTES_FACTOR, MASK_BYTES_EXPONENT = 0.7, 0.75
RECORD_BYTES_PER_SAMPLE = 1300 + 5 * 512 + 1700 + 160  # json + tar headers + padding + parquet row
BYTES_PER_SHARD = 1024 + 5120 + 9700


# ---- dry run ------------------------------------------------------------------------------------------------------


def format_plan(source: Manifest | ImageInput, config: RunConfig, overwrite: bool) -> str:
    """What a run would do, read-only: shards, samples, done/todo, example keys and seeds (a manifest's), estimated
    bytes. ``source``: the manifest, or annotate's images. Raises RunConfigMismatch exactly when the real run would
    be refused."""
    kind = kind_of(config)
    plan = kind.plan(source, config)
    check_output_folder(config, overwrite)
    committed = {} if overwrite else read_committed_stats(config)
    record = None if overwrite else read_run_json(config.output_url)
    if record is not None:
        check_resume(record, config, source, f"{config.output_url}/{RUN_JSON}")
    done = [i for i in committed if i < plan.num_shards]  # O(committed), never a list of every planned shard
    todo_shards = plan.num_shards - len(done)
    todo_samples = plan.num_samples - sum(len(plan.shard_range(i)) for i in done)
    first, last = shard_name(config.shard_prefix, 0, config.shard_digits), shard_name(
        config.shard_prefix, max(plan.num_shards - 1, 0), config.shard_digits
    )
    lines = [
        kind.describe(source),
        f"model: {config.model} (family {config.family}; {config.size[0]}x{config.size[1]} px; SeeDiff cascade at "
        + (f"depths {list(config.layers.cascade or [])} below the image-token grid, seeds from blocks "
           f"{list(config.layers.cross_blocks)}, expansion by block {config.layers.self_block})"
           if config.layers.cross_blocks is not None else
           f"depths {list(config.layers.cascade or [])} below the latent, seeds from "
           f"{'/'.join(config.layers.seed_blocks)} cross-attention)"),
        *(f"lora: {a.path} at weight {a.weight:g} (sha256 {(a.sha256 or '?')[:12]})" for a in config.lora),
        f"plan: {plan.num_samples} samples in {plan.num_shards} shards of up to {config.samples_per_shard} "
        f"({first}.tar .. {last}.tar)",
        f"output: {config.output_url} ({'overwrite' if overwrite else 'resume' if record else 'new'})",
        f"done: {len(committed)} shards committed; to generate: {todo_shards} shards, {todo_samples} samples",
    ]
    examples = plan.example_ids()
    lines += ["examples:"] if examples else []
    for sample_id in examples:
        spec = plan.sample(sample_id)
        classes = ", ".join(f"{c.name}={c.class_id}" for c in spec.classes)
        lines.append(
            f"  key {spec.key}  shard {plan.shard_of(sample_id)}  classes {classes}  "
            f"seed {spec.seed}  prompt {spec.prompt.text!r}"
        )
    per_sample, basis = _bytes_per_sample(config, committed.values(), plan.num_shards / max(plan.num_samples, 1))
    lines.append(
        f"estimated output: {human_bytes(per_sample * plan.num_samples)} ({human_bytes(per_sample)} per sample, {basis})"
    )
    return "\n".join(lines)


def _bytes_per_sample(config: RunConfig, committed: Any, shards_per_sample: float) -> tuple[float, str]:
    stats = list(committed)
    count = sum(s.count for s in stats)
    if count:
        return sum(s.tar_bytes + s.parquet_bytes for s in stats) / count, "measured on the committed shards"
    width, height = config.size
    pixels = width * height
    guess = (pixels * IMAGE_BYTES_PER_PIXEL[config.image_format] + MASK_BYTES_FACTOR * pixels**MASK_BYTES_EXPONENT
             + RECORD_BYTES_PER_SAMPLE + BYTES_PER_SHARD * shards_per_sample)
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
    plan = kind_of(config).plan(source, config)
    committed: dict[int, ShardStats] = {}  # read once under the lease, then each shard as this run commits it
    check_output_folder(config, overwrite)  # before the lease touches the folder; again under it
    try:
        with OutputLease(config.output_url, uuid.uuid4().hex[:12]) as lease:
            return _run_under_lease(source, config, runtime, plan, lease, overwrite, actor_class, stream, committed)
    except KeyboardInterrupt:
        # read again: an actor may have committed a shard whose result the driver had not received yet
        done = len(read_committed_stats(config))
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
                remove_temp_files(config)  # the actors are stopped: what one killed mid-shard left goes
        else:
            result = DispatchResult({}, 0.0)
        progress.phase("writing the index")
        index = write_index(config, plan.num_shards, committed)
    finally:
        progress.close()
    run_json = f"{config.output_url.rstrip('/')}/{RUN_JSON}"
    return RunSummary.from_dispatch(config.output_url, result, already, index, {"run_json": run_json},
                                    runtime.max_failed_fraction)


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
        on_term = signal.getsignal(signal.SIGTERM)
        ray.init(address=runtime.address)
        if threading.current_thread() is threading.main_thread() and on_term is not None:
            signal.signal(signal.SIGTERM, on_term)  # Ray's own exits at once: no lease release, no message
