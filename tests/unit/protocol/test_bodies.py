"""The one JSON body parser (protocol/bodies.py) and the /v1/generate request, without a runner."""

import json
import math
import pickle

import pytest

from moe_cluster.protocol.bodies import decode_generate_request, media_type, parse_json
from moe_cluster.protocol.errors import WireError, encode_error


def _error(body, content_type="application/json") -> WireError:
    with pytest.raises(WireError) as info:
        decode_generate_request(body, content_type)
    return info.value


def test_generate_request_fields_and_defaults():
    assert decode_generate_request(b'{"input_ids": [[1, 2]], "max_new_tokens": 3}', None) == ([[1, 2]], 3)
    assert decode_generate_request(b'{"input_ids": [[1]]}', "application/json; charset=utf-8") == ([[1]], 16)


@pytest.mark.parametrize("body, content_type, status, message", [
    (b'{"input_ids": [[1,', "application/json", 400, "malformed JSON body: "),
    (b'{"input_ids": [[1,', "application/json", 400, '; send {"input_ids": [[1, 2, 3]], "max_new_tokens": 8}'),
    (b"[" * 100_000, "application/json", 400, "malformed JSON body: nested too deeply"),
    (b"\xff", "application/json", 400, "malformed JSON body"),
    (b"[[1, 2]]", "application/json", 400, "the body must be a JSON object with input_ids"),
    (b'{"max_new_tokens": 3}', "application/json", 400, "with input_ids"),
    (b'{"input_ids": [[1]], "temperature": 0.7}', "application/json", 400, "unknown fields ['temperature']"),
    (b"x", "text/plain", 415, "Content-Type must be application/json, got 'text/plain'"),
    (b'{"input_ids": [[1]]}', "", 415, "Content-Type must be application/json"),
])
def test_bad_generate_requests(body, content_type, status, message):
    error = _error(body, content_type)
    assert error.status == status and message in error.message, error.message


def test_parse_json_keeps_nan_for_the_values_check_and_names_what_it_parsed():
    value = parse_json(b"[NaN, Infinity, -Infinity]")
    assert math.isnan(value[0]) and value[1:] == [math.inf, -math.inf]
    with pytest.raises(WireError, match=r"^malformed JSON inference header: .*\(hint\)$") as info:
        parse_json(b"{", "inference header", " (hint)")
    assert info.value.status == 400
    with pytest.raises(WireError, match="malformed JSON body"):
        parse_json(b'{"a": ' + b"9" * 5000 + b"}")  # an integer of over 4300 digits


def test_media_type_and_error_body():
    assert media_type(None) == media_type("") == ""
    assert media_type(" Application/MsgPack ; q=1") == "application/msgpack"
    assert json.loads(encode_error("bad")) == {"error": "bad"}
    error = WireError(413, "too big")
    assert isinstance(error, ValueError) and (error.status, error.message, str(error)) == (413, "too big", "too big")
    again = pickle.loads(pickle.dumps(error))  # as Ray sends it back to a handle caller
    assert type(again) is WireError and (again.status, again.message) == (413, "too big")
