"""The two request decoders against arbitrary and malformed input (no Ray).

`protocol.v1.decode_forward_request` (POST /v1/forward) and `protocol.oip.parse_infer_request`
(POST /v2/models/<name>/infer) read bytes straight from the network. For any input they must
either return a valid request (hidden_states a numpy array [T, D] with T <= max_tokens, finite
values) or raise WireError with a 4xx status: never another exception, which would be a 500.
Property-based tests (hypothesis) throw arbitrary bytes and arbitrary msgpack/JSON
structures at them, plus structures close to valid requests (where the bugs hide); a
battery of named malformed inputs pins the status and the message of each case.
"""

import json

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_cluster.protocol.bodies import JSON
from moe_cluster.protocol.errors import WireError
from moe_cluster.protocol.limits import Limits
from moe_cluster.protocol.oip import HEADER_LENGTH, parse_infer_request
from moe_cluster.protocol.tensors import array_from_numbers, array_to_bytes
from moe_cluster.protocol.v1 import MSGPACK, decode_forward_request

D = 8
MAX_TOKENS = 16
LIMITS = Limits(d_model=D, max_tokens=MAX_TOKENS)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


# --- the property -------------------------------------------------------------------------------

def _decoded(decode, body: bytes, header: str | None):
    """decode(body, header, LIMITS), or None after checking the WireError is a 4xx with a message."""
    try:
        request = decode(body, header, LIMITS)
    except WireError as exc:
        assert 400 <= exc.status < 500 and exc.message, exc
        return None
    _check_hidden_states(request.hidden_states)
    assert request.layer is None or isinstance(request.layer, int)
    return request


def _forward(body: bytes, content_type: str | None):
    request = _decoded(decode_forward_request, body, content_type)
    if request is not None:
        assert isinstance(request.return_expert_counts, bool) and request.wire_format in (JSON, MSGPACK)
    return request


def _infer(body: bytes, header_length: str | None):
    request = _decoded(parse_infer_request, body, header_length)
    if request is not None:
        assert request.request_id is None or isinstance(request.request_id, str)
    return request


def _check_hidden_states(x_TD: np.ndarray) -> None:
    assert isinstance(x_TD, np.ndarray) and x_TD.flags.writeable
    assert x_TD.ndim == 2 and x_TD.shape[1] == D and 0 <= x_TD.shape[0] <= MAX_TOKENS
    assert x_TD.dtype in DTYPES and bool(np.isfinite(x_TD).all())


# --- strategies ---------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=6), max_leaves=40)
MSGPACK_VALUES = st.recursive(SCALARS | st.binary(max_size=64), lambda inner: st.lists(inner, max_size=6)
                              | st.dictionaries(st.text(max_size=6) | st.binary(max_size=4), inner, max_size=6),
                              max_leaves=40)
FIELD_NAMES = st.sampled_from(["hidden_states", "layer", "return_expert_counts", "extra"])
DIMS = st.integers(-2, MAX_TOKENS + 2) | st.just(D) | st.integers(-2**63, 2**63 - 1) | st.booleans()
CONTENT_TYPES = st.sampled_from([JSON, MSGPACK, None, "", "application/x-msgpack; charset=x", "text/plain",
                                 "APPLICATION/JSON", "multipart/form-data"])


@st.composite
def tensor_maps(draw):
    """A msgpack tensor map {dtype, shape, data}, often valid, often slightly wrong."""
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", "", None, 4]))
    tokens = draw(st.integers(0, MAX_TOKENS + 1))
    shape = draw(st.sampled_from(["right", "any", "garbage"]))
    shape = [tokens, D] if shape == "right" else draw(st.lists(DIMS, max_size=3)) if shape == "any" \
        else draw(MSGPACK_VALUES)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
    data = draw(st.one_of(st.binary(min_size=tokens * D * itemsize, max_size=tokens * D * itemsize),
                          st.binary(max_size=80), st.lists(st.floats(), max_size=4)))
    tensor = {"dtype": dtype, "shape": shape, "data": data}
    if draw(st.booleans()):
        tensor[draw(st.sampled_from(["dtype", "shape", "data", "order"]))] = draw(MSGPACK_VALUES)
    return tensor


@st.composite
def nested_rows(draw):
    """hidden_states as JSON rows: often [T][D] numbers, sometimes ragged or not numbers."""
    tokens = draw(st.integers(0, MAX_TOKENS + 1))
    width = draw(st.sampled_from([D, D, D - 1, 0]))
    value = st.floats(width=32) | st.integers(-10**6, 10**6) | st.just(10**400) if draw(st.booleans()) \
        else JSON_VALUES
    return draw(st.lists(st.lists(value, min_size=width, max_size=width if draw(st.booleans()) else width + 1),
                         min_size=tokens, max_size=tokens))


