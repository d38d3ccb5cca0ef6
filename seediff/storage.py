"""Storage both sides use: the filesystem of an output URL and publishing a file so that it appears only complete.

Local disk: a file grows under a hidden temp name next to its final path and is renamed when complete (atomic).
Object stores: an upload becomes visible only when it completes, so a file is staged on local disk and uploaded to its
final key. The staging folder is per process; a process killed mid-upload leaves its folder behind, and the next
actor on that machine removes it (``sweep_staging``)."""

from __future__ import annotations

import errno
import getpass
import hashlib
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import IO

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from seediff.schemas.config import InputError, RetryLater
from seediff.schemas.records import temp_name


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.geteuid())


def user_temp_dir(name: str) -> Path:
    """``<temp dir>/<name>-<user>``: a fixed folder of this user's (not created here; ``private_dir`` does)."""
    return Path(tempfile.gettempdir()) / f"{name}-{_user()}"


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that it is this user's own folder: a folder another user made (or a
    link planted there) could be read, or its staged files swapped before upload. Returns ``path``."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise StorageAccessError(f"{path}: not a folder of this user's (uid {os.geteuid()}); remove it or set TMPDIR "
                                 "to another temp folder")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


STAGING_ROOT = user_temp_dir("seediff-staging")  # <root>/<pid>/: one folder per process, the root this user's only
WRITE_PROBE_PREFIX = ".seediff-write-check-"  # check_access's probe object


