"""Sampling sessions and sample requests."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..wire import CreateSamplingSessionRequest, SampleRequest
from .common import caller, caller_and_body, offload, service, submit

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> dict:
    who, req = await caller_and_body(request, CreateSamplingSessionRequest, "create_sampling_session")
    sid = await offload(service(request).sampling.create, who.owner, req)
    return {"type": "create_sampling_session", "sampling_session_id": sid}


@router.get("/samplers/{sampler_id}")
async def get_sampler(request: Request, sampler_id: str) -> dict:
    who = caller(request)
    return await offload(service(request).sampling.describe, who.owner, sampler_id)


@router.post("/asample")
async def asample(request: Request) -> JSONResponse:
    who, req = await caller_and_body(request, SampleRequest, "asample")
    answer = await submit(request, who, lambda: service(request).sampling.submit(who.owner, req))
    return JSONResponse(answer)
