"""Driver loop that runs shards on an elastic pool of Ray actors: shards go only to ready actors, a bounded number in
flight per actor, retries on another actor, per-shard and start-up timeouts, actor replacement, a pool size that
follows the cluster, and failures handled by kind (transient: backoff; run-level: stop). Generic over any actor with
``generate_shard(shard, attempt) -> dict``; the only module that uses Ray on the driver.

Timing model: a synchronous actor (max_concurrency=1) runs its tasks one at a time in submission order, so the
head of an actor's queue is the shard that is running. Shards are submitted only to actors whose constructor has
finished (seen through the built-in ``__ray_ready__``), so a shard's clock starts at submission to an idle actor or
when the shard ahead of it finishes. An actor that is not ready within the start-up timeout (a node that never comes,
a stalled model download) is killed and replaced; it never holds shards. Only a shard that had started is charged an
attempt when its actor dies; shards queued behind it are requeued for free."""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from seediff.schemas.config import RuntimeOptions
from seediff.storage import DEVICE, RUN_LEVEL, TRANSIENT, failure_kind

log = logging.getLogger(__name__)

POLL_S = 1.0  # upper bound between timeout checks and progress ticks
POOL_CHECK_S = 5.0  # how often the pool size is re-read from the cluster
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 60.0  # transient errors: full-jitter exponential backoff
# Without --shard-timeout: a shard may run this long before any shard has completed (model warm-up, slow cards),
# afterwards ADAPTIVE_FACTOR times the slowest completed shard, never less than the floor.
INITIAL_SHARD_TIMEOUT_S = 4 * 3600.0
ADAPTIVE_FACTOR, ADAPTIVE_FLOOR_S = 4.0, 600.0
# An error that fails this many different shards alike, with no shard completing meanwhile (a config the model
# cannot run, a device fault on every actor), stops the run with that one message instead of burning every attempt.
ALIKE_SHARDS = 3
GPU_WAIT_S = 600.0  # without --gpu-wait: how long an autoscaling cluster may take to add GPU nodes


class DispatchError(RuntimeError):
    """The run cannot proceed at all: actors cannot start, or a run-level error (disk full, permission denied,
    missing credentials) makes every further shard fail the same way."""


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
    transient_failures: int = 0  # retried after a backoff, not charged as attempts

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
    shard: Any  # a ShardSpec: shard_id and len()
    ref: ray.ObjectRef
    started_at: float | None = None  # None while queued behind another shard


@dataclass
class _Slot:
    """One live actor and the shards submitted to it, in submission (= execution) order."""

    handle: Any
    ready_ref: ray.ObjectRef | None
    created_at: float
    queue: deque[_Task] = field(default_factory=deque)

    @property
    def id(self) -> str:
        return self.handle._actor_id.hex()

    @property
    def ready(self) -> bool:
        return self.ready_ref is None

    def start_head(self, now: float) -> None:
        if self.queue and self.queue[0].started_at is None:
            self.queue[0].started_at = now


