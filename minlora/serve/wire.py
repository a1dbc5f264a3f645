"""Request bodies as the tinker SDK sends them (JSON; tinker 0.22.0 and the fields 0.38 adds).

The SDK dumps its requests with `exclude_none`, so optional fields may be absent; fields this
server does not know are ignored (newer SDKs add some), known ones are checked.  `parse(body,
Model, what)` turns a decoded body into a model or a 400 naming the field.  The response
shapes are in results.py.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from .errors import bad_request

__all__ = [
    "AdamParams",
    "ClientConfigRequest",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "Datum",
    "ForwardBackwardInput",
    "ForwardBackwardRequest",
    "ForwardRequest",
    "LoadWeightsRequest",
    "LoraConfig",
    "ModelIdRequest",
    "ModelInput",
    "OptimStepRequest",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SamplingParams",
    "SaveWeightsExternalRequest",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsRequest",
    "SessionHeartbeatRequest",
    "TensorData",
    "TtlRequest",
    "WeightsInfoRequest",
    "parse",
]

Number = Union[StrictInt, StrictFloat]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def parse(body: Any, model: type[Wire], what: str) -> Any:
    """`body` (decoded JSON) as `model`; a 400 naming the first bad fields otherwise."""
    if not isinstance(body, dict):
        raise bad_request(f"{what}: the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise bad_request(f"{what}: " + "; ".join(parts) + more) from None


# ---------------------------------------------------------------------- shared pieces


class TensorData(Wire):
    """A flat list of numbers with a dtype and an optional shape; CSR when the sparse pair is set."""

    data: list[Number]
    dtype: Literal["int64", "float32"]
    shape: Optional[list[StrictInt]] = None
    sparse_crow_indices: Optional[list[StrictInt]] = None
    sparse_col_indices: Optional[list[StrictInt]] = None

    def to_tensor(self, what: str) -> torch.Tensor:
        """The dense tensor; a 400 naming `what` when the pieces do not agree."""
        dtype = torch.int64 if self.dtype == "int64" else torch.float32
        if self.dtype == "int64" and any(isinstance(v, float) and not float(v).is_integer() for v in self.data):
            raise bad_request(f"{what}: int64 data holds a non-integer value")
        try:
            values = torch.tensor(self.data, dtype=torch.float64 if dtype == torch.float32 else torch.int64)
        except (OverflowError, RuntimeError):
            raise bad_request(f"{what}: a value does not fit {self.dtype}") from None
        if self.sparse_crow_indices is not None or self.sparse_col_indices is not None:
            return self._sparse(values, dtype, what)
        if self.shape is not None:
            if any(d < 0 for d in self.shape) or math.prod(self.shape) != values.numel():
                raise bad_request(f"{what}: shape {self.shape} does not hold {values.numel()} values")
            values = values.reshape(self.shape)
        return values.to(dtype)

    def _sparse(self, values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
        crow, col, shape = self.sparse_crow_indices, self.sparse_col_indices, self.shape
        if crow is None or col is None or shape is None or len(shape) != 2:
            raise bad_request(f"{what}: a CSR tensor needs sparse_crow_indices, sparse_col_indices and a 2-D shape")
        rows, cols = shape
        ok = (
            rows >= 0 and cols >= 0 and len(crow) == rows + 1 and crow[0] == 0 and crow[-1] == len(col) == values.numel()
            and all(a <= b for a, b in zip(crow, crow[1:])) and all(0 <= c < cols for c in col)
        )
        if not ok:
            raise bad_request(f"{what}: inconsistent CSR indices for shape {shape}")
        dense = torch.zeros(rows, cols, dtype=values.dtype)
        row_of = torch.repeat_interleave(torch.arange(rows), torch.tensor(crow[1:]) - torch.tensor(crow[:-1]))
        dense[row_of, torch.tensor(col, dtype=torch.int64)] = values
        return dense.to(dtype)


class Chunk(Wire):
    type: str
    tokens: Optional[list[StrictInt]] = None


class ModelInput(Wire):
    chunks: list[Chunk]

    def token_ids(self, what: str) -> list[int]:
        """The concatenated tokens; a 400 for chunks a text-only server cannot take."""
        out: list[int] = []
        for chunk in self.chunks:
            if chunk.type != "encoded_text":
                raise bad_request(f"{what}: chunk type {chunk.type!r} is not supported (this server takes token ids)")
            if chunk.tokens is None:
                raise bad_request(f"{what}: an encoded_text chunk needs tokens")
            out.extend(chunk.tokens)
        return out


class Datum(Wire):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)


class ForwardBackwardInput(Wire):
    data: list[Datum]
    loss_fn: str
    loss_fn_config: Optional[dict[str, Number]] = None


# ---------------------------------------------------------------------- client and sessions


class ClientConfigRequest(Wire):
    sdk_version: Optional[str] = None


class CreateSessionRequest(Wire):
    tags: list[str] = Field(default_factory=list)
    user_metadata: Optional[dict[str, Any]] = None
    sdk_version: Optional[str] = None
    project_id: Optional[str] = None
    display_name: Optional[str] = None


class SessionHeartbeatRequest(Wire):
    session_id: str


class RetrieveFutureRequest(Wire):
    request_id: str
    allow_metadata_only: bool = False


# ---------------------------------------------------------------------- training


class LoraConfig(Wire):
    rank: StrictInt
    seed: Optional[StrictInt] = None
    train_unembed: StrictBool = True
    train_mlp: StrictBool = True
    train_attn: StrictBool = True


class CreateModelRequest(Wire):
    session_id: str
    model_seq_id: StrictInt
    base_model: str
    user_metadata: Optional[dict[str, Any]] = None
    lora_config: Optional[LoraConfig] = None
    optimizer_config: Optional[dict[str, Any]] = None


class ModelIdRequest(Wire):
    model_id: str


class ForwardBackwardRequest(Wire):
    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: Optional[StrictInt] = None


class ForwardRequest(Wire):
    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: Optional[StrictInt] = None


class AdamParams(Wire):
    learning_rate: Number = 1e-4
    beta1: Number = 0.9
    beta2: Number = 0.95
    eps: Number = 1e-12
    weight_decay: Number = 0.0
    grad_clip_norm: Number = 0.0


class OptimStepRequest(Wire):
    adam_params: AdamParams
    model_id: str
    seq_id: Optional[StrictInt] = None


class _SaveRequest(Wire):
    """What every checkpoint save sends: the training client, a checkpoint name (optional but for
    the external save), a TTL and the client's metadata."""

    model_id: str
    path: Optional[str] = None
    seq_id: Optional[StrictInt] = None
    ttl_seconds: Optional[StrictInt] = None
    user_metadata: Optional[dict[str, Any]] = None


