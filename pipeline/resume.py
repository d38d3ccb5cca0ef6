"""Resume: which shards are committed (their ``_stats.json`` exists and parses), removal of what an interrupted run
left behind, and the ``run.json`` check that refuses to mix outputs of different run configs in one root.

Call these before dispatching work, never while writers are running: leftovers are judged by name alone."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Collection
from typing import Any

from fsspec import AbstractFileSystem

from seediff.schemas.config import ConfigError, InputError, RunConfig
from seediff.schemas.manifest import Manifest
from seediff.schemas.records import DATASET_JSON, RUN_JSON, SIZES_JSON, STATS_SUFFIX, ShardStats, shard_file_pattern
from seediff.storage import output_fs, write_file

# RunConfig fields that may differ on resume: the same root can be reached by another URL (a mount, file://, ...).
LOCATION_FIELDS = frozenset({"output_url"})
MANIFEST_FIELD = "manifest_sha256"
CLASSES_FIELD = "classes_sha256"  # the resolved classes, counts and prompts


class RunConfigMismatch(InputError):
    """The output root holds a run with other output-changing settings; the message names the fields."""


def _list_names(fs: AbstractFileSystem, root: str) -> dict[str, str]:
    """basename -> path of the files directly under root (empty when root does not exist yet)."""
    fs.invalidate_cache(root)  # other processes (Ray actors) write here; never trust a cached listing
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(p.rstrip("/")): p for p in paths}


def _shard_files(fs: AbstractFileSystem, root: str, prefix: str, digits: int) -> list[tuple[str, re.Match[str]]]:
    pattern = shard_file_pattern(prefix, digits)
    return [(path, m) for name, path in sorted(_list_names(fs, root).items()) if (m := pattern.match(name))]


def read_committed_stats(config: RunConfig) -> dict[int, ShardStats]:
    """shard id -> stats of every committed shard under config.output_url: its stats file parses and names it."""
    fs, root = output_fs(config.output_url)
    files = _shard_files(fs, root, config.shard_prefix, config.shard_digits)
    ids = {path: int(m["shard"]) for path, m in files if m["suffix"] == STATS_SUFFIX and not m["temp"]}
    contents = fs.cat(list(ids), on_error="return") if ids else {}  # concurrent GETs on object stores
    committed = {}
    for path, shard_id in ids.items():
        data = contents.get(path)
        if data is None or isinstance(data, Exception):
            continue
        try:
            stats = ShardStats.from_json(data, path)
        except ValueError:
            continue
        if stats.shard_id == shard_id:
            committed[shard_id] = stats
    return committed


def clean_leftovers(config: RunConfig, committed: Collection[int]) -> list[str]:
    """Delete temp files and every file of a shard not in ``committed`` (from ``read_committed_stats``), which
    includes stats files that do not parse. Returns the removed paths."""
    fs, root = output_fs(config.output_url)
    files = _shard_files(fs, root, config.shard_prefix, config.shard_digits)
    doomed = [path for path, m in files if m["temp"] or int(m["shard"]) not in committed]
    if doomed:
        fs.rm(doomed)
    return doomed


def run_record(config: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """The ``run.json`` contents: the run config plus what identifies the manifest."""
    return {
        "config": config.model_dump(mode="json"),
        MANIFEST_FIELD: manifest.sha256,
        "manifest_source": manifest.source,
        "samples_per_class": manifest.samples_per_class,
        "num_classes": len(manifest.rows),
        "num_samples": manifest.num_samples,
        CLASSES_FIELD: classes_sha256(manifest),
    }


def classes_sha256(manifest: Manifest) -> str:
    """Fingerprint of the resolved class rows. The manifest's bytes alone miss flags that change the plan
    (``--samples-per-class`` filling counts, the prompt template), which would silently shift sample ids."""
    rows = [[r.class_name, r.class_id, r.num_samples, r.prompt, r.negative_prompt] for r in manifest.rows]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def read_run_json(output_url: str) -> dict[str, Any] | None:
    """The run.json of an output root, or None when there is none."""
    fs, root = output_fs(output_url)
    path = f"{root}/{RUN_JSON}"
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path}: not a seediff run.json (no 'config' object)")
    return record


def check_resume(record: dict[str, Any], config: RunConfig, manifest: Manifest, source: str) -> None:
    """Raise RunConfigMismatch naming the output-changing fields in which ``config``/``manifest`` differ from the
    stored run record ``source``."""
    stored = RunConfig.from_json(json.dumps(record["config"]), source=source)
    fields = [f for f in config.differences(stored) if f not in LOCATION_FIELDS]
    if record.get(MANIFEST_FIELD) != manifest.sha256:
        fields.append(MANIFEST_FIELD)
    if record.get(CLASSES_FIELD) != classes_sha256(manifest):
        fields.append(CLASSES_FIELD)
    if fields:
        raise RunConfigMismatch(
            f"{source}: this output was started with different settings; differing fields: {', '.join(fields)}. "
            "Resume with the same settings and manifest, pass overwrite (--overwrite), or choose another output"
        )


def prepare_output(config: RunConfig, manifest: Manifest, overwrite: bool) -> None:
    """First start: write run.json. Resume: refuse when an output-changing field differs.
    ``overwrite``: first delete the seediff files (of this and of the stored run's shard naming) under the root."""
    fs, root = output_fs(config.output_url)
    path = f"{root}/{RUN_JSON}"
    if overwrite:
        _wipe(fs, root, config)
    record = read_run_json(config.output_url)
    if record is None:
        if _shard_files(fs, root, config.shard_prefix, config.shard_digits):
            raise RunConfigMismatch(
                f"{path}: missing, but {root} holds {config.shard_prefix}-* shard files from an unknown run; "
                "pass overwrite (--overwrite) or choose another output"
            )
        write_file(fs, path, (json.dumps(run_record(config, manifest), indent=2, sort_keys=True) + "\n").encode())
        return
    check_resume(record, config, manifest, path)


def _wipe(fs: AbstractFileSystem, root: str, config: RunConfig) -> None:
    try:
        previous = read_run_json(config.output_url)
    except ConfigError:
        previous = None  # unreadable run.json: still removed below by name
    namings = {(config.shard_prefix, config.shard_digits)}
    if previous is not None:
        old = previous["config"]
        namings.add((old.get("shard_prefix", config.shard_prefix), old.get("shard_digits", config.shard_digits)))
    names = _list_names(fs, root)
    doomed = {names[n] for n in (RUN_JSON, SIZES_JSON, DATASET_JSON) if n in names}
    for prefix, digits in namings:
        doomed.update(path for path, _ in _shard_files(fs, root, prefix, digits))
    if doomed:
        fs.rm(sorted(doomed))
