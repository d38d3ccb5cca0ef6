"""deploy/: the KubeRay manifests and runtime env parse and carry what a GPU run needs; the Dockerfile is pinned and
non-root."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from seediff.pipeline.review import inspect_dataset
from seediff.pipeline.verify import verify_dataset
from tests.e2e_support import HANG_GUARD_S, cli_env
from tests.test_readers import DEMO_FLAGS, REPO

DEPLOY = REPO / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # no generation on the head
    _check_pod(head["template"]["spec"], gpu=False)
    workers = spec["workerGroupSpecs"]
    assert workers, "at least one worker group"
    for group in workers:
        assert group["groupName"] and group["replicas"] >= 1
        _check_pod(group["template"]["spec"], gpu=True)


def _check_pod(pod: dict, gpu: bool) -> None:
    (container,) = pod["containers"]
    assert container["image"] and ":latest" not in container["image"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert "ray stop" in " ".join(pre_stop)
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
    if gpu:
        assert int(limits["nvidia.com/gpu"]) >= 1
        cache_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert cache_mounts["hf-cache"] == "/cache/huggingface"
        assert "hf-cache" in {v["name"] for v in pod["volumes"]}
    _check_no_inline_secrets(container)


def _check_no_inline_secrets(container: dict) -> None:
    for var in container.get("env", []):
        assert "value" not in var or not any(s in var["name"] for s in ("KEY", "TOKEN", "SECRET", "PASSWORD"))


def test_rayjob_runs_the_cli_and_cleans_up() -> None:
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m seediff generate ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_has_the_same_groups() -> None:
    cluster = _load("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_cluster_spec(cluster["spec"])
    job_spec = _load("rayjob.yaml")["spec"]["rayClusterSpec"]
    assert cluster["spec"]["headGroupSpec"] == job_spec["headGroupSpec"]
    assert cluster["spec"]["workerGroupSpecs"] == job_spec["workerGroupSpecs"]


def test_runtime_env_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert ".git" in env["excludes"]
    assert not any(k.startswith(("AWS_", "GOOGLE_", "HF_TOKEN")) for k in env.get("env_vars", {}))


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines()


def test_dockerfile_is_pinned_non_root_and_installs_the_package(dockerfile: list[str]) -> None:
    (base,) = [line.split()[1] for line in dockerfile if line.startswith("FROM ")]
    assert base.startswith("nvidia/cuda:") and "runtime" in base and not base.endswith(":latest")
    installs = [line.strip() for line in dockerfile if line.strip().startswith('"') and "==" in line]
    assert any(line.startswith('"ray[default]==') for line in installs)
    assert any(line.startswith('"diffusers==') for line in installs)
    (user,) = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert user not in ("root", "0")
    assert any("pip install --no-deps ." in line for line in dockerfile)
    assert any("HF_HOME=" in line for line in dockerfile)


def test_ray_version_matches_everywhere(dockerfile: list[str]) -> None:
    (arg,) = [line for line in dockerfile if line.startswith("ARG RAY_VERSION=")]
    image_ray = arg.split("=", 1)[1]
    assert image_ray == _load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    assert image_ray == _load("raycluster.yaml")["spec"]["rayVersion"]


# ---- a real `ray job submit` against a local head ----------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while choosing, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Head:
    jobs: str  # the job API (dashboard) address
    gcs: str  # the cluster address drivers connect to
    log: Path  # what `ray start` printed

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def local_ray_head(env: dict[str, str]) -> Iterator[Head]:
    """The README's ``ray start --head``, run with ``--block`` on 127.0.0.1 with every port chosen free and a private
    temp dir, so it never meets another Ray session on this machine. Stopped by signalling our own ``ray start``
    process, whose node then shuts down its raylet, GCS, dashboard and workers: ``ray stop`` is not used because it
    stops every Ray process of the machine, other sessions included."""
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(9)
    command = [
        "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
        "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, head, Path(temp_dir) / "ray-start.log")
        yield Head(address, f"127.0.0.1:{gcs}", Path(temp_dir) / "ray-start.log")
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_env(home: Path) -> dict[str, str]:
    """Environment for our head and the README's commands: no inherited cluster address or auth mode, and a home
    folder of its own, so that the token `ray get-auth-token --generate` writes (~/.ray/auth_token) is this test's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, "HOME": str(home)}


