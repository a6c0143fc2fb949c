"""A correction asked of a daemon in lake mode (``POST /v1/files/{id}/retract`` or ``/restore``):
what the API hands ``Daemon.between_batches``, which publishes it to the lake's ledger instead of
running it on the local warehouse (``correct.py``). No import of deltalake: the API loads this
in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from moneylion import corrections
from moneylion.errors import MoneylionError

# The corrections a lake ledger entry may carry (replace needs its new bytes in the lake: not yet).
ACTIONS = {action.name: action for action in (corrections.RETRACT, corrections.RESTORE)}


class CorrectionPending(MoneylionError):
    """The correction is in the lake's ledger, but this daemon's replica has not applied it
    within the wait: it will (every replica applies the ledger in order)."""

    def __init__(self, change_id: int, file_id: int, seconds: float) -> None:
        super().__init__(
            f"change {change_id} ({file_id=}) is in the lake's ledger; this replica had not "
            f"applied it after {seconds:g} s"
        )
        self.change_id = change_id
        self.file_id = file_id


@dataclass(frozen=True)
class LakeCorrection:
    """Retract or restore file ``file_id``, as a ledger entry of the lake. Called on a warehouse
    (no daemon in lake mode to publish it) it is the local correction."""

    action: str  # a key of ACTIONS
    file_id: int
    reason: str | None
    top_users_kept: int
    line_bytes: int

    def __call__(self, conn: duckdb.DuckDBPyConnection) -> corrections.Correction:
        return corrections.correct(
            conn,
            ACTIONS[self.action],
            self.file_id,
            self.reason,
            self.top_users_kept,
            self.line_bytes,
        )
