"""The dispatch loop on real local Ray with a small test-only actor: every shard exactly once, retries after actor
death and task errors on another actor, timeouts measured from when a shard starts, giving up after max_attempts;
actors that cannot be scheduled or start too slowly are replaced without holding shards; transient errors back off,
run-level errors stop the run."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import ray

from seediff.pipeline import dispatch
from seediff.pipeline.dispatch import DispatchError, Dispatcher
from seediff.pipeline.plan import Plan
from seediff.schemas.config import RuntimeOptions
from seediff.schemas.manifest import class_row

ROWS = (class_row("cat", 1, 7, "a cat", "", 1), class_row("dog", 2, 5, "a dog", "", 2))
PLAN = Plan(ROWS, global_seed=0, samples_per_shard=2)  # 6 shards
SHARDS = [PLAN.shard(i) for i in range(PLAN.num_shards)]


class ScriptedActor:
    """Returns a stats dict naming the shard and actor. ``fault`` on the first attempt of ``fault_shard``
    (first attempt = the marker file does not exist yet): "exit" kills the process, "raise" raises, "sleep"
    sleeps far past any timeout; "always_raise" raises on every attempt; "transient" raises a connection error on the
    first two attempts; "disk_full" raises ENOSPC; "device" raises a CUDA error on the first attempt; "alike" raises
    the same error on every shard (a config the model cannot run); ``work_s`` is each shard's run time before any fault."""

    def __init__(self, marker_dir: str, fault: str | None = None, fault_shard: int = 0, work_s: float = 0.0):
        self.marker = Path(marker_dir) / f"fault-{fault_shard}"
        self.fault, self.fault_shard, self.work_s = fault, fault_shard, work_s

    def generate_shard(self, shard, attempt) -> dict:
        actor_id = ray.get_runtime_context().get_actor_id()
        time.sleep(self.work_s)  # before any fault, so the previous shard's reply has left a dying process
        if self.fault == "alike":
            raise RuntimeError("capture window (5, 6) averaged none of the 2 UNet calls")
        if shard.shard_id == self.fault_shard and self.fault == "always_raise":
            raise ValueError(f"shard {shard.shard_id} is cursed")
        if shard.shard_id == self.fault_shard and self.fault == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device", "/out/seediff-000000.tar")
        if shard.shard_id == self.fault_shard and self.fault == "transient":
            tries = len(list(self.marker.parent.glob("transient-*")))
            if tries < 2:
                (self.marker.parent / f"transient-{tries}").write_text(actor_id)
                raise ConnectionResetError("connection reset by peer")
        if shard.shard_id == self.fault_shard and self.fault and not self.marker.exists():
            self.marker.write_text(actor_id)
            if self.fault == "exit":
                os._exit(1)
            if self.fault == "raise":
                raise RuntimeError("first attempt fails")
            if self.fault == "device":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if self.fault == "sleep":
                time.sleep(3600)
        return {"shard_id": shard.shard_id, "sample_ids": list(range(shard.start, shard.stop)), "actor": actor_id}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(tmp_path, num_actors=2, runtime=None, **actor_kwargs):
    remote = ray.remote(ScriptedActor).options(num_cpus=1, max_restarts=0)
    done = []
    result = Dispatcher(
        SHARDS,
        lambda: remote.remote(str(tmp_path), **actor_kwargs),
        num_actors,
        runtime or RuntimeOptions(max_attempts=3, shard_timeout_s=60, shards_in_flight_per_actor=2),
        on_shard_done=done.append,
    ).run()
    assert sorted(r.shard_id for r in done) == list(range(len(SHARDS)))  # each reported exactly once
    return result


def assert_all_completed(result):
    assert not result.failed
    assert sorted(result.shards) == list(range(len(SHARDS)))
    ids = [i for r in sorted(result.completed, key=lambda r: r.shard_id) for i in r.stats["sample_ids"]]
    assert ids == list(range(PLAN.num_samples))


def test_every_shard_once_on_two_actors(tmp_path):
    result = run(tmp_path)
    assert_all_completed(result)
    assert all(r.attempts == 1 for r in result.shards.values())
    assert all(r.actor_id and r.run_s > 0 for r in result.completed)  # what the summary's per-actor rates use