@st.composite
def forward_fields(draw, hidden, values):
    """A request body's fields around `hidden`; `values`: what an odd field may hold."""
    fields = {"hidden_states": draw(hidden)}
    if draw(st.booleans()):
        fields["layer"] = draw(st.integers(-3, 3) | SCALARS)
    if draw(st.booleans()):
        fields["return_expert_counts"] = draw(st.booleans() | SCALARS)
    if draw(st.integers(0, 9)) == 0:
        fields[draw(FIELD_NAMES)] = draw(values)
    return fields


# --- /v1/forward --------------------------------------------------------------------------------

@FUZZ
@given(body=st.binary(max_size=512), content_type=CONTENT_TYPES)
def test_forward_arbitrary_bytes(body, content_type):
    _forward(body, content_type)


@FUZZ
@given(value=MSGPACK_VALUES)
def test_forward_arbitrary_msgpack(value):
    _forward(msgpack.packb(value, use_bin_type=True), MSGPACK)


@FUZZ
@given(value=JSON_VALUES)
def test_forward_arbitrary_json(value):
    _forward(json.dumps(value).encode(), JSON)


@FUZZ
@given(fields=forward_fields(tensor_maps(), MSGPACK_VALUES))
def test_forward_near_valid_msgpack(fields):
    request = _forward(msgpack.packb(fields, use_bin_type=True), MSGPACK)
    if request is not None and isinstance(fields["hidden_states"], dict):  # its bytes arrive unchanged
        assert array_to_bytes(request.hidden_states) == fields["hidden_states"]["data"]
        assert request.hidden_states.dtype.name == fields["hidden_states"]["dtype"]


@FUZZ
@given(fields=forward_fields(nested_rows(), JSON_VALUES))
def test_forward_near_valid_json(fields):
    request = _forward(json.dumps(fields).encode(), JSON)
    if request is not None and request.hidden_states.size:  # the values torch.tensor(..., float32) gives
        expected = torch.tensor(fields["hidden_states"], dtype=torch.float32).reshape(-1, D)
        assert request.hidden_states.dtype == np.float32
        assert request.hidden_states.tobytes() == expected.numpy().tobytes()


TORCH = {"float32": (torch.float32, torch.int32), "float16": (torch.float16, torch.int16),
         "bfloat16": (torch.bfloat16, torch.int16)}


@FUZZ
@given(dtype=st.sampled_from(sorted(TORCH)),
       values=st.lists(st.floats() | st.integers(-2**70, 2**70) | st.integers().map(lambda n: n * 10**300),
                       max_size=2 * D))
def test_json_numbers_are_torch_tensor_values(dtype, values):
    """JSON numbers become the bits torch.tensor(values, dtype) gave before the protocol went numpy-only:
    rounding of doubles and ints, out-of-range values (Inf), NaN, and the same OverflowError (as a 400)."""
    torch_dtype, bits = TORCH[dtype]
    try:
        expected = torch.tensor(values, dtype=torch_dtype).view(bits).numpy().tobytes()
    except OverflowError as exc:
        with pytest.raises(WireError) as info:
            array_from_numbers(values, dtype, (len(values),), "data")
        assert info.value.status == 400 and info.value.message == f"data: {exc}"
        return
    got = array_from_numbers(values, dtype, (len(values),), "data")
    assert got.dtype.name == dtype and got.tobytes() == expected


# --- /v2/models/<name>/infer ------------------------------------------------------------------------

@FUZZ
@given(body=st.binary(max_size=512), header_length=st.none() | st.text(max_size=6)
       | st.integers(-2, 600).map(str))
def test_infer_arbitrary_bytes(body, header_length):
    _infer(body, header_length)


@FUZZ
@given(value=JSON_VALUES)
def test_infer_arbitrary_json(value):
    _infer(json.dumps(value).encode(), None)


