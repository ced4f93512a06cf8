"""Imported Hugging Face checkpoints on a real local Ray cluster, held to transformers' own code.

One local Ray cluster for the module, five apps:
  hf-mixtral          MoE app of a tiny Mixtral import (4 experts packed in one deployment)
  hf-deepseek         MoE app of a tiny DeepSeek-V3 import (dense layer 0; 8 experts in one deployment)
  hf-mixtral-runner   ModelRunner calling the running app hf-mixtral by name (`moe_app`); it routes
                      each MoE layer itself and calls the expert deployment directly (`moe_calls: direct`)
  hf-mixtral-runner-via-router   the same, with every MoE layer a call to hf-mixtral's router; its replica
                      asks for a GPU (the cluster has one fake GPU): it is scheduled on it and, CUDA
                      being absent, computes on the CPU
  hf-deepseek-runner  ModelRunner with its own MoE app bound in (`moe`): one serve.run, three deployments

Every MoE block through the cluster (handle and HTTP) equals HF's block (fp32, 1e-5), and
greedy generation through the runner equals `model.generate(..., do_sample=False)` token for token.
The DeepSeek import has one MoE layer (decoder layer 1): a request without `layer` means it,
while the Mixtral import (layers 0 and 1) answers 400. The last test scales hf-mixtral's expert
deployment to zero replicas, checks the runner's /healthz says so, and restores it.
"""

import json
import re
import urllib.request

import pytest
import torch

from moe_cluster.checkpoint import load_config
from moe_cluster.client import MoEClient
from moe_cluster.hf.importer import import_hf_checkpoint

from ..support.hf_models import build_hf, moe_blocks
from .conftest import start_local_serve, stop_local_serve, wait_until

# DeepSeek's attention (MLA) needs as many key/value heads as query heads.
FAMILIES = {"mixtral": {}, "deepseek_v3": {"num_key_value_heads": 4}}
APP = {"mixtral": "hf-mixtral", "deepseek_v3": "hf-deepseek"}
PROMPTS = [[1, 5, 9, 17, 33], [2, 127, 64, 8, 3]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app
    from moe_cluster.serving.runner import build_runner_app

    root = tmp_path_factory.mktemp("hf")
    models, moe_args = {}, {}
    for family, overrides in FAMILIES.items():
        models[family] = build_hf(family, **overrides)
        models[family].save_pretrained(root / family)
        import_hf_checkpoint(root / family, root / f"{family}-moe", log=lambda _: None)
        experts = list(range(load_config(root / f"{family}-moe").num_experts))
        moe_args[family] = dict(checkpoint=str(root / f"{family}-moe"), torch_threads=1, max_tokens_per_request=256,
                                placement=[{"name": "experts", "experts": experts}])
    local = start_local_serve(num_gpus=1)  # fake: no CUDA here
    for family, app in APP.items():
        serve.run(build_app(moe_args[family]), name=app, route_prefix=f"/{app}")
    limits = dict(torch_threads=1, max_input_tokens=64, max_new_tokens=32)
    serve.run(build_runner_app(dict(limits, hf_model=str(root / "mixtral"), moe_app="hf-mixtral")),
              name="hf-mixtral-runner", route_prefix="/hf-mixtral-runner")
    serve.run(build_runner_app(dict(limits, hf_model=str(root / "mixtral"), moe_app="hf-mixtral",
                                    moe_calls="router", runner={"ray_actor_options": {"num_gpus": 1}})),
              name="hf-mixtral-runner-via-router", route_prefix="/hf-mixtral-runner-via-router")
    serve.run(build_runner_app(dict(limits, hf_model=str(root / "deepseek_v3"), moe=moe_args["deepseek_v3"])),
              name="hf-deepseek-runner", route_prefix="/hf-deepseek-runner")
    yield {"models": models, "local": local, "moe_args": moe_args}
    stop_local_serve()


def _runner(family: str) -> str:
    return f"{APP[family]}-runner"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_moe_block_through_the_handle_equals_hf(cluster, family):
    from ray import serve

    handle = serve.get_app_handle(APP[family])
    blocks = moe_blocks(cluster["models"][family])
    assert serve.get_app_handle(APP[family]).info.remote().result()["layers"] == list(blocks)
    x_TD = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for layer, block in blocks.items():
            expected = block(x_TD[None])[0]
            torch.testing.assert_close(handle.forward.remote(x_TD, layer).result(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wire", ["json", "msgpack"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_moe_block_over_http_equals_hf(cluster, family, wire):
    client = MoEClient(cluster["local"].url(f"/{APP[family]}"))
    x_TD = torch.randn(9, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for layer, block in moe_blocks(cluster["models"][family]).items():
            y = client.forward(x_TD.numpy(), layer=layer, wire=wire)
            torch.testing.assert_close(torch.from_numpy(y), block(x_TD[None])[0], rtol=1e-5, atol=1e-5)


def _post(url: str, payload: object, content_type: str = "application/json") -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_dense_decoder_layer_is_http_400_unknown_layer(cluster):
    status, body = _post(cluster["local"].url("/hf-deepseek/v1/forward"), {"hidden_states": [[0.1] * 32], "layer": 0})
    assert status == 400 and "unknown layer 0: this model has MoE layers [1]" in body["error"]


def test_without_layer_the_only_moe_layer_answers_on_every_path(cluster):
    """DeepSeek's import has one MoE layer, decoder layer 1: leaving `layer` out means it."""
    from ray import serve

    (block,) = moe_blocks(cluster["models"]["deepseek_v3"]).values()
    x_TD = torch.randn(5, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = block(x_TD[None])[0]
    answers = {"handle": serve.get_app_handle("hf-deepseek").forward.remote(x_TD).result()}
    client = MoEClient(cluster["local"].url("/hf-deepseek"))
    for wire in ("msgpack", "json"):
        answers[wire] = torch.from_numpy(client.forward(x_TD.numpy(), wire=wire))
    status, body = _post(cluster["local"].url("/hf-deepseek/v2/models/moe/infer"),
                         {"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [5, 32],
                                      "data": x_TD.flatten().tolist()}]})
    assert status == 200, body
    answers["oip"] = torch.tensor(body["outputs"][0]["data"]).reshape(5, 32)
    for path, y in answers.items():
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


def test_without_layer_a_two_layer_model_is_400_listing_its_layers(cluster):
    from ray import serve

    x_TD = torch.randn(2, 32)
    message = 'layer is required: this model has MoE layers [0, 1]; send "layer": <id>'
    with pytest.raises(ValueError, match=re.escape(message)):
        serve.get_app_handle("hf-mixtral").forward.remote(x_TD).result()
    status, body = _post(cluster["local"].url("/hf-mixtral/v1/forward"), {"hidden_states": x_TD.tolist()})
    assert status == 400 and message in body["error"]
    status, body = _post(cluster["local"].url("/hf-mixtral/v2/models/moe/infer"),
                         {"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [2, 32],
                                      "data": x_TD.flatten().tolist()}]})
    assert status == 400 and message in body["error"]


def _hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False).tolist()


