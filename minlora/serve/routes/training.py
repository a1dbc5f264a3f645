"""Training clients: create, info, forward / forward_backward / optim_step, weights."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import ApiError, bad_request
from ..proto import decode_forward_backward_request
from ..wire import (CreateModelRequest, ForwardBackwardRequest, ForwardRequest, LoadWeightsRequest, ModelIdRequest,
                    OptimStepRequest, SaveWeightsExternalRequest, SaveWeightsForSamplerRequest, SaveWeightsRequest,
                    WeightsInfoRequest, parse)
from .common import body, caller, offload, service, submit

router = APIRouter(prefix="/api/v1")


@router.post("/create_model")
async def create_model(request: Request) -> dict:
    who = caller(request)
    req = await body(request, CreateModelRequest, "create_model")
    return await submit(request, who, lambda: service(request).training.create_model(who.owner, req))


@router.post("/get_info")
async def get_info(request: Request) -> dict:
    who = caller(request)
    req = await body(request, ModelIdRequest, "get_info")
    return await offload(service(request).training.info, who.owner, req.model_id)


@router.post("/unload_model")
async def unload_model(request: Request) -> dict:
    who = caller(request)
    req = await body(request, ModelIdRequest, "unload_model")
    return await submit(request, who, lambda: service(request).training.unload(who.owner, req.model_id))


@router.post("/forward_backward")
async def forward_backward(request: Request) -> dict:
    who = caller(request)
    backward = True
    if "application/x-protobuf" in request.headers.get("content-type", ""):
        # tinker >= 0.3x: always protobuf; forward() is this request with forward_only set
        if request.headers.get("content-encoding", "identity") != "identity":
            raise ApiError(415, "compressed request bodies are not supported (proto_compress_fwdbwd is off)")
        data, forward_only = await offload(decode_forward_backward_request, await request.body())
        req, backward = await offload(parse, data, ForwardBackwardRequest, "forward_backward"), not forward_only
    else:
        req = await body(request, ForwardBackwardRequest, "forward_backward")
    training = service(request).training
    return await submit(request, who, lambda: training.forward(who.owner, req.model_id, req.seq_id,
                                                               req.forward_backward_input, backward=backward))


@router.post("/forward")
async def forward(request: Request) -> dict:
    who = caller(request)
    req = await body(request, ForwardRequest, "forward")
    training = service(request).training
    return await submit(request, who, lambda: training.forward(who.owner, req.model_id, req.seq_id,
                                                               req.forward_input, backward=False))


@router.post("/optim_step")
async def optim_step(request: Request) -> dict:
    who = caller(request)
    req = await body(request, OptimStepRequest, "optim_step")
    training = service(request).training
    return await submit(request, who, lambda: training.optim_step(who.owner, req.model_id, req.seq_id,
                                                                  req.adam_params))


@router.post("/save_weights")
async def save_weights(request: Request) -> dict:
    who = caller(request)
    req = await body(request, SaveWeightsRequest, "save_weights")
    return await submit(request, who, lambda: service(request).training.save(who.owner, req, "weights"))


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> dict:
    who = caller(request)
    req = await body(request, SaveWeightsForSamplerRequest, "save_weights_for_sampler")
    return await submit(request, who, lambda: service(request).training.save(who.owner, req, "sampler_weights"))


@router.post("/save_weights_external")
async def save_weights_external(request: Request) -> dict:
    who = caller(request)
    req = await body(request, SaveWeightsExternalRequest, "save_weights_external")
    return await submit(request, who, lambda: service(request).training.save(who.owner, req, "external_weights"))


@router.post("/load_weights")
async def load_weights(request: Request) -> dict:
    who = caller(request)
    req = await body(request, LoadWeightsRequest, "load_weights")
    return await submit(request, who, lambda: service(request).training.load(who.owner, req))


@router.post("/weights_info")
async def weights_info(request: Request) -> dict:
    who = caller(request)
    req = await body(request, WeightsInfoRequest, "weights_info")
    return await offload(service(request).training.weights_info, who.owner, req.tinker_path)


@router.post("/mint/checkpoints/interpolate")
@router.post("/mint/forward_backward_reverse_kl")
async def mint_extras(request: Request) -> dict:
    caller(request)
    raise bad_request(f"{request.url.path} (a MinT extension) is not supported by this server")
