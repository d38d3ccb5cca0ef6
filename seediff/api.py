"""The Python API: every command of the ``seediff`` command line as a function, for notebooks, training scripts and
Ray jobs (the command line is a thin layer over these).

Bad input raises a subclass of ``InputError`` (``ManifestError`` naming ``file:line: field``, ``ConfigError``,
``RunConfigMismatch``, ``NotAnOutputError``) before any model loads or Ray starts. ``generate`` connects to the Ray
cluster the process is already connected to, else ``runtime.address`` / ``RAY_ADDRESS``, else starts a local one.

    import seediff
    summary = seediff.generate("classes.csv", "s3://bucket/run-001",
                               config=seediff.RunConfig(steps=30, resolution=512),
                               runtime=seediff.RuntimeOptions(num_actors=8))
    print(summary.samples_written, summary.bytes_written, summary.paths["dataset_json"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from seediff.pipeline import sources
from seediff.pipeline.kinds import ANNOTATE, kind_of, kind_of_input, manifest_of
from seediff.pipeline.plan import shard_count
from seediff.pipeline.resume import RunConfigMismatch, read_run_json
from seediff.pipeline.sources import ImageInput
from seediff.pipeline.summary import RunSummary
from seediff.pipeline.terminal import default_log_path, run_terminal
from seediff.pipeline.validate import check_run
from seediff.schemas.config import ConfigError, InputError, RunConfig, RuntimeOptions
from seediff.schemas.manifest import Manifest, ManifestError
from seediff.schemas.records import RUN_JSON
from seediff.storage import check_access
from seediff.workers import families
from seediff.workers.adapters import check_adapters, check_variant

__all__ = [
    "generate", "dry_run", "resume", "annotate", "inspect", "verify", "repair", "check", "preview", "report", "export",
    "evaluate",
    "InputError", "ManifestError", "ConfigError", "RunConfigMismatch", "NotAnOutputError", "RunSummary",
]


ANNOTATIONS_DIR = "annotations"  # evaluate: the annotate output under its out folder


class NotAnOutputError(InputError, FileNotFoundError):
    """The URL holds no seediff output (no ``run.json``)."""


def generate(
    manifest: str | os.PathLike[str] | Manifest,
    out: str | os.PathLike[str],
    config: RunConfig | Mapping[str, Any] | None = None,
    runtime: RuntimeOptions | Mapping[str, Any] | None = None,
    *,
    samples_per_class: int | None = None,
    classes: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: TextIO | None = None,
    verbose: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> RunSummary:
    """Generate (or resume) the dataset of ``manifest`` (a path/URL of a class table or scene table
    .csv/.tsv/.jsonl/.parquet/.txt, or a loaded ``Manifest``) under ``out`` (local path or fsspec URL).
    ``samples_per_class`` fills rows without a ``num_samples``; ``classes``: a class table fixing the class ids;
    ``prompts``: templates drawn per sample by class rows without a prompt; ``overwrite`` deletes this output's
    seediff files first. Progress goes to ``progress`` (default: the terminal's stderr); library warnings and Ray's
    messages go to ``log_file`` (default: a new file under the temp folder's seediff-logs/, named in the summary's
    ``paths["log"]``), or with ``verbose`` to the terminal. A local Ray started here is shut down before returning.
    Returns the run's ``RunSummary``; shards that still failed after their retries are in ``failed_shards``."""
    from seediff.pipeline.run import run_generation

    with quiet("generate", verbose, log_file, progress) as (stream, finished):
        run_config, manifest_ = _inputs(manifest, out, config, samples_per_class, classes, prompts)
        runtime_ = _runtime(runtime)
        check_run(run_config, runtime_, manifest_)
        return finished(run_generation(manifest_, run_config, runtime_, overwrite=overwrite, stream=stream))


def dry_run(
    manifest: str | os.PathLike[str] | Manifest | ImageInput,
    out: str | os.PathLike[str],
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    samples_per_class: int | None = None,
    classes: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> str:
    """What ``generate`` would do, as text (shards, samples, done/to do, example keys and seeds, estimated bytes);
    loads no model, starts no Ray, writes nothing. Raises ``RunConfigMismatch`` when ``generate`` would refuse.
    Also renders and tokenizes every distinct prompt template with only the model's tokenizer files: a labelled
    phrase that could fall past the text encoder's context is a ``ManifestError`` at its ``file:line``. With an
    ``ImageInput`` (``annotate_input``), what ``annotate`` would do."""
    from seediff.pipeline.run import format_plan

    run_config = kind_of_input(manifest).settled(_validated(RunConfig, config, "config"))
    run_config, source = _inputs(
        manifest, out, run_config, samples_per_class, classes, prompts, write=False, check_tokens=True
    )
    check_run(run_config, None, source)
    return format_plan(source, run_config, overwrite)


def resume(
    out: str | os.PathLike[str],
    runtime: RuntimeOptions | Mapping[str, Any] | None = None,
    *,
    progress: TextIO | None = None,
    verbose: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> RunSummary:
    """Continue the run recorded in ``out``'s ``run.json``: the same manifest (its recorded URL, checked against
    the recorded hash) and settings; only the runtime options may differ. Generates exactly the shards that are
    not committed, so a killed run resumed this way writes the same bytes as an uninterrupted one. Output as in
    ``generate``."""
    from seediff.pipeline.run import run_generation

    with quiet("resume", verbose, log_file, progress) as (stream, finished):
        run_config, recorded = recorded_inputs(out)
        runtime_ = _runtime(runtime)
        check_run(run_config, runtime_, recorded)
        check_access(run_config.output_url, write=True)
        check_adapters(run_config)  # still there, and the very files recorded
        return finished(run_generation(recorded, run_config, runtime_, stream=stream))


def recorded_inputs(out: str | os.PathLike[str]) -> tuple[RunConfig, Any]:
    """The run config and the input recorded in ``out``'s ``run.json`` (its kind's ``recorded_source``): the
    manifest, or an annotate run's input (``seediff.pipeline.sources.ImageInput``)."""
    url = absolute_url(out)
    check_access(url, write=False)  # credentials, bucket: one line, before anything reads
    record = read_run_json(url)
    source = f"{url}/{RUN_JSON}"
    if record is None:
        raise NotAnOutputError(f"{source}: missing; not a seediff output root")
    config = RunConfig.recorded(record, url, source)
    return config, kind_of(config).recorded_source(record, config, source)


def inspect(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts, failures by reason, bytes, classes and settings of an output (what ``seediff inspect --json``
    prints)."""
    from seediff.pipeline.review import inspect_dataset

    return inspect_dataset(_existing_output(out))


def verify(out: str | os.PathLike[str]) -> list[str]:
    """Check every shard against its stats, parquet, the plan and the index; returns the problems (empty: all good)."""
    return check(out).problems


def repair(out: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """``verify``, then un-commit exactly the committed shards whose own files are damaged (a checksum mismatch, a
    damaged parquet or stats file, a tar holding other samples, a missing file) and rewrite the index without them,
    under the output lease: readers stop reading them at once, and the next ``generate`` or ``resume`` regenerates
    them byte-identically. Returns (problems, the un-committed shard ids)."""
    found = check(out, repair=True)
    return found.problems, found.damaged


def check(out: str | os.PathLike[str], *, repair: bool = False, shown: int | None = None) -> Any:
    """What ``verify`` and ``repair`` do, as a ``seediff.pipeline.verify.Verification`` (counts per kind of problem,
    the findings of the first ``shown`` shards with problems, or all; the damaged shards)."""
    import uuid

    from seediff.pipeline.resume import OutputLease, uncommit
    from seediff.pipeline.verify import verify as verify_shards

    url = _existing_output(out)
    found = verify_shards(url, shown=shown)
    if repair and found.damaged:
        from seediff.pipeline.index import write_index

        config = RunConfig.recorded(read_run_json(url), url)
        with OutputLease(url, f"repair-{uuid.uuid4().hex[:8]}"):
            uncommit(config, found.damaged)
            write_index(config, found.num_shards)
    return found


def preview(
    out: str | os.PathLike[str], path: str | os.PathLike[str], *, n: int = 64, class_name: str | None = None,
    cell: int = 128,
) -> tuple[int, int]:
    """Write a PNG contact sheet of the first ``n`` samples (of ``class_name``) with their masks overlaid to
    ``path``; returns its (width, height)."""
    from seediff.pipeline.review import preview_grid

    return preview_grid(_existing_output(out), os.fspath(path), n=n, class_name=class_name, cell=cell)


def export(out: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None, *, layout: str = "voc",
           split: str = "train", quality: Any = None, verbose: bool = False,
           log_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write the output for a trainer; returns what was written. ``voc``: a folder layout segmentation trainers
    read, under ``directory`` (JPEGImages, SegmentationClass, ImageSets/Segmentation/<split>.txt, labelmap.txt).
    ``energon``: Megatron-Energon's index in place beside the tars (``.nv-meta/``: what ``energon prepare`` writes,
    a dataset.yaml with seediff's sample type); the samples a ``QualityFilter`` (``quality``) rejects are excluded.
    Library output as in ``generate``."""
    if layout == "energon":
        if directory is not None:
            raise ConfigError("DIR: the energon layout is written in place, beside the tars; give no DIR")
        try:
            from seediff.pipeline.energon import export_energon
        except ImportError as e:
            raise ConfigError(f"--layout energon needs megatron-energon (pip install 'seediff[energon]'): {e}") from e
        with quiet("export", verbose, log_file):
            return export_energon(_existing_output(out), quality)
    if layout != "voc":
        raise ConfigError(f"layout: {layout!r} is not one of: voc, energon")
    if directory is None:
        raise ConfigError("DIR: the voc layout needs a folder to write")
    if quality is not None:
        raise ConfigError("--quality: only with --layout energon")
    from seediff.pipeline.layouts import export_voc

    check_access(os.fspath(directory), write=True)
    with quiet("export", verbose, log_file):
        return export_voc(_existing_output(out), os.fspath(directory), split=split)


def annotate(
    input: str | os.PathLike[str] | ImageInput,
    out: str | os.PathLike[str],
    config: RunConfig | Mapping[str, Any] | None = None,
    runtime: RuntimeOptions | Mapping[str, Any] | None = None,
    *,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: TextIO | None = None,
    verbose: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> RunSummary:
    """Label the images of ``input`` (WebDataset tar URLs or brace pattern, a ``dataset.json``, a folder of images,
    or a ``.txt`` list of image paths/URLs) with ``classes`` (one vocabulary for every image) or per sample: when
    ``config.annotate.classes_field`` is set, the class names in each sample's ``json`` or, with ``classes`` as the
    table, the names its field's integers index (0 = the first); when ``config.annotate.caption_field`` is set, the
    phrases marked in its caption, which is its prompt. Shards under ``out`` like ``generate`` (resumable, indexed,
    verifiable). Returns the run's ``RunSummary``. Output as in ``generate``."""
    from seediff.pipeline.run import run_generation

    with quiet("annotate", verbose, log_file, progress) as (stream, finished):
        run_config, runtime_ = annotate_config(config, out), _runtime(runtime)
        image_input = annotate_input(input, run_config, classes) if isinstance(input, (str, os.PathLike)) else input
        run_config, _ = _inputs(image_input, out, run_config, None)
        check_run(run_config, runtime_, image_input)
        return finished(run_generation(image_input, run_config, runtime_, overwrite=overwrite, stream=stream))


def evaluate(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str,
    config: RunConfig | Mapping[str, Any] | None = None,
    runtime: RuntimeOptions | Mapping[str, Any] | None = None,
    predictions: str | os.PathLike[str] | None = None,
    split: str | None = None,
    classes_file: str | None = None,
    progress: TextIO | None = None,
    verbose: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], str]:
    """Measure mask quality on the labelled dataset at ``root`` (``voc`` or ``labels`` layout): annotate its images
    under ``out/annotations`` with each image's ground-truth classes (the "known classes" protocol), with
    ``config``'s model and settings, plus plain cross-attention label maps; then score both against the ground
    truth (mIoU, pixel accuracy, ignore fraction, per-class IoU) into ``out/metrics.json``. ``predictions``: score
    that output root instead, without running a model. Returns the metrics and the path of metrics.json. Output as
    in ``generate``."""
    with quiet("eval", verbose, log_file, progress) as (stream, _):
        return _evaluate(root, out, layout, config, runtime, predictions, split, classes_file, stream)


def _evaluate(root: str | os.PathLike[str], out: str | os.PathLike[str], layout: str,
              config: RunConfig | Mapping[str, Any] | None, runtime: RuntimeOptions | Mapping[str, Any] | None,
              predictions: str | os.PathLike[str] | None, split: str | None, classes_file: str | None,
              progress: TextIO) -> tuple[dict[str, Any], str]:
    from seediff.pipeline.evaluate import known_classes, score_predictions, write_report
    from seediff.pipeline.layouts import open_labelled_dataset

    dataset = open_labelled_dataset(os.fspath(root), layout, split=split, classes_file=classes_file)
    out_url = absolute_url(out)
    background_only: list[str] = []
    if predictions is None:
        run_config = annotate_config(config, f"{out_url.rstrip('/')}/{ANNOTATIONS_DIR}")
        run_config, _ = resolve_model(run_config.model_copy(
            update={"annotate": run_config.annotate.model_copy(update={"cross_attention_labels": True})}
        ))
        units, background_only = known_classes(dataset)
        image_input = ImageInput(dataset.root, tuple(units), dataset.class_names[1:])
        runtime_ = _runtime(runtime)
        check_run(run_config, runtime_, image_input)
        from seediff.pipeline.run import run_generation

        if units:
            summary = run_generation(image_input, run_config, runtime_, stream=progress)
            if not summary.ok:
                raise RuntimeError(f"annotating {dataset.root} failed: {summary.format()}")
        predictions = run_config.output_url if units else None  # every image background-only: nothing to read
    metrics = score_predictions(dataset, None if predictions is None else os.fspath(predictions), background_only)
    return metrics, write_report(metrics, out_url)


def annotate_config(config: RunConfig | Mapping[str, Any] | None, out: str | os.PathLike[str]) -> RunConfig:
    """``config`` for an annotate run writing to ``out``: its ``annotate`` settings default to ``AnnotateConfig()``."""
    return ANNOTATE.settled(_validated(RunConfig, config, "config")).model_copy(update={"output_url": absolute_url(out)})


def annotate_input(input: str | os.PathLike[str], config: RunConfig, classes: Sequence[str] | None) -> ImageInput:
    """The images of INPUT and the run's classes (``classes``, ``config.annotate.classes_field`` or
    ``caption_field``); reads tars only when their sample counts or classes require it. Raises an ``InputError``
    naming the file (and the sample and field)."""
    source = os.fspath(input)
    return sources.annotate_input(source if "://" in source else absolute_url(source), config, classes)


def report(out: str | os.PathLike[str], path: str | os.PathLike[str], *, verbose: bool = False,
           log_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write one self-contained HTML page about the output to ``path``: per-class counts and failure reasons,
    distributions of mask area, seeds, ignore fraction and confidence, the weakest and strongest samples of each
    class, the run settings. Returns what it covered (classes, samples, failures, bytes). Library output as in
    ``generate``."""
    from seediff.pipeline.report import write_report_page

    url = _existing_output(out)
    with quiet("report", verbose, log_file):
        return write_report_page(url, os.fspath(path))


# ---- inputs -------------------------------------------------------------------------------------------------------


def resolve_model(config: RunConfig) -> tuple[RunConfig, families.Recognised]:
    """The config with the model's family, size and layers filled in (workers/families.py) and its LoRA adapters
    checked against the model, their sha256 recorded (workers/adapters.py): headers only, before any weights load."""
    resolved, recognised = families.resolve(config)
    check_variant(resolved)
    return check_adapters(resolved), recognised


def absolute_url(url: str | os.PathLike[str]) -> str:
    """Ray workers do not share the driver's working directory, and ``run.json`` must name the manifest so that a
    resume from anywhere finds it: a relative local path is made absolute."""
    url = os.fspath(url)
    return url if "://" in url else os.path.abspath(url)


def _inputs(
    manifest: str | os.PathLike[str] | Manifest | ImageInput,
    out: str | os.PathLike[str],
    config: RunConfig | Mapping[str, Any] | None,
    samples_per_class: int | None,
    classes: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    write: bool = True,
    check_tokens: bool = False,
) -> tuple[RunConfig, Manifest | ImageInput]:
    """Validated settings and the run's input (a manifest loaded from its path here, or a loaded one; annotate's
    opened ``ImageInput``); the output's store checked for credentials, bucket and (``write``) write permission, the
    manifest's for reading; a plan whose shard numbers overflow ``shard_digits`` refused."""
    run_config = _validated(RunConfig, config, "config").model_copy(update={"output_url": absolute_url(out)})
    check_access(run_config.output_url, write=write)
    given_path = isinstance(manifest, (str, os.PathLike))  # else a loaded manifest, or annotate's opened input
    if given_path:  # a missing manifest is reported as such, before the model is looked up
        check_access(absolute_url(manifest), write=False)
        _check_found(absolute_url(manifest))
    # the model's family, size and layers, from its config files: an unsupported model or size fails here
    run_config, _ = resolve_model(run_config)
    if given_path:
        manifest = manifest_of(absolute_url(manifest), run_config, samples_per_class,
                               None if classes is None else absolute_url(classes),
                               None if prompts is None else absolute_url(prompts), check_tokens)
    _check_shard_digits(manifest, run_config)
    return run_config, manifest


def _check_shard_digits(manifest: Manifest | ImageInput, config: RunConfig) -> None:
    shards = shard_count(manifest.num_samples, config.samples_per_shard)
    if shards > 10**config.shard_digits:
        raise ConfigError(
            f"--shard-digits: {config.shard_digits} digits number at most {10**config.shard_digits} shards, the plan "
            f"has {shards}; raise --shard-digits or --samples-per-shard"
        )


def _check_found(manifest_url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(manifest_url)
    if not fs.exists(path):
        raise ManifestError(f"{manifest_url}: manifest file not found")


@contextlib.contextmanager
def quiet(command: str, verbose: bool, log_file: str | os.PathLike[str] | None,
          progress: TextIO | None = None) -> Iterator[tuple[TextIO, Callable[[RunSummary], RunSummary]]]:
    """A command's output: library warnings, Ray's messages and the actors' stderr in ``log_file`` (default: a new
    file, ``default_log_path``) or, with ``verbose``, on the terminal (pipeline/terminal.py; inside the command
    line's own terminal, that one). Yields the stream for seediff's progress (``progress``, default the terminal)
    and ``finished(summary)``: the summary with the wall time of the whole call (validation and starting Ray
    included) and the log file among its paths. A local Ray started inside is shut down on the way out."""
    started = time.monotonic()
    with run_terminal(verbose, os.fspath(log_file) if log_file else default_log_path(command)) as terminal:

        def finished(summary: RunSummary) -> RunSummary:
            paths = {**summary.paths, **({"log": terminal.log_path} if terminal.log_path else {})}
            return dataclasses.replace(summary, wall_s=time.monotonic() - started, paths=paths)

        connected_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        try:
            yield progress or terminal.stream, finished
        finally:
            if not connected_before and "ray" in sys.modules:
                try:
                    sys.modules["ray"].shutdown()
                except KeyboardInterrupt:  # a second Ctrl-C while Ray stops: the data and index are written
                    pass


def _runtime(runtime: RuntimeOptions | Mapping[str, Any] | None) -> RuntimeOptions:
    return _validated(RuntimeOptions, runtime, "runtime")


def _validated(model: type, value: Any, source: str) -> Any:
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if isinstance(value, Mapping):
        return model.from_mapping(dict(value), source)
    raise ConfigError(f"{source}: expected {model.__name__} or a mapping, got {type(value).__name__}")


def _existing_output(out: str | os.PathLike[str]) -> str:
    url = os.fspath(out)
    check_access(url, write=False)  # credentials, bucket: one line, before anything reads
    if read_run_json(url) is None:
        raise NotAnOutputError(f"{url.rstrip('/')}/{RUN_JSON}: missing; not a seediff output root")
    return url