RUNNERS = {"mixtral": ("hf-mixtral-runner", "hf-mixtral", "direct"),
           "mixtral-via-router": ("hf-mixtral-runner-via-router", "hf-mixtral", "router"),
           "deepseek_v3": ("hf-deepseek-runner", "hf-deepseek-runner", "direct")}  # family: (runner, MoE app, calls)


@pytest.mark.parametrize("via", ["handle", "http"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_generate_through_the_cluster_equals_hf_generate(cluster, runner, via):
    """Greedy tokens equal HF's; MoE calls go where `moe_calls` says: with `direct` the router serves
    none of them (its batch counter stays), with `router` it serves every one."""
    from ray import serve

    app, moe_app, calls = RUNNERS[runner]
    family = runner.removesuffix("-via-router")
    router = serve.get_deployment_handle("router", app_name=moe_app)
    batches = lambda: router.stats.remote().result().get("router_phases", {}).get("batches", 0)  # noqa: E731
    before = batches()
    if via == "handle":
        result = serve.get_app_handle(app).generate.remote(PROMPTS, 6).result()
    else:
        status, result = _post(cluster["local"].url(f"/{app}/v1/generate"), {"input_ids": PROMPTS, "max_new_tokens": 6})
        assert status == 200, result
    assert result["output_ids"] == _hf_generate(cluster["models"][family], PROMPTS, 6)
    timings = result["timings"]
    moe_layers = len(moe_blocks(cluster["models"][family]))
    assert timings["new_tokens"] == 6 and timings["moe_calls_per_token"] == moe_layers
    assert all(t["moe_calls"] == moe_layers and t["moe_ms"] > 0 for t in timings["per_token"])
    assert batches() - before == (6 * moe_layers if calls == "router" else 0)


def test_a_runner_on_a_fake_gpu_is_scheduled_there_and_computes_on_the_cpu(cluster):
    """Ray gave the replica the GPU (its gpu_ids), torch has no CUDA: pick_device keeps it on the CPU, in the
    checkpoint's dtype (auto on the CPU); its answers are checked with the others' above."""
    status, info = _get(cluster["local"].url("/hf-mixtral-runner-via-router/v1/info"))
    assert status == 200, info
    assert (info["gpu_ids"], info["device"], info["dtype"]) == (["0"], "cpu", "float32")
    status, info = _get(cluster["local"].url("/hf-mixtral-runner/v1/info"))
    assert (info["gpu_ids"], info["device"]) == ([], "cpu")


def test_concurrent_generate_calls(cluster):
    """Several requests at once: each runs in its own worker thread of the runner replica."""
    from ray import serve

    handle = serve.get_app_handle(_runner("deepseek_v3"))
    prompts = [[[i, 2 * i, 3 * i]] for i in range(1, 6)]
    responses = [handle.generate.remote(prompt, 5) for prompt in prompts]
    for prompt, response in zip(prompts, responses):
        assert response.result()["output_ids"] == _hf_generate(cluster["models"]["deepseek_v3"], prompt, 5)


BAD_GENERATE = {
    "non-integer ids": ({"input_ids": [[1, 2.5]]}, 400, "integers"),
    "bool ids": ({"input_ids": [[True, 2]]}, 400, "integers"),
    "flat list": ({"input_ids": [1, 2, 3]}, 400, "[[1, 2, 3]]"),
    "id >= vocab": ({"input_ids": [[1, 128]]}, 400, "outside the model's vocabulary [0, 128)"),
    "negative id": ({"input_ids": [[-1]]}, 400, "outside the model's vocabulary"),
    "ragged batch": ({"input_ids": [[1, 2], [3]]}, 400, "same length"),
    # 400 as the OpenAI routes answer the same faults (protocol/limits.py TextLimits), not 413
    "too many tokens": ({"input_ids": [[1] * 65]}, 400, "over this server's limit of 64 (max_input_tokens)"),
    "too many new tokens": ({"input_ids": [[1]], "max_new_tokens": 33}, 400, "over this server's limit of 32"),
    "zero new tokens": ({"input_ids": [[1]], "max_new_tokens": 0}, 400, "positive integer"),
    "sampling asked": ({"input_ids": [[1]], "temperature": 0.7}, 400, "unknown fields"),
    "malformed json": (b'{"input_ids": [[1,', 400, "malformed JSON"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_bad_generate_requests_are_4xx(cluster, case):
    payload, status, message = BAD_GENERATE[case]
    got_status, body = _post(cluster["local"].url("/hf-mixtral-runner/v1/generate"), payload)
    assert got_status == status and message in body["error"], body


def test_runner_errors_paths_info_and_health(cluster):
    from ray import serve

    url = cluster["local"].url("/hf-mixtral-runner")
    assert _post(f"{url}/v1/generate", b"x", "text/plain")[0] == 415
    assert _post(f"{url}/v1/nothing", {})[0] == 404
    assert _post(f"{url}/v1/info", {})[0] == 405
    with urllib.request.urlopen(f"{url}/healthz") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{url}/v1/info") as response:
        info = json.loads(response.read())
    assert info["moe_layers"] == [0, 1] and info["moe"] == "hf-mixtral"
    hf_params = sum(p.numel() for p in cluster["models"]["mixtral"].parameters())
    experts = sum(p.numel() for b in moe_blocks(cluster["models"]["mixtral"]).values() for p in b.parameters())
    assert info["dense_parameters"] == hf_params - experts  # the runner holds no gate, no expert
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        serve.get_app_handle("hf-mixtral-runner").generate.remote([[500]], 2).result()
    assert serve.get_app_handle("hf-mixtral-runner").generate.remote([[1, 2]], 2).result()["output_ids"] == \
        _hf_generate(cluster["models"]["mixtral"], [[1, 2]], 2)


def test_runner_args_are_checked_before_anything_is_deployed(tmp_path):
    from moe_cluster.serving.runner import build_runner_app

    build_hf("mixtral").save_pretrained(tmp_path / "mixtral")
    build_hf("qwen3_moe").save_pretrained(tmp_path / "qwen3")
    import_hf_checkpoint(tmp_path / "qwen3", tmp_path / "qwen3-moe", log=lambda _: None)
    with pytest.raises(ValueError, match="exactly one of"):
        build_runner_app({"hf_model": str(tmp_path / "mixtral")})
    with pytest.raises(ValueError, match="moe.checkpoint is required"):
        build_runner_app({"hf_model": str(tmp_path / "mixtral"), "moe": {"preset": "tiny"}})
    with pytest.raises(ValueError, match="does not match"):
        build_runner_app({"hf_model": str(tmp_path / "mixtral"), "moe": {"checkpoint": str(tmp_path / "qwen3-moe")}})


def test_a_runner_routing_itself_follows_a_redeployed_moe_app(cluster, tmp_path):
    """hf-mixtral redeployed with other MoE weights (a Mixtral drawn from another seed): the runner
    that routes for itself (hf-mixtral-runner, `moe_calls: direct`) must not combine the new experts'
    answers with the old gates. The experts refuse rows routed for the old app version, the runner
    reloads the gates and placement, and its tokens equal HF's generate of the old dense layers with
    the new MoE blocks. Restored afterwards."""
    import copy

    from ray import serve

    from moe_cluster.serving.app import build_app

    other = build_hf("mixtral", seed=1)
    other.save_pretrained(tmp_path / "mixtral-1")
    import_hf_checkpoint(tmp_path / "mixtral-1", tmp_path / "mixtral-1-moe", log=lambda _: None)
    hybrid = copy.deepcopy(cluster["models"]["mixtral"])  # the runner's dense layers, the new MoE blocks
    for i, block in moe_blocks(other).items():
        hybrid.model.layers[i].mlp.load_state_dict(block.state_dict())
    expected = _hf_generate(hybrid, PROMPTS, 6)
    assert expected != _hf_generate(cluster["models"]["mixtral"], PROMPTS, 6)  # the swap shows in the tokens
    args = cluster["moe_args"]["mixtral"]
    serve.run(build_app(dict(args, checkpoint=str(tmp_path / "mixtral-1-moe"))), name="hf-mixtral",
              route_prefix="/hf-mixtral")
    try:
        for app in ("hf-mixtral-runner", "hf-mixtral-runner-via-router"):
            assert serve.get_app_handle(app).generate.remote(PROMPTS, 6).result()["output_ids"] == expected, app
    finally:
        serve.run(build_app(args), name="hf-mixtral", route_prefix="/hf-mixtral")
    assert serve.get_app_handle("hf-mixtral-runner").generate.remote(PROMPTS, 6).result()["output_ids"] == \
        _hf_generate(cluster["models"]["mixtral"], PROMPTS, 6)


def _running_replicas(app: str) -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()}


def test_runner_healthz_is_503_naming_an_expert_deployment_that_does_not_answer(cluster):
    """hf-mixtral's router up and its one expert deployment without a running replica: the runner
    cannot generate, so its /healthz must not say ok. Restored afterwards (any test order works).

    How: redeploy hf-mixtral with the expert deployment asking for a resource no node has. Serve
    stops the old replica and the new one never starts, while the router (no such request) runs.
    (Serve refuses num_replicas=0, and a replica killed or scaled to zero comes back by itself.)
    """
    from ray import serve

    from moe_cluster.serving.app import build_app

    url = cluster["local"].url("/hf-mixtral-runner/healthz")
    assert _get(url) == (200, {"status": "ok"})
    args = cluster["moe_args"]["mixtral"]
    unschedulable = {"ray_actor_options": {"num_cpus": 0, "resources": {"no-such-node": 1}}}
    no_experts = dict(args, placement=[dict(args["placement"][0], options=unschedulable)])
    serve.run_many([serve.RunTarget(build_app(no_experts), name="hf-mixtral", route_prefix="/hf-mixtral")],
                   wait_for_applications_running=False)  # it never runs: the experts cannot start
    try:
        wait_until(lambda: _running_replicas("hf-mixtral") == {"router": 1, "experts": 0}, timeout=60,
                   what="hf-mixtral with its router running and no expert replica")
        assert serve.get_app_handle("hf-mixtral").info.remote().result()["layers"] == [0, 1]  # the router answers
        status, body = _get(url)
        assert status == 503, body
        assert "the MoE app's expert deployments ['experts'] do not answer a ping" in body["error"]
    finally:
        serve.run(build_app(args), name="hf-mixtral", route_prefix="/hf-mixtral")
    assert _get(url) == (200, {"status": "ok"})
