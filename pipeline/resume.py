"""Resume: which shards are committed (their ``_stats.json`` exists and parses), removal of what an interrupted run
left behind, and the ``run.json`` check that refuses to mix outputs of different run configs in one root.

Call these before dispatching work, never while writers are running: leftovers are judged by name alone."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Collection
from typing import Any

from fsspec import AbstractFileSystem

from seediff.pipeline.kinds import kind_of
from seediff.pipeline.sources import ImageInput
from seediff.schemas.config import ConfigError, InputError, RetryLater, RunConfig
from seediff.schemas.manifest import Manifest
from seediff.schemas.records import (
    DATASET_JSON,
    LEASE_JSON,
    PARQUET_SUFFIX,
    RUN_JSON,
    SIZES_JSON,
    STATS_SUFFIX,
    TAR_SUFFIX,
    ShardStats,
    shard_file_pattern,
    shard_name,
)
from seediff.storage import WRITE_PROBE_PREFIX, is_local, output_fs, write_file

log = logging.getLogger(__name__)

# RunConfig fields that may differ on resume: the same root can be reached by another URL (a mount, file://, ...).
LOCATION_FIELDS = frozenset({"output_url"})


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


def remove_temp_files(config: RunConfig) -> list[str]:
    """Delete the temp files of shard writers (what an actor killed mid-shard left): at the end of a run, once no
    actor writes. Returns the removed paths."""
    fs, root = output_fs(config.output_url)
    doomed = [path for path, m in _shard_files(fs, root, config.shard_prefix, config.shard_digits) if m["temp"]]
    if doomed:
        fs.rm(doomed)
    return doomed


def run_record(config: RunConfig, source: Manifest | ImageInput) -> dict[str, Any]:
    """The ``run.json`` contents: the run config plus what identifies the run's input (its kind's
    ``source_record``)."""
    return {"config": config.model_dump(mode="json"), **kind_of(config).source_record(source)}


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
    if "code_version" in record["config"]:  # written before output_format existed: the first layout
        record["config"] = {k: v for k, v in record["config"].items() if k != "code_version"} | {"output_format": 1}
    return record


def check_resume(record: dict[str, Any], config: RunConfig, manifest: Manifest | ImageInput, source: str) -> None:
    """Raise RunConfigMismatch naming the output-changing fields in which ``config``/``manifest`` (or the annotate
    input) differ from the stored run record ``source``."""
    stored = RunConfig.from_json(json.dumps(record["config"]), source=source)
    fields = [f for f in config.differences(stored) if f not in LOCATION_FIELDS]
    current = kind_of(config).source_record(manifest)
    fields += [f for f in kind_of(config).fingerprints if record.get(f) != current[f]]
    if fields:
        raise RunConfigMismatch(
            f"{source}: this output was started with different settings; differing fields: {', '.join(fields)}. "
            "Resume with the same settings and manifest, pass overwrite (--overwrite), or choose another output"
        )


def prepare_output(config: RunConfig, manifest: Manifest | ImageInput, overwrite: bool) -> dict[int, ShardStats]:
    """First start: write run.json. Resume: refuse when an output-changing field differs and a shard of the stored
    run is committed; with nothing committed yet (a typo corrected before the first shard), the new settings simply
    replace the old. ``overwrite``: first delete the seediff files (of this and of the stored run's shard naming).
    Returns the committed shards' stats (``read_committed_stats``), read once here for the whole run."""
    fs, root = output_fs(config.output_url)
    path = f"{root}/{RUN_JSON}"
    check_output_folder(config, overwrite)
    if overwrite:
        _wipe(fs, root, config)
    record = read_run_json(config.output_url)
    if record is not None:
        try:
            check_resume(record, config, manifest, path)
            return read_committed_stats(config)
        except RunConfigMismatch:
            if _bound(record, config):
                raise
        log.info("%s: settings changed before any shard was committed; replacing it", path)
        _wipe(fs, root, config)
    _write_run_json(fs, path, run_record(config, manifest))
    return {}  # a new output, or its files just removed


class NotAnOutputFolder(InputError):
    """``--out`` names a file, or a folder with files of its own that is not a seediff output (no run.json)."""


def check_output_folder(config: RunConfig, overwrite: bool) -> None:
    """A run writes only into a folder that is absent, empty or a seediff output (it has run.json): never beside a
    user's own files (a ``dataset.json`` or ``sizes.json`` of theirs would be replaced). Shard files of this run's
    naming without run.json are a run whose run.json was lost: refused unless ``overwrite``. Raise naming what is
    there."""
    fs, root = output_fs(config.output_url)
    if is_local(fs) and os.path.exists(root) and not os.path.isdir(root):
        raise NotAnOutputFolder(f"{config.output_url}: is a file; --out must be a folder (absent, empty, or a seediff "
                                "output)")
    names = _list_names(fs, root)
    if RUN_JSON in names:
        return
    pattern = shard_file_pattern(config.shard_prefix, config.shard_digits)
    shards = [n for n in names if pattern.match(n)]
    foreign = sorted(n for n in names if not pattern.match(n) and not _ours_without_run_json(n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NotAnOutputFolder(
            f"{config.output_url}: not a seediff output (no {RUN_JSON}) and not empty: it holds {shown}. seediff "
            "writes only into an absent or empty folder, or one of its own outputs; choose another --out"
        )
    if shards and not overwrite:
        raise RunConfigMismatch(
            f"{root}/{RUN_JSON}: missing, but {root} holds {config.shard_prefix}-* shard files from an unknown run; "
            "pass overwrite (--overwrite) or choose another output"
        )


def _ours_without_run_json(name: str) -> bool:
    """Files a starting run writes before run.json: the lease (and its staged copy), the write-access probe."""
    return name == LEASE_JSON or name.startswith(f"{LEASE_JSON}.") or name.startswith(WRITE_PROBE_PREFIX)


def _bound(record: dict[str, Any], config: RunConfig) -> bool:
    """Whether the stored run has a committed shard (under its own shard naming)."""
    stored = record["config"]
    naming = {k: stored[k] for k in ("shard_prefix", "shard_digits") if k in stored}
    return bool(read_committed_stats(config.model_copy(update=naming)))


def _write_run_json(fs: AbstractFileSystem, path: str, record: dict[str, Any]) -> None:
    write_file(fs, path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


DEVICE_FIELD = "device"  # the resolved device kind and dtype of the actors, e.g. {"kind": "cuda", "dtype": "float16"}


def bind_device(
    config: RunConfig, device: dict[str, str], allow_change: bool, committed: Collection[int] | None = None
) -> None:
    """Record the actors' resolved device kind and dtype in run.json. Once a shard is committed (``committed``: the
    run's committed shard ids, read here when not given), a resume that would change them (a GPU run resumed on CPU
    mixes fp16 and fp32 images) is refused unless ``allow_change``."""
    fs, root = output_fs(config.output_url)
    path = f"{root}/{RUN_JSON}"
    record = read_run_json(config.output_url) or {}
    stored = record.get(DEVICE_FIELD)
    if stored == device:
        return
    if stored and not allow_change and (read_committed_stats(config) if committed is None else committed):
        raise RunConfigMismatch(
            f"{path}: this output was generated on {stored.get('kind')} in {stored.get('dtype')}; this run would use "
            f"{device['kind']} in {device['dtype']}. Resume on the same kind of device, or pass --allow-device-change"
        )
    _write_run_json(fs, path, {**record, DEVICE_FIELD: device})


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
    own = (RUN_JSON, SIZES_JSON, DATASET_JSON) if RUN_JSON in names else ()  # the index files are ours only there
    doomed = {names[n] for n in own if n in names}
    for prefix, digits in namings:
        doomed.update(path for path, _ in _shard_files(fs, root, prefix, digits))
    if doomed:
        fs.rm(sorted(doomed))


# ---- the output lease ---------------------------------------------------------------------------------------------

LEASE_HEARTBEAT_S = 10.0  # how often the holding driver refreshes the lease
LEASE_STALE_S = 60.0  # a lease without a heartbeat for this long belongs to a dead driver and is taken over
LEASE_SKEW_S = 30.0  # clock difference between hosts tolerated before a future heartbeat is disbelieved


def _shown(value: Any) -> str:
    """A lease field as quoted in a message: whatever a damaged or planted lease holds, one short line."""
    return " ".join(str(value).split())[:80]


def _dead_on_this_host(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (a killed driver need not wait for the lease to age)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class LeaseHeld(RetryLater):
    """Another live driver holds the output root's lease; the message names it."""


class OutputLease:
    """``lease.json`` at the output root: which driver (run id, host, pid) writes there, with a heartbeat. Only the
    holder cleans leftovers, writes run.json and dispatches shards, so two drivers on one ``--out`` never delete each
    other's files or regenerate the same shards.

    Creation is atomic where the store allows it: local disk creates the file with a hard link (fails if it exists);
    S3 uses a conditional PUT (If-None-Match, s3fs ``mode="create"``). Other stores get a best-effort check-then-write
    followed by a read-back. A stale lease (no heartbeat for ``stale_s``) is removed, after checking it did not
    change meanwhile, and then created anew under the same rules; so is the lease of a driver on this host whose
    process is gone."""

    def __init__(self, output_url: str, run_id: str, stale_s: float = LEASE_STALE_S):
        self.fs, root = output_fs(output_url)
        self.path = f"{root}/{LEASE_JSON}"
        self.run_id, self.stale_s = run_id, stale_s
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once that happens

    def _body(self) -> bytes:
        holder = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started}
        return (json.dumps({**holder, "heartbeat": time.time()}, sort_keys=True) + "\n").encode()

    def read(self) -> dict[str, Any] | None:
        """The holder's record; {} for a lease that does not parse as one (half-written by a best-effort store,
        damaged): treated as stale."""
        try:
            holder = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _age(self, holder: dict[str, Any]) -> tuple[float, str]:
        """Seconds since the holder's last heartbeat, and how that was judged. A heartbeat that is not a finite
        number counts as none (stale). One in the future beyond ``LEASE_SKEW_S`` (clock skew, or a planted lease)
        is not believed: the lease file's modification time (the store's clock) stands in, so such a lease goes
        stale ``stale_s`` after it was last written instead of locking the output until that date."""
        beat = holder.get("heartbeat")
        now = time.time()
        if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not math.isfinite(beat):
            return math.inf, "no valid heartbeat"
        if beat <= now + LEASE_SKEW_S:
            return max(now - beat, 0.0), f"heartbeat {max(now - beat, 0.0):.0f}s ago"
        try:
            written = self.fs.modified(self.path).timestamp()
        except (OSError, NotImplementedError, AttributeError):
            written = self.started  # judged from this driver's first look
        age = max(now - written, 0.0)
        return age, f"heartbeat {beat - now:.0f}s in the future, clock skew? The file was written {age:.0f}s ago"

    def acquire(self) -> None:
        """Take the lease (or a stale one) and start the heartbeat; raise LeaseHeld naming a live holder."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        for _ in range(3):
            if self._create():
                self._heartbeat_in_background()
                return
            holder = self.read()
            if holder is None:
                continue  # released meanwhile
            age, judged = self._age(holder)
            if age < self.stale_s and not _dead_on_this_host(holder):
                raise LeaseHeld(
                    f"{self.path}: this output is in use by run {_shown(holder.get('run_id'))} on "
                    f"{_shown(holder.get('host'))} (pid {_shown(holder.get('pid'))}, {judged}); wait for "
                    f"it to finish or stop it (a lease without heartbeat for {self.stale_s:.0f}s is taken over)"
                )
            log.warning("taking over the lease of run %s (%s, or its driver process is gone)",
                        _shown(holder.get("run_id")), judged if holder else "lease.json unreadable")
            if self.read() == holder:  # nobody refreshed or took it over meanwhile
                self.fs.rm_file(self.path)
        raise LeaseHeld(f"{self.path}: could not take the lease (other drivers are competing for it)")

    def _create(self) -> bool:
        data = self._body()
        if is_local(self.fs):
            staged = f"{self.path}.{self.run_id}"
            with open(staged, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(staged, self.path)  # atomic, and fails when the lease exists
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(staged)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if protocols & {"s3", "s3a"}:
            try:
                self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
                return True
            except FileExistsError:
                return False
        if self.fs.exists(self.path):  # best effort: check, write, read back
            return False
        self.fs.pipe_file(self.path, data)
        return (self.read() or {}).get("run_id") == self.run_id

    def _heartbeat_in_background(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="seediff-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                holder = self.read()
                if holder is None or holder.get("run_id") != self.run_id:
                    self.lost = f"{self.path}: taken over by run {holder.get('run_id') if holder else None}"
                    return
                write_file(self.fs, self.path, self._body())
            except Exception as e:  # a failed refresh is retried at the next beat; the lease goes stale otherwise
                log.warning("lease heartbeat failed: %s", e)

    def check(self) -> None:
        """Raise LeaseHeld once another driver has taken the lease over (this driver was presumed dead)."""
        if self.lost:
            raise LeaseHeld(f"lease lost: {self.lost}; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.read()
        if holder is not None and holder.get("run_id") == self.run_id:
            self.fs.rm_file(self.path)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def uncommit(config: RunConfig, shard_ids: Collection[int]) -> list[str]:
    """Delete the stats files (the commit markers) of ``shard_ids``, then their tar and parquet: readers that list
    the folder stop reading them, and the next run regenerates exactly those shards, byte-identically. Rewrite the
    index afterwards (pipeline/index.py). Call under the output lease. Returns the removed paths."""
    fs, root = output_fs(config.output_url)
    names = [shard_name(config.shard_prefix, i, config.shard_digits) for i in sorted(shard_ids)]
    markers = [f"{root}/{name}{STATS_SUFFIX}" for name in names]
    existing = _list_names(fs, root)
    markers = [p for p in markers if posixpath.basename(p) in existing]
    if markers:
        fs.rm(markers)  # first: a shard is uncommitted before any of its files goes
    files = [existing[n + s] for n in names for s in (TAR_SUFFIX, PARQUET_SUFFIX) if n + s in existing]
    if files:
        fs.rm(files)
    return markers + files
