"""``verify``: does every committed byte of an output match its checksums and the plan, and does the index list
exactly the committed shards? Read only (``--repair``, in seediff/api.py, acts on what this finds).

Per planned shard, in this order: its files present; the stats (the commit marker) parse; the tar's and the parquet's
sha256 equal the ones the stats recorded (a damaged parquet is a finding, never a traceback); the parquet parses and
its sample ids are the shard's planned ids; the tar streams to the end with each sample's fields contiguous and
complete, each field's sha256 equal to the parquet's, its keys exactly the parquet's successful samples (no foreign,
missing or duplicate key) and its mask values within the sample's own class ids; sample counts and byte sizes agree
between tar, stats, parquet, sizes.json and dataset.json. Per dataset: the index files parse and list nothing outside
the plan.

Findings stream out of ``findings()`` one shard at a time, so a partial output of 10^6 planned shards is checked in
bounded memory; ``Verification`` keeps counts per kind of problem and the findings of the first shards."""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seediff.pipeline.kinds import kind_of
from seediff.pipeline.plan import SampleRanges
from seediff.pipeline.readers import IMAGE_FIELDS, MASK_FIELD, sample_record
from seediff.pipeline.review import read_run
from seediff.schemas.records import (
    BACKGROUND_LABEL,
    DATASET_JSON,
    IGNORE_LABEL,
    PARQUET_SUFFIX,
    SIZES_JSON,
    STATS_SUFFIX,
    SUCCESS,
    TAR_SUFFIX,
    ShardStats,
    checksum_column,
    decode_mask,
    sample_classes,
    sample_key,
    shard_name,
)
from seediff.storage import output_fs

STATS_BATCH = 256  # stats files fetched at once (concurrent GETs on object stores), so memory stays bounded
SHOWN_SHARDS = 20  # shards whose findings a summary shows in full

# kinds of problem, in the order a summary lists them
MISSING = "missing shard"
UNCOMMITTED = "not committed"
FILE_MISSING = "file missing"
STATS_UNREADABLE = "stats unreadable"
CHECKSUM = "file checksum"
PARQUET_UNREADABLE = "parquet unreadable"
TAR_UNREADABLE = "tar unreadable"
KEYS = "wrong samples"
SAMPLE = "sample damaged"
COUNTS = "counts"
INDEX = "index"
KINDS = (MISSING, UNCOMMITTED, FILE_MISSING, STATS_UNREADABLE, CHECKSUM, PARQUET_UNREADABLE, TAR_UNREADABLE, KEYS,
         SAMPLE, COUNTS, INDEX)


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    shard: int | None  # the planned shard it concerns; None for the dataset's index files
    message: str  # one line, naming the file


@dataclass
class Verification:
    """What ``verify`` found: ``counts`` per kind, ``findings`` (those of the first ``shown`` shards with problems,
    and every dataset-level one; all of them when ``shown`` is None), ``damaged`` (committed shards whose own files
    are wrong or whose stats do not parse: what ``--repair`` un-commits)."""

    counts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    shards_with_problems: int = 0
    num_shards: int = 0  # planned

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def problems(self) -> list[str]:
        return [f.message for f in self.findings]

    def summary(self) -> str:
        """Counts per kind and the findings kept, then a line saying how many more shards there are."""
        if self.ok:
            return "OK: every shard is complete and matches the index"
        lines = [f.message for f in self.findings]
        shown = len({f.shard for f in self.findings if f.shard is not None})
        if self.shards_with_problems > shown:
            lines.append(f"... and {self.shards_with_problems - shown} more shards with problems (--all lists them)")
        total = sum(self.counts.values())
        lines.append(f"{total} problems in {self.shards_with_problems} shards: "
                     + ", ".join(f"{self.counts[k]} {k}" for k in KINDS if self.counts[k]))
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "counts": {k: self.counts[k] for k in KINDS if self.counts[k]},
            "shards_with_problems": self.shards_with_problems,
            "damaged": self.damaged,
            "problems": [{"kind": f.kind, "shard": f.shard, "message": f.message} for f in self.findings],
        }


def verify_dataset(out_url: str) -> list[str]:
    """The problems ``verify`` finds (empty = OK)."""
    return verify(out_url).problems


def verify(out_url: str, shown: int | None = None) -> Verification:
    """Check the output at ``out_url``: each planned shard (the shard ranges of run.json's sample count, size and
    layout) against its files, and the index. ``shown``: keep the findings of only the first ``shown`` shards with
    problems (None: all)."""
    verifier = Verifier(out_url)
    result = Verification()
    last_shard = None
    for finding in verifier.findings():
        result.counts[finding.kind] += 1
        if finding.shard is not None and finding.shard != last_shard:
            result.shards_with_problems += 1
            last_shard = finding.shard
        if shown is None or finding.shard is None or result.shards_with_problems <= shown:
            result.findings.append(finding)
    result.damaged = sorted(verifier.damaged)
    result.num_shards = verifier.num_shards
    return result