def _short(error: BaseException) -> str:
    """One line: the last line of a remote traceback (the exception itself, also for a constructor that raised), or
    the first line of anything else."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    has_traceback = isinstance(error, RayTaskError) or getattr(error, "actor_init_failed", False)
    return lines[-1].strip() if has_traceback else lines[0].strip()


def backoff_s(failures: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^(failures-1))], at least 10% of it."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (failures - 1))
    return ceiling * rng.uniform(0.1, 1.0)


class Dispatcher:
    """Runs every shard on actors made by ``make_actor`` (a no-argument callable returning a Ray actor handle with
    ``generate_shard``). ``pool_size`` is the number of actors to keep: an int, or a callable re-read every
    ``POOL_CHECK_S`` seconds (the pool grows when GPUs join the cluster and shrinks, idle actors first, when they go).
    ``on_shard_done`` is called once per shard when it completes or finally fails; ``on_tick`` at least every
    ``POLL_S`` seconds. ``run`` raises DispatchError when actors cannot start or a run-level error occurs; the actors
    are killed on every way out, Ctrl-C included."""

    def __init__(
        self,
        shards: Sequence[Any],
        make_actor: Callable[[], Any],
        pool_size: int | Callable[[], int],
        runtime: RuntimeOptions,
        on_shard_done: Callable[[ShardRecord], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ):
        self.pool_size = pool_size if callable(pool_size) else (lambda: pool_size)
        self.target = self._read_pool_size()
        self.make_actor = make_actor
        self.runtime = runtime
        self.on_shard_done = on_shard_done or (lambda record: None)
        self.on_tick = on_tick or (lambda: None)
        self.specs = {s.shard_id: s for s in shards}
        self.records = {s.shard_id: ShardRecord(s.shard_id, len(s)) for s in shards}
        self.pending: deque[int] = deque(s.shard_id for s in shards)
        self.not_before: dict[int, float] = {}  # shard -> monotonic time its backoff ends
        self.avoid: dict[int, set[str]] = {}  # shard -> actors on which it raised
        self.slots: list[_Slot] = []
        self.startup_failures = 0  # consecutive actors that died or timed out before becoming ready
        self.alike: dict[str, set[int]] = {}  # error message -> shards it failed since the last completed shard
        self.slowest_s = 0.0  # longest completed shard, for the adaptive timeout
        self.rng = random.Random()
        self.pool_checked = time.monotonic()

    # -- public -------------------------------------------------------------------------------------------------

    def run(self) -> DispatchResult:
        t0 = time.monotonic()
        try:
            while self.pending or any(s.queue for s in self.slots):
                self._resize_pool()
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

    def _read_pool_size(self) -> int:
        size = int(self.pool_size())
        if size < 1:
            raise ValueError("the actor pool size must be >= 1")
        return size

    def _resize_pool(self) -> None:
        now = time.monotonic()
        if now - self.pool_checked >= POOL_CHECK_S:
            self.pool_checked = now
            target = self._read_pool_size()
            if target != self.target:
                log.info("actor pool: %d -> %d actors (cluster resources changed)", self.target, target)
                self.target = target
        surplus = len(self.slots) - self.target
        # Shrink through actors that hold no shards, those still starting first; busy actors finish their shards.
        for slot in sorted((s for s in self.slots if not s.queue), key=lambda s: s.ready)[: max(surplus, 0)]:
            self._retire(slot, "pool shrank")
        while len(self.slots) < self.target:
            handle = self.make_actor()
            self.slots.append(_Slot(handle, handle.__ray_ready__.remote(), now))

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
            if not slot.ready:
                continue
            while len(slot.queue) < self.runtime.shards_in_flight_per_actor:
                shard_id = self._next_shard_for(slot, now)
                if shard_id is None:
                    break
                spec, attempt = self.specs[shard_id], self.records[shard_id].attempts + 1
                slot.queue.append(_Task(spec, slot.handle.generate_shard.remote(spec, attempt)))
                slot.start_head(now)

    def _next_shard_for(self, slot: _Slot, now: float) -> int | None:
        """First pending shard past its backoff that has not raised on this actor; a shard that raised on every live
        actor may go back to one of them rather than wait forever."""
        live = {s.id for s in self.slots}
        for shard_id in self.pending:
            if self.not_before.get(shard_id, 0.0) > now:
                continue
            avoid = self.avoid.get(shard_id, ())
            if slot.id not in avoid or live <= avoid:
                self.pending.remove(shard_id)
                self.not_before.pop(shard_id, None)
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
            time.sleep(self._wait_timeout())
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
                self._startup_failed(_short(e), e)
            log.warning("actor %s died: %s", slot.id[:8], _short(e))
            self._retire(slot, f"actor died: {_short(e)}")
            return
        except RayTaskError as e:
            assert task is not None  # __ray_ready__ cannot raise a task error
            slot.queue.remove(task)
            if failure_kind(e.cause if e.cause is not None else e) == DEVICE:
                # The device of this process is broken (a sticky CUDA error): charge the shard, give the shards
                # queued behind it back for free and replace the process.
                log.warning("actor %s: device error (%s); replacing it", slot.id[:8], _short(e))
                for queued in slot.queue:
                    queued.started_at = None
                self._charge(task.shard.shard_id, _short(e))
                self._retire(slot, f"device error: {_short(e)}")
                return
            slot.start_head(now)
            self._task_failed(slot, task, e, now)
            return
        if task is None:
            slot.ready_ref = None
            self.startup_failures = 0
        else:
            self._succeeded(slot, task, value, now)
            slot.start_head(now)

    def _task_failed(self, slot: _Slot, task: _Task, error: RayTaskError, now: float) -> None:
        shard_id, message = task.shard.shard_id, _short(error)
        kind = failure_kind(error.cause if error.cause is not None else error)
        if kind == RUN_LEVEL:
            raise DispatchError(f"run stopped: shard {shard_id}: {message}") from error
        if kind == TRANSIENT:
            record = self.records[shard_id]
            record.transient_failures += 1
            record.error = message
            if record.transient_failures <= self.runtime.transient_retries:
                delay = backoff_s(record.transient_failures, self.rng)
                log.warning("shard %d: transient error (%s); retrying in %.1fs", shard_id, message, delay)
                self.not_before[shard_id] = now + delay
                self.pending.appendleft(shard_id)
                return
        self.avoid.setdefault(shard_id, set()).add(slot.id)
        self._charge(shard_id, message)

    def _succeeded(self, slot: _Slot, task: _Task, stats: dict[str, Any], now: float) -> None:
        if task in slot.queue:
            slot.queue.remove(task)
        record = self.records[task.shard.shard_id]
        record.attempts += 1
        record.stats, record.error, record.actor_id = stats, None, slot.id
        record.run_s = now - task.started_at if task.started_at is not None else 0.0
        self.slowest_s = max(self.slowest_s, record.run_s)
        self.alike.clear()
        self.on_shard_done(record)

    def _charge(self, shard_id: int, error: str) -> None:
        """Count a failed attempt; requeue the shard at the front after a backoff, or give up on it after
        max_attempts. The same error on ALIKE_SHARDS shards (every shard, when fewer; at least two) with none
        completing meanwhile stops the run: it is not the shards' fault."""
        record = self.records[shard_id]
        record.attempts += 1
        record.error = error
        failed_alike = self.alike.setdefault(error, set())
        failed_alike.add(shard_id)
        if len(failed_alike) >= max(2, min(ALIKE_SHARDS, len(self.records))):
            raise DispatchError(f"run stopped: {len(failed_alike)} shards failed alike, none completed: {error}")
        if record.attempts < self.runtime.max_attempts:
            delay = backoff_s(record.attempts, self.rng)
            log.warning("shard %d attempt %d failed (%s); retrying in %.1fs", shard_id, record.attempts, error, delay)
            self.not_before[shard_id] = time.monotonic() + delay
            self.pending.appendleft(shard_id)
        else:
            log.error("shard %d failed after %d attempts: %s", shard_id, record.attempts, error)
            self.on_shard_done(record)

    def _startup_failed(self, reason: str, error: BaseException | None = None) -> None:
        """Count an actor that failed to start; stop the run only when none is working: a pool asking for more
        actors than can be placed now (--min-actors above the GPUs present, an autoscaler still adding nodes) keeps
        running on the actors it has and keeps trying to place the rest."""
        if self.ready_actors:
            log.warning("an actor failed to start (%s); running on the %d ready, placing it again", reason,
                        self.ready_actors)
            return
        self.startup_failures += 1
        if self.startup_failures >= max(self.runtime.max_attempts, self.target):
            raise DispatchError(
                f"{self.startup_failures} actors in a row failed to start; last: {reason}"
            ) from error

    # -- timeouts -----------------------------------------------------------------------------------------------

    def shard_timeout_s(self) -> float:
        """--shard-timeout when given, else adaptive: a multiple of the slowest completed shard, with a floor."""
        if self.runtime.shard_timeout_s is not None:
            return self.runtime.shard_timeout_s
        if self.slowest_s == 0.0:
            return INITIAL_SHARD_TIMEOUT_S
        return max(ADAPTIVE_FLOOR_S, ADAPTIVE_FACTOR * self.slowest_s)

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        timeout = self.shard_timeout_s()
        deadlines = [t.started_at + timeout for s in self.slots for t in s.queue if t.started_at is not None]
        deadlines += [s.created_at + self.runtime.actor_startup_timeout_s for s in self.slots if not s.ready]
        deadlines += [t for shard_id, t in self.not_before.items() if shard_id in self.pending]
        return max(0.0, min([POLL_S, *(d - now for d in deadlines)]))

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        timeout, startup = self.shard_timeout_s(), self.runtime.actor_startup_timeout_s
        for slot in list(self.slots):
            if not slot.ready:
                if now - slot.created_at > startup:
                    log.warning("actor %s not ready after %.0fs (--actor-startup-timeout); replacing it", slot.id[:8], startup)
                    self._retire(slot, "start-up timeout")
                    self._startup_failed(f"not ready within --actor-startup-timeout {startup:g}s")
                continue
            head = slot.queue[0] if slot.queue else None
            if head is not None and head.started_at is not None:
                running = now - head.started_at
                if running > timeout:
                    log.warning("shard %d ran %.0fs > timeout; killing its actor", head.shard.shard_id, running)
                    self._retire(slot, f"timeout: ran longer than {timeout:g}s (--shard-timeout)")


