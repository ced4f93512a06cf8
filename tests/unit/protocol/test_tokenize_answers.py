"""The runner's /tokenize and /detokenize answers (serving/http/tokenize_routes.py) on real tokenizers built
offline (tests/support/tokenizers_zoo.py): the ids are those the OpenAI API runs for the same prompt or chat,
the text is the tokenizer's decode, and every mistake is a 4xx naming the field. No Ray, no model."""

import asyncio
import copy
import json
from types import SimpleNamespace

import pytest

from moe_cluster.engine.text import PLAIN_CHAT_TEMPLATE, chat_prompt
from moe_cluster.protocol import tokenize as tok
from moe_cluster.protocol.errors import WireError
from moe_cluster.protocol.limits import TextLimits
from moe_cluster.serving.http import tokenize_routes as routes
from moe_cluster.serving.http.openai_routes import OpenAIFace
from tests.support.asgi import json_request
from tests.support.tokenizers_zoo import byte_level_bpe, sentencepiece_bpe, wordpiece

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


def face(tokenizer, vocab_size=None, context=None, limits=(4096, 256), name="tiny", max_kv_tokens=None):
    """What the routes read of an OpenAIFace: the tokenizer, the model's name, vocabulary, limits (the context and
    the decode loop's KV cache among them)."""
    stub = SimpleNamespace(tokenizer=tokenizer, no_tokenizer="no tokenizer.json in /m", model_name=name,
                           vocab_size=vocab_size or len(tokenizer),
                           limits=TextLimits(*limits, context=context, max_kv_tokens=max_kv_tokens))
    stub.check_model = lambda model: OpenAIFace.check_model(stub, model)
    return stub


def post(stub, path: str, payload) -> tuple[int, dict]:
    """(status, JSON answer) of a POST to `path`, a WireError told as the dispatch tells it."""
    try:
        response = asyncio.run(routes.answer_body(stub, path, json.dumps(payload).encode(), "application/json"))
    except WireError as exc:
        return exc.status, {"param": exc.param, "code": exc.code, "message": exc.message}
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_bpe], ids=["byte_level_bpe", "sentencepiece_bpe"])
def test_text_prompts_tokenize_as_completions_and_detokenize_back(make):
    tokenizer, text = make(), "The quick brown fox, naïve café."
    status, answer = post(face(tokenizer), "/tokenize", {"prompt": text})
    assert status == 200 and set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert answer["tokens"] == tokenizer(text)["input_ids"]  # what /v1/completions runs for this prompt
    assert answer["count"] == len(answer["tokens"]) and answer["token_strs"] is None
    status, back = post(face(tokenizer), "/detokenize", {"tokens": answer["tokens"]})
    assert status == 200 and back == {"prompt": tokenizer.decode(answer["tokens"])}
    assert back["prompt"].endswith(text)


def test_add_special_tokens_and_token_strings():
    tokenizer = wordpiece()  # BERT-style: [CLS] ... [SEP] when special tokens are added
    _, with_special = post(face(tokenizer), "/tokenize", {"prompt": "hello world", "return_token_strs": True})
    _, without = post(face(tokenizer), "/tokenize", {"prompt": "hello world", "add_special_tokens": False})
    assert with_special["tokens"] == [tokenizer.cls_token_id] + without["tokens"] + [tokenizer.sep_token_id]
    assert with_special["token_strs"] == ["[CLS]", "hello", "world", "[SEP]"] and without["token_strs"] is None
    _, text = post(face(tokenizer), "/detokenize", {"tokens": with_special["tokens"]})
    assert text == {"prompt": "[CLS] hello world [SEP]"}  # special tokens kept, as vLLM's detokenize


@pytest.mark.parametrize("own_template", [False, True], ids=["plain_template", "tokenizers_template"])
def test_messages_tokenize_as_chat_completions_runs_them(own_template):
    tokenizer = copy.deepcopy(byte_level_bpe())
    if own_template:
        tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}[assistant]{% endif %}")
    _, answer = post(face(tokenizer), "/tokenize", {"messages": MESSAGES})
    assert answer["tokens"] == chat_prompt(tokenizer, MESSAGES)  # /v1/chat/completions' prompt ids
    _, no_turn = post(face(tokenizer), "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert len(no_turn["tokens"]) < len(answer["tokens"])
    assert tokenizer.decode(answer["tokens"]).startswith(tokenizer.decode(no_turn["tokens"]))
    continued = MESSAGES + [{"role": "assistant", "content": "I am"}]
    _, open_end = post(face(tokenizer), "/tokenize", {"messages": continued, "add_generation_prompt": False,
                                                      "continue_final_message": True})
    assert tokenizer.decode(open_end["tokens"]).endswith("I am")


def test_max_model_len_is_the_longest_sequence_the_server_runs():
    tokenizer = byte_level_bpe()
    assert routes.max_model_len(face(tokenizer, limits=(100, 28))) == 128
    assert routes.max_model_len(face(tokenizer, context=64, limits=(100, 28))) == 64
    assert routes.max_model_len(face(tokenizer, context=64, limits=(100, 28), max_kv_tokens=48)) == 48
    assert post(face(tokenizer, context=64), "/tokenize", {"prompt": "x"})[1]["max_model_len"] == 64


@pytest.mark.parametrize("path, payload, status, param", [
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/detokenize", {"tokens": [1, 400]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {"prompt": "\ud800 lone surrogate"}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/tokenize", {"prompt": "x", "chat_template": "{{ 1 }}"}, 400, "chat_template"),
])
def test_mistakes_are_4xx_naming_the_field(path, payload, status, param):
    got, answer = post(face(byte_level_bpe()), path, payload)
    assert (got, answer["param"]) == (status, param), answer
    assert answer["message"]


