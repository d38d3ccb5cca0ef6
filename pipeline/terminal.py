"""The terminal of a command (``generate``, ``resume``, ``annotate``, ``eval``, ``report``, ``export``, and the Python
API's functions of the same names): seediff's own lines (notes, progress, errors, the
summary) reach the user; everything else the process writes to stderr goes to a log file: Python warnings, Ray's
messages (its token-auth warning, "Started a local Ray instance"), C++ code writing to file descriptor 2, and the
actors' stderr that Ray forwards to the driver (library warnings printed once per actor). ``-v`` keeps it all on the
terminal instead.

The redirection is at the file-descriptor level because much of that output never passes through Python's
``sys.stderr`` or ``logging``."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from seediff.storage import private_dir, user_temp_dir

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Terminal:
    stream: TextIO  # where seediff's own lines go: the user's stderr
    log_path: str | None  # where everything else went; None with -v


LOG_DIR = user_temp_dir("seediff-logs")  # not "seediff": run from /tmp, that folder would shadow the package


def default_log_path(command: str) -> str:
    return str(LOG_DIR / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


@contextlib.contextmanager
def run_terminal(verbose: bool, log_path: str) -> Iterator[Terminal]:
    """For the duration of a run: seediff's loggers at WARNING and above on the terminal; with ``verbose``, all
    loggers at INFO and everything else on the terminal too; without it, the rest (INFO lines included) in
    ``log_path``. Inside another run terminal (the command line's, around an API call that opens its own), the
    outer one stays in charge and is yielded."""
    if _active:
        yield _active[-1]
        return
    root = logging.getLogger()
    if verbose:
        with _handler(root, logging.StreamHandler(sys.stderr), logging.INFO, TERMINAL_FORMAT), \
                _current(Terminal(sys.stderr, None)) as terminal:
            yield terminal
        return
    if Path(log_path).parent == LOG_DIR:
        private_dir(LOG_DIR)  # the user's own, mode 0700: logs may quote prompts and paths
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace") as log, \
            _stderr_to(log) as stream, \
            _handler(root, logging.StreamHandler(log), logging.INFO, LOG_FORMAT), \
            _handler(root, logging.StreamHandler(stream), logging.WARNING, TERMINAL_FORMAT, only="seediff"), \
            _current(Terminal(stream, log_path)) as terminal:
        yield terminal


_active: list[Terminal] = []  # the run terminal in charge, if any


@contextlib.contextmanager
def _current(terminal: Terminal) -> Iterator[Terminal]:
    _active.append(terminal)
    try:
        yield terminal
    finally:
        _active.pop()


@contextlib.contextmanager
def _stderr_to(log: TextIO) -> Iterator[TextIO]:
    """Point file descriptor 2 and ``sys.stderr`` at ``log``; yields a stream to where stderr pointed before."""
    original = sys.stderr
    original.flush()
    saved = os.dup(2)
    try:
        uses_fd2 = original.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):  # e.g. a test's capture object
        uses_fd2 = False
    terminal = (
        open(os.dup(saved), "w", buffering=1, encoding=original.encoding or "utf-8", errors="backslashreplace")
        if uses_fd2
        else original
    )
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    try:
        yield terminal
    finally:
        log.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = original
        if terminal is not original:
            terminal.close()


@contextlib.contextmanager
def _handler(logger: logging.Logger, handler: logging.Handler, level: int, form: str,
             only: str | None = None) -> Iterator[None]:
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(form))
    if only is not None:
        handler.addFilter(logging.Filter(only))
    previous = logger.level
    logger.setLevel(min(logger.level or logging.WARNING, logging.INFO))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
