"""Uploads over HTTP: a CSV received as a raw body or one multipart file goes into the inbox whole.

The bytes are streamed into ``inbox/.uploads/`` (``Config.uploads_dir``: a hidden folder, which
the non-recursive watcher never looks into, on the inbox's filesystem), hashed on the way, and
fsynced; then the file is hard-linked into the inbox under its final name (``link`` never
replaces a file already there, unlike ``rename``) and the folder is fsynced. The watcher sees a
file appear whole (a bare Created, settled like any file moved in) and the worker takes it as
if it had been dropped there. A body past ``max_upload_bytes`` is refused with 413 before or
while it arrives; an interrupted upload (a client gone, the daemon killed) leaves at most a
file in ``.uploads/``, removed when it fails or at the next start (``clear_uploads``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from litestar import Request
from litestar.exceptions import InternalServerException
from multipart import MultipartError, MultipartSegment, PushMultipartParser

from moneylion.api.errors import problem
from moneylion.api.queries import file_id_of
from moneylion.api.warehouse import ApiContext
from moneylion.config import Config
from moneylion.watcher import IGNORED_SUFFIXES

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers allowed beyond the file
NAME_MAX = 120  # characters kept of the client's file name
CLIENT_GONE = "client disconnected prematurely"  # Litestar's detail for an http.disconnect
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Upload:
    """An upload received whole: its bytes' sha256 and size, the name it got in the inbox, and
    the ledger's file id when these bytes were already there (then nothing was written)."""

    sha256: str
    size_bytes: int
    name: str
    known_file_id: int | None


def clear_uploads(config: Config) -> int:
    """Remove what interrupted uploads left in ``.uploads/`` (call before serving); the count."""
    folder = config.uploads_dir
    removed = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    folder.mkdir(parents=True, exist_ok=True)
    if removed:
        log.info("uploads_cleared", extra={"fields": {"files": removed}})
    return removed


def inbox_name(requested: str | None, sha256: str) -> str:
    """A safe inbox file name from the client's (its last path part, [A-Za-z0-9._-] only, not
    hidden, not a temp suffix the watcher ignores); ``upload-<sha>.csv`` when nothing is left."""
    base = (requested or "").replace("\\", "/").rsplit("/", 1)[-1]
    safe = _UNSAFE.sub("_", base).lstrip(".")[:NAME_MAX]
    if not safe.strip("_"):
        return f"upload-{sha256[:12]}.csv"
    if safe.lower().endswith(IGNORED_SUFFIXES):
        safe += ".csv"
    return safe


class _Staged:
    """The temporary file an upload is written to, hashed and counted on the way."""

    def __init__(self, config: Config) -> None:
        config.uploads_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=config.uploads_dir, prefix="upload-", suffix=".part")
        self.fd = fd
        self.path = Path(path)
        self.limit = config.max_upload_bytes
        self.size = 0
        self.hasher = hashlib.sha256()
        self.name: str | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _TooLarge
        self.hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1  # never closed twice: the number may be reused by then
            os.close(fd)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class _TooLarge(Exception):
    """The body passed max_upload_bytes."""


async def receive_upload(request: Request[Any, Any, Any], ctx: ApiContext) -> Upload:
    """Stream the request's CSV (raw body, or the first file part of a multipart form) into the
    inbox; problem details 413 past ``max_upload_bytes``, 400 for a malformed form."""
    config = ctx.config
    media_type, options = request.content_type
    multipart = media_type == "multipart/form-data"
    declared = request.content_length
    allowed = config.max_upload_bytes + (MULTIPART_OVERHEAD_BYTES if multipart else 0)
    if declared is not None and declared > allowed:
        raise _too_large(config)
    staged = _Staged(config)
    try:
        if multipart:
            await _receive_form(request, staged, options.get("boundary", ""))
        else:
            staged.name = request.query_params.get("name")
            async for chunk in _body(request):
                if chunk:
                    staged.write(chunk)
        await anyio.to_thread.run_sync(os.fsync, staged.fd)
        staged.close()
        sha256 = staged.hasher.hexdigest()
        known = await anyio.to_thread.run_sync(lambda: ctx.run(lambda c: file_id_of(c, sha256)))
        if known is not None:
            staged.path.unlink()
            return Upload(sha256, staged.size, inbox_name(staged.name, sha256), known)
        name = await anyio.to_thread.run_sync(
            _publish, staged.path, config.inbox, staged.name, sha256
        )
    except _TooLarge:
        staged.discard()
        raise _too_large(config) from None
    except BaseException:
        staged.discard()
        raise
    log.info(
        "file_uploaded",
        extra={"fields": {"file": name, "sha256": sha256, "bytes": staged.size}},
    )
    return Upload(sha256, staged.size, name, None)


async def _receive_form(request: Request[Any, Any, Any], staged: _Staged, boundary: str) -> None:
    """The first part with a file name (or named ``file``) of a multipart form into ``staged``;
    other parts are skipped, each at most MULTIPART_OVERHEAD_BYTES."""
    if not boundary:
        raise problem(400, "multipart/form-data without a boundary")
    taking = taken = False
    other_bytes = 0
    try:
        with PushMultipartParser(boundary, max_segment_count=16) as parser:
            async for chunk in _body(request):
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        taking = not taken and (event.filename is not None or event.name == "file")
                        if taking:
                            staged.name = event.filename
                    elif event is None:
                        taken = taken or taking
                        taking = False
                    elif taking:
                        staged.write(bytes(event))
                    else:
                        other_bytes += len(event)
                        if other_bytes > MULTIPART_OVERHEAD_BYTES:
                            raise problem(
                                400, "the form's fields other than the file are too large"
                            )
    except MultipartError as exc:
        raise problem(400, f"malformed multipart/form-data: {exc}") from None
    if not taken:
        raise problem(400, "the form holds no file (a part named 'file' or with a filename)")


async def _body(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    """The request's body as it arrives. A client gone before its end (it hung up, or the
    server cut a body that came too slowly) is the client's doing: a 400 logged as a client
    error, not Litestar's 500 with a traceback."""
    try:
        async for chunk in request.stream():
            yield chunk
    except InternalServerException as exc:
        if exc.detail != CLIENT_GONE:
            raise
        raise problem(400, "the client went away before the upload was complete") from None


def _publish(staged: Path, inbox: Path, requested: str | None, sha256: str) -> str:
    """Link the complete file into the inbox under a name no file there has, drop the staged
    name, fsync the inbox; the name it got. A file of that name and these bytes is left be."""
    name = inbox_name(requested, sha256)
    stem, dot, suffix = name.rpartition(".")
    candidates = [name, f"{stem}-{sha256[:12]}{dot}{suffix}" if dot else f"{name}-{sha256[:12]}"]
    for candidate in candidates:
        target = inbox / candidate
        try:
            os.link(staged, target)
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links: rename, after a check that can race
            if target.exists():
                continue
            os.rename(staged, target)
        else:
            staged.unlink()
        _fsync_dir(inbox)
        return candidate
    # Both names are taken: the second holds these very bytes (its name carries their hash).
    staged.unlink()
    return candidates[-1]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _too_large(config: Config) -> Exception:
    return problem(413, f"the upload is larger than max_upload_bytes ({config.max_upload_bytes})")
