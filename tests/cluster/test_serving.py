"""The serving cluster against the oracle: handles, HTTP, placements, fake GPUs, bad input.

One local Ray cluster (with 4 fake GPUs) for the module, two apps on it, sharing a checkpoint:
  moe:    the default placement (router + expert-0..expert-7), CPU
  packed: two deployments of four experts each, every replica on a (fake) GPU
"""

import json
import urllib.request

import msgpack
import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.client import MoEClient, MoEHTTPError
from moe_cluster.core.reference import reference_forward
from moe_cluster.serving.handle import MoEHandle

from .conftest import start_local_serve, stop_local_serve, wait_until
from moe_cluster.checkpoint import load_model, save_model

MAX_TOKENS = 4096


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("ckpt")
    model = MoEModel.random(preset_config("tiny"), seed=5)
    save_model(model, checkpoint)
    local = start_local_serve(num_gpus=4)
    common = dict(checkpoint=str(checkpoint), max_tokens_per_request=MAX_TOKENS, torch_threads=1,
                  max_body_bytes=2**21)
    serve.run(build_app(common), name="moe", route_prefix="/")
    packed = dict(common, router={"ray_actor_options": {"num_cpus": 0, "num_gpus": 1}},
                  experts={"ray_actor_options": {"num_cpus": 0, "num_gpus": 1}},
                  placement=[{"name": "experts-0-3", "experts": [0, 1, 2, 3], "options": {"num_replicas": 2}},
                             {"name": "experts-4-7", "experts": [4, 5, 6, 7]}],
                  max_tokens_per_call=16, transport="object_store")
    serve.run(build_app(packed), name="packed", route_prefix="/packed")
    # auto with a small threshold and no channel: calls of <= 4 rows (1 KiB) by value, larger ones through the
    # object store
    mixed = dict(common, by_value_max_bytes=1024, channel_max_bytes=0,
                 placement=[{"name": "mixed-0-3", "experts": [0, 1, 2, 3]}, {"name": "mixed-4-7", "experts": [4, 5, 6, 7]}])
    serve.run(build_app(mixed), name="mixed", route_prefix="/mixed")
    # direct channels (serving/channel.py): every call on a ZeroMQ socket of the replica, on loopback
    channel = dict(common, transport="channel", channel_host="127.0.0.1",
                   placement=[{"name": "chan-0-3", "experts": [0, 1, 2, 3]}, {"name": "chan-4-7", "experts": [4, 5, 6, 7]}])
    serve.run(build_app(channel), name="channel", route_prefix="/channel")
    yield {"model": load_model(checkpoint), "local": local,
           "handle": serve.get_app_handle("moe"), "packed": serve.get_app_handle("packed")}
    stop_local_serve()


def _x(tokens, seed=0, d=64):
    return torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens", [0, 1, 33, 2048])
@pytest.mark.parametrize("layer", [0, 1])
def test_handle_equals_oracle_fp32(cluster, tokens, layer):
    x = _x(tokens, seed=tokens + layer)
    y = cluster["handle"].forward.remote(x, layer).result()
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, reference_forward(cluster["model"], x, layer), rtol=1e-5, atol=1e-5)


def test_handle_bf16_and_numpy(cluster):
    x = _x(65, seed=9)
    y_bf16 = cluster["handle"].forward.remote(x.bfloat16(), 1).result()
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16, reference_forward(cluster["model"], x.bfloat16(), 1),
                               rtol=1.6e-2, atol=1e-2)
    y_np = cluster["handle"].forward.remote(x.numpy(), 0).result()
    assert isinstance(y_np, np.ndarray)
    np.testing.assert_allclose(y_np, reference_forward(cluster["model"], x, 0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wire, tokens", [("json", 1), ("json", 33), ("msgpack", 0), ("msgpack", 33),
                                          ("msgpack", 2048)])
def test_http_equals_oracle(cluster, wire, tokens):
    client = MoEClient(cluster["local"].url())
    x = _x(tokens, seed=100 + tokens)
    y, counts = client.forward(x.numpy(), layer=1, wire=wire, return_expert_counts=True)
    torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)
    assert sum(counts) == tokens * 2 and len(counts) == 8


def test_http_float16_keeps_its_dtype(cluster):
    x = _x(17, seed=3).half()
    y = MoEClient(cluster["local"].url()).forward(x.numpy(), layer=0)
    assert y.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, 0), rtol=2e-3, atol=2e-3)


