"""Open Inference Protocol v2 codec (moe_cluster/protocol/oip.py, oip_routes.py) and its HTTP routes
with a fake router (no Ray). The codec is numpy only: hidden_states are numpy arrays (bf16 as
ml_dtypes.bfloat16), compared here bit for bit."""

import asyncio
import json

import ml_dtypes
import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.protocol.errors import WireError
from moe_cluster.protocol.limits import Limits
from moe_cluster.protocol.oip import HEADER_LENGTH, encode_infer_response, parse_infer_request
from moe_cluster.protocol.oip_routes import Route, check_model, model_metadata, parse_route

D = 8
LIMITS = Limits(d_model=D, max_tokens=16)
NUMPY = {"FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def _x(tokens, seed=0):
    return np.random.default_rng(seed).standard_normal((tokens, D)).astype(np.float32)


def _same(array, expected):
    """The same numpy dtype, shape and bits."""
    assert isinstance(array, np.ndarray) and array.dtype == expected.dtype and array.shape == expected.shape
    assert array.tobytes() == expected.tobytes()


def _hidden(x, datatype="FP32", binary=False, nested=False):
    """The hidden_states input for x [T, D] and the bytes that follow the JSON header (if binary)."""
    spec = {"name": "hidden_states", "datatype": datatype, "shape": list(x.shape)}
    if binary:
        raw = x.tobytes()  # little-endian; a bf16 (ml_dtypes) array's bytes are its 16-bit patterns
        return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
    values = x.astype(np.float32)
    return {**spec, "data": values.tolist() if nested else values.reshape(-1).tolist()}, b""


def _body(inputs, raw=None, **fields):
    """(body, Inference-Header-Content-Length or None) of a request; raw: the binary section, if any."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    return header + (raw or b""), (None if raw is None else str(len(header)))


def _parse(inputs, raw=None, limits=LIMITS, **fields):
    return parse_infer_request(*_body(inputs, raw, **fields), limits)


def _error(inputs, raw=None, header_length="auto", limits=LIMITS, **fields) -> WireError:
    body, length = _body(inputs, raw, **fields)
    with pytest.raises(WireError) as info:
        parse_infer_request(body, length if header_length == "auto" else header_length, limits)
    return info.value


# --- requests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True])
def test_json_flat_and_nested(nested):
    x = _x(3)
    request = _parse([_hidden(x, nested=nested)[0]], id="req-1")
    _same(request.hidden_states, x)
    assert request.hidden_states.flags.writeable
    assert (request.layer, request.request_id, request.binary_output) == (None, "req-1", False)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_binary_inputs_keep_their_dtype(datatype):
    x = _x(5).astype(NUMPY[datatype])
    hidden, raw = _hidden(x, datatype, binary=True)
    layer = {"name": "layer", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}
    request = _parse([hidden, layer], raw + np.array([1], "<i8").tobytes())
    assert request.layer == 1
    _same(request.hidden_states, x)
    assert request.hidden_states.flags.writeable  # a copy, not a view of the request body


@pytest.mark.parametrize("datatype", ["BF16", "FP16"])
def test_16_bit_json_is_numbers_and_layer_int32_in_json(datatype):
    x = _x(2).astype(NUMPY[datatype])
    request = _parse([_hidden(x, datatype)[0],  # the float32 values of x: exact
                      {"name": "layer", "datatype": "INT32", "shape": [1], "data": [1]}])
    assert request.layer == 1
    _same(request.hidden_states, x)


@pytest.mark.parametrize("datatype, dtype", [("FP32", torch.float32), ("FP16", torch.float16),
                                             ("BF16", torch.bfloat16)])
def test_json_numbers_round_as_torch_tensor_does(datatype, dtype):
    """Doubles between two values of the datatype, ints, out of range: what torch.tensor(values, dtype) gives
    (for fp16/bf16 a double is rounded to float32 first: numpy's direct double -> fp16 differs)."""
    values = [-34704.00054943591, 29719.999932282753, 55504.00143894224, 1.0000000596046448, 65519.99,
              65520.0, 1e6, -1e39, 3.5e38, 2 ** 64 + 1, -(2 ** 70) - 1, 16777217, 2 ** 128, 5e-324]
    values = (values * 2)[:2 * D]
    hidden = {"name": "hidden_states", "datatype": datatype, "shape": [2, D], "data": values}
    got = _parse([hidden], limits=Limits(d_model=D, max_tokens=16, allow_non_finite=True)).hidden_states
    expected = torch.tensor(values, dtype=dtype).reshape(2, D)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert got.tobytes() == expected.view(bits).numpy().tobytes()
    if datatype == "FP16":  # the first three are where a direct double -> fp16 rounding would differ
        assert np.asarray(values[:3], np.float16).tobytes() != got.reshape(-1)[:3].tobytes()
    huge = {**hidden, "data": [10 ** 400] + values[1:]}
    with pytest.raises(OverflowError):
        torch.tensor(huge["data"], dtype=dtype)
    error = _error([huge], limits=Limits(d_model=D, max_tokens=16, allow_non_finite=True))
    assert error.status == 400 and "int too large to convert to float" in error.message


def test_mixed_json_and_binary_inputs_and_empty_batch():
    hidden, raw = _hidden(np.zeros((0, D), np.float32), binary=True)
    request = _parse([{"name": "layer", "datatype": "INT64", "shape": [1], "data": [0]}, hidden], raw,
                     parameters={"binary_data_output": True, "priority": 3})
    assert request.hidden_states.shape == (0, D) and request.layer == 0 and request.binary_output


@pytest.mark.parametrize("outputs, parameters, binary", [
    (None, None, False), (None, {"binary_data_output": True}, True), ([], {"binary_data_output": True}, True),
    ([{"name": "output"}], {"binary_data_output": True}, True),
    ([{"name": "output", "parameters": {"binary_data": False}}], {"binary_data_output": True}, False),
    ([{"name": "output", "parameters": {"binary_data": True}}], None, True),
])
def test_binary_output_choice(outputs, parameters, binary):
    fields = {k: v for k, v in (("outputs", outputs), ("parameters", parameters)) if v is not None}
    assert _parse([_hidden(_x(1))[0]], **fields).binary_output is binary


BINARY_HIDDEN, BINARY_RAW = _hidden(_x(2), binary=True)
JSON_HIDDEN = _hidden(_x(2))[0]
BAD_REQUESTS = {
    "header length larger than body": ([BINARY_HIDDEN], BINARY_RAW, "99999", {}, 400, "only"),
    "header length not a number": ([BINARY_HIDDEN], BINARY_RAW, "12a", {}, 400, HEADER_LENGTH),
    "binary without header length": ([BINARY_HIDDEN], BINARY_RAW, None, {}, 400, "needs the Inference-Header"),
    "binary_data_size without header length": ([BINARY_HIDDEN], None, None, {}, 400, "no Inference-Header"),
    "binary_data_size mismatch": ([{**BINARY_HIDDEN, "parameters": {"binary_data_size": 60}}], BINARY_RAW,
                                  "auto", {}, 400, "needs 64 bytes"),
    "trailing bytes": ([BINARY_HIDDEN], BINARY_RAW + b"\0\0", "auto", {}, 400, "add up to 64"),
    "data and binary": ([{**BINARY_HIDDEN, "data": [0.0] * 16}], BINARY_RAW, "auto", {}, 400, "exactly one"),
    "no data": ([{k: v for k, v in JSON_HIDDEN.items() if k != "data"}], None, None, {}, 400, "exactly one"),
    "wrong datatype": ([{**JSON_HIDDEN, "datatype": "INT8"}], None, None, {}, 400, "datatype must be one of"),
    "FP64 in JSON": ([{**JSON_HIDDEN, "datatype": "FP64"}], None, None, {}, 400,
                     "float64 is not supported: send float32, bfloat16 or float16"),
    "FP64 binary": ([{**BINARY_HIDDEN, "datatype": "FP64", "parameters": {"binary_data_size": 128}}],
                    _x(2).astype(np.float64).tobytes(), "auto", {}, 400, "float64 is not supported"),
    "wrong D": ([{**JSON_HIDDEN, "shape": [4, 4]}], None, None, {}, 400, f"[T, {D}]"),
    "three dims": ([{**JSON_HIDDEN, "shape": [1, 2, D]}], None, None, {}, 400, f"[T, {D}]"),
    "negative dim": ([{**JSON_HIDDEN, "shape": [-1, D]}], None, None, {}, 400, "non-negative"),
    "shape vs data": ([{**JSON_HIDDEN, "shape": [3, D]}], None, None, {}, 400, "needs 24"),
    "ragged nested": ([{**JSON_HIDDEN, "data": [[0.0] * D, [0.0] * 3]}], None, None, {}, 400, "nested"),
    "strings in data": ([{**JSON_HIDDEN, "data": ["a"] * 16}], None, None, {}, 400, "only numbers"),
    "too many tokens": ([{**BINARY_HIDDEN, "shape": [17, D]}], BINARY_RAW, "auto", {}, 413, "limit of 16"),
    "missing hidden_states": ([{"name": "layer", "datatype": "INT64", "shape": [1], "data": [0]}], None, None,
                              {}, 400, "missing input 'hidden_states'"),
    "no inputs": ([], None, None, {}, 400, "non-empty"),
    "unknown input": ([JSON_HIDDEN, {"name": "mask", "datatype": "FP32", "shape": [1], "data": [0]}], None,
                      None, {}, 400, "unknown input 'mask'"),
    "duplicate input": ([JSON_HIDDEN, JSON_HIDDEN], None, None, {}, 400, "given twice"),
    "layer float": ([JSON_HIDDEN, {"name": "layer", "datatype": "FP32", "shape": [1], "data": [0]}], None, None,
                    {}, 400, "INT64 or INT32"),
    "layer shape": ([JSON_HIDDEN, {"name": "layer", "datatype": "INT64", "shape": [2], "data": [0, 1]}], None,
                    None, {}, 400, "shape must be [1]"),
    "layer value": ([JSON_HIDDEN, {"name": "layer", "datatype": "INT64", "shape": [1], "data": [1.5]}], None,
                    None, {}, 400, "one integer"),
    "layer binary size": ([JSON_HIDDEN, {"name": "layer", "datatype": "INT32", "shape": [1],
                                         "parameters": {"binary_data_size": 8}}], b"\0" * 8, "auto", {}, 400,
                          "needs 4 bytes"),
    "shared memory": ([{**JSON_HIDDEN, "parameters": {"shared_memory_region": "r"}}], None, None, {}, 400,
                      "shared memory"),
    "unknown field": ([JSON_HIDDEN], None, None, {"model": "x"}, 400, "unknown request fields"),
    "id not a string": ([JSON_HIDDEN], None, None, {"id": 3}, 400, "'id' must be a string"),
    "unknown output": ([JSON_HIDDEN], None, None, {"outputs": [{"name": "logits"}]}, 400, "one output"),
    "classification": ([JSON_HIDDEN], None, None, {"outputs": [{"name": "output", "parameters":
                                                              {"classification": 3}}]}, 400, "classification"),
    "NaN": ([{**JSON_HIDDEN, "data": [float("nan")] * 16}], None, None, {}, 422, "NaN"),
    "Inf in binary": ([BINARY_HIDDEN], np.full((2, D), np.inf, np.float32).tobytes(), "auto", {}, 422, "NaN or Inf"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests(case):
    inputs, raw, header_length, fields, status, message = BAD_REQUESTS[case]
    error = _error(inputs, raw, header_length, **fields)
    assert error.status == status and message in error.message, error.message


def test_malformed_json_and_non_finite_allowed():
    with pytest.raises(WireError, match="malformed JSON"):
        parse_infer_request(b'{"inputs": [', None, LIMITS)
    with pytest.raises(WireError, match="JSON object"):
        parse_infer_request(b"[1, 2]", None, LIMITS)
    allow = Limits(d_model=D, max_tokens=16, allow_non_finite=True)
    x = _parse([{**JSON_HIDDEN, "data": [float("nan")] * 16}], limits=allow).hidden_states
    assert x.dtype == np.float32 and np.isnan(x).all()


# --- responses, routes, metadata ----------------------------------------------------------------

@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_encode_json_and_binary(datatype):
    y = _x(3).astype(NUMPY[datatype])
    body, headers = encode_infer_response(y, "moe", "7", binary_output=False)
    response = json.loads(body)
    assert HEADER_LENGTH not in headers and response["id"] == "7" and response["model_name"] == "moe"
    (output,) = response["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", datatype, [3, D])
    assert output["data"] == y.astype(np.float32).reshape(-1).tolist()  # exact: fp16/bf16 values are float32s
    _same(np.asarray(output["data"], np.float32).reshape(3, D).astype(y.dtype), y)

    body, headers = encode_infer_response(y, "moe", None, binary_output=True)
    size = int(headers[HEADER_LENGTH])
    header = json.loads(body[:size])
    assert "id" not in header and headers["content-type"] == "application/octet-stream"
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(body) - size == 3 * D * y.itemsize
    assert body[size:] == y.tobytes()  # raw little-endian bytes
    request = parse_infer_request(*_body([{"name": "hidden_states", "datatype": datatype, "shape": [3, D],
                                           "parameters": {"binary_data_size": len(body) - size}}], body[size:]),
                                  LIMITS)
    _same(request.hidden_states, y)  # the bytes round-trip


@pytest.mark.parametrize("path, route", [
    ("/v2", Route("server")), ("/v2/health/live", Route("live")), ("/v2/health/ready", Route("ready")),
    ("/v2/models/moe", Route("model", "moe")), ("/v2/models/moe/ready", Route("model_ready", "moe")),
    ("/v2/models/moe/infer", Route("infer", "moe")),
    ("/v2/models/moe/versions/1/infer", Route("infer", "moe", "1")),
    ("/v2/models/moe/versions/1", Route("model", "moe", "1")),
    ("/v2/models", None), ("/v2/models/moe/predict", None), ("/v2/health", None), ("/v2/models/moe/versions", None),
])
def test_routes(path, route):
    assert parse_route(path) == route


def test_check_model_and_metadata():
    check_model(Route("infer", "moe", "1"), "moe")
    with pytest.raises(WireError, match="unknown model 'other'") as info:
        check_model(Route("infer", "other"), "moe")
    assert info.value.status == 404
    with pytest.raises(WireError, match="no version '2'"):
        check_model(Route("model", "moe", "2"), "moe")
    meta = model_metadata("moe", 64)
    assert meta["inputs"][0] == {"name": "hidden_states", "datatype": "FP32", "shape": [-1, 64]}
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 64]}]


# --- the /v2 routes with an in-process fake router -------------------------------------------

class FakeRouter:
    """What serving/http (endpoints, oip) needs of MoERouter, computing with the in-process model (tiny preset:
    MoE layers 0 and 1; `layer_ids` renames them, e.g. (5,) for a model with one MoE layer)."""

    def __init__(self, failed=(), layer_ids=None):
        from moe_cluster.serving.args import AppArgs

        self.args = AppArgs(preset="tiny", seed=1, oip_model_name="tiny-moe", max_tokens_per_request=16)
        self.config = preset_config("tiny")
        if layer_ids is not None:
            self.config = self.config.replace(num_layers=len(layer_ids), layer_ids=tuple(layer_ids))
        self.limits = Limits(self.config.d_model, 16)
        self.model = MoEModel.random(self.config, seed=1)
        self.failed = list(failed)
        self.auth = None
        self.layers_run = []  # the layer of every run, as the router's serve_request gets it

    async def check_experts(self):
        return self.failed

    async def serve_request(self, x_TD, layer):
        self.layers_run.append(layer)
        return self.model.forward(x_TD, layer), [0] * self.config.num_experts


def _call(router, method, path, body=b"", headers=()):
    """(status, headers, body) of handle_http for one request."""
    from starlette.requests import Request

    from moe_cluster.serving.http.endpoints import handle_http

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    response = asyncio.run(handle_http(router, Request(scope, receive)))
    return response.status_code, response.headers, response.body


def test_routes_through_handle_http():
    router = FakeRouter()
    assert _call(router, "GET", "/v2/health/live")[:1] == (200,)
    assert _call(router, "GET", "/v2/models/tiny-moe/versions/1/ready")[0] == 200
    status, _, body = _call(router, "GET", "/v2/models/moe")
    assert status == 404 and "tiny-moe" in json.loads(body)["error"]
    assert _call(router, "GET", "/v2/models/tiny-moe/infer")[0] == 405
    assert _call(router, "GET", "/v2/nothing")[0] == 404
    x = _x(0)  # D=8 does not fit the tiny model (D=64): 400 before any compute
    assert _call(router, "POST", "/v2/models/tiny-moe/infer", _body([_hidden(x)[0]])[0])[0] == 400

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    hidden = {"name": "hidden_states", "datatype": "FP32", "shape": [3, 64], "data": x.flatten().tolist()}
    body, _ = _body([hidden, {"name": "layer", "datatype": "INT32", "shape": [1], "data": [1]}],
                    outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    status, headers, content = _call(router, "POST", "/v2/models/tiny-moe/infer", body)
    size = int(headers[HEADER_LENGTH])
    y = np.frombuffer(content[size:], np.float32).reshape(3, 64)
    torch.testing.assert_close(torch.from_numpy(y.copy()), router.model.forward(x, 1), rtol=1e-6, atol=1e-6)


def test_not_ready_and_compressed_body():
    router = FakeRouter(failed=["expert-3"])
    for path in ("/v2/health/ready", "/v2/models/tiny-moe/ready"):
        status, _, body = _call(router, "GET", path)
        assert status == 400 and "expert-3" in json.loads(body)["error"]
    status, _, body = _call(router, "POST", "/v2/models/tiny-moe/infer", b"\x1f\x8b", [("Content-Encoding", "gzip")])
    assert status == 415 and "uncompressed" in json.loads(body)["error"]


# --- `layer`: required with several MoE layers, the only one by default -----------------------

def _infer_body(x, layer=None, datatype="FP32"):
    hidden = {"name": "hidden_states", "datatype": datatype, "shape": list(x.shape), "data": x.flatten().tolist()}
    inputs = [hidden] + ([] if layer is None else [{"name": "layer", "datatype": "INT64", "shape": [1],
                                                     "data": [layer]}])
    return _body(inputs)[0]


def _forward_body(x, layer=None):
    return json.dumps({"hidden_states": x.tolist(), **({} if layer is None else {"layer": layer})}).encode()


def _answer(path, content):
    """The output [T, 64] of a 200 answer of /v2/.../infer (JSON) or /v1/forward (JSON)."""
    reply = json.loads(content)
    return torch.tensor(reply["outputs"][0]["data"] if path.startswith("/v2") else reply["output"]).reshape(-1, 64)


PATHS = ["/v2/models/tiny-moe/infer", "/v1/forward"]


@pytest.mark.parametrize("path", PATHS)
def test_a_missing_layer_is_a_400_listing_the_layers_when_the_model_has_several(path):
    router = FakeRouter()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    body = _infer_body(x) if path.startswith("/v2") else _forward_body(x)
    status, _, content = _call(router, "POST", path, body)
    assert status == 400 and router.layers_run == []
    assert 'layer is required: this model has MoE layers [0, 1]; send "layer": <id>' in json.loads(content)["error"]
    for layer in (0, 1):  # given, every layer answers
        body = _infer_body(x, layer) if path.startswith("/v2") else _forward_body(x, layer)
        status, _, content = _call(router, "POST", path, body)
        assert status == 200
        torch.testing.assert_close(_answer(path, content), router.model.forward(x, layer), rtol=1e-6, atol=1e-6)
    assert router.layers_run == [0, 1]


@pytest.mark.parametrize("path", PATHS)
def test_a_missing_layer_is_the_only_moe_layer(path):
    router = FakeRouter(layer_ids=(5,))  # one MoE layer, named 5 (e.g. decoder layer 5 of an import)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    body = _infer_body(x) if path.startswith("/v2") else _forward_body(x)
    status, _, content = _call(router, "POST", path, body)
    assert status == 200 and router.layers_run == [5]
    torch.testing.assert_close(_answer(path, content), router.model.forward(x, 5), rtol=1e-6, atol=1e-6)
    body = _infer_body(x, 0) if path.startswith("/v2") else _forward_body(x, 0)
    status, _, content = _call(router, "POST", path, body)
    assert status == 400 and "unknown layer 0: this model has MoE layers [5]" in json.loads(content)["error"]


def test_fp64_over_http_is_a_400_and_nothing_runs():
    router = FakeRouter()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    status, _, content = _call(router, "POST", "/v2/models/tiny-moe/infer", _infer_body(x, 0, datatype="FP64"))
    assert status == 400 and router.layers_run == []
    assert "float64 is not supported: send float32, bfloat16 or float16" in json.loads(content)["error"]