def output_fs(output_url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path (no trailing slash) of an output URL."""
    fs, root = fsspec.core.url_to_fs(output_url)
    return fs, root.rstrip("/") or root


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def sweep_staging() -> list[Path]:
    """Remove the staging folders of processes that are gone: what an actor killed mid-upload left on this machine's
    disk. Folders of live processes (other actors uploading now) are kept. Returns the folders removed."""
    removed = []
    for folder in sorted(STAGING_ROOT.glob("*")) if STAGING_ROOT.is_dir() else ():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class StagedFile:
    """A file that appears under ``path`` only on ``publish()``; ``discard()`` (or leaving the ``with`` block
    unpublished) removes what was written. ``file`` is the binary stream to write to.

    Local disk: staged under a hidden temp name next to the final path, renamed on publish (atomic).
    Object stores: staged in the local temp directory and uploaded with ``put_file``, which is one PUT or a
    multipart upload that is aborted on error, so the final key appears only complete."""

    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        directory, base = posixpath.split(path)
        if is_local(fs):
            staging_dir = directory
            os.makedirs(staging_dir, exist_ok=True)
        else:
            staging_dir = str(private_dir(STAGING_ROOT) / str(os.getpid()))
            os.makedirs(staging_dir, mode=0o700, exist_ok=True)
        self.temp_path = os.path.join(staging_dir, temp_name(base, uuid.uuid4().hex))
        self.file: IO[bytes] = open(self.temp_path, "wb")  # noqa: SIM115 - closed by publish/discard
        self.sha256: str | None = None  # of the published bytes, once published

    def publish(self) -> int:
        """Make the file visible under its final path; returns its size in bytes. ``sha256`` is then the digest of
        the staged bytes, read back from the staging disk: what the commit marker records is what was stored."""
        size = self.file.tell()
        self.file.flush()
        self.sha256 = file_sha256(self.temp_path)
        if is_local(self.fs):
            os.fsync(self.file.fileno())  # the rename must not expose a file whose data is still in flight
            self.file.close()
            os.replace(self.temp_path, self.path)
        else:
            self.file.close()
            try:
                self.fs.put_file(self.temp_path, self.path)
            finally:
                os.remove(self.temp_path)
        return size

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.temp_path):
            os.remove(self.temp_path)

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.file.closed:
            self.discard()


class StorageAccessError(InputError):
    """An input or output URL this process cannot use (no credentials, no such bucket, no write permission); the
    message names the URL. Found during validation, before any model loads or Ray starts."""


class StorageUnreachable(StorageAccessError, RetryLater):
    """The store of a URL did not answer (connection refused, timeout, 5xx): retry later, not bad input."""


def check_access(url: str, write: bool) -> None:
    """Raise StorageAccessError unless ``url``'s store is reachable with this process's credentials, its bucket
    exists and, with ``write``, an object can be created (and removed) under it."""
    fs, root = output_fs(url)
    try:
        if is_local(fs):
            existing = root
            while not os.path.exists(existing) and existing not in ("", "/"):
                existing = os.path.dirname(existing)
            if write and not os.access(existing or "/", os.W_OK):
                raise StorageAccessError(f"{url}: not writable ({existing}: permission denied)")
            return
        bucket = root.split("/", 1)[0]
        fs.ls(bucket, detail=False)  # unlike exists(), raises on missing credentials and refused access
        if write:
            probe = f"{root}/{WRITE_PROBE_PREFIX}{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except StorageAccessError:
        raise
    except Exception as error:  # botocore/gcsfs errors share no base class; each is named in the message
        unreachable = failure_kind(error) == TRANSIENT  # the endpoint down, throttling: not the user's input
        raise (StorageUnreachable if unreachable else StorageAccessError)(
            f"{url}: {_access_problem(error, url)}" + ("; try again later" if unreachable else "")) from error


def _access_problem(error: Exception, url: str) -> str:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run with an "
                "instance/pod role)")
    if isinstance(error, FileNotFoundError):
        return f"the bucket {url.split('://', 1)[-1].split('/', 1)[0]!r} does not exist"
    if isinstance(error, PermissionError):
        return f"access denied ({error})"
    return f"cannot access it ({type(error).__name__}: {error})"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(fs: AbstractFileSystem, path: str, data: bytes) -> int:
    """Publish a whole small file with the same visibility rules as the shard files."""
    with StagedFile(fs, path) as staged:
        staged.file.write(data)
        return staged.publish()


# ---- failure kinds --------------------------------------------------------------------------------------------------

TRANSIENT = "transient"  # retry the same work after a backoff: network, 5xx, throttling
RUN_LEVEL = "run"  # every further shard would fail the same way: stop the run
SHARD = "shard"  # anything else: retry the shard on another actor, a bounded number of times
DEVICE = "device"  # the accelerator is broken for this process (a sticky CUDA error): retire the actor, retry elsewhere

_RUN_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
# botocore/aiohttp exception class names (matched by name: botocore is an optional dependency)
_RUN_CLASSES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoSuchBucket"}
_TRANSIENT_CLASSES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                      "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError"}
_RUN_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
              "AllAccessDisabled", "AccountProblem"}
# A CUDA error is sticky: every later kernel launch of the process raises, so only a fresh process recovers. cuBLAS
# and cuDNN report allocation and launch failures as RuntimeError (not OutOfMemoryError) with these prefixes.
_DEVICE_MESSAGES = ("CUDA error", "CUBLAS_STATUS_", "cuDNN error", "CUDNN_STATUS_", "CUDA driver error")
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def failure_kind(error: BaseException) -> str:
    """TRANSIENT, RUN_LEVEL, DEVICE or SHARD for an exception, looking through its chain (s3fs re-raises botocore errors as
    OSError ``from`` the original)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = _own_kind(current)
        if kind != SHARD:
            return kind
        current = current.__cause__ or current.__context__
    return SHARD


def _own_kind(error: BaseException) -> str:
    names = {cls.__name__ for cls in type(error).__mro__}
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", "")) if hasattr(error, "response") else ""
    status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") if code else None
    if names & _RUN_CLASSES or code in _RUN_CODES:
        return RUN_LEVEL
    if names & _TRANSIENT_CLASSES or code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
        return TRANSIENT
    if isinstance(error, (ConnectionError, TimeoutError)):
        return TRANSIENT
    if isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_MESSAGES):
        return DEVICE
    if isinstance(error, OSError) and error.errno in _RUN_ERRNOS:
        return RUN_LEVEL
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return TRANSIENT
    return SHARD
