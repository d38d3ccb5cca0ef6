"""Dataset-level index files, built from the committed shards' stats: ``sizes.json`` (open_clip convention:
tar basename -> sample count, plus ``__len__``) and ``dataset.json`` (a wids descriptor with relative shard URLs)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from seediff.pipeline.resume import read_committed_stats
from seediff.schemas.config import RunConfig
from seediff.schemas.records import DATASET_JSON, SIZES_JSON, TAR_SUFFIX, ShardStats
from seediff.storage import output_fs, write_file


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_index(
    config: RunConfig, num_shards: int, committed: Mapping[int, ShardStats] | None = None
) -> dict[str, Any]:
    """Write sizes.json and dataset.json listing exactly the committed shards among ``range(num_shards)``:
    ``committed`` (shard id -> stats, as a run has them: read at its start plus those it committed) or, when not
    given, those read from the output. Returns a summary: committed/missing shard ids, sample and failure totals,
    the written paths."""
    fs, root = output_fs(config.output_url)
    stats = read_committed_stats(config) if committed is None else committed
    shards = [stats[i] for i in range(num_shards) if i in stats]
    num_samples = sum(s.successes for s in shards)

    sizes: dict[str, int] = {s.shard + TAR_SUFFIX: s.successes for s in shards}
    sizes["__len__"] = num_samples
    dataset = {
        "wids_version": 1,
        "name": config.shard_prefix,
        "shardlist": [{"url": s.shard + TAR_SUFFIX, "nsamples": s.successes, "filesize": s.tar_bytes} for s in shards],
    }
    sizes_path, dataset_path = f"{root}/{SIZES_JSON}", f"{root}/{DATASET_JSON}"
    write_file(fs, sizes_path, _json_bytes(sizes))
    write_file(fs, dataset_path, _json_bytes(dataset))
    return {
        "committed_shards": len(shards),
        "missing_shards": [i for i in range(num_shards) if i not in stats],
        "num_samples": num_samples,
        "failures": sum(s.failures for s in shards),
        "sizes_json": sizes_path,
        "dataset_json": dataset_path,
    }