@st.composite
def infer_bodies(draw):
    """(body, Inference-Header-Content-Length) of a request close to a valid one."""
    datatype = draw(st.sampled_from(["FP32", "FP16", "BF16", "FP64", "INT64", "BYTES", 3]))
    tokens = draw(st.integers(0, MAX_TOKENS + 1))
    shape = [tokens, D] if draw(st.booleans()) else draw(st.lists(DIMS, max_size=3) | JSON_VALUES)
    itemsize = 4 if datatype == "FP32" else 2
    hidden = {"name": "hidden_states", "datatype": datatype, "shape": shape}
    raw = b""
    if draw(st.booleans()):  # binary data after the JSON header
        raw = draw(st.binary(min_size=tokens * D * itemsize, max_size=tokens * D * itemsize) | st.binary(max_size=80))
        hidden["parameters"] = {"binary_data_size": draw(st.just(len(raw)) | DIMS | SCALARS)}
    else:
        flat = st.lists(st.floats(width=16 if itemsize == 2 else 32) | st.integers(-1000, 1000),
                        min_size=tokens * D, max_size=tokens * D)
        hidden["data"] = draw(flat | flat.map(lambda v: [v[i:i + D] for i in range(0, len(v), D)]) | JSON_VALUES)
    inputs = [hidden]
    if draw(st.booleans()):
        inputs.append({"name": "layer", "datatype": draw(st.sampled_from(["INT64", "INT32", "FP32"])),
                       "shape": draw(st.just([1]) | st.lists(DIMS, max_size=2)), "data": [draw(SCALARS)]})
    request = {"inputs": draw(st.permutations(inputs))}
    for key in draw(st.lists(st.sampled_from(["id", "parameters", "outputs", "model"]), max_size=2)):
        request[key] = draw(JSON_VALUES)
    header = json.dumps(request).encode()
    length = draw(st.sampled_from(["right", "none", "off", "garbage"]))
    header_length = {"right": str(len(header)), "none": None, "off": str(len(header) + draw(st.integers(-3, 3))),
                     "garbage": draw(st.text(max_size=4))}[length]
    return header + raw, header_length


@FUZZ
@given(request=infer_bodies())
def test_infer_near_valid(request):
    _infer(*request)


# --- named malformed inputs ----------------------------------------------------------------------

def _tensor(dtype="float32", shape=(2, D), data=None, **extra):
    data = np.zeros(shape, np.float32).tobytes() if data is None else data
    return msgpack.packb({"hidden_states": {"dtype": dtype, "shape": list(shape), "data": data}, **extra})


def _rows(value=0.0, tokens=2, width=D, **extra):
    return json.dumps({"hidden_states": [[value] * width] * tokens, **extra}).encode()


