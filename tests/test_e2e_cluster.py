"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, one CPU each) and the CLI run against that cluster's
address: the output is complete and byte-identical to a clean run. Shards go only to actors whose model has loaded,
so on a loaded machine the first ready actor may take every shard of this small run; that a second node's actor
gets shards is checked with paced shards in tests/test_e2e_elastic.py."""

from __future__ import annotations

import pytest
from ray.cluster_utils import Cluster

from tests.e2e_support import check_dataset, digests, reference_run, run_cli, stats_files, write_inputs


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_actors_on_both_nodes(two_nodes, tmp_path):
    manifest, config = write_inputs(tmp_path / "inputs")
    reference = reference_run(manifest, str(tmp_path / "reference" / "out"))
    out = tmp_path / "out"
    done = run_cli(
        "generate", str(manifest), "--out", str(out), "--config", str(config),
        "--num-actors", "2", "--device", "cpu", "--address", two_nodes.address,
    )
    assert done.returncode == 0, done.stderr
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert len(nodes) == 2
    assert {s["runtime"]["node_id"] for s in stats_files(out).values()} <= nodes
    check_dataset(out, 9)
    assert digests(out) == reference
