"""A bfloat16 model served end to end: the handle, HTTP msgpack (MoEClient) and OIP v2 binary (tritonclient).

One local Ray cluster for the module, one app serving a bf16 checkpoint written by the project's
own writer (`checkpoint.save_model`; `import-hf --dtype keep` writes through the same CheckpointWriter): SwiGLU experts
packed into two deployments, a gated shared expert, MoE layers named 1 and 3, expert calls cut into
chunks of at most 16 rows. Every answer, for several T and every layer, must be

- bit for bit the bf16 in-process path (`MoEModel.forward` on the same checkpoint). The cluster
  runs the same operations on the same bf16 values (gate in fp32, the combine in the plan's
  order), only in other processes. That needs each expert row's result not to depend on how many
  rows share a call or on the thread count: `test_the_bf16_in_process_path_is_deterministic`
  checks exactly that (it holds for torch's CPU bf16 matmul on the machines CI uses);
- close to the fp32 oracle (`reference_forward` of the same weights upcast to fp32, on the same
  inputs upcast, so the gate makes the same choices). bf16 keeps 8 significant bits (eps = 2**-7
  = 7.8e-3) and each output goes through about five roundings (an expert's hidden state and
  output, weight * output, the sum over experts, the shared expert): per element rtol 2e-2
  (2.5 eps), and atol 2e-2 of the answer's largest magnitude, as terms of the sum can cancel;
  for the whole answer a relative Frobenius error below 1e-2 (measured: 4e-3 to 6e-3).
"""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.checkpoint import load_model, save_model
from moe_cluster.client import MoEClient
from moe_cluster.core.forward import LocalExperts, moe_forward, run_sync
from moe_cluster.core.layers import GateAndShared, MoELayer
from moe_cluster.core.reference import reference_forward
from moe_cluster.core.routing import GateWeights

from .conftest import start_local_serve, stop_local_serve, triton_client

MODEL = "bf16-moe"
LAYERS = (1, 3)
TOKENS = (1, 7, 64, 513)
CONFIG = ModelConfig(d_model=64, d_ff=96, num_experts=8, top_k=2, num_layers=2, layer_ids=LAYERS,
                     expert_kind="swiglu", normalize_top_k=True, num_shared_experts=1, shared_d_ff=64,
                     shared_expert_gate=True, dtype="bfloat16")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("bf16")
    save_model(MoEModel.random(CONFIG, seed=11), checkpoint)
    model = load_model(checkpoint)
    assert model.layers[0].experts[0].w1.dtype == torch.bfloat16  # what the servers load: bf16 weights
    local = start_local_serve()
    try:
        args = {"checkpoint": str(checkpoint), "torch_threads": 1, "oip_model_name": MODEL, "max_tokens_per_call": 16,
                "router": {"ray_actor_options": {"num_cpus": 0}}, "experts": {"ray_actor_options": {"num_cpus": 0}},
                "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3]},
                              {"name": "experts-4-7", "experts": [4, 5, 6, 7]}]}
        serve.run(build_app(args), name="bf16", route_prefix="/")
        yield {"model": model, "oracle": _upcast(model), "handle": serve.get_app_handle("bf16"),
               "url": local.url(), "port": local.port}
    finally:
        stop_local_serve()


@pytest.fixture(scope="module")
def triton(cluster):
    client = triton_client(cluster["port"])
    yield client
    client.close()


def _upcast(model: MoEModel) -> MoEModel:
    """The same weights in float32 (exact: every bf16 value is a float32)."""
    layers = []
    for layer in model.layers:
        gate = layer.gate_and_shared.gate
        gate32 = GateWeights(*(None if t is None else t.float() for t in (gate.weight_ED, gate.bias_E,
                                                                          gate.selection_bias_E)))
        shared = None if layer.gate_and_shared.shared is None else copy.deepcopy(layer.gate_and_shared.shared).float()
        layers.append(MoELayer(GateAndShared(gate32, shared), [copy.deepcopy(e).float() for e in layer.experts]))
    return MoEModel(model.config.replace(dtype="float32"), layers)


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, CONFIG.d_model, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _bf16_numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().astype(ml_dtypes.bfloat16)  # exact both ways