def test_packed_placement_equals_per_expert_placement(cluster):
    x = _x(300, seed=4)  # chunks of <= 16 rows spread over both replicas of experts-0-3
    for layer in (0, 1):
        per_expert = cluster["handle"].forward.remote(x, layer).result()
        packed = cluster["packed"].forward.remote(x, layer).result()
        torch.testing.assert_close(packed, per_expert, rtol=1e-6, atol=1e-6)
    client = MoEClient(cluster["local"].url("/packed"))
    assert client.info()["placement"].keys() == {"experts-0-3", "experts-4-7"}
    torch.testing.assert_close(torch.from_numpy(client.forward(x.numpy(), 1)),
                               reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)


def test_fake_gpus_are_distinct_per_replica_and_compute_falls_back_to_cpu(cluster):
    from ray import serve

    handle = serve.get_deployment_handle("experts-0-3", app_name="packed")
    seen = {}

    def both_replicas_seen():
        stats = handle.stats.remote().result()
        seen[stats["pid"]] = stats
        return len(seen) == 2

    wait_until(both_replicas_seen, timeout=30, interval=0.05, what="both replicas of experts-0-3")
    other = serve.get_deployment_handle("experts-4-7", app_name="packed").stats.remote().result()
    gpu_ids = [s["gpu_ids"] for s in seen.values()] + [other["gpu_ids"]]
    assert all(len(ids) == 1 for ids in gpu_ids)
    assert len({ids[0] for ids in gpu_ids}) == 3  # three replicas, three distinct GPUs
    assert {s["device"] for s in [*seen.values(), other]} == {"cpu"}  # no CUDA on this machine
    assert MoEClient(cluster["local"].url("/packed")).info()["router_device"] == "cpu"


def test_experts_without_tokens_get_no_call(cluster):
    from ray import serve

    handles = {e: serve.get_deployment_handle(f"expert-{e}", app_name="moe") for e in range(8)}

    def calls():
        out = {}
        for e, h in handles.items():
            out[e] = sum(n for layer, _, n in h.stats.remote().result()["calls"] if layer == 0)
        return out

    x = _x(1, seed=12)  # one token: exactly top_k = 2 experts get a call
    before = calls()
    _, counts = MoEClient(cluster["local"].url()).forward(x.numpy(), layer=0, return_expert_counts=True)
    after = calls()
    chosen = {e for e, n in enumerate(counts) if n}
    assert len(chosen) == 2
    assert {e for e in range(8) if after[e] != before[e]} == chosen
    assert all(after[e] - before[e] == 1 for e in chosen)


@pytest.mark.parametrize("tokens", [1, 2, 37, 300])
def test_every_transport_equals_the_oracle(cluster, tokens):
    """moe: auto (every call of these sizes by value); packed: object store only; mixed: auto with a
    1 KiB threshold, so a 1-token request goes by value and a 300-token one through the object store; channel:
    every call on the replicas' direct channels (after the first calls, which may find them not yet known). Which
    path each call took is counted by the router (/v1/stats "transport")."""
    from ray import serve

    x = _x(tokens, seed=30 + tokens)
    for app in ("moe", "packed", "mixed", "channel"):
        router = serve.get_app_handle(app)
        before = router.stats.remote().result()["transport"]["calls"]
        for layer in (0, 1):
            y = np.array(router.forward.remote(x.numpy(), layer).result())  # writable copy
            torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, layer),
                                       rtol=1e-5, atol=1e-5)
        after = router.stats.remote().result()["transport"]["calls"]
        sent = {path: after[path] - before[path] for path in after}
        assert sum(sent.values()) >= 2, sent  # at least one call per layer
        if app == "moe":  # auto, 1 MiB: every call of these sizes by value
            assert sent["object_store"] == 0, sent
        elif app == "packed":  # forced object store
            assert sent["by_value"] == 0, sent
        elif app == "channel":  # the router follows the replicas from its start: only the very first may fall back
            assert sent["channel"] >= 2 and sent["by_value"] + sent["object_store"] <= 2, sent
        elif tokens == 1:  # mixed, 1 KiB threshold: 2 rows (512 B) a layer at most
            assert sent["object_store"] == 0, sent
        elif tokens == 300:  # 600 rows over 2 deployments: every call over 1 KiB
            assert sent["by_value"] == 0, sent


