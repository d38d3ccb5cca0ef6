"""Driver loop that runs shards on a pool of Ray actors: a bounded number of shards in flight per actor, retries on
another actor, per-shard timeouts and actor replacement. Generic over any actor with
``generate_shard(shard: ShardSpec) -> dict``; the only module that uses Ray on the driver.

Timing model: a synchronous actor (max_concurrency=1) runs its tasks one at a time in submission order, so the
head of an actor's queue is the shard that is running; a shard's clock starts when it becomes the head of a
ready actor (constructor finished, seen through the built-in ``__ray_ready__``), not when it is submitted.
Only a shard that had started is charged an attempt when its actor dies; shards queued behind it are requeued
for free."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from seediff.schemas.config import RuntimeOptions
from seediff.schemas.records import ShardSpec

log = logging.getLogger(__name__)

POLL_S = 1.0  # upper bound between timeout checks and progress ticks


class DispatchError(RuntimeError):
    """The run cannot proceed at all, e.g. every new actor dies in its constructor."""


@dataclass
class ShardRecord:
    """What happened to one shard: its stats on success, its last error on failure."""

    shard_id: int
    num_samples: int
    attempts: int = 0
    stats: dict[str, Any] | None = None
    error: str | None = None
    actor_id: str | None = None  # the actor that completed it
    run_s: float | None = None  # driver-observed time from start on the actor to completion

    @property
    def ok(self) -> bool:
        return self.stats is not None


@dataclass
class DispatchResult:
    shards: dict[int, ShardRecord]
    wall_s: float

    @property
    def completed(self) -> list[ShardRecord]:
        return [r for r in self.shards.values() if r.ok]

    @property
    def failed(self) -> list[ShardRecord]:
        return [r for r in self.shards.values() if not r.ok]


@dataclass
class _Task:
    shard: ShardSpec
    ref: ray.ObjectRef
    started_at: float | None = None  # None while queued behind another shard or waiting for the constructor


@dataclass
class _Slot:
    """One live actor and the shards submitted to it, in submission (= execution) order."""

    handle: Any
    ready_ref: ray.ObjectRef | None
    queue: deque[_Task] = field(default_factory=deque)

    @property
    def id(self) -> str:
        return self.handle._actor_id.hex()

    @property
    def ready(self) -> bool:
        return self.ready_ref is None

    def start_head(self, now: float) -> None:
        if self.ready and self.queue and self.queue[0].started_at is None:
            self.queue[0].started_at = now


def _short(error: BaseException) -> str:
    """One line: the last line of a remote traceback (the exception itself, also for a constructor that raised), or
    the first line of anything else."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    has_traceback = isinstance(error, RayTaskError) or getattr(error, "actor_init_failed", False)
    return lines[-1].strip() if has_traceback else lines[0].strip()


