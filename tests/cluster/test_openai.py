"""The OpenAI API of a whole model served by one command, driven by the official `openai` client.

`moe-cluster serve --hf-model DIR --checkpoint CKPT --config serve.yaml` (a real process, real
HTTP, bearer auth on) runs a tiny Mixtral with a tokenizer made in the test: runner + router +
one expert deployment. The tokenizer is a WordPiece one that cleans up spaces when it decodes
(" !" -> "!", " ' s" -> "'s"): its decode of all ids is not the join of the decodes of pieces,
which once cut answers short. Greedy answers equal transformers' `generate` decoded by the same
tokenizer; streamed text equals the unstreamed one; 8 concurrent requests each get what they
would get alone; degenerate sampling parameters are answered; a client that hangs up is let go;
bad requests get OpenAI's error objects with the documented status codes.
"""

import json
import os
import re
import socket
import subprocess
import time
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.engine.text import chat_prompt

from ..support.hf_models import build_hf
from ..support.tokenizers_zoo import wordpiece
from .conftest import free_port, stop_process, wait_until

openai = pytest.importorskip("openai", reason="needs the `test` extra: pip install -e '.[test]'")

TOKEN, TOKEN_ENV, MODEL, VOCAB = "oai-test-token-81d2", "MOE_TEST_OPENAI_TOKEN", "tiny-mixtral", 90
PROMPTS = ["Hello, how are you?", "The quick brown fox", "Once upon a time there was a small model that"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("openai")
    tokenizer = wordpiece()
    assert len(tokenizer) == VOCAB and tokenizer.clean_up_tokenization_spaces
    hf_model = build_hf("mixtral", vocab_size=VOCAB)
    hf_model.save_pretrained(work / MODEL)
    tokenizer.save_pretrained(str(work / MODEL))
    import_hf_checkpoint(work / MODEL, work / "moe", log=lambda _: None)
    args = {"torch_threads": 1, "auth_token_env": TOKEN_ENV, "placement": [{"name": "experts", "experts": [0, 1, 2, 3]}]}
    (work / "serve.yaml").write_text(yaml.safe_dump({"applications": [
        {"name": "moe", "route_prefix": "/", "import_path": "moe_cluster.serving.app:build_app", "args": args}]}))
    port, log = free_port(), open(work / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "moe_cluster.cli", "serve", "--hf-model", str(work / MODEL),
                                "--checkpoint", str(work / "moe"), "--config", str(work / "serve.yaml"),
                                "--port", str(port), "--num-cpus", "2"],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, TOKEN_ENV: TOKEN})
    try:
        wait_until(lambda: "moe-cluster: ready in" in (work / "serve.log").read_text() or process.poll() is not None,
                   timeout=240, what="the ready banner of moe-cluster serve --hf-model")
        assert process.poll() is None, (work / "serve.log").read_text()[-3000:]
        base = f"http://127.0.0.1:{port}/v1"
        yield {"client": openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=120), "base": base,
               "model": hf_model, "tokenizer": tokenizer, "log": (work / "serve.log")}
    finally:
        stop_process(process)


def hf_text(server, prompt_ids: list[int], new_tokens: int) -> str:
    """What transformers' greedy generate answers, decoded by the same tokenizer."""
    ids = torch.tensor([prompt_ids])
    out = server["model"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False)[0, ids.shape[1]:]
    return server["tokenizer"].decode(out, skip_special_tokens=True)


def complete(client, prompt, stream=False, **kwargs):
    """(text, finish_reason, usage) of one completion, streamed or not."""
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kwargs}
    if not stream:
        answer = client.completions.create(**kwargs)
        return answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks[-1].usage


def test_the_banner_and_models(server):
    banner = server["log"].read_text()
    assert "POST http://127.0.0.1:" in banner and "/v1/chat/completions" in banner
    assert [m.id for m in server["client"].models.list()] == [MODEL]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_transformers_streamed_or_not(server, prompt):
    text, finish, use = complete(server["client"], prompt)
    ids = server["tokenizer"](prompt)["input_ids"]
    assert text == hf_text(server, ids, 12)
    assert finish == "length" and (use.prompt_tokens, use.completion_tokens) == (len(ids), 12)
    assert complete(server["client"], prompt, stream=True) == (text, finish, use)


# Token ids whose 16 greedy tokens decode to "o o'don don'hello ...": the tokenizer joins " ' " into "'"
# only once the next token is there, so the text already streamed is not a prefix of the decode of all
# ids; the old streamer stopped there, silently, at "o o '" (found by trying random prompts).
CLEANUP_PROMPT = [78, 35, 42, 28]


