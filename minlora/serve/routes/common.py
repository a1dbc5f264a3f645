"""What every route does first: find the service, authenticate, read the body, run the work
off the event loop, and answer a retried submit from its idempotency key."""
from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..errors import bad_request
from ..keys import Principal
from ..service import Service
from ..wire import Wire, parse

__all__ = ["body", "caller", "caller_and_body", "offload", "service", "submit"]

T = TypeVar("T")


def service(request: Request) -> Service:
    return request.app.state.service


def caller(request: Request) -> Principal:
    """The authenticated caller (401 otherwise)."""
    return service(request).auth.principal(request.headers.get("x-api-key"))


async def body(request: Request, model: type[Wire], what: str) -> Any:
    """The JSON body as `model` (400 for malformed JSON or fields)."""
    raw = await request.body()
    if not raw:
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            ctype = request.headers.get("content-type", "")
            hint = " (protobuf bodies are taken by forward_backward only)" if "protobuf" in ctype else ""
            raise bad_request(f"{what}: the body is not valid JSON{hint}: {exc}") from None
    return await offload(parse, data, model, what)


async def caller_and_body(request: Request, model: type[Wire], what: str) -> tuple[Principal, Any]:
    """The authenticated caller (401 first), then the JSON body as `model` (400)."""
    who = caller(request)
    return who, await body(request, model, what)


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """Runs blocking work (database, tensors) on a worker thread."""
    return await run_in_threadpool(fn, *args)


async def submit(request: Request, who: Principal, fn: Callable[[], dict]) -> dict:
    """A submit that answers with a future: the first answer again for a repeated idempotency key."""
    futures = service(request).futures
    key = request.headers.get("x-idempotency-key")
    seen = futures.remembered(who.owner, key)
    if seen is not None:
        return seen
    answer = await offload(fn)
    futures.remember(who.owner, key, answer)
    return answer
