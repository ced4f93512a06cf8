"""vLLM's tokenizer endpoints on the wire (no torch, no Ray): which request a body is, checks naming the field."""

import json

import pytest

from moe_cluster.protocol import tokenize as tok
from moe_cluster.protocol.errors import WireError


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def test_a_text_request_with_vllms_defaults():
    request = tok.parse_tokenize(body({"prompt": "Hello"}), "application/json")
    assert isinstance(request, tok.TokenizeCompletionRequest)
    assert (request.model, request.prompt, request.add_special_tokens, request.return_token_strs) == \
        (None, "Hello", True, False)
    request = tok.parse_tokenize(body({"model": "m", "prompt": "", "add_special_tokens": False}), None)
    assert (request.model, request.prompt, request.add_special_tokens) == ("m", "", False)


def test_a_chat_request_with_vllms_defaults():
    request = tok.parse_tokenize(body({"messages": [{"role": "user", "content": "Hi"}]}), "application/json")
    assert isinstance(request, tok.TokenizeChatRequest)
    assert (request.add_generation_prompt, request.continue_final_message, request.add_special_tokens) == \
        (True, False, False)
    assert [m.text() for m in request.messages] == ["Hi"]
    request = tok.parse_tokenize(body({"messages": [{"role": "assistant", "content": "Sure"}], "chat_template": None,
                                       "add_generation_prompt": False, "continue_final_message": True}), None)
    assert (request.add_generation_prompt, request.continue_final_message) == (False, True)


def test_a_detokenize_request():
    assert tok.parse_detokenize(body({"tokens": [3, 1, 4]}), None).tokens == [3, 1, 4]
    assert tok.parse_detokenize(body({"model": "m", "tokens": []}), None).model == "m"


@pytest.mark.parametrize("payload, param, code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"model": "m"}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({"prompt": ["a", "b"]}, "prompt", "invalid_value"),  # vLLM tokenizes one text
    ({"prompt": "x", "model": 3}, "model", "invalid_value"),
    ({"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens", "invalid_value"),
    ({"prompt": "x", "return_token_strs": 1}, "return_token_strs", "invalid_value"),
    ({"prompt": "x", "max_tokens": 3}, "max_tokens", "unsupported_parameter"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": "Hi"}, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "y"}]}, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": "y"}], "continue_final_message": True}, "continue_final_message",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "y"}], "chat_template": "{{ messages }}"}, "chat_template",
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "y"}], "tools": [{"type": "function"}]}, "tools",
     "unsupported_parameter"),
])
def test_bad_tokenize_requests_name_the_field(payload, param, code):
    with pytest.raises(WireError) as raised:
        tok.parse_tokenize(body(payload), "application/json")
    assert (raised.value.status, raised.value.param, raised.value.code) == (400, param, code)
    assert param.split(".")[0] in raised.value.message


@pytest.mark.parametrize("payload, param, code", [
    ({}, "tokens", "missing_required_parameter"),
    ({"tokens": "1 2 3"}, "tokens", "invalid_value"),
    ({"tokens": [1, 2.5]}, "tokens.1", "invalid_value"),
    ({"tokens": [1, "2"]}, "tokens.1", "invalid_value"),
    ({"tokens": [True]}, "tokens.0", "invalid_value"),
    ({"tokens": [[1, 2]]}, "tokens.0", "invalid_value"),  # one sequence, as vLLM
    ({"tokens": [1], "prompt": "x"}, "prompt", "unsupported_parameter"),
])
def test_bad_detokenize_requests_name_the_field(payload, param, code):
    with pytest.raises(WireError) as raised:
        tok.parse_detokenize(body(payload), None)
    assert (raised.value.status, raised.value.param, raised.value.code) == (400, param, code)


@pytest.mark.parametrize("parse", [tok.parse_tokenize, tok.parse_detokenize])
def test_bodies_that_are_not_json_objects(parse):
    for raw, status in [(b"{not json", 400), (b"[1, 2]", 400), (b'"text"', 400)]:
        with pytest.raises(WireError) as raised:
            parse(raw, "application/json")
        assert raised.value.status == status
    with pytest.raises(WireError) as raised:
        parse(body({"prompt": "x", "tokens": [1]}), "text/plain")
    assert raised.value.status == 415


def test_answers_have_vllms_shapes():
    assert tok.tokenize_body([5, 6, 7], 4096) == {"count": 3, "max_model_len": 4096, "tokens": [5, 6, 7],
                                                  "token_strs": None}
    assert tok.tokenize_body([5], 8, ["▁a"]) == {"count": 1, "max_model_len": 8, "tokens": [5], "token_strs": ["▁a"]}
    assert tok.detokenize_body("Hi there") == {"prompt": "Hi there"}
