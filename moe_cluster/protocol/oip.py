"""Open Inference Protocol v2 (KServe / Triton REST): the inference codec. Pure protocol code, no Ray.

The paths (/v2, health, metadata, infer) and the metadata are in oip_routes.py. An inference
request (POST /v2/models/{name}[/versions/{v}]/infer) is a JSON object. With the binary tensor
data extension, the body's first `Inference-Header-Content-Length` bytes are that JSON and the
rest are the raw little-endian bytes of every input that declares `parameters.binary_data_size`,
in the order of `inputs`:

    {"id": "42",                                                                     # optional, echoed
     "inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [T, D], "data": [...]},
                {"name": "layer", "datatype": "INT64", "shape": [1], "data": [0]}],  # see below
     "outputs": [{"name": "output", "parameters": {"binary_data": true}}]}          # optional

`hidden_states` is FP32, FP16 or BF16 (JSON data: numbers, flat row-major or nested [T][D];
FP64 is refused with a 400); `layer` is INT32 or INT64, required when the model has more
than one MoE layer (the caller resolves a missing one: `ModelConfig.resolve_layer`). The one
output, `output` [T, D], has the datatype of `hidden_states` and is JSON numbers, or binary
data after the JSON header when the request asks for it (`binary_data` on the output, else
`parameters.binary_data_output`).

Parsing gives hidden_states as a numpy array [T, D] of the datatype sent (BF16 as
`ml_dtypes.bfloat16`; numpy only) and raises `WireError(status, message)` (protocol/errors.py),
checking every declared shape and byte size against the limits and the body before any array
is built. Nothing is unpickled.

Shape legend: T tokens, D model dim.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import BY_OIP, FLOAT64_NOT_SUPPORTED, dtype_of_array
from .bodies import JSON, parse_json
from .errors import WireError
from .limits import Limits
from .oip_routes import MODEL_VERSION
from .tensors import array_from_bytes, array_from_numbers, array_to_bytes, array_to_numbers

__all__ = ["HEADER_LENGTH", "BINARY", "InferRequest", "parse_infer_request", "encode_infer_response"]

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
_INTS = {"INT32": 4, "INT64": 8}
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
_INPUT_FIELDS = {"name", "datatype", "shape", "parameters", "data"}
_INPUT_NAMES = ("hidden_states", "layer")


@dataclass(frozen=True)
class InferRequest:
    hidden_states: np.ndarray  # [T, D] in the datatype sent (float32, float16, ml_dtypes.bfloat16); writable
    layer: int | None  # None when not sent: the caller resolves it (ModelConfig.resolve_layer)
    request_id: str | None  # echoed as the response's "id"
    binary_output: bool  # send `output` as binary data after the JSON header


@dataclass(frozen=True)
class _Input:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # the JSON "data" value; None when the data is binary
    binary_size: int | None  # parameters.binary_data_size; None for JSON data


# --- inference requests ------------------------------------------------------------------------

def parse_infer_request(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """Parse and validate an infer body; `header_length` is the Inference-Header-Content-Length header.

    Returns hidden_states [T, D] with T <= limits.max_tokens and D = limits.d_model. Raises
    WireError: 400 for a bad request, 413 for too many tokens, 422 for NaN/Inf (unless allowed).
    """
    header, binary = _split_body(body, header_length)
    hint = "" if header_length is not None else f" (binary tensor data needs the {HEADER_LENGTH} header)"
    fields = parse_json(header, "inference header", hint)
    if not isinstance(fields, dict):
        raise WireError(400, "the inference request must be a JSON object with an 'inputs' list")
    unknown = sorted(str(k) for k in set(fields) - _REQUEST_FIELDS)
    if unknown:
        raise WireError(400, f"unknown request fields {unknown}; allowed: {sorted(_REQUEST_FIELDS)}")
    request_id = fields.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError(400, f"'id' must be a string, got {request_id!r}")
    binary_output = _binary_output(fields.get("outputs"), _request_parameters(fields.get("parameters")))
    inputs = _parse_inputs(fields.get("inputs"))
    hidden = inputs["hidden_states"]
    dtype = _check_hidden_states(hidden, limits)
    if "layer" in inputs:
        _check_layer(inputs["layer"])
    # Every size is checked: now cut the binary section and build the (small, bounded) tensors.
    if header_length is None and any(inp.binary_size is not None for inp in inputs.values()):
        raise WireError(400, f"inputs declare binary_data_size but the request has no {HEADER_LENGTH} "
                             "header; send it with the size of the JSON part of the body")
    chunks = _binary_chunks(list(inputs.values()), binary)
    x_TD = _float_array(hidden, dtype, chunks.get(hidden.name))
    limits.check_values(x_TD)
    layer = _layer_value(inputs["layer"], chunks.get("layer")) if "layer" in inputs else None
    return InferRequest(x_TD, layer, request_id, binary_output)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary section) of a body, by the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise WireError(400, f"{HEADER_LENGTH} must be the byte size of the JSON header, got {header_length!r}")
    size = int(text)
    if size > len(body):
        raise WireError(400, f"{HEADER_LENGTH} is {size} but the body has only {len(body)} bytes; "
                             "it must be the size of the JSON part of the body")
    return body[:size], memoryview(body)[size:]


def _request_parameters(raw: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WireError(400, f"'parameters' must be an object, got {raw!r}")
    if not isinstance(raw.get("binary_data_output", False), bool):
        raise WireError(400, f"parameters.binary_data_output must be true or false, "
                             f"got {raw['binary_data_output']!r}")
    # Other request parameters (priority, timeout, sequence_id, ...) are standard in clients
    # but change nothing for a stateless MoE layer: accepted and ignored.
    return raw


def _binary_output(raw: Any, parameters: dict) -> bool:
    """Whether `output` goes back as binary data: its own binary_data, else binary_data_output."""
    default = parameters.get("binary_data_output", False)
    if raw is None or raw == []:
        return default
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise WireError(400, "'outputs' must be a list of objects like {\"name\": \"output\"}")
    names = [o.get("name") for o in raw]
    if names != ["output"]:
        raise WireError(400, f"requested outputs {names}: this model has one output, 'output'; "
                             "request it once or leave 'outputs' out")
    unknown = sorted(str(k) for k in set(raw[0]) - {"name", "parameters"})
    params = raw[0].get("parameters") or {}
    if unknown or not isinstance(params, dict):
        raise WireError(400, f"output 'output': unknown fields {unknown} or parameters that are not an object")
    extra = sorted(str(k) for k in set(params) - {"binary_data"})
    if extra:
        raise WireError(400, f"output 'output': unsupported parameters {extra}; only binary_data is supported")
    binary = params.get("binary_data", default)
    if not isinstance(binary, bool):
        raise WireError(400, f"output 'output': binary_data must be true or false, got {binary!r}")
    return binary


def _parse_inputs(raw: Any) -> dict[str, _Input]:
    """The inputs by name, in request order (the order of their binary data)."""
    if not isinstance(raw, list) or not raw:
        raise WireError(400, "'inputs' must be a non-empty list; send at least 'hidden_states'")
    inputs: dict[str, _Input] = {}
    for index, item in enumerate(raw):
        inp = _parse_input(item, index)
        if inp.name not in _INPUT_NAMES:
            raise WireError(400, f"unknown input {inp.name!r}; this model takes 'hidden_states' "
                                 "and optionally 'layer'")
        if inp.name in inputs:
            raise WireError(400, f"input {inp.name!r} is given twice; send it once")
        inputs[inp.name] = inp
    if "hidden_states" not in inputs:
        raise WireError(400, "missing input 'hidden_states' (FP32, FP16 or BF16, shape [T, D])")
    return inputs


def _parse_input(item: Any, index: int) -> _Input:
    if not isinstance(item, dict):
        raise WireError(400, f"inputs[{index}] must be an object with name, datatype, shape and data")
    unknown = sorted(str(k) for k in set(item) - _INPUT_FIELDS)
    if unknown:
        raise WireError(400, f"inputs[{index}]: unknown fields {unknown}; allowed: {sorted(_INPUT_FIELDS)}")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise WireError(400, f"inputs[{index}]: 'name' and 'datatype' must be strings")
    if not (isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise WireError(400, f"input {name!r}: parameters must be an object, got {params!r}")
    extra = sorted(str(k) for k in set(params) - {"binary_data_size"})
    if extra:
        raise WireError(400, f"input {name!r}: unsupported parameters {extra} (no shared memory here); "
                             "send the data as JSON or as binary data with binary_data_size")
    size = params.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise WireError(400, f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
    if (size is None) == ("data" not in item):
        raise WireError(400, f"input {name!r}: send either 'data' (JSON) or parameters.binary_data_size "
                             "(binary data after the JSON header), exactly one of them")
    return _Input(name, datatype, tuple(shape), item.get("data"), size)


def _check_hidden_states(inp: _Input, limits: Limits) -> str:
    """The dtype name of hidden_states, after checking its declared shape and size."""
    if inp.datatype == "FP64":
        raise WireError(400, f"input 'hidden_states': {FLOAT64_NOT_SUPPORTED} (datatype FP32, BF16 or FP16)")
    if inp.datatype not in BY_OIP:
        raise WireError(400, f"input 'hidden_states': datatype must be one of {sorted(BY_OIP)}, "
                             f"got {inp.datatype!r}")
    if len(inp.shape) != 2 or inp.shape[1] != limits.d_model:
        raise WireError(400, f"input 'hidden_states': shape must be [T, {limits.d_model}] "
                             f"(d_model={limits.d_model}), got {list(inp.shape)}")
    limits.check_tokens(inp.shape[0])
    dtype = BY_OIP[inp.datatype]
    _check_binary_size(inp, math.prod(inp.shape) * dtype.itemsize)
    return dtype.name


def _check_layer(inp: _Input) -> None:
    if inp.datatype not in _INTS:
        raise WireError(400, f"input 'layer': datatype must be INT64 or INT32, got {inp.datatype!r}")
    if inp.shape != (1,):
        raise WireError(400, f"input 'layer': shape must be [1], got {list(inp.shape)}")
    _check_binary_size(inp, _INTS[inp.datatype])


def _check_binary_size(inp: _Input, expected: int) -> None:
    if inp.binary_size is not None and inp.binary_size != expected:
        raise WireError(400, f"input {inp.name!r}: binary_data_size is {inp.binary_size} but shape "
                             f"{list(inp.shape)} of {inp.datatype} needs {expected} bytes")


def _binary_chunks(inputs: list[_Input], binary: memoryview) -> dict[str, memoryview]:
    """Each binary input's bytes, cut from the binary section in input order."""
    chunks, offset = {}, 0
    for inp in inputs:
        if inp.binary_size is not None:
            chunks[inp.name] = binary[offset:offset + inp.binary_size]
            offset += inp.binary_size
    if offset != len(binary):
        raise WireError(400, f"the body has {len(binary)} bytes after the JSON header but the inputs' "
                             f"binary_data_size add up to {offset}; {HEADER_LENGTH} must be the JSON size")
    return chunks


