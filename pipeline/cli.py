"""The ``seediff`` command line: ``generate`` (validate, plan, resume, dispatch on Ray, index, summary) and the
read-only ``inspect`` / ``preview`` / ``verify`` (pipeline/review.py). Also the entrypoint of ``ray job submit``
(``python -m seediff generate ...``).

Input is checked before anything heavy: a bad manifest, config file or resume setting exits 2 with one message,
without loading a model or starting Ray; ``--dry-run`` stops after printing the plan. Ray and the model code are
imported only once a real run starts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import (
    RunConfigMismatch,
    clean_leftovers,
    prepare_output,
    read_committed_stats,
    check_resume,
    read_run_json,
)
from seediff.schemas.config import TINY_MODEL, ConfigError, RunConfig, RuntimeOptions, load_config_file, merge_settings
from seediff.schemas.manifest import Manifest, ManifestError, load_manifest
from seediff.schemas.records import RUN_JSON, shard_name

log = logging.getLogger("seediff")

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2
TINY_NOTE = (
    "note: --model tiny is a miniature Stable Diffusion with random weights: its images and masks are meaningless "
    "and only exercise the pipeline"
)
# Rough encoded bytes per pixel, for the dry-run size estimate when nothing is committed yet.
IMAGE_BYTES_PER_PIXEL = {"jpg": 0.35, "png": 1.6, "webp": 0.25}
MASK_BYTES_PER_PIXEL = 0.03
TAR_BYTES_PER_SAMPLE = 5 * 768  # five members, each a 512-byte header plus half a block of padding on average


# ---- settings -----------------------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> tuple[RunConfig, RuntimeOptions, int | None]:
    """Config file (if any) overridden by flags -> (RunConfig, RuntimeOptions, samples_per_class). The file may hold
    keys of both models plus ``samples_per_class``; an unknown key is an error naming the file and the key."""
    source = args.config or "command line"
    flags = {
        "output_url": _absolute_if_local(args.out),
        "model": args.model,
        "revision": args.revision,
        "samples_per_class": args.samples_per_class,
        "samples_per_shard": args.samples_per_shard,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "resolution": args.resolution,
        "seed": args.seed,
        "num_actors": args.num_actors,
        "device": args.device,
        "address": args.address,
        "max_attempts": args.max_attempts,
        "shard_timeout_s": args.shard_timeout,
        "shards_in_flight_per_actor": args.shards_in_flight,
        "encode_threads": args.encode_threads,
    }
    merged = merge_settings(load_config_file(args.config) if args.config else {}, flags)
    samples_per_class = merged.pop("samples_per_class", None)
    runtime_part = {k: v for k, v in merged.items() if k in RuntimeOptions.model_fields}
    run_part = {k: v for k, v in merged.items() if k not in RuntimeOptions.model_fields}
    return RunConfig.from_mapping(run_part, source), RuntimeOptions.from_mapping(runtime_part, source), samples_per_class


def _absolute_if_local(url: str) -> str:
    """Ray workers do not share the driver's working directory, so a relative local path is made absolute here."""
    return url if "://" in url else os.path.abspath(url)


# ---- dry run ------------------------------------------------------------------------------------------------------


def format_plan(plan: Plan, config: RunConfig, manifest: Manifest, overwrite: bool) -> str:
    """What a run would do, read-only: shards, samples, done/todo, example keys and seeds, estimated bytes.
    Raises RunConfigMismatch exactly when the real run would be refused."""
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
        f"manifest: {manifest.source} ({len(manifest.rows)} classes, sha256 {manifest.sha256[:12]})",
        f"plan: {plan.num_samples} samples in {plan.num_shards} shards of up to {config.samples_per_shard} "
        f"({first}.tar .. {last}.tar)",
        f"output: {config.output_url} ({'overwrite' if overwrite else 'resume' if record else 'new'})",
        f"done: {len(committed)} shards committed; to generate: {len(todo)} shards, {todo_samples} samples",
        "examples:",
    ]
    examples = sorted({0, 1, 2, plan.num_samples - 1} & set(range(plan.num_samples)))
    for sample_id in examples:
        spec = plan.sample(sample_id)
        lines.append(
            f"  key {spec.key}  shard {sample_id // config.samples_per_shard}  class {spec.row.class_name!r}  "
            f"seed {spec.seed}  prompt {spec.row.prompt!r}"
        )
    per_sample, basis = _bytes_per_sample(config, committed.values())
    lines.append(f"estimated output: {per_sample * plan.num_samples / 1e6:.1f} MB ({per_sample / 1e3:.1f} KB per sample, {basis})")
    return "\n".join(lines)


def _bytes_per_sample(config: RunConfig, committed: Any) -> tuple[float, str]:
    stats = list(committed)
    count = sum(s.count for s in stats)
    if count:
        return sum(s.tar_bytes + s.parquet_bytes for s in stats) / count, "measured on the committed shards"
    pixels = config.resolution**2
    guess = pixels * (IMAGE_BYTES_PER_PIXEL[config.image_format] + MASK_BYTES_PER_PIXEL) + TAR_BYTES_PER_SAMPLE
    return guess, f"rough guess for {config.image_format} at {config.resolution}px"


