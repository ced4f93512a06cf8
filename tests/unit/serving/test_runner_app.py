"""The runner deployment (serving/runner.py ModelRunner) built from its config with `moe_calls: in_process`,
its HTTP faces answered through the one dispatch, no Ray: the MoE source comes from the factory
(serving/runner_moe.py), /v1/generate and the OpenAI routes check the token limits alike, the decode loop's
sizes come from the config and show in /v1/info and /v1/stats."""

import asyncio
import json
import logging
import re

import pytest
import torch

from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.protocol.limits import TextLimits
from moe_cluster.serving import runner as runner_module
from moe_cluster.serving.http.auth import BearerAuth
from moe_cluster.serving.runner import ModelRunner, build_in_process_runner_app, build_runner_app
from moe_cluster.serving.runner_args import RunnerArgs
from moe_cluster.serving.runner_moe import InProcessMoE

from ...support.asgi import json_request
from ...support.hf_models import build_hf
from ...support.tokenizer import save_tokenizer

VOCAB, CONTEXT = 320, 64
LIMITS = dict(max_input_tokens=12, max_new_tokens=8, max_num_seqs=4, max_prefill_tokens=32)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner_app")
    build_hf("mixtral", vocab_size=VOCAB, max_position_embeddings=CONTEXT).save_pretrained(root / "hf")
    save_tokenizer(root / "hf", VOCAB)
    import_hf_checkpoint(root / "hf", root / "moe", log=lambda _: None)
    return root / "hf", root / "moe"


def make_runner(model_dirs, monkeypatch=None, **overrides):
    """A ModelRunner replica as Serve makes one (its async __init__ on the args), in this process."""
    hf, moe = model_dirs
    args = {"hf_model": str(hf), "moe": {"checkpoint": str(moe)}, "moe_calls": "in_process", **LIMITS, **overrides}
    runner = ModelRunner.func_or_class.__new__(ModelRunner.func_or_class)
    asyncio.run(runner.__init__(RunnerArgs.model_validate(args).model_dump(mode="json")))
    return runner


@pytest.fixture(scope="module")
def runner(model_dirs):
    patch = pytest.MonkeyPatch()
    patch.setattr(runner_module, "pick_device", lambda: torch.device("cpu"))  # Ray's GPU ids: no Ray here
    patch.setattr(runner_module, "replica_devices", lambda: {"gpu_ids": []})
    made = make_runner(model_dirs, max_kv_tokens=16)
    yield made
    made.__del__()
    patch.undo()


