"""``POST /v1/checks``: what ingesting a CSV now would do, keeping nothing (``check.py``).

The raw body is the file (``?name=`` names it; a ``.gz`` or ``.zst`` name is decompressed as in
the inbox), bounded by ``max_check_bytes`` (413 past it, before or while it arrives). It is
written to a private folder under the staging folder, checked, and removed. The check writes the
worker's tables inside a transaction it rolls back, so it runs between two of the worker's
batches (``WarehouseView.between_batches``), like a correction; a route that runs writes, it
takes the access, Host and Origin rules of every unsafe method (``access.py``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
from litestar import Request, Router, post
from litestar.datastructures import State
from litestar.exceptions import InternalServerException

from moneylion.api.errors import problem, problem_spec
from moneylion.api.uploads import CLIENT_GONE, NAME_MAX, inbox_name
from moneylion.api.v1 import context
from moneylion.check import CheckReport, check_file
from moneylion.config import Config
from moneylion.corrections import CorrectionRefused
from moneylion.errors import DiskLow


@post(
    "/checks",
    request_max_body_size=None,  # counted here against max_check_bytes
    status_code=200,
    responses={
        400: problem_spec("The client went away before the body was complete"),
        409: problem_spec("Checks are not available in this mode (lake mode)"),
        413: problem_spec("Larger than max_check_bytes"),
        503: problem_spec("No room to stage the file now"),
    },
)
async def check_v1(request: Request[Any, Any, Any], state: State) -> CheckReport:
    """What ingesting this CSV now would do, without keeping anything: its outcome
    (``would_load``, ``would_hold``, ``would_fail``, ``seen_before``), its rows loaded,
    duplicate and rejected, the rejects by reason with their first lines, and its effect on the
    users, days and top list it touches (money as exact decimal strings). Exact: the file goes
    through the real ingest, rolled back at its end."""
    ctx = context(state)
    config = ctx.config
    requested = request.query_params.get("name")
    folder, path = await receive_file(
        request, config, requested, config.max_check_bytes, "max_check_bytes"
    )
    try:
        report = await anyio.to_thread.run_sync(
            lambda: ctx.view.between_batches(
                lambda conn: check_file(conn, path, config, name=(requested or "")[:NAME_MAX])
            )
        )
    except CorrectionRefused as refused:  # lake mode
        raise problem(409, str(refused)) from None
    except DiskLow as low:
        raise problem(503, str(low)) from None
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))
    return report


async def receive_file(
    request: Request[Any, Any, Any],
    config: Config,
    requested: str | None,
    limit: int,
    bound: str,
) -> tuple[Path, Path]:
    """The body, at most ``limit`` bytes (the config key ``bound``: 413 past it), into a file of
    its own folder under the staging folder: (folder, file). Its name keeps the requested one's
    suffix (a compressed file is read as one)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit, bound)
    config.staging_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="check-", dir=config.staging_dir))
    path = folder / inbox_name(requested, "check")
    size = 0
    try:
        with path.open("wb") as out:
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit, bound)
                    out.write(chunk)
            except InternalServerException as exc:
                if exc.detail != CLIENT_GONE:
                    raise
                raise problem(400, "the client went away before the body was complete") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, path


def _too_large(limit: int, bound: str) -> Exception:
    return problem(413, f"the file is larger than {bound} ({limit})")


checks_router = Router(path="/v1", route_handlers=[check_v1])