FORWARD_BAD = {
    "empty body (json)": (b"", JSON, 400, "malformed JSON"),
    "empty body (msgpack)": (b"", MSGPACK, 400, "malformed msgpack"),
    "truncated json": (_rows()[:-7], JSON, 400, "malformed JSON"),
    "truncated msgpack": (_tensor()[:-5], MSGPACK, 400, "malformed msgpack"),
    "msgpack sent as json": (_tensor(), JSON, 400, "malformed JSON"),
    "json sent as msgpack": (_rows(), MSGPACK, 400, ""),
    "utf-16 garbage": ("{\"hidden_states\": []}".encode("utf-16")[:-1], JSON, 400, "malformed JSON"),
    "a list, not an object": (b"[[0.0]]", JSON, 400, "object/map"),
    "hidden_states a string": (json.dumps({"hidden_states": "AAAA"}).encode(), JSON, 400, "list of rows"),
    "missing hidden_states": (b'{"layer": 0}', JSON, 400, "missing field 'hidden_states'"),
    "dtype float64": (_tensor(dtype="float64", data=b"\0" * 2 * D * 8), MSGPACK, 400,
                      "hidden_states.dtype: float64 is not supported: send float32, bfloat16 or float16"),
    "dtype int8": (_tensor(dtype="int8", data=b"\0" * 2 * D), MSGPACK, 400, "dtype must be one of"),
    "dtype upper case": (_tensor(dtype="FLOAT32"), MSGPACK, 400, "dtype must be one of"),
    "dtype missing": (msgpack.packb({"hidden_states": {"shape": [1, D], "data": b"\0" * 4 * D}}), MSGPACK, 400,
                      "dtype must be one of"),
    "huge declared shape, little data": (_tensor(shape=(2**40, D), data=b"\0" * 8), MSGPACK, 413, "limit of 16"),
    "huge width": (_tensor(shape=(1, 2**62), data=b"\0" * 8), MSGPACK, 400, f"[T, {D}]"),
    "negative tokens": (_tensor(shape=(-1, D), data=b""), MSGPACK, 400, "non-negative"),
    "three dims": (_tensor(shape=(1, 1, D), data=b"\0" * 4 * D), MSGPACK, 400, "two integers"),
    "float dims": (msgpack.packb({"hidden_states": {"dtype": "float32", "shape": [1.0, D], "data": b""}}),
                   MSGPACK, 400, "two integers"),
    "bool dims": (_tensor(shape=(True, D), data=b"\0" * 4 * D), MSGPACK, 400, "two integers"),
    "data as a list": (msgpack.packb({"hidden_states": {"dtype": "float32", "shape": [1, D], "data": [0.0] * D}}),
                       MSGPACK, 400, "msgpack bin"),
    "data one byte short": (_tensor(data=b"\0" * (8 * D - 1)), MSGPACK, 400, f"needs {8 * D}"),
    "NaN (json)": (_rows(float("nan")), JSON, 422, "NaN"),
    "Infinity (json)": (_rows(float("inf")), JSON, 422, "NaN or Inf"),
    "Inf (float16 bits)": (_tensor("float16", data=np.full((2, D), np.inf, np.float16).tobytes()), MSGPACK, 422,
                           "NaN or Inf"),
    "NaN (bfloat16 bits)": (_tensor("bfloat16", data=np.full((2, D), 0x7FC0, np.uint16).tobytes()), MSGPACK, 422,
                            "NaN or Inf"),
    "overflows float32": (_rows(1e39), JSON, 422, "NaN or Inf"),
    "integer of 5000 digits": (b'{"hidden_states": [[' + b"9" * 5000 + b"]]}", JSON, 400, ""),
    "extra top-level field": (_rows(temperature=1.0), JSON, 400, "unknown fields ['temperature']"),
    "extra tensor field": (msgpack.packb({"hidden_states": {"dtype": "float32", "shape": [0, D], "data": b"",
                                                            "order": "C"}}), MSGPACK, 400, "unknown tensor fields"),
    "integer map key": (msgpack.packb({1: 2}), MSGPACK, 400, "malformed msgpack"),
    "msgpack ext type": (msgpack.packb({"hidden_states": msgpack.ExtType(5, b"x")}), MSGPACK, 400, "extension"),
    "deeply nested json": (b"[" * 100_000 + b"]" * 100_000, JSON, 400, "JSON"),
    "deeply nested msgpack": (b"\x91" * 100_000 + b"\xc0", MSGPACK, 400, "malformed msgpack"),
    "ragged rows": (json.dumps({"hidden_states": [[0.0] * D, [0.0] * (D - 1)]}).encode(), JSON, 400, "lengths"),
    "empty rows": (json.dumps({"hidden_states": [[]]}).encode(), JSON, 400, f"[T, {D}]"),
    "booleans as numbers": (_rows(True), JSON, 400, "only numbers"),
    "too many tokens": (_rows(tokens=MAX_TOKENS + 1), JSON, 413, "limit of 16"),
    "layer a string": (_rows(layer="0"), JSON, 400, "layer must be an integer"),
    "layer a float": (_rows(layer=0.0), JSON, 400, "layer must be an integer"),
    "layer a bool": (_rows(layer=True), JSON, 400, "layer must be an integer"),
    "layer null": (_rows(layer=None), JSON, 400, "layer must be an integer"),
    "return_expert_counts a string": (_rows(return_expert_counts="yes"), JSON, 400, "true or false"),
    "content type text/plain": (_rows(), "text/plain", 415, "Content-Type"),
    "content type form": (b"a=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
    "content type protobuf": (b"\x08\x01", "application/x-protobuf", 415, "Content-Type"),
}


@pytest.mark.parametrize("case", FORWARD_BAD)
def test_forward_malformed(case):
    body, content_type, status, message = FORWARD_BAD[case]
    with pytest.raises(WireError) as info:
        decode_forward_request(body, content_type, LIMITS)
    assert info.value.status == status and message in info.value.message, info.value.message


@pytest.mark.parametrize("body, content_type", [(_rows(), JSON), (_tensor(), MSGPACK)])
def test_forward_layer_is_none_when_absent_and_kept_when_sent(body, content_type):
    """The decoder does not pick a layer: the router resolves a missing one (ModelConfig.resolve_layer)."""
    assert decode_forward_request(body, content_type, LIMITS).layer is None
    fields = json.loads(body) if content_type == JSON else msgpack.unpackb(body)
    for layer in (0, 3):
        sent = json.dumps({**fields, "layer": layer}).encode() if content_type == JSON \
            else msgpack.packb({**fields, "layer": layer})
        assert decode_forward_request(sent, content_type, LIMITS).layer == layer


def _infer_json(hidden=None, **fields):
    hidden = hidden or {"name": "hidden_states", "datatype": "FP32", "shape": [1, D], "data": [0.0] * D}
    return json.dumps({"inputs": [hidden], **fields}).encode()


def _infer_binary(raw: bytes, size=None, shape=(1, D)):
    """(body, header length) with hidden_states as binary data."""
    header = json.dumps({"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": list(shape),
                                     "parameters": {"binary_data_size": len(raw) if size is None else size}}]})
    return header.encode() + raw, str(len(header))