# ---- the shard actor pool of a generation run ---------------------------------------------------------------------


@dataclass
class ActorPool:
    """How a run makes its actors: ``make_actor()`` starts one, ``size()`` is how many to keep now, ``device`` is
    the device kind every actor uses ("cuda" or "cpu"; never mixed within a run)."""

    make_actor: Callable[[], Any]
    size: Callable[[], int]
    device: str


def shard_actor_pool(
    actor_class: type, config: Any, plan: Any, runtime: RuntimeOptions, against_cluster: bool, **actor_kwargs: Any
) -> ActorPool:
    """GPU actors, one per GPU present in the cluster (re-read while running), bounded by --min-actors/--max-actors
    (--num-actors N: at most N); with --device cpu, or --device auto on a local cluster without GPUs, CPU actors
    with one torch thread each. Against a cluster address a run never falls back to the CPU silently: with
    --device auto or cuda it waits up to --gpu-wait seconds for GPUs to join. Each actor is
    ``actor_class(config, runtime, plan, torch_threads=..., **actor_kwargs)``."""
    low, high = runtime.actor_bounds()
    gpus = _cluster_gpus()
    if runtime.device != "cpu" and gpus == 0 and (against_cluster or runtime.device == "cuda"):
        gpus = _wait_for_gpus(runtime, against_cluster, against_cluster and autoscaling())
    use_gpu = runtime.device == "cuda" or (runtime.device == "auto" and gpus > 0)
    actor_runtime = runtime.model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    # CPU float results depend on the intra-op thread count; one thread per CPU actor keeps the bytes independent
    # of how many actors run (a runtime option), and CPU throughput scales with --num-actors instead.
    torch_threads = None if use_gpu else 1
    remote = ray.remote(actor_class).options(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=0, max_task_retries=0)

    def size() -> int:
        if not use_gpu:
            return high or low
        return max(low, min(_cluster_gpus(), high or 1 << 30))

    def make_actor() -> Any:
        return remote.remote(config, actor_runtime, plan, torch_threads=torch_threads, **actor_kwargs)

    log.info("%d %s actors to start (ray %s)", size(), "GPU" if use_gpu else "CPU", ray.get_runtime_context().gcs_address)
    return ActorPool(make_actor, size, actor_runtime.device)


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def autoscaling() -> bool:
    """Whether an autoscaler that can add nodes watches the cluster (``ray up``, KubeRay's in-tree autoscaler):
    Ray's v2 autoscaler, or a v1 monitor whose node types come from a cluster config. Every head runs a v1 monitor;
    without a config it is read-only and names each node ``ray.head.default`` or ``node_<id>``."""
    import json

    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001 - no status to read: no autoscaler we can count on
        return False
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    types = {t for key in ("active_nodes", "idle_nodes", "pending_launches") for t in report.get(key) or {}}
    return any(t != "ray.head.default" and not t.startswith("node_") for t in types)