def test_actor_death_retries_only_the_running_shard(tmp_path):
    result = run(tmp_path, fault="exit", fault_shard=1, work_s=0.3)
    assert_all_completed(result)
    dead_actor = (tmp_path / "fault-1").read_text()
    assert result.shards[1].attempts == 2
    assert result.shards[1].actor_id != dead_actor
    # the shard queued behind the dying one on the same actor was requeued without being charged
    assert all(r.attempts == 1 for r in result.shards.values() if r.shard_id != 1)


def test_task_error_retries_on_another_actor(tmp_path):
    result = run(tmp_path, fault="raise", fault_shard=2)
    assert_all_completed(result)
    assert result.shards[2].attempts == 2
    assert result.shards[2].actor_id != (tmp_path / "fault-2").read_text()


def test_shard_failing_every_attempt_is_reported(tmp_path):
    runtime = RuntimeOptions(max_attempts=2, shard_timeout_s=60, shards_in_flight_per_actor=2)
    result = run(tmp_path, runtime=runtime, fault="always_raise", fault_shard=3)
    assert [r.shard_id for r in result.failed] == [3]
    failed = result.shards[3]
    assert failed.attempts == 2 and "ValueError: shard 3 is cursed" in failed.error
    assert len(result.completed) == len(SHARDS) - 1


def test_timeout_kills_actor_and_requeues(tmp_path):
    runtime = RuntimeOptions(max_attempts=3, shard_timeout_s=2, shards_in_flight_per_actor=2)
    result = run(tmp_path, runtime=runtime, fault="sleep", fault_shard=0)
    assert_all_completed(result)
    assert result.shards[0].attempts == 2
    assert result.shards[0].actor_id != (tmp_path / "fault-0").read_text()


def test_without_a_fixed_timeout_a_shard_far_slower_than_the_completed_ones_is_retried(tmp_path, monkeypatch):
    # adaptive: ADAPTIVE_FACTOR x the slowest completed shard (~0.3 s here); the floor (600 s in production) is
    # lowered so the test takes seconds. The sleeping shard is the last, so it starts after others have completed.
    monkeypatch.setattr(dispatch, "ADAPTIVE_FLOOR_S", 3.0)
    runtime = RuntimeOptions(max_attempts=3, shards_in_flight_per_actor=1)
    assert runtime.shard_timeout_s is None
    result = run(tmp_path, runtime=runtime, fault="sleep", fault_shard=len(SHARDS) - 1, work_s=0.3)
    assert_all_completed(result)
    assert result.shards[len(SHARDS) - 1].attempts == 2
    assert all(r.attempts == 1 for r in result.shards.values() if r.shard_id != len(SHARDS) - 1)


def test_timeout_counts_from_start_not_submission(tmp_path):
    # One actor, all 6 shards in flight at once: the last waits ~5 x 0.6 s in the actor's queue, far beyond the
    # 1.5 s timeout, but each runs only 0.6 s, so nothing may time out.
    runtime = RuntimeOptions(max_attempts=1, shard_timeout_s=1.5, shards_in_flight_per_actor=6)
    result = run(tmp_path, num_actors=1, runtime=runtime, work_s=0.6)
    assert_all_completed(result)


def test_actors_that_cannot_start_stop_the_run(tmp_path):
    class Broken:
        def __init__(self):
            raise OSError("no such model")

        def generate_shard(self, shard, attempt):
            return {}

    remote = ray.remote(Broken).options(num_cpus=1, max_restarts=0)
    with pytest.raises(DispatchError, match="no such model"):
        Dispatcher(SHARDS, remote.remote, 2, RuntimeOptions(max_attempts=2)).run()


class SlowStart(ScriptedActor):
    """The first actor's constructor stalls (a model download that hangs); later ones start at once."""

    def __init__(self, marker_dir: str):
        marker = Path(marker_dir) / "slow-start"
        if not marker.exists():
            marker.write_text("stalled")
            time.sleep(3600)
        super().__init__(marker_dir)