def readme_cluster_lines() -> list[str]:
    """The bash lines of the README's "On a Ray cluster" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### On a Ray cluster", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def _wait_for_jobs_api(address: str, head: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # the dashboard answers, if only to refuse this request
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray job API at {address} not up after {timeout_s}s:\n{log.read_text(errors='replace')[-4000:]}")


def test_the_readmes_ray_job_submit_runs_the_demo_on_a_local_head(tmp_path: Path) -> None:
    """The README's lines as written (only the head's flags that keep it apart from other sessions added, and its
    address and the output folder substituted), with token authentication on as Ray 2.60 turns it on. On the same
    head (no GPUs, no autoscaler), --device auto stops at once saying so instead of waiting for GPUs."""
    token, start, submit, stop = readme_cluster_lines()
    assert token.startswith("ray get-auth-token --generate") and start == "ray start --head" and stop == "ray stop"
    assert submit.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 ")
    home, out = tmp_path / "home", tmp_path / "demo-out"
    home.mkdir()
    env = _ray_env(home)
    subprocess.run(["bash", "-c", token], env=env, check=True, timeout=HANG_GUARD_S)
    assert (home / ".ray" / "auth_token").is_file()
    with local_ray_head(env) as head:
        command = submit.replace("http://127.0.0.1:8265", head.jobs).replace("/tmp/demo-out", str(out))
        for _ in range(10):  # the job API answers before the head's job agent has registered
            done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=HANG_GUARD_S)
            if "No available agent to submit job" not in done.stderr:
                break
            time.sleep(5)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + head.tail()
        assert "succeeded" in done.stdout
        started = time.monotonic()
        auto = subprocess.run(
            [sys.executable, "-m", "seediff", "generate", "examples/demo.csv", "--out", str(tmp_path / "auto-out"),
             *DEMO_FLAGS, "--address", head.gcs],
            cwd=REPO, env={**cli_env(), **env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=HANG_GUARD_S,
        )
        stopped_after = time.monotonic() - started
    assert verify_dataset(str(out)) == []
    info = inspect_dataset(str(out))
    assert info["shards"] == info["expected_shards"] == 1  # 12 samples, default shard size
    assert info["samples"] + info["failures"] == info["attempted"] == 12
    assert auto.returncode == 1, auto.stdout + auto.stderr
    assert ("the Ray cluster has no GPUs (2 CPUs) and no autoscaler that could add GPU nodes: pass --device cpu"
            in auto.stderr)
    print(f"--device auto on a cluster without GPUs stopped after {stopped_after:.1f} s (process start included)")


@pytest.mark.parametrize("v2, status, expected", [
    (False, None, False),  # no monitor has reported
    (False, {"autoscaler_report": None}, False),
    (False, {"autoscaler_report": {"active_nodes": {"ray.head.default": 1, "node_6f2a": 1}}}, False),  # read-only
    (False, {"autoscaler_report": {"active_nodes": {"head": 1}, "pending_launches": {"gpu-workers": 2}}}, True),
    (True, None, True),  # Ray's v2 autoscaler (KubeRay's in-tree autoscaler with v2 on)
])
def test_gpu_waits_happen_only_where_an_autoscaler_can_add_nodes(monkeypatch, v2, status, expected) -> None:
    import json

    import ray.autoscaler.v2.utils
    import ray.experimental.internal_kv

    from seediff.pipeline.dispatch import autoscaling

    monkeypatch.setattr(ray.autoscaler.v2.utils, "is_autoscaler_v2", lambda fetch_from_server: v2)
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get",
                        lambda key: None if status is None else json.dumps(status).encode())
    assert autoscaling() is expected
