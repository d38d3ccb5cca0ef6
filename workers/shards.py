"""Shard writer: one shard's ``.tar`` (WebDataset), ``.parquet`` (one row per attempted sample) and ``_stats.json``
(the commit marker), written in that order through fsspec so that no reader or resume ever sees a half-written shard.

Each file is published whole (``seediff.storage``); the stats file is published last, and only it says "done". It
records the sha256 of the tar and of the parquet, so every committed byte is covered by a checksum ``verify`` checks."""

from __future__ import annotations

import hashlib
import io
import os
import platform
import socket
import time
from dataclasses import asdict
from importlib import metadata as dist_metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from seediff import __version__ as SEEDIFF_VERSION
from seediff.schemas.config import RunConfig
from seediff.schemas.records import (
    PARQUET_SCHEMA,
    PARQUET_SUFFIX,
    STATS_SUFFIX,
    SUCCESS,
    TAR_SUFFIX,
    SampleOutcome,
    ShardSpec,
    ShardStats,
    failure_histogram,
    parquet_row,
    shard_file_pattern,
    shard_name,
)
from seediff.storage import StagedFile, is_local, output_fs, write_file

TAR_MTIME = 0  # every tar member gets this mtime, so identical inputs give byte-identical tars


class ShardWriter:
    """Writes one shard. ``add`` every sample of the shard in sample-id order (failures included), then ``commit``.
    Used as a context manager, leaving without commit removes what was staged."""

    def __init__(self, config: RunConfig, shard: ShardSpec, retry: bool = False):
        """``retry``: an earlier attempt at this shard may have died mid-write; its temp files are removed first
        (local outputs: they lie next to the final files; object stores stage per process, see storage)."""
        self.config, self.shard = config, shard
        self.fs, self.root = output_fs(config.output_url)
        self.name = shard_name(config.shard_prefix, shard.shard_id, config.shard_digits)
        if retry and is_local(self.fs):
            self._sweep_temp_files()
        self.start_time = time.time()
        self._rows: list[dict[str, Any]] = []  # parquet rows, one per added sample, in sample-id order
        self._closed = False  # no more add(): commit started or aborted
        self._committed = False
        self._tar_file = StagedFile(self.fs, self.path(TAR_SUFFIX))
        # encoder=False: values are already the final bytes; webdataset's default would re-encode images.
        self._tar = wds.TarWriter(self._tar_file.file, encoder=False, mtime=TAR_MTIME)

    def _sweep_temp_files(self) -> None:
        pattern = shard_file_pattern(self.config.shard_prefix, self.config.shard_digits)
        with os.scandir(self.root) as entries:
            for entry in entries:
                m = pattern.match(entry.name)
                if m and m["temp"] and int(m["shard"]) == self.shard.shard_id:
                    os.remove(entry.path)

    def path(self, suffix: str) -> str:
        return f"{self.root}/{self.name}{suffix}"

    @property
    def added(self) -> int:
        """Samples added so far (successes and failures)."""
        return len(self._rows)

    def add(self, outcome: SampleOutcome) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name}: add after commit/abort")
        ids = self.shard.ids
        expected = ids[self.added] if self.added < len(ids) else None
        if outcome.spec.sample_id != expected:
            raise ValueError(f"shard {self.name}: expected sample {expected}, got {outcome.spec.sample_id}")
        fields = outcome.fields if outcome.status == SUCCESS else None
        if fields is not None:
            self._tar.write({"__key__": outcome.spec.key, **fields})
        self._rows.append(parquet_row(outcome, self.shard.shard_id, fields))

    def commit(self, runtime_info: dict[str, Any]) -> dict[str, Any]:
        """Publish tar, then parquet, then stats (the commit marker). Returns the stats as a dict."""
        if self.added != len(self.shard):
            raise ValueError(f"shard {self.name}: commit after {self.added} of {len(self.shard)} samples")
        self._closed = True
        tar_bytes = self._publish_tar()
        parquet_bytes, parquet_sha256 = self._publish_parquet()
        stats = self._stats(tar_bytes, parquet_bytes, runtime_info, self._tar_file.sha256, parquet_sha256)
        self._publish_stats(stats)
        self._committed = True
        return asdict(stats)

    def abort(self) -> None:
        """Drop the staged tar. Files already published by a failed commit stay; resume removes them."""
        self._closed = True
        try:
            self._tar.close()  # finish the tar stream into the staged file, or tarfile's finalizer writes later
        finally:
            self._tar_file.discard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def _publish_tar(self) -> int:
        self._tar.close()  # writes the end-of-archive blocks; the staged file stays open
        return self._tar_file.publish()

    def _publish_parquet(self) -> tuple[int, str]:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self._rows, schema=PARQUET_SCHEMA), buf, compression="zstd")
        data = buf.getvalue()
        return write_file(self.fs, self.path(PARQUET_SUFFIX), data), hashlib.sha256(data).hexdigest()

    def _publish_stats(self, stats: ShardStats) -> None:
        write_file(self.fs, self.path(STATS_SUFFIX), stats.to_json().encode())

    def _stats(
        self, tar_bytes: int, parquet_bytes: int, runtime_info: dict[str, Any], tar_sha256: str | None,
        parquet_sha256: str,
    ) -> ShardStats:
        end = time.time()
        errors = [row["error"] or "unknown" for row in self._rows if row["status"] != SUCCESS]
        return ShardStats(
            shard_id=self.shard.shard_id,
            shard=self.name,
            count=len(self._rows),
            successes=len(self._rows) - len(errors),
            failures=len(errors),
            failures_by_reason=failure_histogram(errors),
            tar_bytes=tar_bytes,
            parquet_bytes=parquet_bytes,
            start_time=self.start_time,
            end_time=end,
            duration_s=end - self.start_time,
            host=socket.gethostname(),
            versions=software_versions(),
            runtime=dict(runtime_info),
            tar_sha256=tar_sha256,
            parquet_sha256=parquet_sha256,
        )


def software_versions() -> dict[str, str | None]:
    """Versions that shape the output; looked up from package metadata so torch is never imported just for this."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "seediff": SEEDIFF_VERSION}
    for dist in ("torch", "diffusers", "transformers", "webdataset", "pyarrow", "pillow"):
        try:
            versions[dist] = dist_metadata.version(dist)
        except dist_metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
