"""The actor pool follows the cluster: on a local multi-node Ray cluster (ray.cluster_utils.Cluster) whose nodes
declare one logical GPU each, a second node that joins mid-run gets an actor and shards; when it is removed mid-run
its shard is reassigned, and the output is byte-identical to a clean run.

The nodes' GPUs are Ray's logical resources (this machine has no GPU): the test actor is scheduled on one like a GPU
actor and computes on the CPU with one torch thread, exactly as the reference run does."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from seediff.pipeline.run import run_generation
from seediff.schemas.config import RuntimeOptions
from seediff.schemas.manifest import load_manifest
from seediff.workers.actor import ShardActor
from tests.e2e_support import HANG_GUARD_S, SETTINGS, check_dataset, digests, reference_run, run_config, write_inputs

SETTINGS_ONE_PER_SHARD = {**SETTINGS, "samples_per_shard": 1}  # 9 shards
PACE_S = 4.0  # each shard takes at least this long, so the run outlasts a new node's start-up (imports, model)


class LogicalGpuActor(ShardActor):
    """Test-only: holds a node's logical GPU, computes on the CPU with one thread, and paces its shards."""

    def __init__(self, config, runtime, plan, **kwargs):
        super().__init__(config, runtime.model_copy(update={"device": "cpu"}), plan, **{**kwargs, "torch_threads": 1})

    def generate_shard(self, shard, attempt=1):
        time.sleep(PACE_S)
        return super().generate_shard(shard, attempt)


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def node_ids_of_stats(out) -> list[str]:
    ids = []
    for path in out.glob("*_stats.json"):
        try:
            ids.append(json.loads(path.read_text())["runtime"]["node_id"])
        except (ValueError, KeyError):
            pass
    return ids


def test_a_node_joining_gets_shards_and_a_node_leaving_has_them_reassigned(cluster, tmp_path):
    manifest, _ = write_inputs(tmp_path / "inputs", SETTINGS_ONE_PER_SHARD)
    reference = reference_run(manifest, str(tmp_path / "reference" / "out"), SETTINGS_ONE_PER_SHARD)
    out = tmp_path / "out"
    ray.init(address=cluster.address)  # in this thread: Ray's node start-up needs the main thread
    runtime = RuntimeOptions(device="cuda", address=cluster.address, actor_startup_timeout_s=120, shard_timeout_s=300)
    outcome: list = []
    run = threading.Thread(target=lambda: outcome.append(run_generation(
        load_manifest(manifest), run_config(str(out), SETTINGS_ONE_PER_SHARD), runtime, actor_class=LogicalGpuActor
    )), daemon=True)
    run.start()

    deadline = time.monotonic() + HANG_GUARD_S
    while not list(out.glob("*_stats.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    joined = cluster.add_node(num_cpus=1, num_gpus=1)  # the pool grows to 2 actors within POOL_CHECK_S
    while joined.node_id not in node_ids_of_stats(out) and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert joined.node_id in node_ids_of_stats(out), "the joined node got no shard"
    cluster.remove_node(joined)  # while its actor runs its next shard
    run.join(timeout=HANG_GUARD_S)

    assert outcome and outcome[0].ok, outcome[0].format() if outcome else "the run did not finish"
    assert len(set(node_ids_of_stats(out))) == 2
    check_dataset(out, 9)
    assert digests(out) == reference
