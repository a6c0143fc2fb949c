"""One error shape per surface, and every error is a log event.

``/v1`` and everything else answer RFC 9457 problem details through Litestar's
ProblemDetailsPlugin (HTTP exceptions and unexpected exceptions are converted to it); the
seed-compatible ``/api`` router answers ``{"error": "..."}`` as the take-home did. No response
ever carries a stack trace: those go to the log.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import MediaType
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.types import Scope

from moneylion.api.models import Problem, SeedError
from moneylion.api.warehouse import WarehouseUnavailable
from moneylion.errors import MoneylionError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(status: int, detail: str | None = None, **extra: Any) -> ProblemDetailsException:
    """A problem-details exception with the status phrase as title."""
    return ProblemDetailsException(
        status_code=status,
        title=HTTPStatus(status).phrase,
        type_="about:blank",
        detail=detail or "",
        extra=extra or None,
    )


def problem_spec(description: str) -> ResponseSpec:
    """The OpenAPI entry for a problem-details response."""
    return ResponseSpec(
        data_container=Problem, media_type=PROBLEM_MEDIA_TYPE, description=description
    )


def seed_spec(description: str) -> ResponseSpec:
    """The OpenAPI entry for a seed-style ``{"error": ...}`` response."""
    return ResponseSpec(
        data_container=SeedError, media_type=MediaType.JSON, description=description
    )


def _from_http_exception(exc: HTTPException) -> ProblemDetailsException:
    if isinstance(exc.extra, list) and exc.extra:
        return problem(exc.status_code, exc.detail, errors=exc.extra)
    return problem(exc.status_code, exc.detail)


def _from_warehouse_unavailable(exc: WarehouseUnavailable) -> ProblemDetailsException:
    return problem(503, str(exc))


def _from_unexpected(exc: Exception) -> ProblemDetailsException:
    return problem(500, "internal error; see the log")


def problem_details_plugin() -> ProblemDetailsPlugin:
    """Problem details for every HTTP exception and for anything unexpected (as a 500)."""
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            enable_for_all_http_exceptions=True,
            exception_to_problem_detail_map={
                HTTPException: _from_http_exception,
                WarehouseUnavailable: _from_warehouse_unavailable,
                Exception: _from_unexpected,
            },
        )
    )


class SeedApiError(MoneylionError):
    """An error the seed answered with ``{"error": message}`` and this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(exc: Exception) -> int:
    """The HTTP status an exception ends up as."""
    if isinstance(exc, SeedApiError):
        return exc.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, WarehouseUnavailable):
        return 503
    return 500


def log_api_error(exc: Exception, scope: Scope) -> None:
    """after_exception hook: one log event per error response (traceback only for bugs)."""
    status = status_of(exc)
    fields = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "error": str(exc) if status < 500 or status == 503 else type(exc).__name__,
    }
    if status >= 500 and status != 503:
        log.error("api_error", exc_info=exc, extra={"fields": fields})
    elif status == 503:
        log.warning("api_unavailable", extra={"fields": fields})
    else:
        log.info("api_client_error", extra={"fields": fields})
