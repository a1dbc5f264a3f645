"""The REST side: training runs, checkpoints (list, archive, publish, TTL, delete), sessions.

`{checkpoint_id}` holds a slash (`weights/<name>`, `sampler_weights/<name>`), so it is a path
parameter and the routes that end after it are declared before the bare DELETE.
"""
from __future__ import annotations

import email.utils
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..archive import FILES, build_archive, peft_files
from ..catalog import Weights, adapter_owner
from ..errors import bad_request, not_found
from ..paths import parse_checkpoint_id
from ..results import checkpoint_json, iso, revision_checkpoint_json, training_run_json
from ..state import CheckpointRecord
from ..wire import TtlRequest
from .common import body, caller, offload, service

router = APIRouter(prefix="/api/v1")

MAX_PAGE = 1000


def _page(limit: int, offset: int) -> tuple[int, int]:
    if not 0 < limit <= MAX_PAGE or offset < 0:
        raise bad_request(f"limit must be in 1..{MAX_PAGE} and offset >= 0")
    return limit, offset


def _run_json(svc: Any, run: Any) -> dict:
    cks, _ = svc.store.checkpoints(run_id=run.run_id)
    visible = [c for c in cks if svc.catalog.checkpoint_visible(c, run.owner)]
    last = {kind: next((c for c in visible if c.checkpoint_type == kind), None) for kind in ("training", "sampler")}
    return training_run_json(run, svc.host.name, last["training"], last["sampler"])