@pytest.mark.parametrize("stream", [False, True], ids=["unstreamed", "streamed"])
def test_text_is_the_tokenizers_decode_where_it_cleans_up_spaces(server, stream):
    text, finish, use = complete(server["client"], CLEANUP_PROMPT, stream=stream, max_tokens=16)
    assert text == hf_text(server, CLEANUP_PROMPT, 16) and "o'" in text
    assert (finish, use.completion_tokens) == ("length", 16)


def test_chat_streamed_and_not_equals_transformers_on_the_plain_template(server):
    client, messages = server["client"], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    expected = hf_text(server, chat_prompt(server["tokenizer"], messages), 10)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def runner_stats(server) -> dict:
    request = urllib.request.Request(server["base"] + "/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_eight_concurrent_requests_each_get_what_they_get_alone(server):
    client, tokenizer = server["client"], server["tokenizer"]
    cases = [(PROMPTS[i % 3] * (1 + i % 2), 4 + 2 * i, i % 2 == 1) for i in range(8)]
    before = runner_stats(server)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: complete(client, c[0], stream=c[2], max_tokens=c[1]), cases))
    assert [text for text, _, _ in answers] == [hf_text(server, tokenizer(p)["input_ids"], n) for p, n, _ in cases]
    after = runner_stats(server)
    loop, loop0 = after["decode_loop"], before["decode_loop"]
    steps, layers = loop["steps"] - loop0["steps"], server["model"].config.num_hidden_layers
    assert loop["sequences"] - loop0["sequences"] == 8
    # Each step gives every sequence in it one token, so steps >= the longest answer; 8 requests sent at
    # once share steps: at least 3 sequences per step on average (alone, each would take its own steps).
    tokens = [usage.completion_tokens for _, _, usage in answers]
    assert max(tokens) <= steps <= sum(tokens) / 3, (steps, tokens)
    calls = loop["moe_calls"] - loop0["moe_calls"]
    assert loop["overlap"] is False and calls == steps * layers  # one MoE call per layer per step
    moe, moe0 = after["moe"], before["moe"]  # the runner routes for itself (moe_calls: direct)
    assert after["moe_calls"] == "direct" and moe["transport"]["mode"] == "auto"
    assert moe["transport"]["calls"]["channel"] > moe0["transport"]["calls"]["channel"]  # small calls: channels
    assert moe["router_phases"]["batches"] - moe0["router_phases"]["batches"] == calls  # each one routed batch


def test_stop_strings_and_seeded_sampling(server):
    client = server["client"]
    full = complete(client, PROMPTS[0], max_tokens=16)[0]
    stop = full[6:8]
    text, finish, _ = complete(client, PROMPTS[0], max_tokens=16, stop=[stop, "never-there"])
    assert (text, finish) == (full[:full.index(stop)], "stop")
    assert complete(client, PROMPTS[0], stream=True, max_tokens=16, stop=stop)[:2] == (text, finish)
    seeded = dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=42, extra_body={"top_k": 40})
    assert complete(client, PROMPTS[1], **seeded)[0] == complete(client, PROMPTS[1], stream=True, **seeded)[0]


BAD = [  # (request kwargs, the client's exception, status, param)
    (dict(model="no-such-model"), openai.NotFoundError, 404, "model"),
    (dict(n=0), openai.BadRequestError, 400, "n"),
    (dict(logprobs=21), openai.BadRequestError, 400, "logprobs"),
    (dict(logit_bias={"5": 1.0}), openai.BadRequestError, 400, "logit_bias"),
    (dict(extra_body={"stop_token_ids": [VOCAB + 1]}), openai.BadRequestError, 400, "stop_token_ids"),
    (dict(temperature=3.5), openai.BadRequestError, 400, "temperature"),
    (dict(top_p=0), openai.BadRequestError, 400, "top_p"),
    (dict(max_tokens=0), openai.BadRequestError, 400, "max_tokens"),
    (dict(max_tokens=100000), openai.BadRequestError, 400, "max_tokens"),
    (dict(prompt="word " * 5000), openai.BadRequestError, 400, "prompt"),
    (dict(prompt=[VOCAB + 5]), openai.BadRequestError, 400, "prompt"),
    (dict(stop=["x" * 300]), openai.BadRequestError, 400, "stop"),
    (dict(extra_body={"beam_width": 4}), openai.BadRequestError, 400, "beam_width"),
]


