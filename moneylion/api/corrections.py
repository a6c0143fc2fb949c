"""``POST /v1/files/{id}/retract``, ``/restore`` and ``/release``: corrections over HTTP.

The daemon holds the warehouse, so a correction runs in its process, between two of the
worker's batches (``WarehouseView.between_batches``). In lake mode a retraction or a restore is
a ledger entry of the lake instead: the daemon publishes it and answers once its own replica has
applied it, or 202 with where to look if that takes longer than its wait (docs/lake.md). These
routes change data: the access, Host and Origin rules of every unsafe method apply
(``access.py``), as for uploads.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Annotated, Any, TypeAlias

import anyio.to_thread
import duckdb
import msgspec
from litestar import Request, Response, Router, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, QueryParameter

from moneylion import corrections, inbox, release
from moneylion.api.checks import receive_file
from moneylion.api.errors import problem, problem_spec
from moneylion.api.v1 import Id, context
from moneylion.corrections import CorrectionRefused
from moneylion.errors import FileRefused
from moneylion.lake.request import CorrectionPending, LakeCorrection
from moneylion.source import Bounds, stage

REASON_MAX_CHARS = 1000  # a reason is a sentence for the ledger, not a document


class CorrectionRequest(msgspec.Struct):
    """Why (kept in the ledger's ``corrections`` row and the log event)."""

    reason: Annotated[str, msgspec.Meta(max_length=REASON_MAX_CHARS)] | None = None


class CorrectionAnswer(msgspec.Struct):
    """What the correction did: the file's new status, the base rows it took out and put in,
    and how many other files' rows changed verdict."""

    change_id: int
    action: str
    file_id: int
    kind: str
    status: str
    files: list[int]
    rows_out: int
    rows_in: int
    files_changed: int
    seconds: float
    file: str


class PendingAnswer(msgspec.Struct):
    """Lake mode: the correction is in the lake's ledger (``change_id``, its place in the
    order) and every replica will apply it; this daemon's had not yet when it answered. The
    file's page (``file``, also the ``Location``) lists it among its corrections once applied."""

    change_id: int
    file_id: int
    status: str
    detail: str
    file: str


def _answer(done: corrections.Correction) -> CorrectionAnswer:
    return CorrectionAnswer(
        change_id=done.change_id,
        action=done.action,
        file_id=done.file_id,
        kind=done.kind,
        status=str(done.status),
        files=list(done.files),
        rows_out=done.rows_out,
        rows_in=done.rows_in,
        files_changed=done.files_changed,
        seconds=round(done.seconds, 6),
        file=f"/v1/files/{done.file_id}",
    )


_RESPONSES: dict[int, Any] = {
    400: problem_spec("The body is malformed"),
    404: problem_spec("No such file in the ledger"),
    409: problem_spec("The file is not in a state this correction applies to"),
}
_LAKE_RESPONSES: dict[int, Any] = {
    **_RESPONSES,
    # The annotation's union (``Answer``) would say "anything" for 200: it is a correction.
    200: ResponseSpec(data_container=CorrectionAnswer, description="What the correction did"),
    202: ResponseSpec(
        data_container=PendingAnswer,
        description="Lake mode: published to the lake, not applied by this daemon's replica yet",
    ),
}


async def _run(
    state: State, work: Callable[[duckdb.DuckDBPyConnection], corrections.Correction]
) -> CorrectionAnswer:
    """``work`` between the worker's batches; a refusal as 404 (no such file) or 409."""
    ctx = context(state)
    try:
        done = await anyio.to_thread.run_sync(lambda: ctx.view.between_batches(work))
    except CorrectionRefused as refused:
        status = 404 if str(refused).startswith("no file") else 409
        raise problem(status, str(refused)) from None
    return _answer(done)


Answer: TypeAlias = CorrectionAnswer | Response[PendingAnswer]


async def _run_or_publish(
    state: State,
    work: Callable[[duckdb.DuckDBPyConnection], corrections.Correction],
    lake: LakeCorrection,
) -> Answer:
    """Local mode: ``_run(work)``. Lake mode: ``lake`` (the same correction) is published to
    the lake's ledger by the daemon, and answered once its replica applied it; 202 with where
    to look when that took longer than the daemon's wait."""
    if context(state).lake_lag() is None:
        return await _run(state, work)
    try:
        return await _run(state, lake)
    except CorrectionPending as pending:
        where = f"/v1/files/{pending.file_id}"
        return Response(
            PendingAnswer(pending.change_id, pending.file_id, "pending", str(pending), where),
            status_code=202,
            headers={"Location": where},
        )


@post("/files/{file_id:str}/retract", status_code=200, responses=_LAKE_RESPONSES)
async def retract_v1(
    state: State, file_id: Id, data: Annotated[CorrectionRequest, Body()]
) -> Answer:
    """Take a file out of the warehouse, as if it had never arrived: its rows leave, later
    files' rows it held back take their place, every aggregate follows exactly. The ledger
    keeps it (status ``retracted``, when and why); the same bytes dropped again load nothing
    until it is restored. A reason is required."""
    if not (data.reason or "").strip():
        raise problem(400, "a reason is required to retract a file")
    config = context(state).config
    return await _run_or_publish(
        state,
        lambda conn: corrections.retract(
            conn,
            int(file_id),
            data.reason or "",
            top_users_kept=config.top_users_kept,
            line_bytes=config.reject_line_bytes,
        ),
        LakeCorrection(
            "retract", int(file_id), data.reason, config.top_users_kept, config.reject_line_bytes
        ),
    )


@post("/files/{file_id:str}/restore", status_code=200, responses=_LAKE_RESPONSES)
async def restore_v1(
    state: State, file_id: Id, data: Annotated[CorrectionRequest | None, Body()] = None
) -> Answer:
    """Undo a retraction: the file is back in its place in the order."""
    config = context(state).config
    reason = data.reason if data is not None else None
    return await _run_or_publish(
        state,
        lambda conn: corrections.restore(
            conn,
            int(file_id),
            reason,
            top_users_kept=config.top_users_kept,
            line_bytes=config.reject_line_bytes,
        ),
        LakeCorrection(
            "restore", int(file_id), reason, config.top_users_kept, config.reject_line_bytes
        ),
    )


@post("/files/{file_id:str}/release", status_code=200, responses=_RESPONSES)
async def release_v1(
    state: State, file_id: Id, data: Annotated[CorrectionRequest | None, Body()] = None
) -> CorrectionAnswer:
    """Load a file held by ``max_reject_share`` as if it arrived now: the latest file in the
    order, from its bytes in ``held/`` (they must be the ledger's), without the hold check. It
    becomes ``loaded`` with this load's counts and rejects, and moves to ``done/``. 409 when the
    file is not held or its bytes are not in ``held/``."""
    config = context(state).config
    reason = data.reason if data is not None else None
    return await _run(state, lambda conn: release.release(conn, int(file_id), config, reason))


@post(
    "/files/{file_id:str}/replace",
    request_max_body_size=None,  # counted against max_upload_bytes while it arrives
    status_code=200,
    responses={**_RESPONSES, 413: problem_spec("Larger than max_upload_bytes")},
)
async def replace_v1(
    request: Request[Any, Any, Any],
    state: State,
    file_id: Id,
    reason: Annotated[
        str | None, QueryParameter(max_length=REASON_MAX_CHARS, description="why")
    ] = None,
) -> CorrectionAnswer:
    """Replace a file by the CSV in the body (``?name=`` names it, ``?reason=`` says why): the
    new bytes take the old file's place in the order, and the warehouse becomes the ledger
    with the old bytes swapped for the new ones. The old file's row is ``replaced`` and says
    which file replaced it; the new bytes are kept in ``done/``. Refused (409): bytes the
    ledger has, another kind of file, a file that would be refused whole."""
    ctx = context(state)
    config = ctx.config
    requested = request.query_params.get("name")
    folder, path = await receive_file(
        request, config, requested, config.max_upload_bytes, "max_upload_bytes"
    )
    try:

        def work(conn: duckdb.DuckDBPyConnection) -> corrections.Correction:
            staged = stage(path, config.staging_dir, bounds=Bounds.of(config))
            try:
                return corrections.replace(conn, int(file_id), staged, config, reason or None)
            finally:
                staged.discard()

        answer = await _run(state, work)
        await anyio.to_thread.run_sync(
            lambda: inbox.move_without_overwrite(path, inbox.day_folder(config.done_dir))
        )
    except FileRefused as refused:
        raise problem(409, f"the new file is refused: {refused.message}") from None
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))
    return answer


corrections_router = Router(
    path="/v1", route_handlers=[retract_v1, restore_v1, release_v1, replace_v1]
)