def test_unschedulable_actor_does_not_hang_the_run(tmp_path):
    # The first actor asks for a resource no node has: it stays pending, gets no shards, and after the start-up
    # timeout it is replaced; the run completes on the others.
    made = []

    def make_actor():
        options = {"resources": {"nobody_has_this": 1}} if not made else {}
        made.append(options)
        return ray.remote(ScriptedActor).options(num_cpus=1, max_restarts=0, **options).remote(str(tmp_path))

    runtime = RuntimeOptions(shard_timeout_s=60, actor_startup_timeout_s=15)  # generous: worker start-up on a loaded machine
    result = Dispatcher(SHARDS, make_actor, 2, runtime).run()
    assert_all_completed(result)
    assert made[0] and len(made) >= 2


def test_constructor_past_startup_timeout_is_replaced(tmp_path):
    remote = ray.remote(SlowStart).options(num_cpus=1, max_restarts=0)
    runtime = RuntimeOptions(shard_timeout_s=60, actor_startup_timeout_s=15)  # generous: worker start-up on a loaded machine
    started = time.monotonic()
    result = Dispatcher(SHARDS, lambda: remote.remote(str(tmp_path)), 1, runtime).run()
    assert_all_completed(result)
    assert (tmp_path / "slow-start").exists() and time.monotonic() - started < 60
    assert all(r.attempts == 1 for r in result.shards.values())  # the stalled actor held no shard


def test_transient_errors_back_off_without_spending_attempts(tmp_path):
    runtime = RuntimeOptions(max_attempts=1, shard_timeout_s=60)
    result = run(tmp_path, runtime=runtime, fault="transient", fault_shard=4)
    assert_all_completed(result)
    assert result.shards[4].transient_failures == 2 and result.shards[4].attempts == 1


def test_run_level_error_stops_the_run_early(tmp_path):
    runtime = RuntimeOptions(max_attempts=3, shard_timeout_s=60)
    remote = ray.remote(ScriptedActor).options(num_cpus=1, max_restarts=0)
    done = []
    with pytest.raises(DispatchError, match="run stopped: shard 0: .*No space left on device"):
        Dispatcher(
            SHARDS, lambda: remote.remote(str(tmp_path), fault="disk_full"), 2, runtime, on_shard_done=done.append
        ).run()
    assert len(done) < len(SHARDS)


def test_device_error_retires_the_actor_and_the_shard_completes_elsewhere(tmp_path):
    result = run(tmp_path, fault="device", fault_shard=2, work_s=0.2)
    assert_all_completed(result)
    faulty = (tmp_path / "fault-2").read_text()
    assert result.shards[2].attempts == 2 and result.shards[2].actor_id != faulty
    assert all(r.actor_id != faulty for r in result.completed if r.shard_id > 2)  # never used again: retired
    # the shards queued behind the faulty one were given back without an attempt charged
    assert all(r.attempts == 1 for r in result.shards.values() if r.shard_id != 2)


def test_an_error_failing_every_shard_alike_stops_the_run_with_one_message(tmp_path):
    runtime = RuntimeOptions(max_attempts=3, shard_timeout_s=60)
    remote = ray.remote(ScriptedActor).options(num_cpus=1, max_restarts=0)
    done = []
    started = time.monotonic()
    with pytest.raises(DispatchError, match=r"3 shards failed alike, none completed: RuntimeError: capture window"):
        Dispatcher(SHARDS, lambda: remote.remote(str(tmp_path), fault="alike"), 2, runtime,
                   on_shard_done=done.append).run()
    assert done == [] and time.monotonic() - started < 30  # stopped early: no shard spent its attempts


def test_a_pool_larger_than_can_be_placed_keeps_running_on_the_placed_actors(tmp_path):
    # --min-actors above the GPUs present (C9): every actor after the first asks for a resource no node has; their
    # start-up timeouts must not stop the run while the placed actor works through the shards.
    made = []

    def make_actor():
        options = {"resources": {"nobody_has_this": 1}} if made else {}
        made.append(options)
        return ray.remote(ScriptedActor).options(num_cpus=1, max_restarts=0, **options).remote(str(tmp_path), work_s=2.5)

    runtime = RuntimeOptions(max_attempts=1, shard_timeout_s=60, actor_startup_timeout_s=6)  # the placed one starts
    result = Dispatcher(SHARDS, make_actor, 2, runtime).run()
    assert_all_completed(result)
    assert len(made) >= 3  # the unplaceable slot failed twice (which stopped the run before) and was placed again