def test_the_served_name_is_accepted_and_a_template_that_refuses_is_a_400():
    tokenizer = copy.deepcopy(byte_level_bpe())
    assert post(face(tokenizer), "/tokenize", {"model": "tiny", "prompt": "x"})[0] == 200
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    status, answer = post(face(tokenizer), "/tokenize", {"messages": MESSAGES})
    assert (status, answer["param"]) == (400, "messages") and "alternate" in answer["message"]


def test_without_a_tokenizer_the_endpoints_answer_503():
    stub = face(byte_level_bpe())
    stub.tokenizer = None
    for path, payload in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})]:
        status, answer = post(stub, path, payload)
        assert (status, answer["code"]) == (503, "no_tokenizer") and "tokenizer.json" in answer["message"]
    with pytest.raises(WireError) as raised:
        routes.tokenizer_info(stub)
    assert raised.value.status == 503


def test_tokenizer_info_names_the_special_tokens_and_the_template_applied():
    info = routes.tokenizer_info(face(sentencepiece_bpe()))
    assert (info["bos_token"], info["eos_token"], info["pad_token"], info["unk_token"]) == ("<s>", "</s>", None, "<unk>")
    assert info["tokenizer_class"] == type(sentencepiece_bpe()).__name__ and "vocab_file" not in info
    assert info["chat_template"] == PLAIN_CHAT_TEMPLATE  # it has none: the server's plain one applies
    json.dumps(info)  # JSON only
    tokenizer = copy.deepcopy(byte_level_bpe())
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert routes.tokenizer_info(face(tokenizer))["chat_template"] == tokenizer.chat_template
    assert routes.tokenizer_info(face(tokenizer))["eos_token"] == "<|endoftext|>"
    tokenizer.init_kwargs.update(name_or_path="/srv/models/secret", tokenizer_file="/srv/t.json", vocab_path="/v")
    told = routes.tokenizer_info(face(tokenizer))
    assert not {"name_or_path", "tokenizer_file", "vocab_path"} & set(told)  # no path of the server's files


def test_the_wire_checks_come_first():
    status, answer = post(face(byte_level_bpe()), "/tokenize", {"prompt": 3})
    assert (status, answer["param"]) == (400, "prompt")
    assert isinstance(tok.parse_tokenize(b'{"prompt": "a"}', None), tok.TokenizeCompletionRequest)


# --- through the runner's HTTP dispatch (serving/runner.py -> openai_routes.py -> tokenize_routes.py) ----------

def http(stub, method: str, path: str, payload=None, token: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request through the runner's HTTP face, as Serve hands it over."""
    from moe_cluster.serving.http.auth import BearerAuth
    from moe_cluster.serving.runner import handle_runner_http

    owner = SimpleNamespace(openai=stub, auth=BearerAuth(["secret"]), args=SimpleNamespace(max_body_bytes=4096))
    response = asyncio.run(handle_runner_http(owner, json_request(method, path, payload, token)))
    return response.status_code, json.loads(response.body)


def test_the_runner_routes_the_tokenizer_endpoints_behind_its_token():
    stub, tokenizer = face(byte_level_bpe()), byte_level_bpe()
    assert http(stub, "POST", "/tokenize", {"prompt": "fox"}, "secret") == (200, tok.tokenize_body(
        tokenizer("fox")["input_ids"], 4096 + 256))
    assert http(stub, "POST", "/detokenize", {"tokens": tokenizer("fox")["input_ids"]}, "secret") == (
        200, {"prompt": "fox"})
    assert http(stub, "GET", "/tokenizer_info", None, "secret")[1]["eos_token"] == "<|endoftext|>"
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")]:
        status, answer = http(stub, method, path, {"prompt": "fox"}, token="wrong")
        assert (status, answer["error"]["type"]) == (401, "authentication_error")
    status, answer = http(stub, "GET", "/tokenize", None, "secret")
    assert status == 405 and answer["error"]["message"] == "/tokenize takes POST, not GET"
    status, answer = http(stub, "POST", "/tokenize", {"prompt": "fox", "stream": True}, "secret")
    assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, "stream", "unsupported_parameter")
    status, answer = http(stub, "POST", "/detokenize", {"tokens": [1] * 3000}, "secret")
    assert status == 413  # max_body_bytes applies
