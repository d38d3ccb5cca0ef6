"""deploy/: the KubeRay manifests and runtime env parse and carry what a GPU run needs; the Dockerfile is pinned and
non-root."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


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
    assert spec["entrypoint"].startswith("python -m pipeline.cli generate ")
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
