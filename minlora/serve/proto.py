"""The protobuf bodies newer tinker SDKs (0.3x) speak: forward_backward requests in, and
forward_backward / sample results out (they read those two only as protobuf).

A small hand-written codec of the protobuf wire format for exactly the messages involved
(package `tinker_public`; field numbers below), so the server needs no generated code:

    ForwardBackwardRequest  1 model_id  2 seq_id  3 repeated Datum data  4 loss_fn
                            5 map<string,double> loss_fn_config  6 forward_only
                            7 map<string,LossConfigValue{1 number | 2 text}> loss_fn_config_v2
    Datum                   1 repeated Chunk model_input  2 map<string,Tensor> loss_fn_inputs
    Chunk                   oneof 1 EncodedTextChunk{1 tokens: int32 bytes} | 2 image | 3 dmel
    Tensor                  oneof 1 dense bytes | 2 SparseCsr{1 values, 2 crow, 3 col: int64 bytes};
                            3 DType dtype; 4 repeated int64 shape
    ForwardBackwardOutput   1 loss_fn_output_type  2 repeated ArrayRecord  3 map<string,double> metrics
    ArrayRecord             1 type_tag  2 map<string,BatchedTensor> fields  3 num_datums
    BatchedTensor           1 data  2 offsets (int64 byte offsets, num_datums + 1)  3 dtype
    SampleResponse          1 repeated SampledSequence  2 prompt_logprobs (float32 bytes, NaN = none)
                            3 TopkLogprobs prompt top-k
    SampledSequence         1 StopReason (STOP 0, LENGTH 1)  2 tokens (int32 bytes)  3 logprobs (float32)
    TopkLogprobs            1 token_ids (int32 [n, k])  2 logprobs (float32 [n, k], filler (0, -99999))
                            3 k  4 length
    DType                   1 float32  2 int64  3 int32  4 bfloat16

Decoding checks what it reads and raises ApiError 400 on a malformed body.
"""
from __future__ import annotations

import struct
from typing import Any, Optional

import numpy as np

from .errors import bad_request

__all__ = ["decode_forward_backward_request", "encode_forward_output", "encode_sample_response"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_F32, _INT64, _INT32, _BF16 = 1, 2, 3, 4
_MASK_LOGPROB = -99999.0


# ---------------------------------------------------------------------- writing


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as their 64-bit two's complement (protobuf's rule)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes(number: int, payload: bytes) -> bytes:
    return _field(number, _LEN) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _field(number, _VARINT) + _varint(value) if value else b""


def _str(number: int, text: str) -> bytes:
    return _bytes(number, text.encode()) if text else b""


def _double_map(number: int, values: dict[str, float]) -> bytes:
    return b"".join(_bytes(number, _str(1, k) + _field(2, _I64) + struct.pack("<d", float(v)))
                    for k, v in values.items())


def encode_forward_output(result: dict[str, Any]) -> bytes:
    """A ForwardBackwardOutput body (JSON shape, results.py) as protobuf: one ArrayRecord with
    every output field batched over the datums."""
    outputs = result.get("loss_fn_outputs") or []
    out = _str(1, result.get("loss_fn_output_type", "TorchLossReturn"))
    if outputs:
        record = _str(1, result.get("loss_fn_output_type", "TorchLossReturn")) + _int(3, len(outputs))
        for name in outputs[0]:
            arrays = [np.asarray(o[name]["data"], dtype=np.float32 if o[name]["dtype"] == "float32" else np.int64)
                      for o in outputs]
            offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
            dtype = _F32 if arrays[0].dtype == np.float32 else _INT64
            tensor = _bytes(1, b"".join(a.tobytes() for a in arrays)) + _bytes(2, offsets.tobytes()) + _int(3, dtype)
            record += _bytes(2, _str(1, name) + _bytes(2, tensor))
        out += _bytes(2, record)
    return out + _double_map(3, result.get("metrics") or {})


def _topk(rows: list[Optional[list]]) -> bytes:
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), _MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, lp) in enumerate(row or []):
            ids[i, j], lps[i, j] = token, lp
    return _bytes(1, ids.tobytes()) + _bytes(2, lps.tobytes()) + _int(3, k) + _int(4, len(rows))


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """A SampleResponse body (JSON shape, engine.py) as protobuf."""
    out = b""
    for seq in result["sequences"]:
        body = _int(1, 0 if seq["stop_reason"] == "stop" else 1)
        body += _bytes(2, np.asarray(seq["tokens"], dtype=np.int32).tobytes())
        if seq.get("logprobs"):
            body += _bytes(3, np.asarray(seq["logprobs"], dtype=np.float32).tobytes())
        out += _bytes(1, body)
    prompt = result.get("prompt_logprobs")
    if prompt is not None:
        out += _bytes(2, np.asarray([np.nan if x is None else x for x in prompt], dtype=np.float32).tobytes())
    if result.get("topk_prompt_logprobs") is not None:
        out += _bytes(3, _topk(result["topk_prompt_logprobs"]))
    return out


# ---------------------------------------------------------------------- reading


