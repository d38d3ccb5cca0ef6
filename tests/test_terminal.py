"""What a user sees in a terminal: ``generate`` under a pseudo-terminal shows its phases in order and then the
summary; from ``generate``, the Python API's ``seediff.generate`` and ``eval`` alike, no library warning, Ray message
or forwarded actor output reaches the terminal (they are in the log file the summary names); the driver never
imports the model stack, whose teardown kept the command alive after the summary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from tests.e2e_support import REPO, SETTINGS, cli_env, write_inputs

PHASES = ("starting Ray", "loading the model on 2 actors", "generating", "writing the index", "summary:")
# Library and Ray output as it would appear: Python warnings, logging records, Ray's own lines, actor prefixes.
NOISE = re.compile(r"warn|\(pid=|\(ShardActor|\bINFO\b|Ray instance|Ray cluster|torchvision|Traceback|token", re.I)
PROBE = (
    "import sys; from seediff.pipeline.cli import main; rc = main(sys.argv[1:]); "
    "print('model stack imported:', [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]); "
    "sys.exit(rc)"
)


def run_in_pty(command: list[str], timeout: float = 420) -> tuple[int, str, float]:
    """(exit status, everything the terminal received, seconds from the summary's first byte to the exit)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns, like a real one
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    received, summary_at, deadline = b"", None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not chunk:
                break
            received += chunk
            if summary_at is None and b"summary:" in received:
                summary_at = time.monotonic()
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    lingered = time.monotonic() - summary_at if summary_at else float("nan")
    return status, received.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n"), lingered


def test_generate_in_a_terminal_shows_phases_in_order_and_no_library_output(tmp_path):
    manifest, config = write_inputs(tmp_path / "inputs")
    log_file = tmp_path / "run.log"
    status, screen, lingered = run_in_pty([
        sys.executable, "-c", PROBE, "generate", str(manifest), "--out", str(tmp_path / "out"), "--config",
        str(config), "--num-actors", "2", "--log-file", str(log_file),
        "--address", "local",  # always a new local Ray: never a cluster that another process started here
    ])
    assert status == 0, screen
    positions = [screen.find(phase) for phase in PHASES]
    assert -1 not in positions and positions == sorted(positions), (positions, screen)
    noisy = [line for line in screen.splitlines() if NOISE.search(line)]
    assert not noisy, noisy
    assert "9 samples written" in screen and f"log (library messages, Ray, actors' stderr): {log_file}" in screen
    assert "model stack imported: []" in screen
    # the library output went to the log file instead
    assert re.search(r"worker\.py:\d+ -- ", log_file.read_text()), "Ray's own messages are not in the log"
    print(f"returned {lingered:.2f} s after the summary began")


API_PROBE = (
    "import json, sys, seediff; "
    "summary = seediff.generate(sys.argv[1], sys.argv[2], config=json.loads(sys.argv[3]), "
    "runtime={'num_actors': 1, 'address': 'local'}); "  # a new local Ray, never another process's cluster
    "print('written', summary.samples_written, 'log', summary.paths['log'])"
)


def test_the_python_api_in_a_terminal_prints_no_library_output(tmp_path):
    manifest, _ = write_inputs(tmp_path / "inputs")
    status, screen, _ = run_in_pty([sys.executable, "-c", API_PROBE, str(manifest), str(tmp_path / "out"),
                                    json.dumps(SETTINGS)])
    assert status == 0, screen
    noisy = [line for line in screen.splitlines() if NOISE.search(line)]
    assert not noisy, noisy
    (log,) = re.findall(r"written 9 log (\S+)", screen)
    assert re.search(r"worker\.py:\d+ -- ", open(log).read()), "Ray's own messages are not in the log"


def test_eval_in_a_terminal_prints_no_library_output(tmp_path):
    from tests.test_annotate import FLAGS, write_voc_fixture

    write_voc_fixture(tmp_path / "VOC2012")
    log_file = tmp_path / "eval.log"
    status, screen, _ = run_in_pty([
        sys.executable, "-m", "seediff", "eval", str(tmp_path / "VOC2012"), "--layout", "voc", "--out",
        str(tmp_path / "eval"), *FLAGS, "--address", "local", "--log-file", str(log_file),
    ])
    assert status == 0, screen
    noisy = [line for line in screen.splitlines() if NOISE.search(line)]
    assert not noisy, noisy
    assert "seediff: mIoU" in screen and re.search(r"worker\.py:\d+ -- ", log_file.read_text())
