"""The driver SIGKILLed after at least one committed shard, then the same command again (or ``seediff resume OUT``,
which repeats no flag): only the missing shards are generated, committed shards are left untouched, and the output is
byte-identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import psutil
import pytest

from tests.e2e_support import (
    HANG_GUARD_S,
    REPO,
    SETTINGS,
    check_dataset,
    cli_command,
    cli_env,
    digests,
    reference_run,
    run_cli,
    write_inputs,
)

# 9 samples in 5 interleaved shards (shard s: ids s, s+5): the rerun must expand the same progressions
SETTINGS_KILLED = {**SETTINGS, "shard_layout": "interleaved"}
NUM_SHARDS = 5


def kill_after_first_commit(command: list[str], out) -> None:
    """Start the CLI, SIGKILL the driver as soon as a shard is committed, then SIGKILL every process it had started
    (the local Ray instance and its actors, which Ray would stop only later), so nothing keeps writing behind the
    rerun's back."""
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not list(out.glob("*_stats.json")):
            assert proc.poll() is None, "the run ended before committing a shard"
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started = driver.children(recursive=True)  # taken before the kill, while the tree is intact
            driver.kill()
        proc.wait()
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(started, timeout=30)


@pytest.fixture(scope="module")
def inputs_and_reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("driver-kill")
    manifest, config = write_inputs(directory / "inputs", SETTINGS_KILLED)
    reference = reference_run(manifest, str(directory / "reference" / "out"), SETTINGS_KILLED)
    return manifest, config, reference


@pytest.mark.parametrize("rerun", ["same command", "resume"])
def test_driver_killed_then_rerun_is_byte_identical(inputs_and_reference, tmp_path, rerun):
    manifest, config, reference = inputs_and_reference
    out = tmp_path / "out"
    args = ("generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2")

    kill_after_first_commit(cli_command(*args), out)
    survivors = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*_stats.json")}
    assert 1 <= len(survivors) < NUM_SHARDS

    # resume: the manifest and settings come from run.json; only a runtime option is given
    done = run_cli(*args) if rerun == "same command" else run_cli("resume", str(out), "--num-actors", "2")
    assert done.returncode == 0, done.stderr
    assert f"{NUM_SHARDS - len(survivors)} shards generated, {len(survivors)} already committed, 0 failed" in done.stdout
    for name, (content, mtime) in survivors.items():  # committed shards were not regenerated
        assert (out / name).read_bytes() == content and (out / name).stat().st_mtime_ns == mtime
    check_dataset(out, 9)
    assert digests(out) == reference
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_ctrl_c_stops_with_one_line_and_exit_130(inputs_and_reference, tmp_path):
    manifest, config, _ = inputs_and_reference
    out = tmp_path / "out"
    command = cli_command("generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2")
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_GUARD_S
    while not list(out.glob("*_stats.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground driver
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr
    committed = len(list(out.glob("*_stats.json")))
    assert f"interrupted: {committed} of {NUM_SHARDS} shards committed; run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / "lease.json").exists()  # released: the rerun starts at once
