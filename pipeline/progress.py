"""Progress of a generation run: its phase, then samples with a recent rate and ETA; a tqdm bar on a terminal, plain
lines otherwise (Ray job logs, CI, ``nohup``). Committed shards count in full; shards still running count with the
samples their actors have reported so far (``PartialCounts``)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

from tqdm import tqdm

from seediff.pipeline.dispatch import ShardRecord

LOG_EVERY_S = 30.0
RATE_WINDOW_S = 30.0
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # postfix: ", ..."


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
    """``total`` samples planned, ``done`` of them already committed by an earlier run. Shows the run's phase
    (``phase``) and, while generating, the samples, the rate over the last ``RATE_WINDOW_S`` seconds (a rate since
    the start would include Ray start-up and model loading) and the ETA at that rate."""

    def __init__(self, total: int, done: int, stream: TextIO = sys.stderr, log_every_s: float = LOG_EVERY_S):
        self.total, self.done, self.stream, self.log_every_s = total, done, stream, log_every_s
        self.failed_shards = 0
        self.started = self.last_log = time.monotonic()
        self.partial = 0  # samples written by shards still running
        self.current_phase = ""
        self.history: deque[tuple[float, int]] = deque([(self.started, done)])  # (time, samples shown)
        self.bar = (
            tqdm(total=total, initial=done, unit="img", file=stream, dynamic_ncols=True, bar_format=BAR_FORMAT)
            if stream.isatty()
            else None
        )

    def phase(self, name: str) -> None:
        """Starting Ray, loading the model on N actors, generating, writing the index: one line each off a
        terminal, the bar's label on one."""
        if name == self.current_phase:
            return
        self.current_phase = name
        if self.bar is not None:
            self.bar.set_description_str(name)
        else:
            print(f"phase: {name}", file=self.stream, flush=True)

    def shard_done(self, record: ShardRecord) -> None:
        if not record.ok:
            self.failed_shards += 1
            return
        # Shown at the next tick, whose partial count no longer includes this shard.
        self.done += record.num_samples

    def tick(self, partial: int = 0, now: float | None = None) -> None:
        """``partial``: samples written so far by the shards still running."""
        now = time.monotonic() if now is None else now
        self.partial = partial
        self.history.append((now, self.done + partial))
        while len(self.history) > 2 and self.history[1][0] <= now - RATE_WINDOW_S:
            self.history.popleft()  # keep one point at or before the window's start
        if self.bar is not None:
            self.bar.n = self.done + self.partial
            # Before the first sample, a rate would only measure the model loading.
            self.bar.set_postfix_str(self._rate_text(now) if self.bar.n > self.bar.initial else "", refresh=True)
        elif now - self.last_log >= self.log_every_s:
            self.last_log = now
            print(self.line(now), file=self.stream, flush=True)

    def rate(self, now: float) -> float:
        """Samples per second over the last RATE_WINDOW_S seconds (since the start, if shorter)."""
        then, shown_then = self.history[0]
        return (self.done + self.partial - shown_then) / (now - then) if now > then else 0.0

    def _rate_text(self, now: float) -> str:
        rate = self.rate(now)
        remaining = self.total - self.done - self.partial
        eta = tqdm.format_interval(remaining / rate) if rate > 0 else "?"
        window = min(RATE_WINDOW_S, now - self.history[0][0])
        return f"{rate:.2f} img/s over the last {window:.0f} s, ETA {eta}, {self.failed_shards} failed shards"

    def line(self, now: float) -> str:
        shown = self.done + self.partial
        percent = 100.0 * shown / self.total if self.total else 100.0
        return f"progress: {shown}/{self.total} samples ({percent:.1f}%), {self._rate_text(now)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
