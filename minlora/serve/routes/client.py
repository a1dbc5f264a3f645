"""Client bootstrap, sessions, capabilities, telemetry and the futures' long-poll."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..proto import encode_forward_output, encode_sample_response
from ..wire import ClientConfigRequest, CreateSessionRequest, RetrieveFutureRequest, SessionHeartbeatRequest, Wire
from .common import body, caller, caller_and_body, offload, service

router = APIRouter(prefix="/api/v1")


class _Finish(Wire):
    reason: Any = None
    detail: Any = None


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(request: Request) -> dict:
    caller(request)
    await body(request, ClientConfigRequest, "client/config")
    return {
        # mint's sk- keys pass tinker 0.22's client-side check only through the JWT exchange
        "pjwt_auth_enabled": True,
        "credential_default_source": "api_key",
        "parallel_fwdbwd_chunks": True,
        "proto_write_fwdbwd": False,
        "proto_compress_fwdbwd": False,
        "grpc_target": None,
        "enable_grpc_retrieve_future": False,
        "sample_no_retries": False,
        # the pyqwest transport follows the archive redirect itself (and sends the key along)
        "use_pyqwest_transport": False,
    }


@router.post("/client/dynamic_config")
async def client_dynamic_config(request: Request) -> dict:
    caller(request)
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}


@router.post("/auth/token")
async def auth_token(request: Request) -> dict:
    who = caller(request)
    return {"jwt": service(request).auth.issue(who)}


@router.get("/get_server_capabilities")
async def capabilities(request: Request) -> dict:
    caller(request)
    svc = service(request)
    host = svc.host
    return {"supported_models": [{
        "model_name": host.name, "max_context_length": host.max_context, "trainable": True,
        "sampleable": True, "supported_lora_ranks": list(range(1, svc.backend.max_rank + 1)),
    }]}


@router.post("/create_session")
async def create_session(request: Request) -> dict:
    who, req = await caller_and_body(request, CreateSessionRequest, "create_session")
    sid = await offload(service(request).sessions.create, who.owner, req.tags, req.user_metadata or {},
                        req.sdk_version)
    return {"type": "create_session", "session_id": sid, "info_message": None, "warning_message": None,
            "error_message": None}


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> dict:
    who, req = await caller_and_body(request, SessionHeartbeatRequest, "session_heartbeat")
    await offload(service(request).sessions.check, who.owner, req.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(request: Request, session_id: str) -> Response:
    who, req = await caller_and_body(request, _Finish, "sessions/finish")
    svc = service(request)
    await offload(svc.sessions.check, who.owner, session_id)
    reason = req.reason.get("type") if isinstance(req.reason, dict) else req.reason
    await offload(svc.sessions.end, session_id, f"finished by the client ({reason or 'no reason'})")
    return Response(status_code=204)


@router.post("/telemetry")
async def telemetry(request: Request) -> dict:
    caller(request)  # the SDK resends refused batches forever: accept (and drop) them
    return {"status": "accepted"}


@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Any:
    who, req = await caller_and_body(request, RetrieveFutureRequest, "retrieve_future")
    svc = service(request)
    result, kind = await svc.futures.wait(who.owner, req.request_id, svc.config.long_poll_s)
    if result is None:
        return JSONResponse({"type": "try_again", "request_id": req.request_id, "queue_state": "active",
                             "queue_state_reason": None})
    accept = request.headers.get("accept", "")
    encode = _PROTO_RESULTS.get(kind)
    if encode is not None and "error" not in result and "application/x-protobuf" in accept \
            and "application/json" not in accept:  # tinker >= 0.3x reads these results only as protobuf
        return Response(await offload(encode, result), media_type="application/x-protobuf")
    return JSONResponse(result)


_PROTO_RESULTS = {"forward_backward": encode_forward_output, "forward": encode_forward_output,
                  "sample": encode_sample_response}
