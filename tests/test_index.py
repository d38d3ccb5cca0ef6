"""sizes.json and dataset.json list exactly the committed shards, and wids reads the dataset through them."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import wids

from seediff.pipeline.index import write_index
from tests.test_shards import make_config, write_shard
from seediff.workers.shards import ShardWriter


def read_json(url: str, name: str) -> dict:
    return json.loads(fsspec.open(f"{url}/{name}").open().read())


def test_index_lists_exactly_the_committed_shards(storage_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(storage_url)
    write_shard(config, 1)
    monkeypatch.setattr(ShardWriter, "_publish_stats", lambda self, stats: None)  # shard 0 never commits
    write_shard(config, 0)
    monkeypatch.undo()

    summary = write_index(config, num_shards=2)
    assert summary["committed_shards"] == 1 and summary["missing_shards"] == [0]
    assert summary["num_samples"] == 2 and summary["failures"] == 0
    stats = read_json(storage_url, "seediff-000001_stats.json")
    assert read_json(storage_url, "sizes.json") == {"seediff-000001.tar": 2, "__len__": 2}
    assert read_json(storage_url, "dataset.json") == {
        "wids_version": 1,
        "name": "seediff",
        "shardlist": [{"url": "seediff-000001.tar", "nsamples": 2, "filesize": stats["tar_bytes"]}],
    }


def test_wids_reads_the_dataset_through_dataset_json(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    for shard_id in (0, 1):
        write_shard(config, shard_id)
    assert write_index(config, num_shards=2)["num_samples"] == 5  # sample 2 failed

    dataset = wids.ShardListDataset(
        str(tmp_path / "dataset.json"), cache_dir=str(tmp_path / "cache"), transformations=[]
    )
    assert len(dataset) == 5
    keys = [dataset[i]["__key__"] for i in range(len(dataset))]
    assert keys == ["000000000000", "000000000001", "000000000003", "000000000004", "000000000005"]
    assert json.loads(dataset[3][".json"].read())["class_name"] == "dog"