class Verifier:
    """The output's listing and index, read once; ``findings()`` checks each planned shard against them."""

    def __init__(self, out_url: str):
        record, self.config = read_run(out_url)
        self.fs, self.root = output_fs(out_url)
        self.fs.invalidate_cache(self.root)
        self.names = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}
        self.index_findings: list[Finding] = []
        self.sizes = self._load_index(SIZES_JSON)
        self.entries = self._dataset_entries(self._load_index(DATASET_JSON))
        self.indexed = {n.removesuffix(TAR_SUFFIX) for n in self.sizes if n.endswith(TAR_SUFFIX)} | set(self.entries)
        num_samples = record.get("num_samples")
        # the plan's shard arithmetic needs only the count: neither the manifest nor the input (either may have moved)
        self.plan = SampleRanges([num_samples if isinstance(num_samples, int) else 0], self.config.samples_per_shard,
                                 self.config.shard_layout)
        self.num_shards = self.plan.num_shards
        self.required = kind_of(self.config).required_fields  # and one of IMAGE_FIELDS
        self.damaged: set[int] = set()

    def _name(self, shard_id: int) -> str:
        return shard_name(self.config.shard_prefix, shard_id, self.config.shard_digits)

    def _planned(self, name: str) -> bool:
        digits = name.removeprefix(f"{self.config.shard_prefix}-")
        return digits.isdigit() and int(digits) < self.num_shards and self._name(int(digits)) == name

    # ---- the index ----------------------------------------------------------------------------------------------

    def _load_index(self, name: str) -> dict[str, Any]:
        if name not in self.names:
            self.index_findings.append(
                Finding(INDEX, None, f"{name}: missing (run `seediff generate` to completion to write the index)"))
            return {}
        try:
            data = json.loads(self.fs.cat_file(f"{self.root}/{name}"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            self.index_findings.append(Finding(INDEX, None, f"{name}: not valid JSON: {str(e)[:200]}"))
            return {}
        if not isinstance(data, dict):
            self.index_findings.append(Finding(INDEX, None, f"{name}: expected a JSON object"))
            return {}
        if name == SIZES_JSON:
            bad = [k for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                self.index_findings.append(Finding(INDEX, None, f"{name}: {len(bad)} entries are not sample counts"))
            return {k: v for k, v in data.items() if k not in bad}
        return data

    def _dataset_entries(self, dataset: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """dataset.json's shard entries by shard name (urls are relative to the root)."""
        shardlist = dataset.get("shardlist", [])
        good = [e for e in shardlist if isinstance(e, dict) and isinstance(e.get("url"), str)] \
            if isinstance(shardlist, list) else []
        if len(good) != (len(shardlist) if isinstance(shardlist, list) else -1) and dataset:
            self.index_findings.append(Finding(INDEX, None, f"{DATASET_JSON}: 'shardlist' is not a list of "
                                                            "{url, nsamples, filesize} entries"))
        return {posixpath.basename(e["url"]).removesuffix(TAR_SUFFIX): e for e in good}

    # ---- the shards ---------------------------------------------------------------------------------------------

    def findings(self) -> Iterator[Finding]:
        yield from self.index_findings
        for first in range(0, self.num_shards, STATS_BATCH):
            batch = range(first, min(first + STATS_BATCH, self.num_shards))
            stats_texts = self._stats_texts(batch)
            for shard_id in batch:
                yield from self._check_shard(shard_id, stats_texts.get(shard_id))
        for name in sorted(n for n in self.indexed if not self._planned(n)):
            yield Finding(INDEX, None, f"{name}: listed in the index but outside the run's {self.num_shards} "
                                       "planned shards")

    def _stats_texts(self, batch: range) -> dict[int, Any]:
        paths = {f"{self.root}/{self._name(i)}{STATS_SUFFIX}": i for i in batch
                 if self._name(i) + STATS_SUFFIX in self.names}
        contents = self.fs.cat(list(paths), on_error="return") if paths else {}
        return {i: contents.get(p) for p, i in paths.items()}

    def _check_shard(self, shard_id: int, stats_text: Any) -> Iterator[Finding]:
        name = self._name(shard_id)
        present = {suffix for suffix in (TAR_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX) if name + suffix in self.names}
        if not present:
            yield Finding(MISSING, shard_id, f"{name}: missing shard (no tar, parquet or stats file)")
            return
        stats = None
        if STATS_SUFFIX not in present:
            yield Finding(UNCOMMITTED, shard_id, f"{name}{STATS_SUFFIX}: missing stats file (shard not committed)")
        else:
            try:
                if isinstance(stats_text, Exception) or stats_text is None:
                    raise ValueError(f"unreadable ({type(stats_text).__name__})")
                stats = ShardStats.from_json(stats_text, name + STATS_SUFFIX)
                if stats.shard_id != shard_id:
                    raise ValueError(f"names shard {stats.shard_id}")
            except ValueError as e:
                stats = None
                self.damaged.add(shard_id)  # a marker that does not parse: un-committed, its files regenerated
                yield Finding(STATS_UNREADABLE, shard_id,
                              f"{name}{STATS_SUFFIX}: does not parse as shard stats ({str(e)[:200]})")
        own = list(self._check_files(shard_id, name, present, stats))
        if own and stats is not None:
            self.damaged.add(shard_id)
        yield from own
        if stats is not None and name not in self.indexed:
            yield Finding(INDEX, shard_id, f"{name}: not listed in {SIZES_JSON}/{DATASET_JSON}")
        if stats is None and name in self.indexed:
            yield Finding(INDEX, shard_id, f"{name}: listed in {SIZES_JSON}/{DATASET_JSON} but not committed")

    def _check_files(self, shard_id: int, name: str, present: set[str], stats: ShardStats | None) -> Iterator[Finding]:
        for suffix in (TAR_SUFFIX, PARQUET_SUFFIX):
            if suffix not in present:
                yield Finding(FILE_MISSING, shard_id, f"{name}{suffix}: missing")
        parquet = None
        if PARQUET_SUFFIX in present:
            parquet, problems = self._read_parquet(shard_id, name, stats)
            yield from problems
        if TAR_SUFFIX in present:
            yield from self._check_tar(shard_id, name, stats, parquet)

    def _read_parquet(self, shard_id: int, name: str, stats: ShardStats | None) -> tuple[_Parquet | None, list[Finding]]:
        path = f"{self.root}/{name}{PARQUET_SUFFIX}"
        data = self.fs.cat_file(path)
        if stats is not None and stats.parquet_sha256 and hashlib.sha256(data).hexdigest() != stats.parquet_sha256:
            return None, [Finding(CHECKSUM, shard_id, f"{path}: sha256 {hashlib.sha256(data).hexdigest()[:12]}... "
                                                      f"differs from the stats' {stats.parquet_sha256[:12]}...")]
        try:
            # on this thread: an Arrow pool task releasing a Python buffer at interpreter exit aborts (review.py)
            table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
            keys, ids, statuses = (table[c].to_pylist() for c in ("key", "sample_id", "status"))
        except (pa.ArrowException, OSError, KeyError, ValueError) as e:
            return None, [Finding(PARQUET_UNREADABLE, shard_id, f"{path}: unreadable ({type(e).__name__}: "
                                                                f"{str(e)[:200]})")]
        problems = []
        planned = list(self.plan.shard_range(shard_id))
        if ids != planned:
            problems.append(Finding(KEYS, shard_id, f"{path}: sample ids {_span(ids)} are not the shard's planned "
                                                    f"ids {_span(planned)}"))
        if keys != [sample_key(i) for i in ids]:
            problems.append(Finding(KEYS, shard_id, f"{path}: keys do not match the sample ids"))
        if stats is not None and table.num_rows != stats.count:
            problems.append(Finding(COUNTS, shard_id, f"{name}: parquet has {table.num_rows} rows, stats count "
                                                      f"{stats.count} attempted"))
        return _Parquet(table, [k for k, s in zip(keys, statuses, strict=True) if s == SUCCESS]), problems

    def _check_tar(self, shard_id: int, name: str, stats: ShardStats | None, parquet: _Parquet | None
                   ) -> Iterator[Finding]:
        path = f"{self.root}/{name}{TAR_SUFFIX}"
        contents = _read_tar(self.fs, path, _checksums(parquet.table) if parquet else {}, self.required)
        if stats is not None and stats.tar_sha256 and contents.sha256 != stats.tar_sha256:
            yield Finding(CHECKSUM, shard_id, f"{path}: sha256 {contents.sha256[:12]}... differs from the stats' "
                                              f"{stats.tar_sha256[:12]}...")
        yield from (Finding(kind, shard_id, message) for kind, message in contents.problems)
        successes = parquet.successes if parquet else None
        if successes is not None and contents.keys != successes:
            foreign = sorted(set(contents.keys) - set(successes))
            missing = sorted(set(successes) - set(contents.keys))
            duplicate = sorted(k for k, n in Counter(contents.keys).items() if n > 1)
            detail = "; ".join(f"{what} {_span(keys)}" for what, keys in
                               (("foreign keys", foreign), ("missing keys", missing), ("duplicate keys", duplicate))
                               if keys) or "keys out of order"
            yield Finding(KEYS, shard_id, f"{path}: holds other samples than its parquet: {detail}")
        entry = self.entries.get(name, {})
        counts = {
            "tar": len(contents.keys),
            "stats": stats.successes if stats else None,
            "parquet": len(successes) if successes is not None else None,
            SIZES_JSON: self.sizes.get(name + TAR_SUFFIX),
            DATASET_JSON: entry.get("nsamples"),
        }
        counts = {source: n for source, n in counts.items() if n is not None}
        if len(set(counts.values())) > 1:
            yield Finding(COUNTS, shard_id, f"{name}: sample count mismatch: "
                                            + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for source, declared in (("stats", stats.tar_bytes if stats else None), (DATASET_JSON, entry.get("filesize"))):
            if declared is not None and declared != contents.size:
                yield Finding(COUNTS, shard_id, f"{path}: {contents.size} bytes, {source} says {declared}")


@dataclass
class _Parquet:
    table: Any  # pyarrow.Table
    successes: list[str]  # keys of the successful samples, in row order


def _span(keys: Sequence[Any], most: int = 4) -> str:
    shown = ", ".join(str(k) for k in keys[:most])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > most else ''}]"


def _checksums(table: Any) -> dict[str, dict[str, str]]:
    """key -> {sha256 column -> value} of the samples in a shard's parquet (none for format 1)."""
    if table is None:
        return {}
    columns = [c for c in table.column_names if c.endswith("_sha256")]
    rows = table.select(["key", *columns]).to_pylist()
    return {r["key"]: {c: r[c] for c in columns if r[c] is not None} for r in rows}


class _Hashing:
    """A read-only stream that hashes and counts what passes through it (tarfile's stream mode only calls read)."""

    def __init__(self, f: Any):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


@dataclass
class _TarContents:
    keys: list[str] = field(default_factory=list)  # in tar order, once per sample
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    sha256: str = ""
    size: int = 0


def _read_tar(fs: Any, path: str, checksums: dict[str, dict[str, str]], required: tuple[str, ...]) -> _TarContents:
    """Stream the whole tar once: its sha256 and size; readable to the end, fields of a key contiguous, ``required``
    fields present, each field's sha256 as the parquet says (``checksums``: key -> column -> sha256), mask values
    allowed."""
    result = _TarContents()
    seen: set[str] = set()
    current: str | None = None
    sample: dict[str, bytes] = {}

    def finish() -> None:
        if current is not None:
            result.problems.extend((SAMPLE, p) for p in
                                   _check_sample(path, current, sample, checksums.get(current, {}), required))

    with fs.open(path, "rb") as raw:
        stream = _Hashing(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = posixpath.basename(member.name).partition(".")
                    if key != current:
                        finish()
                        if key in seen:
                            result.problems.append((SAMPLE, f"{path}: fields of sample {key} are not contiguous"))
                        else:
                            seen.add(key)
                            result.keys.append(key)
                        current, sample = key, {}
                    sample[ext] = tar.extractfile(member).read()
            finish()
        except (tarfile.TarError, EOFError, OSError) as e:
            if current is not None:
                result.keys.pop()  # the sample being read is incomplete
            result.problems.append((TAR_UNREADABLE, f"{path}: unreadable tar ({type(e).__name__}: {e}) after "
                                                    f"{len(result.keys)} samples"))
        while stream.read(1 << 20):  # the rest (end-of-archive padding), so the digest covers the whole file
            pass
    result.sha256, result.size = stream.digest.hexdigest(), stream.size
    return result


def _check_sample(
    path: str, key: str, sample: dict[str, bytes], checksums: dict[str, str], required: tuple[str, ...]
) -> list[str]:
    where = f"{path}: sample {key}"
    corrupt = [
        f"{where}: {ext} sha256 {actual[:12]}... differs from the parquet's {expected[:12]}..."
        for ext, data in sorted(sample.items())
        if (expected := checksums.get(checksum_column(ext, sample))) and (actual := hashlib.sha256(data).hexdigest()) != expected
    ]
    missing = [f for f in required if f not in sample]
    if not any(f in sample for f in IMAGE_FIELDS):
        missing.append("/".join(IMAGE_FIELDS))
    if missing:
        return [*corrupt, f"{where}: missing fields {', '.join(missing)}"]
    try:
        allowed = {BACKGROUND_LABEL, IGNORE_LABEL, *sample_classes(sample_record(sample))}
    except (ValueError, KeyError, TypeError) as e:
        return [*corrupt, f"{where}: json unreadable or without class ids: {e}"]
    try:
        values = set(np.unique(decode_mask(sample[MASK_FIELD])).tolist())
    except (ValueError, OSError) as e:
        return [*corrupt, f"{where}: mask.png unreadable: {e}"]
    bad = sorted(values - allowed)
    outside = [f"{where}: mask values {bad} outside the sample's class ids {sorted(allowed)}"] if bad else []
    return [*corrupt, *outside]