@router.get("/training_runs")
async def list_training_runs(request: Request, limit: int = 20, offset: int = 0,
                             access_scope: str = Query("owned")) -> dict:
    who = caller(request)
    limit, offset = _page(limit, offset)
    svc = service(request)

    def work() -> dict:
        runs, total = svc.store.runs(who.owner, limit, offset)
        return {"training_runs": [_run_json(svc, r) for r in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    return await offload(work)


def _owned_run(svc: Any, owner: str, run_id: str) -> Any:
    run = svc.store.run(run_id) if len(run_id) <= 128 else None
    if run is None or run.owner != owner:
        raise not_found(f"training run {run_id!r} not found")
    return run


@router.get("/training_runs/{run_id}")
async def get_training_run(request: Request, run_id: str, access_scope: str = Query("owned")) -> dict:
    who = caller(request)
    svc = service(request)
    return await offload(lambda: _run_json(svc, _owned_run(svc, who.owner, run_id)))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(request: Request, run_id: str) -> dict:
    who = caller(request)
    svc = service(request)

    def work() -> dict:
        if svc.store.run(run_id) is None and adapter_owner(run_id) == who.owner:
            return {"checkpoints": [revision_checkpoint_json(r) for r in svc.catalog.adapter_revisions(who.owner, run_id)],
                    "cursor": None}
        run = _owned_run(svc, who.owner, run_id)
        cks, _ = svc.store.checkpoints(run_id=run.run_id)
        return {"checkpoints": [checkpoint_json(c) for c in cks if _listed(svc, c, who.owner)], "cursor": None}

    return await offload(work)


@router.get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict:
    who = caller(request)
    limit, offset = _page(limit, offset)
    svc = service(request)

    def work() -> dict:
        cks, total = svc.store.checkpoints(owner=who.owner, limit=limit, offset=offset)
        return {"checkpoints": [checkpoint_json(c) for c in cks if _listed(svc, c, who.owner)],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    return await offload(work)


def _listed(svc: Any, ck: CheckpointRecord, owner: str) -> bool:
    """Listings show training and sampler checkpoints (tinker 0.22's Checkpoint knows no other
    type); external exports are reached by their paths."""
    return ck.checkpoint_type != "external" and svc.catalog.checkpoint_visible(ck, owner)


def _resolve(svc: Any, owner: str, run_id: str, checkpoint_id: str) -> Weights:
    return svc.catalog.resolve(owner, str(parse_checkpoint_id(run_id, checkpoint_id)), "checkpoint",
                               allow_serving=False)


def _own_checkpoint(svc: Any, owner: str, run_id: str, checkpoint_id: str) -> CheckpointRecord:
    weights = _resolve(svc, owner, run_id, checkpoint_id)
    if weights.checkpoint is None:
        raise bad_request("registry revisions are managed with `minlora adapters`, not through this endpoint")
    if weights.checkpoint.owner != owner:
        raise not_found(f"checkpoint {weights.path!r} not found")
    return weights.checkpoint


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
async def checkpoint_archive(request: Request, run_id: str, checkpoint_id: str) -> Response:
    who = caller(request)
    svc = service(request)

    def work() -> tuple[str, float]:
        rev = svc.catalog.revision(_resolve(svc, who.owner, run_id, checkpoint_id))
        return svc.archives.token(who.owner, rev.adapter_id, rev.number, checkpoint_id.rsplit("/", 1)[-1])

    token, expires = await offload(work)
    base = (svc.config.public_url or str(request.base_url)).rstrip("/")
    return Response(status_code=302, headers={"Location": f"{base}/api/v1/archives/{token}",
                                              "Expires": email.utils.formatdate(expires, usegmt=True)})


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
async def external_weights_urls(request: Request, run_id: str, checkpoint_id: str) -> dict:
    who = caller(request)
    svc = service(request)

    def work() -> dict:
        weights = _resolve(svc, who.owner, run_id, checkpoint_id)
        if weights.checkpoint is None or weights.checkpoint.checkpoint_type != "external":
            raise bad_request("external_weights_urls is for external_weights checkpoints (save_weights_external)")
        base = (svc.config.public_url or str(request.base_url)).rstrip("/")
        urls, expires = {}, 0.0
        for file in FILES:
            token, expires = svc.archives.token(who.owner, weights.adapter_id, weights.revision,
                                                weights.checkpoint.name, file)
            urls[file] = f"{base}/api/v1/archives/{token}"
        return {"urls": urls, "expires": iso(expires)}

    return await offload(work)


@router.get("/archives/{token}")
async def archive_download(request: Request, token: str) -> Response:
    svc = service(request)  # the signed token is the authorization (the SDK's download sends no key)
    link = svc.archives.open(token)
    file = link.get("f")
    if file is not None:
        files = await offload(peft_files, svc.registry, link["a"], link["r"], svc.host.name)
        if file not in files:
            raise not_found("this download link is not valid")
        return Response(files[file], media_type="application/octet-stream")
    data = await offload(build_archive, svc.registry, link["a"], link["r"], svc.host.name)
    name = f"{link.get('n') or 'checkpoint'}.tar".replace('"', "")
    return Response(data, media_type="application/x-tar",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
async def publish(request: Request, run_id: str, checkpoint_id: str) -> Response:
    return await _set(request, run_id, checkpoint_id, public=True)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
async def unpublish(request: Request, run_id: str, checkpoint_id: str) -> Response:
    return await _set(request, run_id, checkpoint_id, public=False)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
async def set_ttl(request: Request, run_id: str, checkpoint_id: str) -> Response:
    req = await body(request, TtlRequest, "ttl")
    ttl = req.ttl_seconds
    if ttl is not None and ttl <= 0:
        raise bad_request("ttl_seconds must be > 0, or null (never expires)")
    return await _set(request, run_id, checkpoint_id, expires_at=None if ttl is None else time.time() + ttl)


async def _set(request: Request, run_id: str, checkpoint_id: str, **values: Any) -> Response:
    who = caller(request)
    svc = service(request)

    def work() -> None:
        svc.store.set_checkpoint(_own_checkpoint(svc, who.owner, run_id, checkpoint_id), **values)

    await offload(work)
    return Response(status_code=204)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(request: Request, run_id: str, checkpoint_id: str) -> Response:
    who = caller(request)
    svc = service(request)
    # The checkpoint's name goes; its registry revision stays (the registry's history is append-only).
    await offload(lambda: svc.store.delete_checkpoint(_own_checkpoint(svc, who.owner, run_id, checkpoint_id)))
    return Response(status_code=204)


@router.get("/sessions")
async def list_sessions(request: Request, limit: int = 20, offset: int = 0,
                        access_scope: str = Query("owned")) -> dict:
    who = caller(request)
    limit, offset = _page(limit, offset)
    return {"sessions": await offload(service(request).store.sessions, who.owner, limit, offset)}


@router.get("/sessions/{session_id}")
async def get_session(request: Request, session_id: str, access_scope: str = Query("owned")) -> dict:
    who = caller(request)
    svc = service(request)

    def work() -> dict:
        rec = svc.store.session(session_id) if len(session_id) <= 64 else None
        if rec is None or rec.owner != who.owner:
            raise not_found(f"unknown session {session_id!r}")
        return {"training_run_ids": svc.store.runs_of_session(session_id),
                "sampler_ids": svc.store.samplers_of_session(session_id)}

    return await offload(work)
