"""Training clients: create, info, forward / forward_backward / optim_step, weights."""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Request

from ..errors import ApiError, bad_request
from ..proto import decode_forward_backward_request
from ..wire import (CreateModelRequest, ForwardBackwardRequest, ForwardRequest, LoadWeightsRequest, ModelIdRequest,
                    OptimStepRequest, SaveWeightsExternalRequest, SaveWeightsForSamplerRequest, SaveWeightsRequest,
                    WeightsInfoRequest, parse)
from .common import body, caller, caller_and_body, offload, service, submit

router = APIRouter(prefix="/api/v1")


# (training backend, owner, parsed body) -> the answer
Call = Callable[[Any, str, Any], Any]


def _route(path: str, model: type, *, queued: bool, call: Call) -> None:
    """POST /api/v1/<path>: the body as `model`, then `call` on the service's training backend,
    queued as a future (queued) or answered at once (run off the event loop)."""

    async def route(request: Request) -> dict:
        who, req = await caller_and_body(request, model, path)
        training = service(request).training
        if queued:
            return await submit(request, who, lambda: call(training, who.owner, req))
        return await offload(call, training, who.owner, req)

    route.__name__ = path
    router.post(f"/{path}")(route)


_route("create_model", CreateModelRequest, queued=True,
       call=lambda t, owner, req: t.create_model(owner, req))
_route("get_info", ModelIdRequest, queued=False,
       call=lambda t, owner, req: t.info(owner, req.model_id))
_route("unload_model", ModelIdRequest, queued=True,
       call=lambda t, owner, req: t.unload(owner, req.model_id))


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


_route("forward", ForwardRequest, queued=True, call=lambda t, owner, req: t.forward(
    owner, req.model_id, req.seq_id, req.forward_input, backward=False))
_route("optim_step", OptimStepRequest, queued=True, call=lambda t, owner, req: t.optim_step(
    owner, req.model_id, req.seq_id, req.adam_params))
_route("save_weights", SaveWeightsRequest, queued=True,
       call=lambda t, owner, req: t.save(owner, req, "weights"))
_route("save_weights_for_sampler", SaveWeightsForSamplerRequest, queued=True,
       call=lambda t, owner, req: t.save(owner, req, "sampler_weights"))
_route("save_weights_external", SaveWeightsExternalRequest, queued=True,
       call=lambda t, owner, req: t.save(owner, req, "external_weights"))
_route("load_weights", LoadWeightsRequest, queued=True,
       call=lambda t, owner, req: t.load(owner, req))
_route("weights_info", WeightsInfoRequest, queued=False,
       call=lambda t, owner, req: t.weights_info(owner, req.tinker_path))


@router.post("/mint/checkpoints/interpolate")
@router.post("/mint/forward_backward_reverse_kl")
async def mint_extras(request: Request) -> dict:
    caller(request)
    raise bad_request(f"{request.url.path} (a MinT extension) is not supported by this server")