@pytest.mark.parametrize("kwargs, error, status, param", BAD, ids=[str(b[3]) + str(i) for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_error_objects(server, kwargs, error, status, param):
    with pytest.raises(error) as raised:
        server["client"].completions.create(**{"model": MODEL, "prompt": "Hi", "max_tokens": 4, **kwargs})
    assert raised.value.status_code == status
    body = raised.value.body  # the client unwraps {"error": {...}}
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param
    assert body["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def hf_logprobs(server, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' own logits [S, V] for `ids`: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(server["model"](torch.tensor([ids])).logits[0].float(), dim=-1)


def test_the_harness_scoring_request_through_the_cluster(server):
    """What lm-evaluation-harness sends for loglikelihood (token-id prompts, echo, logprobs 1, max_tokens 1):
    each choice's prompt logprobs (first null) and top_logprobs are transformers' own; one forward each."""
    prompts = [[5, 9, 17, 33, 40], [60, 2, 71], list(range(10, 30))]
    before = runner_stats(server)["decode_loop"]
    answer = server["client"].completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=1,
                                                 logprobs=1, echo=True, seed=1234)
    after = runner_stats(server)["decode_loop"]
    assert after["steps"] - before["steps"] == 1  # the three prefills, together: the scoring costs one forward
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for choice, ids in zip(answer.choices, prompts):
        rows, logprobs = hf_logprobs(server, ids), choice.logprobs
        greedy = int(torch.argmax(rows[-1]))
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        expected = [float(rows[i, t]) for i, t in enumerate(ids[1:] + [greedy])]
        assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        for i, top in enumerate(logprobs.top_logprobs[1:]):  # the token, and the most likely (the same if greedy)
            best = int(torch.argmax(rows[i]))
            assert max(top.values()) == pytest.approx(float(rows[i, best]), abs=1e-4)
            assert (logprobs.token_logprobs[i + 1] == max(top.values())) == (best == (ids + [greedy])[i + 1])
        assert choice.text == server["tokenizer"].decode(ids) + server["tokenizer"].decode([greedy])
    scored = server["client"].completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text == server["tokenizer"].decode(prompts[0])
    assert scored.choices[0].logprobs.token_logprobs == answer.choices[0].logprobs.token_logprobs[:-1]


def test_streamed_logprobs_n_choices_and_chat_logprobs(server):
    client, prompt = server["client"], server["tokenizer"](PROMPTS[1])["input_ids"]
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2, n=2)
    answer = client.completions.create(**kwargs)
    text = hf_text(server, prompt, 6)
    assert [c.text for c in answer.choices] == [text, text] and answer.usage.completion_tokens == 12
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    for choice in answer.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert "".join(c.text for c in mine) == text
        assert sum((c.logprobs.token_logprobs for c in mine), []) == pytest.approx(choice.logprobs.token_logprobs,
                                                                                  abs=1e-5)
    messages = [{"role": "user", "content": "Hi!"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    ids = chat_prompt(server["tokenizer"], messages)
    out = server["model"].generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    rows = hf_logprobs(server, ids + out)[len(ids) - 1:]
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([float(rows[i, t]) for i, t in enumerate(out)], abs=1e-4)
    assert all([t.logprob for t in c.top_logprobs] == pytest.approx(torch.topk(rows[i], 3).values.tolist(), abs=1e-4)
               for i, c in enumerate(content))


def metrics_port(server) -> int:
    """The Prometheus port of Ray's metrics export on the server's node, as the banner prints it."""
    found = re.search(r"Prometheus metrics \(the runner's OpenAI API[^)]*\) at http://127\.0\.0\.1:(\d+)/metrics",
                      server["log"].read_text())
    assert found, "the banner names no Prometheus metrics URL"
    return int(found.group(1))


def scraped(port: int, name: str) -> dict[str, float]:
    """{labels: value} of the samples of metric `name` in the Prometheus text of Ray's export."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}(\{{.*\}}) (\S+)$", text, re.M)}


def test_the_runners_prometheus_metrics(server):
    """/metrics of Ray's export has the runner's histograms, gauges and counters, tagged with the model."""
    port = metrics_port(server)
    answer = complete(server["client"], PROMPTS[0], max_tokens=5)  # at least one request with 5 tokens
    assert answer[2].completion_tokens == 5
    model = f'model="{MODEL}"'

    def exported():
        tokens = scraped(port, "ray_moe_runner_generation_tokens_total")
        return tokens if any(model in labels and value >= 5 for labels, value in tokens.items()) else None

    wait_until(exported, timeout=90, interval=2, what="the runner's metrics in Ray's Prometheus export")
    for name in ("ray_moe_runner_time_to_first_token_seconds_count", "ray_moe_runner_time_per_output_token_seconds_count",
                 "ray_moe_runner_e2e_request_latency_seconds_count", "ray_moe_runner_prompt_tokens_total"):
        assert any(model in labels and value >= 1 for labels, value in scraped(port, name).items()), name
    assert any('reason="length"' in labels and value >= 1
               for labels, value in scraped(port, "ray_moe_runner_requests_finished_total").items())
    for gauge in ("ray_moe_runner_requests_running", "ray_moe_runner_requests_waiting"):
        assert any(model in labels for labels in scraped(port, gauge)), gauge


def test_auth_applies_and_generate_stays(server):
    anonymous = openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        anonymous.models.list()
    assert raised.value.body["type"] == "authentication_error"
    request = urllib.request.Request(server["base"] + "/generate", json.dumps(
        {"input_ids": [[1, 5, 9]], "max_new_tokens": 3}).encode(), {"Content-Type": "application/json",
                                                                   "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        ids = json.loads(response.read())["output_ids"]
    expected = server["model"].generate(torch.tensor([[1, 5, 9]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                                        max_new_tokens=3, do_sample=False)
    assert ids == expected.tolist()


@pytest.mark.parametrize("sampling", [dict(temperature=1e-39), dict(temperature=1.0, top_p=1e-30),
                                      dict(temperature=1e-30, top_p=1e-30, extra_body={"top_k": 1})])
def test_degenerate_sampling_is_answered_as_greedy_and_the_api_keeps_serving(server, sampling):
    """A temperature that overflows the logits, or a top_p that keeps no token, once froze the decode loop."""
    started = time.monotonic()
    text = complete(server["client"], PROMPTS[0], **sampling)[0]
    assert time.monotonic() - started < 30
    assert text == complete(server["client"], PROMPTS[0])[0] == hf_text(server, server["tokenizer"](PROMPTS[0])["input_ids"], 12)


def raw_request(server, body: dict) -> socket.socket:
    """A raw HTTP/1.1 POST to /v1/completions (a client that may hang up at any byte); returns the socket."""
    host, port = server["base"].removeprefix("http://").split("/")[0].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    return seen


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "unstreamed"])
def test_a_client_that_hangs_up_is_let_go_while_eight_others_answer_right(server, stream):
    client, tokenizer = server["client"], server["tokenizer"]
    before = runner_stats(server)["decode_loop"]
    cases = [(PROMPTS[i % 3], 6 + i, i % 2 == 0) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        sock = raw_request(server, {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0,
                                    "stream": stream})
        if stream:
            read_until(sock, b"data: ")  # the first chunk came; then the client goes away
        else:
            wait_until(lambda: runner_stats(server)["decode_loop"]["steps"] > before["steps"], 30, 0.05,
                       "the abandoned request decoding")
        sock.close()
        answers = pool.map(lambda c: complete(client, c[0], stream=c[2], max_tokens=c[1]), cases)
        dropped = wait_until(lambda: (s := runner_stats(server)["decode_loop"])["cancelled"] > before["cancelled"]
                             and s, 60, 0.05, "the abandoned request leaving the decode loop")
        answers = list(answers)
    assert [text for text, _, _ in answers] == [hf_text(server, tokenizer(p)["input_ids"], n) for p, n, _ in cases]
    assert dropped["cancelled"] == before["cancelled"] + 1
    # It left long before its 200 tokens: all 8 others ended (each <= 13 tokens) and it is not among them.
    after = runner_stats(server)["decode_loop"]
    assert after["sequences"] - before["sequences"] == 8 and after["steps"] - before["steps"] < 200


def test_a_lone_surrogate_in_the_prompt_is_a_400_not_a_500(server):
    """JSON may carry "\\ud800" (the openai client refuses to send it, a raw client does not)."""
    sock = raw_request(server, {"model": MODEL, "prompt": "\ud800 lone surrogate", "max_tokens": 2})
    with sock:
        answer = read_until(sock, b"}}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    error = json.loads(body[body.index(b"{"):])["error"]
    assert error["param"] == "prompt" and "surrogate" in error["message"]
