"""The HTTP application: the routes over a Service, request size limits and the error shape."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI

from .errors import ApiError, install_handlers
from .routes import client, rest, sampling, training
from .service import Service

__all__ = ["create_app"]


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` answer 413 (declared sizes at once, streamed
    ones when they cross the limit)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            body = json.dumps({"detail": _too_large(self.max_bytes).message}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _too_large(self.max_bytes)  # inside the handler's body read: the 413 handler answers
            return message

        await self.app(scope, limited, send)


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.futures.bind_loop(asyncio.get_running_loop())
        yield

    app = FastAPI(title="minlora serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    install_handlers(app)
    for module in (client, training, sampling, rest):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_request_bytes)
    return app
