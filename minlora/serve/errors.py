"""The service's errors and the one shape they take on the wire.

Two kinds of failure reach a client:

* an HTTP error: status + `{"detail": "<message>"}` (what the tinker SDK renders as
  `Error code: <status> - {'detail': ...}`); raised as `ApiError` anywhere in a request handler;
* a failed future: HTTP 200 on `retrieve_future` with `{"error": "<message>", "category":
  "user" | "server"}` (the SDK raises `RequestFailedError`); raised as `UserError` /
  `ServerError` by the work a future runs.

Nothing else leaves the server: an unexpected exception becomes a 500 whose body names a
log reference, never a traceback (install_handlers).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

__all__ = [
    "ApiError",
    "FutureFailure",
    "ServerError",
    "UserError",
    "bad_request",
    "failure_body",
    "forbidden",
    "install_handlers",
    "not_found",
    "unauthorized",
]

log = logging.getLogger("minlora.serve")


class ApiError(Exception):
    """An HTTP error answer: `status` and a message for `{"detail": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


class FutureFailure(Exception):
    """The work behind a future failed; the client's `.result()` raises with this message."""

    category = "server"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(FutureFailure):
    """The request could not be done as asked (bad data, unknown checkpoint, ...)."""

    category = "user"


class ServerError(FutureFailure):
    """The server could not do it (restart, exhausted memory, a bug)."""

    category = "server"


def failure_body(exc: BaseException) -> dict[str, Any]:
    """The RequestFailedResponse of a future whose work raised `exc`."""
    if isinstance(exc, FutureFailure):
        return {"error": exc.message, "category": exc.category}
    if isinstance(exc, ApiError):
        return {"error": exc.message, "category": "user" if exc.status < 500 else "server"}
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error %s in a future", ref, exc_info=exc)
    return {"error": f"internal server error (log reference {ref})", "category": "server"}


def install_handlers(app: Any) -> None:
    """Error handlers of a FastAPI app: ApiError -> its status and detail; a request the
    routing cannot accept -> 400/404/405 with a detail; anything else -> 500 with a log
    reference (the traceback goes to the server's log only)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_request: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Any, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Any, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal server error (log reference {ref})"}, status_code=500)