# ---- the run ------------------------------------------------------------------------------------------------------


@dataclass
class GenerateOutcome:
    result: Any  # seediff.pipeline.dispatch.DispatchResult
    index: dict[str, Any]
    skipped_shards: int

    @property
    def ok(self) -> bool:
        return not self.result.failed


def generate(
    manifest: Manifest,
    config: RunConfig,
    runtime: RuntimeOptions,
    *,
    overwrite: bool = False,
    actor_class: type | None = None,
    stream: TextIO = sys.stderr,
) -> GenerateOutcome:
    """Write or check run.json, remove leftovers, generate the uncommitted shards on Ray (connecting if not yet
    connected), write sizes.json/dataset.json. ``actor_class`` defaults to seediff.workers.actor.ShardActor."""
    plan = Plan(manifest.rows, config.seed, config.samples_per_shard)
    prepare_output(config, manifest, overwrite)
    committed = read_committed_stats(config)
    removed = clean_leftovers(config, committed)
    if removed:
        log.info("removed %d leftover files of interrupted shards", len(removed))
    todo = [plan.shard(i) for i in range(plan.num_shards) if i not in committed]
    log.info("%d of %d shards already committed; generating %d", len(committed), plan.num_shards, len(todo))

    from seediff.pipeline.dispatch import DispatchResult, Dispatcher, ShardRecord  # Ray only from here on
    from seediff.pipeline.index import write_index
    from seediff.pipeline.progress import PartialCounts, Progress

    if todo:
        import ray

        _connect_ray(runtime)
        counts = ray.remote(PartialCounts).options(num_cpus=0).remote()
        make_actor, num_actors = _actor_factory(actor_class, config, runtime, counts)
        progress = Progress(plan.num_samples, plan.num_samples - sum(len(s) for s in todo), stream)

        def shard_done(record: ShardRecord) -> None:
            counts.close.remote(record.shard_id)  # ordered before the next tick's total()
            progress.shard_done(record)

        try:
            result = Dispatcher(
                todo, make_actor, num_actors, runtime, shard_done, lambda: progress.tick(ray.get(counts.total.remote()))
            ).run()
        finally:
            progress.close()
            ray.kill(counts)
    else:
        result = DispatchResult({}, 0.0)
    return GenerateOutcome(result, write_index(config, plan.num_shards), len(committed))