def http(runner, method: str, path: str, payload=None, token: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of one request through the runner's __call__, as Serve hands it over."""
    request = json_request(method, path, payload, token)
    response = asyncio.run(ModelRunner.func_or_class.__call__(runner, request))
    return response.status_code, json.loads(response.body), response.headers


def test_the_config_chooses_the_moe_source_and_the_decode_loop_sizes(runner):
    assert isinstance(runner.moe, InProcessMoE) and runner.runner.moe_call is runner.moe
    status, info, _ = http(runner, "GET", "/v1/info")
    assert status == 200 and (info["moe"], info["moe_calls"]) == ("in_process", "in_process")
    assert (info["max_num_seqs"], info["max_kv_tokens"], info["max_prefill_tokens"]) == (4, 16, 32)
    status, stats, _ = http(runner, "GET", "/v1/stats")
    assert status == 200 and stats["moe_calls"] == "in_process"
    assert (stats["decode_loop"]["max_kv_tokens"], stats["decode_loop"]["max_prefill_tokens"]) == (16, 32)
    assert http(runner, "GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert runner.openai.limits == TextLimits(12, 8, CONTEXT, 16)


def test_the_engine_options_reach_the_decode_loop_and_are_shown(model_dirs, monkeypatch):
    """Every engine option reaches the loop (max_kv_tokens None: the loop derives it from free memory, and
    what it derived is shown and checked); overlap is off unless asked."""
    from moe_cluster.serving.http import openai_routes

    seen = {}

    class Loop:
        stats = {}

        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            self.max_num_seqs, self.max_kv_tokens, self.max_prefill_tokens = 4, 1000, 2048
            self.overlap, self.prefill_slowdown = kwargs["overlap"], kwargs["prefill_slowdown"]

        def close(self, wait=True):
            pass

    monkeypatch.setattr(openai_routes, "DecodeLoop", Loop)
    monkeypatch.setattr(runner_module, "pick_device", lambda: torch.device("cpu"))
    made = make_runner(model_dirs)
    assert seen["max_kv_tokens"] is None and seen["overlap"] is False  # None: from free memory; overlap: off
    assert (made.decode_loop_sizes()["max_kv_tokens"], made.openai.limits.max_kv_tokens) == (1000, 1000)
    made = make_runner(model_dirs, max_kv_tokens=30, max_prefill_tokens=16, overlap=True, prefill_slowdown=2.0)
    assert (seen["max_kv_tokens"], seen["max_prefill_tokens"], seen["overlap"], seen["prefill_slowdown"]) == \
        (30, 16, True, 2.0)


@pytest.mark.parametrize("prompt, new, param, code, numbers", [
    (13, 1, "prompt", "context_length_exceeded", ["13", "12"]),  # over max_input_tokens
    (4, 9, "max_tokens", "invalid_value", ["9", "8"]),  # over max_new_tokens
])
def test_the_same_fault_gets_the_same_answer_on_generate_and_openai(runner, prompt, new, param, code, numbers):
    status, answer, _ = http(runner, "POST", "/v1/completions", {"model": "hf", "prompt": [5] * prompt,
                                                                 "max_tokens": new})
    error = answer["error"]
    assert (status, error["param"], error["code"], error["type"]) == (400, param, code, "invalid_request_error")
    assert all(n in error["message"] for n in numbers), error
    status, plain, _ = http(runner, "POST", "/v1/generate", {"input_ids": [[5] * prompt], "max_new_tokens": new})
    assert status == 400 and plain["error"] == error["message"].replace("max_tokens", "max_new_tokens")
    with pytest.raises(Exception, match=re.escape(plain["error"])):  # a handle caller: the same WireError
        asyncio.run(runner.generate([[5] * prompt], new))


def test_a_choice_past_the_kv_cache_is_refused_naming_both_numbers(runner):
    status, answer, _ = http(runner, "POST", "/v1/completions", {"model": "hf", "prompt": [5] * 10,
                                                                 "max_tokens": 8, "n": 2})
    error = answer["error"]
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "max_tokens")
    assert error["message"] == "the prompt's 10 tokens + max_tokens 8 = 18 exceed the KV cache (max_kv_tokens) of 16 tokens"
    # /v1/generate runs HF's generate with its own cache: the decode loop's KV cache is no limit there
    assert http(runner, "POST", "/v1/generate", {"input_ids": [[5] * 10], "max_new_tokens": 8})[0] == 200


def test_generate_and_completions_answer_within_the_limits(runner):
    status, out, _ = http(runner, "POST", "/v1/generate", {"input_ids": [[5, 6, 7]], "max_new_tokens": 3})
    assert status == 200 and len(out["output_ids"][0]) == 6
    status, answer, _ = http(runner, "POST", "/v1/completions", {"model": "hf", "prompt": [5, 6, 7],
                                                                 "max_tokens": 3, "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] <= 3


def test_every_face_of_the_runner_sits_behind_one_auth_check_and_one_log_line(runner, caplog):
    runner.auth = BearerAuth(["secret"])
    try:
        for path, method in [("/v1/generate", "POST"), ("/v1/info", "GET"), ("/v1/completions", "POST"),
                             ("/v1/models", "GET"), ("/tokenize", "POST"), ("/nothing", "GET")]:
            status, answer, headers = http(runner, method, path, {})
            assert status == 401 and headers["www-authenticate"].startswith('Bearer realm="moe-cluster"'), path
            openai_path = path in ("/v1/completions", "/v1/models", "/tokenize")
            assert (answer["error"]["code"] == "invalid_api_key") if openai_path else isinstance(answer["error"], str)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            assert http(runner, "GET", "/v1/models", token="secret")[0] == 200
            assert http(runner, "GET", "/v1/generate", token="secret")[0] == 405
            assert http(runner, "GET", "/v1/nothing", token="secret")[0] == 404
    finally:
        runner.auth = None
    lines = [r.getMessage() for r in caplog.records if r.name == "ray.serve"]
    assert [re.sub(r"\d+\.\dms$", "ms", line) for line in lines] == [
        "GET '/v1/models' 200 ms", "GET '/v1/generate' 405 ms", "GET '/v1/nothing' 404 ms"]  # repr: no forged lines


def test_build_in_process_runner_app_builds_the_one_runner_class(model_dirs):
    hf, moe = model_dirs
    app = build_in_process_runner_app({"hf_model": str(hf), "moe": {"checkpoint": str(moe)}})
    assert app._bound_deployment.func_or_class is ModelRunner.func_or_class
    assert app._bound_deployment.init_args[0]["moe_calls"] == "in_process"
    assert app._bound_deployment.init_args[1] is None  # no MoE app deployed with it
    with pytest.raises(ValueError, match="in_process needs moe"):
        build_runner_app({"hf_model": str(hf), "moe_app": "moe", "moe_calls": "in_process"})


def test_a_value_error_inside_a_moe_call_is_a_500_not_the_clients_400(model_dirs, monkeypatch):
    """E.g. a router refusing the rows the runner sent it (a WireError there): no fault of this request."""
    monkeypatch.setattr(runner_module, "pick_device", lambda: torch.device("cpu"))
    made = make_runner(model_dirs)

    class Refusing:
        def forward(self, x_TD, layer):
            raise ValueError("hidden_states must be [T, 32]")

    made.moe.model = Refusing()
    try:
        status, answer, _ = http(made, "POST", "/v1/generate", {"input_ids": [[5, 6]], "max_new_tokens": 2})
        assert status == 500 and answer["error"].startswith("InternalError: MoE layer 0: ValueError: hidden_states")
        status, answer, _ = http(made, "POST", "/v1/completions", {"model": "hf", "prompt": [5, 6], "max_tokens": 2})
        assert (status, answer["error"]["type"]) == (500, "server_error") and "hidden_states" in answer["error"]["message"]
        # a ValueError of transformers' generate itself (after the request was checked): 500 too; a bad request 400
        made.runner.model.generate = lambda **kwargs: (_ for _ in ()).throw(ValueError("cache position mismatch"))
        status, answer, _ = http(made, "POST", "/v1/generate", {"input_ids": [[5, 6]], "max_new_tokens": 2})
        assert (status, answer["error"]) == (500, "InternalError: generate: ValueError: cache position mismatch")
        assert http(made, "POST", "/v1/generate", {"input_ids": [[5, 6]], "max_new_tokens": 0})[0] == 400
    finally:
        made.__del__()