def _from_bf16_numpy(y: np.ndarray) -> torch.Tensor:
    assert y.dtype == ml_dtypes.bfloat16, y.dtype
    return torch.from_numpy(y.astype(np.float32)).bfloat16()


def _assert_near_fp32(y_TD: torch.Tensor, oracle_TD: torch.Tensor) -> None:
    """Within bf16's precision of the fp32 oracle (see the module docstring for the numbers)."""
    y = y_TD.float()
    torch.testing.assert_close(y, oracle_TD, rtol=2e-2, atol=2e-2 * float(oracle_TD.abs().max()))
    assert float((y - oracle_TD).norm()) <= 1e-2 * float(oracle_TD.norm())


def _triton_infer(client, x: torch.Tensor, layer: int) -> np.ndarray:
    import tritonclient.http as httpclient

    inputs = [httpclient.InferInput("hidden_states", list(x.shape), "BF16"),
              httpclient.InferInput("layer", [1], "INT64")]
    inputs[0].set_data_from_numpy(_bf16_numpy(x), binary_data=True)  # tritonclient sends BF16 only as binary
    inputs[1].set_data_from_numpy(np.array([layer], np.int64), binary_data=True)
    result = client.infer(MODEL, inputs, outputs=[httpclient.InferRequestedOutput("output", binary_data=True)])
    assert result.get_output("output")["datatype"] == "BF16"
    return result.as_numpy("output")


def test_the_bf16_in_process_path_is_deterministic():
    """The basis of the bit-for-bit comparisons below: each expert row's bf16 result depends neither on
    the other rows of its call (chunks of 1, 5, 16 rows or all) nor on the thread count, nor on the run."""
    model = MoEModel.random(CONFIG, seed=11)
    threads = torch.get_num_threads()
    try:
        for tokens in TOKENS:
            x = _x(tokens, seed=tokens)
            for layer in LAYERS:
                expected = model.forward(x, layer)
                assert torch.equal(model.forward(x, layer), expected)
                for max_rows in (1, 5, 16):
                    for n in (1, 2):
                        torch.set_num_threads(n)
                        assert torch.equal(_chunked_forward(model, x, layer, max_rows), expected), (tokens, layer,
                                                                                                    max_rows, n)
    finally:
        torch.set_num_threads(threads)


def _chunked_forward(model: MoEModel, x_TD: torch.Tensor, layer: int, max_rows: int) -> torch.Tensor:
    """MoEModel.forward with the router's chunking: the one forward loop, one expert call per chunk
    of at most max_rows rows."""
    parts = model.layer(layer).gate_and_shared
    experts = LocalExperts(model.experts.modules, max_rows_per_call=max_rows)
    y_TD, _ = run_sync(moe_forward(x_TD, layer, parts, model.config, experts))
    return y_TD.to(x_TD.dtype)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_every_path_equals_the_bf16_in_process_path_and_is_near_the_fp32_oracle(cluster, triton, tokens, layer):
    x = _x(tokens, seed=100 * tokens + layer)
    expected = cluster["model"].forward(x, layer)
    oracle = reference_forward(cluster["oracle"], x.float(), layer)
    _assert_near_fp32(expected, oracle)
    answers = {
        "handle": cluster["handle"].forward.remote(x, layer).result(),
        "http msgpack": _from_bf16_numpy(MoEClient(cluster["url"]).forward(_bf16_numpy(x), layer=layer)),
        "oip binary": _from_bf16_numpy(_triton_infer(triton, x, layer)),
    }
    for path, y in answers.items():
        assert y.dtype == torch.bfloat16 and y.shape == x.shape, path
        torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=lambda m, p=path: f"{p}: {m}")
        _assert_near_fp32(y, oracle)


def test_the_app_serves_the_checkpoint_in_bf16(cluster):
    info = MoEClient(cluster["url"]).info()
    assert (info["dtype"], info["layers"], info["expert_kind"]) == ("bfloat16", list(LAYERS), "swiglu")
