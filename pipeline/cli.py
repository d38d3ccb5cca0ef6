"""The ``seediff`` command line, a thin layer over the Python API (seediff/api.py): ``generate``, ``annotate``,
``resume``, the read-only ``inspect`` / ``preview`` / ``verify`` / ``report``, and ``export`` / ``eval``. Also the
entrypoint of ``ray job submit`` (``python -m seediff generate ...``).

Every run setting and runtime option is a flag generated from the settings models (pipeline/flags.py); a config file
may hold the same keys, and flags override it. Input is checked before anything heavy: a bad manifest, config file,
flag or resume setting exits 2 with one message naming where the user wrote it, without loading a model or starting
Ray; ``--dry-run`` stops after printing the plan."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from seediff import api
from seediff.pipeline.flags import HelpFormatter, add_flags, given
from seediff.pipeline.sources import class_list
from seediff.pipeline.summary import RunSummary, human_bytes
from seediff.pipeline.terminal import default_log_path, run_terminal
from seediff.schemas.config import (
    TINY_MODEL,
    AnnotateConfig,
    ConfigError,
    InputError,
    MaskConfig,
    RetryLater,
    RunConfig,
    RuntimeOptions,
    config_file_keys,
    load_config_file,
    merge_settings,
)


EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_RETRY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # how Kubernetes, Slurm and a closed terminal stop a job: handled like Ctrl-C
SHOWN_SHARDS = 20  # verify: shards whose problems are printed in full without --all
TINY_NOTE = (
    "note: --model tiny is a miniature Stable Diffusion with random weights: its images and masks are meaningless "
    "and only exercise the pipeline"
)
# Keys a config file may hold besides the models' fields; each is also a flag of its own.
MANIFEST_KEYS = {"samples_per_class": "--samples-per-class"}


# ---- settings -----------------------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> tuple[RunConfig, RuntimeOptions, int | None]:
    """Config file (if any) overridden by flags -> (RunConfig, RuntimeOptions, samples_per_class). The file may hold
    keys of both models plus ``samples_per_class``; an error names the flag, or the file, line and key."""
    file_data = load_config_file(args.config) if args.config else {}
    written_as = config_file_keys(args.config) if args.config else {}
    flag_values, flag_names = given(args, args.flags)
    written_as.update(flag_names)
    if getattr(args, "timestep", None):  # annotate/eval: a repeatable flag of its own
        flag_values.setdefault("annotate", {})["timesteps"] = args.timestep
        written_as["annotate.timesteps"] = "--timestep"
    if getattr(args, "samples_per_class", None) is not None:
        flag_values["samples_per_class"] = args.samples_per_class
        written_as["samples_per_class"] = MANIFEST_KEYS["samples_per_class"]
    merged = merge_settings(file_data, flag_values)
    samples_per_class = merged.pop("samples_per_class", None)
    if samples_per_class is not None and not isinstance(samples_per_class, int):
        raise InputError(f"{written_as['samples_per_class']}: must be an integer (got {samples_per_class!r})")
    runtime_part = {k: v for k, v in merged.items() if k in RuntimeOptions.model_fields}
    run_part = {k: v for k, v in merged.items() if k not in RuntimeOptions.model_fields}
    run_part["output_url"] = api.absolute_url(args.out)
    source = args.config or "command line"
    problems, built = [], []
    for model, part in ((RunConfig, run_part), (RuntimeOptions, runtime_part)):
        try:
            built.append(model.from_mapping(part, source, written_as))
        except ConfigError as e:  # report the problems of both models at once
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    return built[0], built[1], samples_per_class


def runtime_settings(args: argparse.Namespace) -> RuntimeOptions:
    """``resume``: the runtime options from a config file (runtime keys only) and flags."""
    file_data = load_config_file(args.config) if args.config else {}
    written_as = config_file_keys(args.config) if args.config else {}
    flag_values, flag_names = given(args, args.flags)
    written_as.update(flag_names)
    return RuntimeOptions.from_mapping(merge_settings(file_data, flag_values), args.config or "command line", written_as)


# ---- run commands -------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    config, runtime, samples_per_class = settings(args)
    if args.dry_run:
        if config.model == TINY_MODEL:
            print(TINY_NOTE, file=sys.stderr)
        print(api.dry_run(args.manifest, args.out, config, samples_per_class=samples_per_class,
                          classes=args.classes, prompts=args.prompts, overwrite=args.overwrite))
        return EXIT_OK
    return _run(args, lambda terminal: api.generate(
        args.manifest, args.out, config, runtime, samples_per_class=samples_per_class, classes=args.classes,
        prompts=args.prompts, overwrite=args.overwrite,
        progress=terminal,
    ), tiny=config.model == TINY_MODEL)


def cmd_annotate(args: argparse.Namespace) -> int:
    config, runtime, _ = settings(args)
    classes = None if args.classes is None else class_list(args.classes)
    image_input = api.annotate_input(args.input, api.annotate_config(config, args.out), classes)  # before Ray
    if args.dry_run:
        print(api.dry_run(image_input, args.out, api.annotate_config(config, args.out), overwrite=args.overwrite))
        return EXIT_OK
    return _run(args, lambda terminal: api.annotate(
        image_input, args.out, config, runtime, overwrite=args.overwrite, progress=terminal,
    ), tiny=config.model == TINY_MODEL)


def cmd_resume(args: argparse.Namespace) -> int:
    runtime = runtime_settings(args)
    config, _ = api.recorded_inputs(args.out)  # a bad OUT is reported before Ray starts
    return _run(args, lambda terminal: api.resume(args.out, runtime, progress=terminal), tiny=config.model == TINY_MODEL)


def _run(args: argparse.Namespace, run: Callable[[TextIO], RunSummary], tiny: bool) -> int:
    """A run with library output in the log file (pipeline/terminal.py). A local Ray started for this command is
    shut down before the summary, so the command ends right after it."""
    from seediff.pipeline.dispatch import DispatchError

    with run_terminal(args.verbose, args.log_file or default_log_path(args.command)) as terminal:
        if tiny:
            print(TINY_NOTE, file=terminal.stream)
        try:
            summary = run(terminal.stream)  # the API shuts down a local Ray it started
        except DispatchError as e:
            print(f"seediff: error: {e}", file=terminal.stream)
            return EXIT_FAILED
        except KeyboardInterrupt as e:  # the actors are already stopped; committed shards are kept
            print(str(e) or "interrupted", file=terminal.stream)
            return _interrupted_status()
    print(summary.format())
    if terminal.log_path:
        print(f"  log (library messages, Ray, actors' stderr): {terminal.log_path}")
    return EXIT_OK if summary.ok else EXIT_FAILED


# ---- review commands ----------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from seediff.pipeline.review import format_inspection

    info = api.inspect(args.url)
    print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json else format_inspection(info))
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    width, height = api.preview(args.url, args.out, n=args.n, class_name=args.class_name, cell=args.cell)
    print(f"wrote {args.out} ({width}x{height})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    found = api.check(args.url, repair=args.repair, shown=None if args.all else SHOWN_SHARDS)
    if args.json:
        print(json.dumps(found.as_json(), indent=2, ensure_ascii=False))
    else:
        print(found.summary())
        if args.repair and found.damaged:
            print(f"repair: un-committed {len(found.damaged)} shards ({_ids(found.damaged)}) and rewrote the index; "
                  "run the same generate command (or seediff resume) to regenerate them")
    return EXIT_OK if found.ok else EXIT_FAILED


def _ids(ids: list[int], most: int = SHOWN_SHARDS) -> str:
    return ", ".join(map(str, ids[:most])) + (f", ... ({len(ids)} in all)" if len(ids) > most else "")


def cmd_export(args: argparse.Namespace) -> int:
    quality = quality_filter(args.quality) if args.quality else None
    summary = api.export(args.url, args.directory, layout=args.layout, split=args.split, quality=quality,
                         verbose=args.verbose, log_file=args.log_file)
    if args.layout == "energon":
        print(f"indexed {summary['samples']} samples in {summary['shards']} shards for energon in "
              f"{args.url}/.nv-meta ({summary['excluded']} excluded by --quality)")
    else:
        print(f"wrote {summary['images']} images in the {args.layout} layout to {args.directory} "
              f"({len(summary['classes'])} classes, image set {args.split})")
    return EXIT_OK


def quality_filter(settings: list[str]) -> Any:
    """``--quality KEY=VALUE ...`` -> a ``QualityFilter``; a bad key or value is an InputError naming the flag."""
    from seediff.pipeline.readers import QualityFilter  # torch: imported only when a filter is asked for

    defaults = {f.name: f.default for f in dataclasses.fields(QualityFilter)}
    values: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or key not in defaults:
            raise InputError(f"--quality: {setting!r}: expected KEY=VALUE, KEY one of {', '.join(defaults)}")
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        flag = isinstance(defaults[key], bool)
        if isinstance(value, bool) != flag or not isinstance(value, (int, float)):
            raise InputError(f"--quality: {setting!r}: expected {'true or false' if flag else 'a number'}")
        values[key] = value
    return QualityFilter(**values)


def cmd_eval(args: argparse.Namespace) -> int:
    from seediff.pipeline.evaluate import format_report

    config, runtime, _ = settings(args)
    if config.model == TINY_MODEL and args.predictions is None:
        print(TINY_NOTE, file=sys.stderr)
    report, path = api.evaluate(args.root, args.out, layout=args.layout, config=config, runtime=runtime,
                                predictions=args.predictions, split=args.split, classes_file=args.classes_file,
                                verbose=args.verbose, log_file=args.log_file)
    print(format_report(report))
    print(f"wrote {path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    covered = api.report(args.url, args.out, verbose=args.verbose, log_file=args.log_file)
    print(f"wrote {args.out} ({covered['classes']} classes, {covered['samples']} samples, "
          f"{human_bytes(covered['bytes'])})")
    return EXIT_OK


# ---- parser -------------------------------------------------------------------------------------------------------

RUN_GROUP = "run settings (recorded in run.json; they change the output bytes)"
MASK_GROUP = "mask settings (part of the run settings; config-file key mask.<name>)"
RUNTIME_GROUP = "runtime options (may change between a run and its resume)"
# Settings of the sampling and of the encoded image, which an annotate run (real images, one UNet call per timestep,
# the input's own image bytes) never uses.
GENERATION_ONLY = {"scheduler", "steps", "guidance_scale", "image_format", "image_quality", "negative_prompt",
                   "safety_checker", "shard_layout"}
ANNOTATE_GROUP = "annotate settings (part of the run settings; config-file key annotate.<name>)"


def build_parser() -> argparse.ArgumentParser:
    # raw text: the --version line is not wrapped
    parser = argparse.ArgumentParser(prog="seediff", description="Generate image + mask datasets as WebDataset shards.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate (or resume) a dataset", formatter_class=HelpFormatter)
    gen.set_defaults(func=cmd_generate)
    gen.add_argument("manifest", help="class table or scene table: .csv/.tsv/.jsonl/.parquet/.txt, local path or URL")
    gen.add_argument("--out", required=True, help=f"{RunConfig.model_fields['output_url'].description} (required)")
    gen.add_argument("--config", help="YAML/JSON file with run settings and runtime options; flags override it")
    gen.add_argument("--classes", metavar="FILE",
                     help="class table (class_name, class_id) fixing the class ids of the manifest (default: ids in "
                     "order of first use)")
    gen.add_argument("--prompts", metavar="FILE", help="prompt templates with {class_name}, one per line, drawn per "
                     "sample by class rows without a prompt (default: prompt_template)")
    gen.add_argument(MANIFEST_KEYS["samples_per_class"], type=int, metavar="INT",
                     help="samples of each manifest row without a num_samples value (default: unset)")
    gen.add_argument("--overwrite", action="store_true", help="delete this output's seediff files and start over")
    gen.add_argument("--dry-run", action="store_true", help="validate and print the plan; no model, no Ray")
    _add_output_flags(gen)
    gen.set_defaults(flags=_run_flags(gen))

    res = sub.add_parser(
        "resume", help="continue the run recorded in OUT/run.json (manifest and settings from there)",
        formatter_class=HelpFormatter,
        description="Generate the shards of OUT that are not committed, with the manifest and run settings recorded "
        "in OUT/run.json. Only runtime options may be given; they may differ from the first run's.",
    )
    res.set_defaults(func=cmd_resume)
    res.add_argument("out", help="output root of an earlier generate: local path, s3://..., gs://...")
    res.add_argument("--config", help="YAML/JSON file with runtime options; flags override it")
    _add_output_flags(res)
    res.set_defaults(flags=add_flags(res.add_argument_group(RUNTIME_GROUP), RuntimeOptions))

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

    rep = sub.add_parser("report", help="write a self-contained HTML QA page: per-class counts, distributions, samples")
    rep.set_defaults(func=cmd_report)
    rep.add_argument("url")
    rep.add_argument("-o", "--out", required=True, help="HTML path or URL to write")
    _add_output_flags(rep)

    ver = sub.add_parser("verify", help="check every shard against its stats, parquet and the index")
    ver.set_defaults(func=cmd_verify)
    ver.add_argument("url")
    ver.add_argument(
        "--repair", action="store_true",
        help="un-commit the damaged shards (delete their files) and rewrite the index, so that readers skip them "
        "and the next generate run regenerates them",
    )
    ver.add_argument("--all", action="store_true", help=f"list every problem (default: those of the first "
                     f"{SHOWN_SHARDS} shards, and counts per kind)")
    ver.add_argument("--json", action="store_true", help="print the findings as JSON")

    exp = sub.add_parser("export", help="write an output root as a folder layout segmentation trainers read")
    exp.set_defaults(func=cmd_export)
    exp.add_argument("url", metavar="OUT_ROOT", help="output root of generate or annotate")
    exp.add_argument("directory", metavar="DIR", nargs="?", help="folder (or URL) to write (voc)")
    exp.add_argument("--layout", choices=["voc", "energon"], required=True,
                     help="voc: JPEGImages, SegmentationClass, ... under DIR; energon: Megatron-Energon's index "
                          "(.nv-meta/, what energon prepare writes) in place beside the tars, no DIR")
    exp.add_argument("--split", default="train", help="name of the image-set list (voc; default train)")
    exp.add_argument("--quality", nargs="+", metavar="KEY=VALUE",
                     help="energon: exclude the samples this QualityFilter rejects (min_class_fraction, "
                          "max_ignore_fraction, min_confidence, drop_empty, drop_degenerate), e.g. "
                          "--quality min_class_fraction=0.02 max_ignore_fraction=0.2")
    _add_output_flags(exp)

    ann = sub.add_parser(
        "annotate", help="label real images: WebDataset shards, a dataset.json, an image folder or a list",
        formatter_class=HelpFormatter,
        description="Label every image of INPUT with SeeDiff label maps; output shards keep each input sample's "
        "fields byte for byte and add mask.png and mask.json. Resumable like generate.",
    )
    ann.set_defaults(func=cmd_annotate)
    ann.add_argument("input", metavar="INPUT", help="tar URLs or brace pattern, dataset.json, image folder, or .txt "
                     "list of image paths/URLs (local or any fsspec URL)")
    ann.add_argument("--out", required=True, help=f"{RunConfig.model_fields['output_url'].description} (required)")
    ann.add_argument("--classes", help='the class list, "dog,cat" or @FILE (one name per line), ids 1, 2, ... in '
                     "order: alone, every image's classes; with --classes-field, the table each sample's integers "
                     "index (e.g. its cls field; index 0 = the first name); with --caption-field, the first ids")
    ann.add_argument("--config", help="YAML/JSON file with run settings and runtime options; flags override it")
    ann.add_argument("--overwrite", action="store_true", help="delete this output's seediff files and start over")
    ann.add_argument("--dry-run", action="store_true", help="check the input and classes and print the plan; no "
                     "model, no Ray, writes nothing")
    _add_output_flags(ann)
    ann.set_defaults(flags=_run_flags(ann, annotate=True))

    ev = sub.add_parser("eval", help="measure mask quality on a labelled dataset: mIoU, pixel accuracy, ...",
                        formatter_class=HelpFormatter,
                        description="Annotate the dataset's images with their ground-truth classes (under "
                        "OUT/annotations) and score the label maps, and plain cross-attention ones, against the "
                        "ground truth: OUT/metrics.json and a table.")
    ev.set_defaults(func=cmd_eval)
    ev.add_argument("root", metavar="ROOT", help="labelled dataset folder or URL")
    ev.add_argument("--layout", choices=["voc", "labels"], required=True)
    ev.add_argument("--out", required=True, help="folder (or URL) for metrics.json and the annotations")
    ev.add_argument("--split", help="VOC image set (default: val, or the only list)")
    ev.add_argument("--classes-file", help="class list, one name per line (line number = label value)")
    ev.add_argument("--predictions", help="score this output root (of annotate) instead of running the model")
    ev.add_argument("--config", help="YAML/JSON file with run settings and runtime options; flags override it")
    _add_output_flags(ev)
    ev.set_defaults(flags=_run_flags(ev, annotate=True))
    return parser


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library warnings, Ray's messages and seediff's INFO lines on the terminal")
    parser.add_argument("--log-file", metavar="PATH",
                        help="where library warnings and Ray's messages go (default: a new file under "
                             f"{default_log_path('COMMAND').rsplit('/', 1)[0]}/)")


def _run_flags(parser: argparse.ArgumentParser, annotate: bool = False) -> list:
    """The generated flags of the run settings, mask settings and runtime options (and, for annotate and eval, the
    annotate settings plus the repeatable ``--timestep``)."""
    skip = {"output_url", "mask", "annotate"} | (GENERATION_ONLY if annotate else set())
    flags = add_flags(parser.add_argument_group(RUN_GROUP), RunConfig, skip=frozenset(skip))
    flags += add_flags(parser.add_argument_group(MASK_GROUP), MaskConfig, prefix="mask.")
    if annotate:
        group = parser.add_argument_group(ANNOTATE_GROUP)
        flags += add_flags(group, AnnotateConfig, prefix="annotate.", skip=frozenset({"annotate.timesteps"}))
        group.add_argument("--timestep", type=int, action="append", metavar="INT",
                           help=f"{AnnotateConfig.model_fields['timesteps'].description}; repeat for several "
                           "(default: 100)")
    flags += add_flags(parser.add_argument_group(RUNTIME_GROUP), RuntimeOptions)
    return flags


class _Stopped:
    """The stop signal received, if any: SIGTERM/SIGHUP raise KeyboardInterrupt where Ctrl-C would, so a run stops
    dispatching, releases its lease and says how to resume; the exit status is then 128 + the signal's number."""

    signum: int | None = None

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        cls.signum = signum
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _interrupted_status() -> int:
    return 128 + _Stopped.signum if _Stopped.signum else EXIT_INTERRUPTED
def version_line() -> str:
    """``seediff --version``: seediff's version and those of the libraries that decide its output bytes."""
    from importlib.metadata import PackageNotFoundError, version

    from seediff import __version__

    found = []
    for name in ("diffusers", "transformers", "torch", "ray", "peft"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"seediff {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives an optional positional its value only next to the one before it: `export OUT --layout voc DIR`
    # leaves DIR over, so it is taken here
    if getattr(args, "func", None) is cmd_export and args.directory is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.directory, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(signal, "SIGPIPE"):  # `seediff inspect out | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _Stopped.signum = None
    previous = {}
    if threading.current_thread() is threading.main_thread():  # restored on return: main() may run in-process
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                previous[name] = signal.signal(getattr(signal, name), _Stopped.handle)
    try:
        return args.func(args)
    except RetryLater as e:
        print(f"seediff: error: {e}", file=sys.stderr)
        return EXIT_RETRY
    except (InputError, FileNotFoundError) as e:
        print(f"seediff: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt as e:  # outside a run (a dry run, verify, ...): one line, no traceback
        print(str(e) or "interrupted", file=sys.stderr)
        return _interrupted_status()
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


if __name__ == "__main__":
    sys.exit(main())