def test_one_call_per_deployment_carries_every_chosen_expert(cluster):
    """The packed app hosts experts 0-3 and 4-7 in two deployments: a few tokens (rows well under its
    16-row calls) cost one call per deployment that got rows, however many of its experts were chosen,
    and the answer equals the oracle."""
    from ray import serve

    handles = {name: serve.get_deployment_handle(name, app_name="packed") for name in ("experts-0-3", "experts-4-7")}

    def requests():  # calls received, summed over the replicas that answer stats
        return {name: _replica_requests(handle) for name, handle in handles.items()}

    x = _x(3, seed=21)  # 3 tokens, top-2: 6 rows
    _, counts = MoEClient(cluster["local"].url("/packed")).forward(x.numpy(), layer=0, return_expert_counts=True)
    chosen = {"experts-0-3": [e for e in range(4) if counts[e]], "experts-4-7": [e for e in range(4, 8) if counts[e]]}
    assert max(len(experts) for experts in chosen.values()) >= 2, "the seed must put two experts in one group"
    before = requests()
    y = MoEClient(cluster["local"].url("/packed")).forward(x.numpy(), layer=0)
    after = requests()
    torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, 0), rtol=1e-5, atol=1e-5)
    assert {name: after[name] - before[name] for name in handles} == {
        name: (1 if experts else 0) for name, experts in chosen.items()}


def _replica_requests(handle) -> int:
    """`requests` of every replica of a deployment (stats calls land on random replicas: ask until each
    pid was seen a few times)."""
    seen = {}
    for _ in range(20):
        stats = handle.stats.remote().result()
        seen[stats["pid"]] = stats["requests"]
    return sum(seen.values())


def test_healthz_and_info(cluster):
    url = cluster["local"].url()
    with urllib.request.urlopen(f"{url}/healthz") as response:
        assert response.status == 200 and json.loads(response.read())["expert_deployments"] == 8
    info = MoEClient(url).info()
    assert (info["d_model"], info["num_experts"], info["top_k"], info["num_layers"], info["dtype"]) == \
        (64, 8, 2, 2, "float32")
    assert info["placement"]["expert-3"] == [[0, 3], [1, 3]]


def _post(url, body, content_type="application/json", method="POST"):
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tensor_body(dtype="float32", shape=(2, 64), data=None, **extra):
    data = np.zeros(shape, np.float32).tobytes() if data is None else data
    return msgpack.packb({"hidden_states": {"dtype": dtype, "shape": list(shape), "data": data}, **extra})