def _actor_factory(
    actor_class: type | None, config: RunConfig, runtime: RuntimeOptions, progress: Any
) -> tuple[Callable[[], Any], int]:
    """One GPU actor per GPU in the cluster by default; without GPUs (or with --device cpu) ``num_actors`` CPU
    actors (default 1), each with one torch thread."""
    import ray

    from seediff.workers.actor import ShardActor

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    use_gpu = runtime.device == "cuda" or (runtime.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError("device: cuda requested, but the Ray cluster has no GPUs")
    num_actors = runtime.num_actors or (gpus if use_gpu else 1)
    if not use_gpu and num_actors > cpus:
        log.warning("%d CPU actors requested but the cluster has %d CPUs; the rest wait for resources", num_actors, cpus)
    actor_runtime = runtime.model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    # CPU float results depend on the intra-op thread count; one thread per CPU actor keeps the bytes independent
    # of how many actors run (a runtime option), and CPU throughput scales with --num-actors instead.
    torch_threads = None if use_gpu else 1
    remote = ray.remote(actor_class or ShardActor).options(
        num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=0, max_task_retries=0
    )
    log.info("%d %s actors (ray %s)", num_actors, "GPU" if use_gpu else "CPU", ray.get_runtime_context().gcs_address)
    return (lambda: remote.remote(config, actor_runtime, torch_threads, progress)), num_actors


def _connect_ray(runtime: RuntimeOptions) -> None:
    """--address / RAY_ADDRESS (ray.init reads the variable itself) or a new local cluster; reused if connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=runtime.address)


def cmd_generate(args: argparse.Namespace) -> int:
    config, runtime, samples_per_class = settings(args)
    manifest = load_manifest(args.manifest, samples_per_class=samples_per_class, prompt_template=config.prompt_template)
    if config.model == TINY_MODEL:
        print(TINY_NOTE, file=sys.stderr)
    if args.dry_run:
        plan = Plan(manifest.rows, config.seed, config.samples_per_shard)
        print(format_plan(plan, config, manifest, args.overwrite))
        return EXIT_OK
    from seediff.pipeline.dispatch import DispatchError
    from seediff.pipeline.progress import format_summary

    try:
        outcome = generate(manifest, config, runtime, overwrite=args.overwrite)
    except DispatchError as e:
        print(f"seediff: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(outcome.result, outcome.skipped_shards, outcome.index))
    return EXIT_OK if outcome.ok else EXIT_FAILED


# ---- review commands ----------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from seediff.pipeline.review import format_inspection, inspect_dataset

    info = inspect_dataset(args.url)
    print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json else format_inspection(info))
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    from seediff.pipeline.review import preview_grid

    width, height = preview_grid(args.url, args.out, n=args.n, class_name=args.class_name, cell=args.cell)
    print(f"wrote {args.out} ({width}x{height})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from seediff.pipeline.review import verify_dataset

    problems = verify_dataset(args.url)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problems" if problems else "OK: every shard is complete and matches the index")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from seediff.pipeline.layouts import export_voc

    summary = export_voc(args.url, args.directory, split=args.split)
    print(f"wrote {summary['images']} images in the {args.layout} layout to {args.directory} "
          f"({len(summary['classes'])} classes, image set {args.split})")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from seediff.pipeline.evaluate import format_report, score_predictions, write_report
    from seediff.pipeline.layouts import open_labelled_dataset

    dataset = open_labelled_dataset(args.root, args.layout, split=args.split, classes_file=args.classes_file)
    report = score_predictions(dataset, args.predictions)
    path = write_report(report, _absolute_if_local(args.out))
    print(format_report(report))
    print(f"wrote {path}")
    return EXIT_OK


# ---- parser -------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seediff", description="Generate image + mask datasets as WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate (or resume) a dataset")
    gen.set_defaults(func=cmd_generate)
    gen.add_argument("manifest", help="classes to generate: .csv/.tsv/.jsonl/.parquet/.txt, local path or URL")
    gen.add_argument("--out", required=True, help="output root: local path, s3://..., gs://...")
    gen.add_argument("--config", help="YAML/JSON file with run settings and runtime options; flags override it")
    gen.add_argument("--model", help="hub id, local path, or 'tiny' (offline random-weight demo model)")
    gen.add_argument("--revision", help="model revision (branch, tag or commit)")
    gen.add_argument("--samples-per-class", type=int, help="for manifests without a num_samples column")
    gen.add_argument("--samples-per-shard", type=int)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--resolution", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-actors", type=int, help="default: one per GPU, or 1 CPU actor without GPUs")
    gen.add_argument("--device", choices=["auto", "cuda", "cpu"])
    gen.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    gen.add_argument("--max-attempts", type=int, help="attempts per shard across actors (default 3)")
    gen.add_argument("--shard-timeout", type=float, help="seconds a shard may run before its actor is replaced")
    gen.add_argument("--shards-in-flight", type=int, help="shards queued per actor (default 2)")
    gen.add_argument("--encode-threads", type=int, help="image encoding threads per actor (default 2)")
    gen.add_argument("--overwrite", action="store_true", help="delete this output's seediff files and start over")
    gen.add_argument("--dry-run", action="store_true", help="validate and print the plan; no model, no Ray")

    ins = sub.add_parser("inspect", help="summarise an output: classes, failures, bytes, settings")
    ins.set_defaults(func=cmd_inspect)
    ins.add_argument("url")
    ins.add_argument("--json", action="store_true", help="print the raw summary as JSON")

    pre = sub.add_parser("preview", help="write a PNG contact sheet of images with their masks")
    pre.set_defaults(func=cmd_preview)
    pre.add_argument("url")
    pre.add_argument("-o", "--out", required=True, help="PNG path or URL to write")
    pre.add_argument("-n", "--n", type=int, default=64, help="number of samples")
    pre.add_argument("--class", dest="class_name", help="only this class")
    pre.add_argument("--cell", type=int, default=128, help="cell size in pixels")

    ver = sub.add_parser("verify", help="check every shard against its stats, parquet and the index")
    ver.set_defaults(func=cmd_verify)
    ver.add_argument("url")

    exp = sub.add_parser("export", help="write an output root as a folder layout segmentation trainers read")
    exp.set_defaults(func=cmd_export)
    exp.add_argument("url", metavar="OUT_ROOT", help="output root of generate or annotate")
    exp.add_argument("directory", metavar="DIR", help="folder (or URL) to write")
    exp.add_argument("--layout", choices=["voc"], required=True, help="voc: JPEGImages, SegmentationClass, ...")
    exp.add_argument("--split", default="train", help="name of the image-set list (default train)")

    ev = sub.add_parser("eval", help="score label maps on a labelled dataset: mIoU, pixel accuracy, ...")
    ev.set_defaults(func=cmd_eval)
    ev.add_argument("root", metavar="ROOT", help="labelled dataset folder or URL")
    ev.add_argument("--layout", choices=["voc", "labels"], required=True)
    ev.add_argument("--out", required=True, help="folder (or URL) for metrics.json")
    ev.add_argument("--split", help="VOC image set (default: val, or the only list)")
    ev.add_argument("--classes-file", help="class list, one name per line (line number = label value)")
    ev.add_argument("--predictions", required=True, help="output root whose sample keys are the image ids")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGPIPE"):  # `seediff inspect out | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ManifestError, ConfigError, RunConfigMismatch, FileNotFoundError) as e:
        print(f"seediff: error: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