def _float_array(inp: _Input, dtype: str, chunk: memoryview | None) -> np.ndarray:
    """hidden_states [T, D] from its binary bytes or its JSON numbers."""
    shape = (inp.shape[0], inp.shape[1])
    if chunk is not None:
        return array_from_bytes(chunk, dtype, shape)
    return array_from_numbers(_json_values(inp), dtype, shape, "input 'hidden_states': data")


def _json_values(inp: _Input) -> list:
    """The JSON data as a flat row-major list: flat, or nested as the shape ([T][D])."""
    data = inp.data
    if not isinstance(data, list):
        raise WireError(400, f"input {inp.name!r}: data must be a list (flat row-major, or nested "
                             f"as the shape {list(inp.shape)}), got {type(data).__name__}")
    if len(inp.shape) == 2 and data and all(isinstance(row, list) for row in data):
        if len(data) != inp.shape[0] or any(len(row) != inp.shape[1] for row in data):
            raise WireError(400, f"input {inp.name!r}: nested data does not match shape {list(inp.shape)}")
        data = [value for row in data for value in row]
    expected = math.prod(inp.shape)
    if len(data) != expected:
        raise WireError(400, f"input {inp.name!r}: data has {len(data)} values but shape "
                             f"{list(inp.shape)} needs {expected}")
    return data


def _layer_value(inp: _Input, chunk: memoryview | None) -> int:
    if chunk is not None:
        return int.from_bytes(chunk, "little", signed=True)
    (value,) = _json_values(inp)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(400, f"input 'layer': data must be one integer, got {value!r}")
    return value


# --- responses ---------------------------------------------------------------------------------

def encode_infer_response(y_TD: np.ndarray, model_name: str, request_id: str | None,
                          binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the response for output y [T, D] (a numpy array): JSON, or JSON header + raw bytes."""
    output: dict[str, Any] = {"name": "output", "datatype": dtype_of_array(y_TD).oip, "shape": list(y_TD.shape)}
    raw = b""
    if binary_output:
        raw = array_to_bytes(y_TD)
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = array_to_numbers(y_TD.reshape(-1))
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [output]
    header = json.dumps(response).encode()
    if not binary_output:
        return header, {"content-type": JSON}
    return header + raw, {"content-type": BINARY, HEADER_LENGTH: str(len(header))}