BAD_REQUESTS = {
    "wrong D (json)": (json.dumps({"hidden_states": [[0.0] * 63]}).encode(), "application/json", 400, "[T, 64]"),
    "wrong D (msgpack)": (_tensor_body(shape=(2, 63), data=b"\0" * 504), "application/msgpack", 400, "[T, 64]"),
    "wrong dtype": (_tensor_body(dtype="int8"), "application/msgpack", 400, "dtype must be one of"),
    "float64": (_tensor_body(dtype="float64", data=b"\0" * 2 * 64 * 8, layer=0), "application/msgpack", 400,
                "float64 is not supported: send float32, bfloat16 or float16"),
    "missing layer (json)": (json.dumps({"hidden_states": [[0.0] * 64]}).encode(), "application/json", 400,
                             'layer is required: this model has MoE layers [0, 1]; send "layer": <id>'),
    "missing layer (msgpack)": (_tensor_body(), "application/msgpack", 400,
                                "layer is required: this model has MoE layers [0, 1]"),
    "strings in json": (json.dumps({"hidden_states": [["a"] * 64]}).encode(), "application/json", 400, "numbers"),
    "data length mismatch": (_tensor_body(data=b"\0" * 100), "application/msgpack", 400, "needs 512"),
    "huge declared shape": (_tensor_body(shape=(4000, 64), data=b"\0" * 8), "application/msgpack", 400, "bytes"),
    "negative dims": (_tensor_body(shape=(-1, 64), data=b""), "application/msgpack", 400, "non-negative"),
    "malformed msgpack": (b"\xc1\xff\x00", "application/msgpack", 400, "malformed msgpack"),
    "truncated msgpack": (_tensor_body()[:-10], "application/msgpack", 400, "malformed msgpack"),
    "malformed json": (b'{"hidden_states": [[1.0,', "application/json", 400, "malformed JSON"),
    "deeply nested json": (b"[" * 100000 + b"]" * 100000, "application/json", 400, "JSON"),
    "unknown layer": (json.dumps({"hidden_states": [[0.0] * 64], "layer": 7}).encode(), "application/json", 400,
                      "unknown layer 7"),
    "too many tokens": (_tensor_body(shape=(MAX_TOKENS + 1, 64), data=b"\0" * (MAX_TOKENS + 1) * 256),
                        "application/msgpack", 413, "limit of 4096"),
    "NaN": (json.dumps({"hidden_states": [[float("nan")] * 64]}).encode(), "application/json", 422, "NaN"),
    "extra field": (json.dumps({"hidden_states": [], "temperature": 1}).encode(), "application/json", 400,
                    "unknown fields"),
    "wrong content type": (b"hello", "text/plain", 415, "Content-Type"),
    "body too large": (b"x" * (2**21 + 1), "application/json", 413, "limit"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_http_input_is_a_4xx_and_the_app_keeps_serving(cluster, case):
    body, content_type, status, message = BAD_REQUESTS[case]
    got_status, got_body = _post(f"{cluster['local'].url()}/v1/forward", body, content_type)
    assert got_status == status, got_body[:300]
    assert message in json.loads(got_body)["error"]
    x = _x(5, seed=1)
    torch.testing.assert_close(torch.from_numpy(MoEClient(cluster["local"].url()).forward(x.numpy(), 0)),
                               reference_forward(cluster["model"], x, 0), rtol=1e-5, atol=1e-5)


def test_unknown_path_and_wrong_method(cluster):
    url = cluster["local"].url()
    assert _post(f"{url}/v1/nothing", b"{}")[0] == 404
    status, body = _post(f"{url}/v1/forward", None, method="GET")
    assert status == 405 and "POST" in json.loads(body)["error"]


def test_bad_handle_input_raises_value_error(cluster):
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        cluster["handle"].forward.remote(torch.zeros(2, 5), 0).result()
    with pytest.raises(ValueError, match="unknown layer 3"):
        cluster["handle"].forward.remote(torch.zeros(2, 64), 3).result()
    with pytest.raises(ValueError, match="exceed the limit"):
        cluster["handle"].forward.remote(torch.zeros(MAX_TOKENS + 1, 64), 0).result()
    with pytest.raises(MoEHTTPError, match=r"\[T, 64\]"):
        MoEClient(cluster["local"].url()).forward(np.zeros((1, 3), np.float32), layer=0)


def test_moe_handle_sends_small_requests_by_value_and_large_ones_by_reference(cluster):
    moe = MoEHandle(cluster["handle"], by_value_max_bytes=1024)  # 4 rows of 64 fp32
    for tokens, by_reference in ((1, False), (4, False), (5, True), (300, True)):
        x = _x(tokens, seed=tokens)
        for sent in (x, x.numpy()):
            response = moe.forward(sent, 1)
            assert response.by_reference is by_reference, (tokens, type(sent))
            y = response.result()
            assert isinstance(y, type(sent))  # torch in, torch out; numpy in, numpy out
            y = torch.from_numpy(np.array(y)) if isinstance(y, np.ndarray) else y  # a writable copy
            assert y.shape == x.shape and y.dtype == torch.float32
            torch.testing.assert_close(y, reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)
    view = _x(300, seed=1)[-1:]  # one row, but pickling a torch view sends its whole storage
    response = moe.forward(view, 1)
    assert response.by_reference is True
    torch.testing.assert_close(response.result(), reference_forward(cluster["model"], view, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[T, 64\]"):  # by value too: the router's own error
        moe.forward(torch.zeros(2, 5), 0).result()
    with pytest.raises(ValueError, match="unknown layer 3"):
        moe.forward(np.zeros((2, 64), np.float32), 3).result()
    assert MoEHandle(cluster["handle"], by_value_max_bytes=2**40).by_value_max_bytes <= 4 * 2**20  # gRPC's limit
    assert moe.transport.calls["by_value"] == 6 and moe.transport.calls["object_store"] == 5


@pytest.mark.parametrize("x", [torch.zeros(2, 64, dtype=torch.float64), np.zeros((2, 64))],
                         ids=["torch", "numpy"])
def test_float64_is_refused_by_the_handle_and_the_client(cluster, x):
    with pytest.raises(ValueError, match="float64 is not supported: send float32, bfloat16 or float16"):
        cluster["handle"].forward.remote(x, 0).result()
    with pytest.raises(ValueError, match="float64 is not supported"):  # before anything is sent
        MoEClient(cluster["local"].url()).forward(np.asarray(x), layer=0)


def test_layer_is_required_by_the_handle_and_the_client_of_a_two_layer_model(cluster):
    x = _x(3, seed=13)
    for handle in (cluster["handle"], cluster["packed"]):
        with pytest.raises(ValueError, match=r'layer is required: this model has MoE layers \[0, 1\]; '
                                             r'send "layer": <id>'):
            handle.forward.remote(x).result()
    for wire in ("msgpack", "json"):
        with pytest.raises(MoEHTTPError, match=r"layer is required: this model has MoE layers \[0, 1\]") as info:
            MoEClient(cluster["local"].url()).forward(x.numpy(), wire=wire)
        assert info.value.status == 400
    torch.testing.assert_close(cluster["handle"].forward.remote(x, layer=1).result(),
                               reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)
