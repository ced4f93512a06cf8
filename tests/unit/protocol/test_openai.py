"""The OpenAI wire format (no torch, no Ray): request checks naming the field, answers, chunks, SSE, errors."""

import json

import pytest

from moe_cluster.protocol import openai as oai
from moe_cluster.protocol.errors import WireError


def parse(payload, kind=oai.CompletionRequest, content_type="application/json"):
    return oai.parse_request(json.dumps(payload).encode(), content_type, kind)


def test_a_completion_request_with_defaults_and_neutral_fields():
    request = parse({"model": "m", "prompt": "Hi", "n": 1, "presence_penalty": 0, "logprobs": None, "user": "u",
                     "stop": "END", "best_of": 1, "logit_bias": {}, "top_logprobs": None})
    assert (request.max_tokens, request.n, request.echo, request.logprobs) == (16, 1, False, None)
    assert request.stop_strings == ["END"] and not request.stream and not request.include_usage
    assert request.sampling_values({}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                           "repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
                                           "seed": None, "min_tokens": 0, "ignore_eos": False,
                                           "stop_token_ids": frozenset()}
    assert parse({"model": "m", "prompt": [1, 2, 3], "stop": ["a", "b"]}).prompts == [[1, 2, 3]]


def test_prompts_in_every_form_vllm_takes():
    assert parse({"model": "m", "prompt": "Hi"}).prompts == ["Hi"]
    assert parse({"model": "m", "prompt": ["Hi", "Ho"]}).prompts == ["Hi", "Ho"]
    assert parse({"model": "m", "prompt": [5, 6]}).prompts == [[5, 6]]
    # what lm-evaluation-harness's local-completions sends for loglikelihood requests
    harness = parse({"model": "m", "prompt": [[1, 2, 3], [4, 5]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                     "echo": True, "seed": 1234})
    assert harness.prompts == [[1, 2, 3], [4, 5]]
    assert (harness.echo, harness.logprobs, harness.max_tokens) == (True, 1, 1)
    # max_tokens 0 with echo scores the prompt, generates nothing
    assert parse({"model": "m", "prompt": "x", "echo": True, "max_tokens": 0}).max_tokens == 0


def test_sampling_values_are_the_requests_then_the_models_then_openais():
    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    request = parse({"model": "m", "prompt": "x", "top_p": 0.5, "presence_penalty": 1.5, "frequency_penalty": -0.5,
                     "min_tokens": 3, "ignore_eos": True, "stop_token_ids": [7, 9], "seed": 4, "min_p": 0.1})
    values = request.sampling_values(model)
    assert [values[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")] == [0.6, 0.5, 20, 1.05]
    assert (values["presence_penalty"], values["frequency_penalty"], values["min_p"]) == (1.5, -0.5, 0.1)
    assert (values["min_tokens"], values["ignore_eos"], values["stop_token_ids"], values["seed"]) == (
        3, True, frozenset({7, 9}), 4)
    assert parse({"model": "m", "prompt": "x", "temperature": 0}).sampling_values(model)["temperature"] == 0


def test_a_chat_request():
    request = parse({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                     "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
                    oai.ChatCompletionRequest)
    assert request.max_new_tokens == 5 and request.include_usage
    assert [m.text() for m in request.messages] == ["Be brief.", "Hi"]
    assert request.max_tokens is None  # chat: until the limit unless asked
    assert request.logprobs_k is None
    asked = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3,
                   "n": 2, "echo": False}, oai.ChatCompletionRequest)
    assert (asked.logprobs_k, asked.n) == (3, 2)
    assert parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
                 oai.ChatCompletionRequest).logprobs_k == 0


@pytest.mark.parametrize("payload, status, param, code", [
    ({"model": "m", "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"model": "m", "prompt": "x", "n": 129}, 400, "n", "invalid_value"),
    ({"model": "m", "prompt": [[1]] * 600, "n": 2}, 400, "n", "invalid_value"),  # 1200 choices
    ({"model": "m", "prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ({"model": "m", "prompt": "x", "logprobs": -1}, 400, "logprobs", "invalid_value"),
    ({"model": "m", "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty", "invalid_value"),
    ({"model": "m", "prompt": "x", "presence_penalty": -3}, 400, "presence_penalty", "invalid_value"),
    ({"model": "m", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    ({"model": "m", "prompt": "x", "min_tokens": -1}, 400, "min_tokens", "invalid_value"),
    ({"model": "m", "prompt": "x", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias", "unsupported_parameter"),
    ({"model": "m", "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ({"model": "m", "prompt": "x", "top_logprobs": 2}, 400, "top_logprobs", "unsupported_parameter"),  # chat's
    ({"model": "m", "prompt": "x", "beam_width": 2}, 400, "beam_width", "unsupported_parameter"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "m", "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "m", "prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),  # 0 needs echo
    ({"model": "m", "prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens", "invalid_value"),
    ({"model": "m", "prompt": "x", "seed": -3}, 400, "seed", "invalid_value"),
    ({"model": "m", "prompt": "x", "stop": ["s"] * 17}, 400, "stop", "invalid_value"),
    ({"model": "m", "prompt": "x", "stop": ["a" * 257]}, 400, "stop", "invalid_value"),  # checked at every token
    ({"model": "m", "prompt": "x", "stream_options": {"x": True}}, 400, "stream_options", "invalid_value"),
    ({"model": "m", "prompt": []}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": [[1, 2], []]}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": ["a", ""]}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": [True, 2]}, 400, "prompt", "invalid_value"),  # no token id, as on /v1/generate
    ({"model": "m", "prompt": [[2.0]]}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": "x", "stop_token_ids": [False]}, 400, "stop_token_ids.0", "invalid_value"),
    ({"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": "m"}, 400, "prompt", "missing_required_parameter"),
])
def test_bad_completion_requests_name_the_field(payload, status, param, code):
    with pytest.raises(WireError) as raised:
        parse(payload)
    assert (raised.value.status, raised.value.param, raised.value.code) == (status, param, code)
    assert param in raised.value.message


def test_bad_chat_requests_and_bodies():
    with pytest.raises(WireError) as raised:
        parse({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, oai.ChatCompletionRequest)
    assert raised.value.param.startswith("messages.0.role")
    with pytest.raises(WireError) as raised:
        parse({"model": "m", "messages": []}, oai.ChatCompletionRequest)
    assert raised.value.param == "messages"
    with pytest.raises(WireError) as raised:  # vLLM's rule: top_logprobs only with logprobs
        parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
              oai.ChatCompletionRequest)
    assert (raised.value.param, raised.value.code) == ("top_logprobs", "invalid_value")
    for bad in ({"top_logprobs": 21, "logprobs": True}, {"echo": True}, {"logprobs": 3}):
        with pytest.raises(WireError) as raised:
            parse({"model": "m", "messages": [{"role": "user", "content": "x"}], **bad}, oai.ChatCompletionRequest)
        assert raised.value.param == next(iter(bad))
    with pytest.raises(WireError) as raised:  # image parts are refused when the text is asked for
        parse({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
              oai.ChatCompletionRequest).messages[0].text()
    assert raised.value.param == "messages"
    with pytest.raises(WireError) as raised:
        oai.parse_request(b"{not json", "application/json", oai.CompletionRequest)
    assert raised.value.status == 400
    with pytest.raises(WireError) as raised:
        oai.parse_request(b"{}", "text/plain", oai.CompletionRequest)
    assert raised.value.status == 415
    with pytest.raises(WireError):
        oai.parse_request(b"[1]", None, oai.CompletionRequest)


def test_error_objects():
    body = json.loads(oai.error_body(400, "bad n", "n", "unsupported_parameter"))
    assert body == {"error": {"message": "bad n", "type": "invalid_request_error", "param": "n",
                              "code": "unsupported_parameter"}}
    assert [oai.error_type(s) for s in (401, 404, 413, 500, 503)] == [
        "authentication_error", "not_found_error", "invalid_request_error", "server_error", "server_error"]
    error = WireError(400, "x", "p", "c")  # Ray pickles it back to a handle's caller
    import pickle
    again = pickle.loads(pickle.dumps(error))
    assert (again.status, again.message, again.param, again.code) == (400, "x", "p", "c")
    assert WireError(413, "y").param is None  # the old two-argument form still works


def test_answers_chunks_and_sse():
    use = oai.usage(3, 2)
    assert use == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = oai.completion_body("cmpl-1", "m", [oai.completion_choice(0, "hi", "length")], use)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hi" and body["usage"] == use
    assert body["choices"][0] == {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}
    chat = oai.chat_body("chatcmpl-1", "m", [oai.chat_choice(0, "hi", "stop")], use)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    chunk = oai.chat_chunk("c", "m", 1, oai.chat_delta(2, {"content": "h"}))
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None
    assert chunk["choices"][0]["index"] == 2
    last = oai.completion_chunk("c", "m", 1, use=use)
    assert last["choices"] == [] and last["usage"] == use
    event = oai.sse(chunk)
    assert event.startswith(b"data: {") and event.endswith(b"\n\n") and json.loads(event[6:]) == chunk
    assert oai.SSE_DONE == b"data: [DONE]\n\n"
    assert oai.models_body(["m"], 5)["data"] == [{"id": "m", "object": "model", "created": 5, "owned_by": "moe-cluster"}]