def _fields(buf: bytes, what: str) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field of one message: ints for varints,
    bytes for length-delimited and fixed fields."""
    out, i, n = [], 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise bad_request(f"{what}: malformed protobuf (truncated varint)")
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value: Any = varint()
        elif wire == _LEN:
            size = varint()
            if i + size > n:
                raise bad_request(f"{what}: malformed protobuf (a field runs past the end)")
            value, i = buf[i:i + size], i + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if i + size > n:
                raise bad_request(f"{what}: malformed protobuf (truncated fixed field)")
            value, i = buf[i:i + size], i + size
        else:
            raise bad_request(f"{what}: malformed protobuf (wire type {wire})")
        out.append((number, wire, value))
    return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, bytes):
        raise bad_request(f"{what}: expected a string field")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise bad_request(f"{what}: not UTF-8") from None


def _map_entry(buf: bytes, what: str) -> tuple[str, Any]:
    key, value = "", None
    for number, _, v in _fields(buf, what):
        if number == 1:
            key = _text(v, what)
        elif number == 2:
            value = v
    return key, value


def _array(raw: bytes, dtype: int, what: str) -> np.ndarray:
    kinds = {_F32: np.float32, _INT64: np.int64, _INT32: np.int32, _BF16: np.uint16}
    if dtype not in kinds or len(raw) % np.dtype(kinds[dtype]).itemsize:
        raise bad_request(f"{what}: unsupported dtype {dtype} or a byte count that does not fit it")
    arr = np.frombuffer(raw, dtype=kinds[dtype])
    if dtype == _BF16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _tensor(buf: bytes, what: str) -> dict[str, Any]:
    dense, csr, dtype, shape = None, None, 0, []
    for number, wire, v in _fields(buf, what):
        if number == 1:
            dense = v
        elif number == 2:
            csr = {n: x for n, _, x in _fields(v, what)}
        elif number == 3:
            dtype = v
        elif number == 4:  # packed or not
            shape += [_signed(x) for x in _packed(v, what)] if wire == _LEN else [_signed(v)]
    name = "float32" if dtype in (_F32, _BF16) else "int64"
    out: dict[str, Any] = {"dtype": name, "shape": shape or None}
    if csr is not None:
        out["data"] = _array(csr.get(1, b""), dtype, what).tolist()
        out["sparse_crow_indices"] = _array(csr.get(2, b""), _INT64, what).tolist()
        out["sparse_col_indices"] = _array(csr.get(3, b""), _INT64, what).tolist()
    else:
        out["data"] = _array(dense or b"", dtype, what).tolist()
    return out


def _packed(buf: bytes, what: str) -> list[int]:
    values, i = [], 0
    while i < len(buf):
        shift = result = 0
        while True:
            if i >= len(buf):
                raise bad_request(f"{what}: malformed packed field")
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(result)
    return values


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _datum(buf: bytes, what: str) -> dict[str, Any]:
    chunks, inputs = [], {}
    for number, _, v in _fields(buf, what):
        if number == 1:
            for kind, _, chunk in _fields(v, what):
                if kind != 1:
                    chunks.append({"type": {2: "image", 3: "dmel"}.get(kind, f"chunk {kind}")})
                    continue
                tokens = b"".join(x for n, _, x in _fields(chunk, what) if n == 1)
                chunks.append({"type": "encoded_text", "tokens": _array(tokens, _INT32, what).tolist()})
        elif number == 2:
            key, value = _map_entry(v, what)
            inputs[key] = _tensor(value or b"", f"{what}.loss_fn_inputs.{key}")
    return {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}


def decode_forward_backward_request(buf: bytes) -> tuple[dict[str, Any], bool]:
    """(the request in its JSON shape, forward_only) of a protobuf ForwardBackwardRequest."""
    what = "forward_backward (protobuf)"
    model_id, seq_id, data, loss_fn, config, forward_only = "", 0, [], "", {}, False
    for number, _, v in _fields(buf, what):
        if number == 1:
            model_id = _text(v, what)
        elif number == 2:
            seq_id = _signed(v) if isinstance(v, int) else 0
        elif number == 3:
            data.append(_datum(v, f"{what}.data[{len(data)}]"))
        elif number == 4:
            loss_fn = _text(v, what)
        elif number == 5:
            key, value = _map_entry(v, what)
            if isinstance(value, bytes) and len(value) == 8:
                config[key] = struct.unpack("<d", value)[0]
        elif number == 6:
            forward_only = bool(v)
        elif number == 7:
            key, value = _map_entry(v, what)
            for n, _, x in _fields(value or b"", what):
                if n == 1 and isinstance(x, bytes) and len(x) == 8:
                    config[key] = struct.unpack("<d", x)[0]
                elif n == 2:
                    raise bad_request(f"{what}: loss_fn_config {key!r} is text; only numbers are supported")
    fbi: dict[str, Any] = {"data": data, "loss_fn": loss_fn}
    if config:
        fbi["loss_fn_config"] = config
    return {"forward_backward_input": fbi, "model_id": model_id, "seq_id": seq_id or None}, forward_only