class Dispatcher:
    """Runs every shard on ``num_actors`` actors made by ``make_actor`` (a no-argument callable returning a Ray
    actor handle with ``generate_shard``). ``on_shard_done`` is called once per shard when it completes or finally
    fails; ``on_tick`` at least every ``POLL_S`` seconds. ``run`` raises DispatchError when actors cannot start."""

    def __init__(
        self,
        shards: Sequence[ShardSpec],
        make_actor: Callable[[], Any],
        num_actors: int,
        runtime: RuntimeOptions,
        on_shard_done: Callable[[ShardRecord], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ):
        if num_actors < 1:
            raise ValueError("num_actors must be >= 1")
        self.make_actor = make_actor
        self.num_actors = num_actors
        self.runtime = runtime
        self.on_shard_done = on_shard_done or (lambda record: None)
        self.on_tick = on_tick or (lambda: None)
        self.specs = {s.shard_id: s for s in shards}
        self.records = {s.shard_id: ShardRecord(s.shard_id, len(s)) for s in shards}
        self.pending: deque[int] = deque(s.shard_id for s in shards)
        self.avoid: dict[int, set[str]] = {}  # shard -> actors on which it raised
        self.slots: list[_Slot] = []
        self.startup_failures = 0  # consecutive actors that died before becoming ready

    # -- public -------------------------------------------------------------------------------------------------

    def run(self) -> DispatchResult:
        t0 = time.monotonic()
        try:
            while self.pending or any(s.queue for s in self.slots):
                self._top_up_actors()
                self._fill_queues()
                self._wait_and_handle()
                self._enforce_timeouts()
                self.on_tick()
        finally:
            for slot in self.slots:
                ray.kill(slot.handle, no_restart=True)
            self.slots.clear()
        return DispatchResult(self.records, time.monotonic() - t0)

    @property
    def ready_actors(self) -> int:
        """Live actors whose constructor (model loading) has finished."""
        return sum(slot.ready for slot in self.slots)

    # -- actors -------------------------------------------------------------------------------------------------

    def _top_up_actors(self) -> None:
        while len(self.slots) < self.num_actors:
            handle = self.make_actor()
            self.slots.append(_Slot(handle, handle.__ray_ready__.remote()))

    def _retire(self, slot: _Slot, reason: str) -> None:
        """Kill an actor and settle everything submitted to it: results already finished are kept, the shard that
        was running is charged an attempt, shards that had not started are requeued without charge."""
        # A result the dying process had not yet sent back reads as a death too, so the charged shard is a best guess;
        # rerunning a shard that did commit is harmless because shard writes are idempotent.
        ray.kill(slot.handle, no_restart=True)
        self.slots.remove(slot)
        requeue: list[int] = []
        for task in list(slot.queue):
            finished, _ = ray.wait([task.ref], timeout=0)
            if finished:
                try:
                    self._succeeded(slot, task, ray.get(task.ref), time.monotonic())
                    continue
                except (RayActorError, RayTaskError):
                    pass
            if task.started_at is not None:
                self._charge(task.shard.shard_id, reason)
            else:
                requeue.append(task.shard.shard_id)
        self.pending.extendleft(reversed(requeue))

    # -- queues -------------------------------------------------------------------------------------------------

    def _fill_queues(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            while len(slot.queue) < self.runtime.shards_in_flight_per_actor:
                shard_id = self._next_shard_for(slot)
                if shard_id is None:
                    break
                spec = self.specs[shard_id]
                slot.queue.append(_Task(spec, slot.handle.generate_shard.remote(spec)))
                slot.start_head(now)

    def _next_shard_for(self, slot: _Slot) -> int | None:
        """First pending shard that has not raised on this actor; a shard that raised on every live actor may go
        back to one of them rather than wait forever."""
        live = {s.id for s in self.slots}
        for shard_id in self.pending:
            avoid = self.avoid.get(shard_id, set())
            if slot.id not in avoid or live <= avoid:
                self.pending.remove(shard_id)
                return shard_id
        return None

    # -- events -------------------------------------------------------------------------------------------------

    def _wait_and_handle(self) -> None:
        owners: dict[ray.ObjectRef, tuple[_Slot, _Task | None]] = {}
        for slot in self.slots:
            if slot.ready_ref is not None:
                owners[slot.ready_ref] = (slot, None)
            for task in slot.queue:
                owners[task.ref] = (slot, task)
        if not owners:
            return
        done, _ = ray.wait(list(owners), num_returns=1, timeout=self._wait_timeout())
        if done:  # collect everything else that is already finished too
            done, _ = ray.wait(list(owners), num_returns=len(owners), timeout=0)
        for ref in done:
            slot, task = owners[ref]
            if slot not in self.slots:  # retired while handling an earlier ref of this batch
                continue
            self._handle(slot, task, ref)

    def _handle(self, slot: _Slot, task: _Task | None, ref: ray.ObjectRef) -> None:
        now = time.monotonic()
        try:
            value = ray.get(ref)
        except RayActorError as e:
            if not slot.ready:
                self._startup_failed(e)
            log.warning("actor %s died: %s", slot.id[:8], _short(e))
            self._retire(slot, f"actor died: {_short(e)}")
            return
        except RayTaskError as e:
            assert task is not None  # __ray_ready__ cannot raise a task error
            slot.queue.remove(task)
            self.avoid.setdefault(task.shard.shard_id, set()).add(slot.id)
            self._charge(task.shard.shard_id, _short(e))
            slot.start_head(now)
            return
        if task is None:
            slot.ready_ref = None
            self.startup_failures = 0
            slot.start_head(now)
        else:
            self._succeeded(slot, task, value, now)
            slot.start_head(now)

    def _succeeded(self, slot: _Slot, task: _Task, stats: dict[str, Any], now: float) -> None:
        if task in slot.queue:
            slot.queue.remove(task)
        record = self.records[task.shard.shard_id]
        record.attempts += 1
        record.stats, record.error, record.actor_id = stats, None, slot.id
        record.run_s = now - task.started_at if task.started_at is not None else 0.0
        self.on_shard_done(record)

    def _charge(self, shard_id: int, error: str) -> None:
        """Count a failed attempt; requeue the shard at the front, or give up on it after max_attempts."""
        record = self.records[shard_id]
        record.attempts += 1
        record.error = error
        if record.attempts < self.runtime.max_attempts:
            log.warning("shard %d attempt %d failed (%s); retrying", shard_id, record.attempts, error)
            self.pending.appendleft(shard_id)
        else:
            log.error("shard %d failed after %d attempts: %s", shard_id, record.attempts, error)
            self.on_shard_done(record)

    def _startup_failed(self, error: BaseException) -> None:
        self.startup_failures += 1
        if self.startup_failures >= max(self.runtime.max_attempts, self.num_actors):
            raise DispatchError(
                f"{self.startup_failures} actors in a row died before becoming ready; last error: {_short(error)}"
            ) from error

    # -- timeouts -----------------------------------------------------------------------------------------------

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [
            t.started_at + self.runtime.shard_timeout_s for s in self.slots for t in s.queue if t.started_at is not None
        ]
        return max(0.0, min([POLL_S, *(d - now for d in deadlines)]))

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots):
            head = slot.queue[0] if slot.queue else None
            if head is not None and head.started_at is not None:
                running = now - head.started_at
                if running > self.runtime.shard_timeout_s:
                    log.warning("shard %d ran %.0fs > timeout; killing its actor", head.shard.shard_id, running)
                    self._retire(slot, f"timeout: ran longer than {self.runtime.shard_timeout_s:g}s")