def _wait_for_gpus(runtime: RuntimeOptions, against_cluster: bool, autoscaled: bool) -> int:
    """Wait for GPUs where they can still join: --gpu-wait seconds when given, else GPU_WAIT_S on an autoscaling
    cluster; a cluster without GPUs or an autoscaler is reported at once (CPUs only with --device cpu)."""
    if not against_cluster:
        raise DispatchError("--device cuda: the local Ray cluster has no GPUs; use --device cpu or --address")
    wait_s = runtime.gpu_wait_s if runtime.gpu_wait_s is not None else GPU_WAIT_S if autoscaled else 0.0
    if wait_s == 0:
        raise DispatchError(
            f"the Ray cluster has no GPUs ({int(ray.cluster_resources().get('CPU', 0))} CPUs) and no autoscaler that "
            "could add GPU nodes: pass --device cpu to run on its CPUs, or --gpu-wait SECONDS while you add GPU nodes"
        )
    why = "the cluster's autoscaler can add GPU nodes" if autoscaled else "--gpu-wait"
    log.warning(
        "no GPUs in the Ray cluster yet; waiting up to %.0f s for GPU nodes to join (%s); pass --device cpu to run on "
        "CPUs", wait_s, why,
    )
    deadline = time.monotonic() + wait_s
    while (gpus := _cluster_gpus()) == 0:
        if time.monotonic() >= deadline:
            raise DispatchError(
                f"no GPUs joined the Ray cluster within {wait_s:g}s (--gpu-wait); "
                "pass --device cpu to run on CPUs"
            )
        time.sleep(POLL_S)
    return gpus