ROW = np.zeros((1, D), np.float32).tobytes()
HIDDEN = {"name": "hidden_states", "datatype": "FP32", "shape": [1, D], "data": [0.0] * D}
INFER_BAD = {
    "empty body": (b"", None, 400, "malformed JSON"),
    "truncated json": (_infer_json()[:-3], None, 400, "malformed JSON"),
    "truncated binary section": (_infer_binary(ROW)[0][:-4], _infer_binary(ROW)[1], 400, "add up to"),
    "header length negative": (*_infer_binary(ROW)[:1], "-5", 400, HEADER_LENGTH),
    "header length plus sign": (*_infer_binary(ROW)[:1], "+5", 400, HEADER_LENGTH),
    "header length cuts the json": (_infer_binary(ROW)[0], "10", 400, "malformed JSON"),
    "a list, not an object": (b"[]", None, 400, "JSON object"),
    "inputs an object": (json.dumps({"inputs": HIDDEN}).encode(), None, 400, "non-empty list"),
    "input a string": (json.dumps({"inputs": ["hidden_states"]}).encode(), None, 400, "must be an object"),
    "name not a string": (_infer_json({**HIDDEN, "name": 1}), None, 400, "must be strings"),
    "datatype lower case": (_infer_json({**HIDDEN, "datatype": "fp32"}), None, 400, "datatype must be one of"),
    "datatype BYTES": (_infer_json({**HIDDEN, "datatype": "BYTES"}), None, 400, "datatype must be one of"),
    "datatype FP64": (_infer_json({**HIDDEN, "datatype": "FP64"}), None, 400,
                      "input 'hidden_states': float64 is not supported: send float32, bfloat16 or float16"),
    "shape with a bool": (_infer_json({**HIDDEN, "shape": [True, D]}), None, 400, "non-negative integers"),
    "shape a string": (_infer_json({**HIDDEN, "shape": "1x8"}), None, 400, "non-negative integers"),
    "huge declared shape, little data": (_infer_json({**HIDDEN, "shape": [2**40, D]}), None, 413, "limit of 16"),
    "huge shape, binary": (*_infer_binary(ROW, size=4 * D * MAX_TOKENS, shape=(MAX_TOKENS, D)), 400, "add up to"),
    "binary_data_size negative": (*_infer_binary(ROW, size=-1), 400, "byte count"),
    "binary_data_size a bool": (*_infer_binary(ROW, size=True), 400, "byte count"),
    "data too short": (_infer_json({**HIDDEN, "data": [0.0] * (D - 1)}), None, 400, f"needs {D}"),
    "data a string": (_infer_json({**HIDDEN, "data": "0" * D}), None, 400, "must be a list"),
    "data nested too deep": (_infer_json({**HIDDEN, "data": [[[0.0] * D]]}), None, 400, ""),
    "integer of 5000 digits": (b'{"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [1, 1], '
                               b'"data": [' + b"9" * 5000 + b"]}]}", None, 400, ""),
    "Infinity": (_infer_json({**HIDDEN, "data": [float("inf")] * D}), None, 422, "NaN or Inf"),
    "FP16 overflow": (_infer_json({**HIDDEN, "datatype": "FP16", "data": [1e6] * D}), None, 422, "NaN or Inf"),
    "NaN in binary": (*_infer_binary(np.full((1, D), np.nan, np.float32).tobytes()), 422, "NaN"),
    "parameters a list": (_infer_json(parameters=[1]), None, 400, "'parameters' must be an object"),
    "binary_data_output a string": (_infer_json(parameters={"binary_data_output": "yes"}), None, 400, "true or false"),
    "outputs an object": (_infer_json(outputs={"name": "output"}), None, 400, "must be a list"),
    "deeply nested json": (b"[" * 100_000 + b"]" * 100_000, None, 400, "JSON"),
    "layer negative size": (json.dumps({"inputs": [HIDDEN, {"name": "layer", "datatype": "INT64", "shape": [-1],
                                                            "data": [0]}]}).encode(), None, 400, "non-negative"),
}


@pytest.mark.parametrize("case", INFER_BAD)
def test_infer_malformed(case):
    body, header_length, status, message = INFER_BAD[case]
    with pytest.raises(WireError) as info:
        parse_infer_request(body, header_length, LIMITS)
    assert info.value.status == status and message in info.value.message, info.value.message
