"""Progress of a generation run in samples: a tqdm bar with images/s and ETA on a terminal, a plain periodic log line
otherwise (Ray job logs, CI, ``nohup``), and the final run summary. Committed shards count in full; shards still
running count with the samples their actors have reported so far (``PartialCounts``)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from seediff.pipeline.dispatch import DispatchResult, ShardRecord

LOG_EVERY_S = 30.0


class PartialCounts:
    """Samples written so far by each running shard, reported by the shard actors after every batch. Runs as a small
    Ray actor on the driver's side: a 1000-sample shard takes minutes, and the bar should move meanwhile.
    A shard's count is replaced, not added to, so a retried shard restarts from its new attempt's count; once the
    driver closes a shard (committed or finally failed), late reports for it are ignored."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.closed: set[int] = set()

    def report(self, shard_id: int, written: int) -> None:
        if shard_id not in self.closed:
            self.counts[shard_id] = written

    def close(self, shard_id: int) -> None:
        self.closed.add(shard_id)
        self.counts.pop(shard_id, None)

    def total(self) -> int:
        return sum(self.counts.values())


class Progress:
    """``total`` samples planned, ``done`` of them already committed by an earlier run."""

    def __init__(self, total: int, done: int, stream: TextIO = sys.stderr, log_every_s: float = LOG_EVERY_S):
        self.total, self.done, self.stream, self.log_every_s = total, done, stream, log_every_s
        self.failed_shards = 0
        self.started = self.last_log = time.monotonic()
        self.new = 0  # samples committed in this run, for the rate
        self.partial = 0  # samples written by shards still running
        self.bar = (
            tqdm(total=total, initial=done, unit="img", file=stream, dynamic_ncols=True, smoothing=0.1)
            if stream.isatty()
            else None
        )

    def shard_done(self, record: ShardRecord) -> None:
        if not record.ok:
            self.failed_shards += 1
            return
        # Shown at the next tick, whose partial count no longer includes this shard.
        self.done += record.num_samples
        self.new += record.num_samples

    def tick(self, partial: int = 0) -> None:
        """``partial``: samples written so far by the shards still running."""
        self.partial = partial
        self._show()
        now = time.monotonic()
        if self.bar is None and now - self.last_log >= self.log_every_s:
            self.last_log = now
            print(self.line(now), file=self.stream, flush=True)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(self.done + self.partial - self.bar.n)
            self.bar.set_postfix(failed_shards=self.failed_shards, refresh=False)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        shown = self.done + self.partial
        rate = (self.new + self.partial) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - shown) / rate) if rate > 0 else "?"
        percent = 100.0 * shown / self.total if self.total else 100.0
        return (
            f"progress: {shown}/{self.total} samples ({percent:.1f}%), {rate:.2f} img/s, ETA {eta}, "
            f"{self.failed_shards} failed shards"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(result: DispatchResult, skipped_shards: int, index: dict[str, Any]) -> str:
    """Samples written/failed, shards, bytes, wall time, images/s per actor; the failed shards with their errors."""
    done = result.completed
    stats = [r.stats for r in done]
    written = sum(s["successes"] for s in stats)
    failed_samples = sum(s["failures"] for s in stats)
    size = sum(s["tar_bytes"] + s["parquet_bytes"] for s in stats)
    attempted = sum(r.num_samples for r in done)
    rate = attempted / result.wall_s if result.wall_s > 0 else 0.0
    hosts = {r.actor_id: r.stats.get("host", "?") for r in done}
    lines = [
        f"summary: {written} samples written, {failed_samples} failed (recorded in the parquet), "
        f"{len(done)} shards generated, {skipped_shards} already committed, {len(result.failed)} failed",
        f"  {tqdm.format_sizeof(size, 'B', divisor=1000)} written in {tqdm.format_interval(result.wall_s)} "
        f"({rate:.2f} img/s overall)",
    ]
    for actor_id, actor_rate in sorted(result.images_per_s_by_actor().items()):
        lines.append(f"  actor {actor_id[:8]} on {hosts[actor_id]}: {actor_rate:.2f} img/s")
    lines.append(
        f"  dataset: {index['committed_shards']} committed shards, {index['num_samples']} samples "
        f"({index['sizes_json']}, {index['dataset_json']})"
    )
    for r in sorted(result.failed, key=lambda r: r.shard_id):
        lines.append(f"  FAILED shard {r.shard_id} after {r.attempts} attempts: {r.error}")
    if result.failed:
        lines.append("  rerun the same command to generate the failed shards; committed shards are kept")
    return "\n".join(lines)