class SaveWeightsRequest(_SaveRequest):
    overwrite: StrictBool = False


class SaveWeightsForSamplerRequest(_SaveRequest):
    sampling_session_seq_id: Optional[StrictInt] = None


class SaveWeightsExternalRequest(_SaveRequest):
    path: str  # required: the external destination
    age_encryption_recipients: Optional[list[str]] = None


class LoadWeightsRequest(Wire):
    path: str
    optimizer: StrictBool = False
    model_id: Optional[str] = None
    seq_id: Optional[StrictInt] = None
    # tinker 0.38's create-via-load form (no model_id)
    session_id: Optional[str] = None
    model_seq_id: Optional[StrictInt] = None
    base_model: Optional[str] = None
    user_metadata: Optional[dict[str, Any]] = None


class WeightsInfoRequest(Wire):
    tinker_path: str


class TtlRequest(Wire):
    ttl_seconds: Optional[StrictInt] = None


# ---------------------------------------------------------------------- sampling


class CreateSamplingSessionRequest(Wire):
    session_id: str
    sampling_session_seq_id: StrictInt
    base_model: Optional[str] = None
    model_path: Optional[str] = None


class SamplingParams(Wire):
    max_tokens: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Union[str, list[StrictInt], list[str], None] = None
    temperature: Number = 1.0
    top_k: StrictInt = -1
    top_p: Number = 1.0


class SampleRequest(Wire):
    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: StrictInt = 1
    base_model: Optional[str] = None
    model_path: Optional[str] = None
    sampling_session_id: Optional[str] = None
    seq_id: Optional[StrictInt] = None
    prompt_logprobs: Optional[StrictBool] = None
    topk_prompt_logprobs: StrictInt = 0
