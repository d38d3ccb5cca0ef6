"""Progress between shard commits: actors report samples written after every batch; the driver's count adds the
running shards' reports to the committed shards, without double counting retried or finished shards."""

from __future__ import annotations

import io
from pathlib import Path
import ray
import torch

from seediff.pipeline.dispatch import ShardRecord
from seediff.pipeline.progress import PartialCounts, Progress
from seediff.schemas.config import RuntimeOptions
from seediff.schemas.manifest import load_manifest
from tests.e2e_support import plan_of, run_config, write_inputs
from seediff.workers.actor import ShardActor


def test_partial_counts_replace_per_shard_and_ignore_reports_after_close() -> None:
    counts = PartialCounts()
    counts.report(0, 2)
    counts.report(1, 4)
    counts.report(0, 4)  # the same shard's later batch: replaces
    assert counts.total() == 8
    counts.report(1, 2)  # a retried shard restarts from its new attempt's count
    assert counts.total() == 6
    counts.close(0)
    counts.report(0, 6)  # a late report of a shard the driver already closed
    assert counts.total() == 2


def test_log_line_counts_running_shards_and_committed_ones_once() -> None:
    stream = io.StringIO()  # not a terminal: plain log lines
    progress = Progress(total=100, done=10, stream=stream, log_every_s=0.0)
    start = progress.started
    progress.tick(partial=30, now=start + 10)  # ten seconds into the run
    assert "progress: 40/100 samples (40.0%), 3.00 img/s over the last 10 s" in stream.getvalue()
    progress.shard_done(ShardRecord(shard_id=0, num_samples=30, attempts=1, stats={"successes": 30}))
    progress.tick(partial=0, now=start + 11)  # the shard's reports are closed once it is done
    assert stream.getvalue().splitlines()[-1].startswith("progress: 40/100 samples")


def test_rate_is_over_the_recent_window_not_since_the_start() -> None:
    stream = io.StringIO()
    progress = Progress(total=1000, done=0, stream=stream, log_every_s=0.0)
    start = progress.started
    progress.phase("loading the model on 2 actors")
    for second in range(0, 121, 5):  # 60 s of model loading, then 4 samples/s
        progress.tick(partial=max(0, second - 60) * 4, now=start + second)
    last = stream.getvalue().splitlines()[-1]
    assert "240/1000 samples" in last and "4.00 img/s over the last 30 s" in last and "ETA 03:10" in last
    assert stream.getvalue().splitlines()[0] == "phase: loading the model on 2 actors"


class RecordingCounts(PartialCounts):
    """The real counter, also keeping every report it received, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, int]] = []

    def report(self, shard_id: int, written: int) -> None:
        self.history.append((shard_id, written))
        super().report(shard_id, written)

    def reports(self) -> list[tuple[int, int]]:
        return self.history


def test_actor_reports_samples_written_after_every_batch_to_the_ray_counter(tmp_path: Path) -> None:
    manifest_path, _ = write_inputs(tmp_path / "inputs")
    config = run_config(str(tmp_path / "out"), {"model": "tiny", "resolution": 64, "steps": 2, "batch_size": 2,
                                                 "samples_per_shard": 5, "mask": {"refine": "none"}})
    plan = plan_of(load_manifest(manifest_path), config)
    threads = torch.get_num_threads()
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        counts = ray.remote(RecordingCounts).remote()
        actor = ShardActor(config, RuntimeOptions(device="cpu"), plan, torch_threads=1, progress=counts)
        actor.generate_shard(plan.shard(0))  # 5 samples in batches of 2
        # reports from one caller arrive in order, before this later call
        assert ray.get(counts.reports.remote()) == [(0, 2), (0, 4), (0, 5)]
        assert ray.get(counts.total.remote()) == 5
        counts.close.remote(0)
        assert ray.get(counts.total.remote()) == 0
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
