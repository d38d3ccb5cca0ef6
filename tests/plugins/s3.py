"""Storage backends for tests: a moto S3 server on 127.0.0.1 (real HTTP, reached through s3fs) and output roots on
local disk, ``memory://`` and ``s3://``.

The server's endpoint and dummy credentials go into ``os.environ``, so s3fs/botocore in this process and in
processes started later (Ray workers of a local cluster started after this fixture) reach it."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import fsspec
import pytest
from moto.server import ThreadedMotoServer

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVERS: dict[int, ThreadedMotoServer] = {}  # port -> the server answering there now (replaced by an outage)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Start the moto S3 server for the session; yields its endpoint URL."""
    port = _free_port()
    server = _SERVERS[port] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # drop any s3fs built before the endpoint
        try:
            yield endpoint
        finally:
            _SERVERS[port].stop()


@pytest.fixture
def s3_outage(moto_s3: str) -> Callable[[float], threading.Thread]:
    """``s3_outage(seconds)``: stop the moto server now and start it again on the same port after ``seconds``, in a
    background thread (returned, to join). moto keeps its buckets in this process, so they survive the outage."""
    port = int(moto_s3.rsplit(":", 1)[1])

    def outage(seconds: float) -> threading.Thread:
        _SERVERS[port].stop()

        def restart() -> None:
            time.sleep(seconds)
            server = _SERVERS[port] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    return outage


@pytest.fixture
def s3_output_url(moto_s3: str) -> str:
    """``s3://<fresh bucket>/out`` on the moto server."""
    bucket = f"seediff-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/out"


@pytest.fixture
def memory_output_url() -> Iterator[str]:
    """A fresh root on fsspec's process-global in-memory filesystem, removed afterwards."""
    url = f"memory://seediff-{uuid.uuid4().hex[:12]}/out"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def storage_url(request: pytest.FixtureRequest, tmp_path: os.PathLike) -> str:
    """The same test on local disk, ``memory://`` and ``s3://`` (moto)."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue(f"{request.param}_output_url")
