"""Shared pieces of the end-to-end tests (tests/test_e2e*.py): a small manifest and run config for the tiny model, a
clean reference run without Ray, the CLI as a subprocess, and the checks every finished output must pass."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import webdataset as wds
import yaml

from seediff.pipeline.index import write_index
from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import prepare_output
from seediff.schemas.config import RunConfig, RuntimeOptions
from seediff.schemas.manifest import Manifest, load_manifest
from seediff.workers.actor import ShardActor
from seediff.workers.families import resolve

REPO = Path(__file__).resolve().parents[1]
# 64 px, 2 steps, short PAMR, 2-sample shards: 9 samples -> 5 shards, the last one partial.
SETTINGS = {
    "model": "tiny",
    "resolution": 64,
    "steps": 2,
    "batch_size": 2,
    "samples_per_shard": 2,
    "mask": {"pamr_iterations": 5},
}
MANIFEST_CSV = "class_name,num_samples,prompt\ncat,5,a photo of a cat\ndog,4,a photo of a dog on grass\n"


def write_inputs(directory: Path, settings: dict | None = None) -> tuple[Path, Path]:
    """(manifest.csv, run.yaml) for the CLI; ``settings`` replaces SETTINGS."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest, config = directory / "manifest.csv", directory / "run.yaml"
    manifest.write_text(MANIFEST_CSV)
    config.write_text(yaml.safe_dump(settings or SETTINGS))
    return manifest, config


def run_config(out: str, settings: dict | None = None) -> RunConfig:
    """The config as a run resolves it against the model (family, size, layers: what run.json and the samples
    record)."""
    return resolve(RunConfig.model_validate({**(settings or SETTINGS), "output_url": out}))[0]


def reference_run(
    manifest_path: Path, out: str, settings: dict | None = None, manifest: Manifest | None = None
) -> dict[str, str]:
    """An uninterrupted run without Ray: one plain ShardActor over every shard. Returns the output digests.
    One torch thread, like each of the tests' CPU actors (2 actors on 2 CPUs): on the CPU, float results and
    therefore image bytes depend on the intra-op thread count."""
    config = run_config(out, settings)
    manifest = manifest or load_manifest(manifest_path)
    prepare_output(config, manifest, overwrite=False)
    plan = plan_of(manifest, config)
    threads = torch.get_num_threads()
    try:
        actor = ShardActor(config, RuntimeOptions(device="cpu"), plan, torch_threads=1)
        for shard_id in range(plan.num_shards):
            actor.generate_shard(plan.shard(shard_id))
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide; leave other tests as they were
    write_index(config, plan.num_shards)
    return digests(Path(out))


def plan_of(manifest: Manifest, config: RunConfig) -> Plan:
    return Plan(manifest.rows, config.seed, config.samples_per_shard, config.shard_layout)


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file that must be byte-identical across runs: tars, parquets and the index files (stats
    files hold timings and hosts; run.json holds the output location)."""
    names = [p for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet") or p.name in ("sizes.json", "dataset.json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


def stats_files(out: Path) -> dict[int, dict]:
    return {int(p.name.split("-")[1].split("_")[0]): json.loads(p.read_text()) for p in out.glob("*_stats.json")}


def check_dataset(out: Path, num_samples: int) -> None:
    """Every planned sample exactly once, every tar readable by
    webdataset.WebDataset, sizes.json and dataset.json consistent with the tars."""
    tars = sorted(out.glob("*.tar"))
    per_tar = {}
    keys = []
    for tar in tars:
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        assert all({"jpg", "mask.png", "cls", "txt", "json"} <= s.keys() for s in samples)
        per_tar[tar.name] = len(samples)
        keys += [s["__key__"] for s in samples]
    assert sorted(keys) == [f"{i:012d}" for i in range(num_samples)]  # each once (interleaved: not in tar order)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {**per_tar, "__len__": num_samples}
    dataset = json.loads((out / "dataset.json").read_text())
    assert [(e["url"], e["nsamples"], e["filesize"]) for e in dataset["shardlist"]] == [
        (t.name, per_tar[t.name], t.stat().st_size) for t in tars
    ]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "seediff", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment with the checkout importable (the CLI subprocess and its Ray workers)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# A bound for hangs, not for speed: a busy machine (CI at a load average of 10-15) runs a subprocess several times
# slower than a quiet one, and no test may fail from that alone (pytest-timeout's per-test bound is above it).
HANG_GUARD_S = 1200


def run_cli(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
