"""Ray's direct transport between the router and the experts (`transport: nixl`), on CPU.

NIXL is the transport for GPU tensors (GPU memory to GPU memory, across nodes); on a CPU it
moves host memory through UCX, which is slower than the object store (serving/transport.py),
but it runs the same code path: the router puts each call's rows as a torch tensor
(`ray.put(t, _tensor_transport="nixl")`), the expert fetches them, answers the same way, and
the router fetches the answer. So the GPU path is exercised here on every CI run, and its
answers are held to the oracle. Needs the `nixl` extra (part of `test`); skipped without it.

One local Ray cluster, one app (tiny preset, experts packed in two deployments).
"""

import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.checkpoint import save_model
from moe_cluster.core.reference import reference_forward

from .conftest import start_local_serve, stop_local_serve

pytest.importorskip("nixl._api", reason="needs NIXL: pip install -e '.[nixl]'")

PLACEMENT = [{"name": "experts-0-3", "experts": [0, 1, 2, 3]}, {"name": "experts-4-7", "experts": [4, 5, 6, 7]}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    model = MoEModel.random(preset_config("tiny"), seed=11)
    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_model(model, checkpoint)
    start_local_serve()
    try:
        # The first NIXL transfer of each process starts its NIXL agent: seconds on a busy machine.
        serve.run(build_app({"checkpoint": str(checkpoint), "torch_threads": 1, "transport": "nixl",
                             "placement": PLACEMENT, "request_timeout_s": 120}), name="nixl", route_prefix="/nixl")
        yield {"model": model}
    finally:
        stop_local_serve()


@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_nixl_answers_equal_the_oracle_and_every_call_goes_through_nixl(cluster, tokens):
    from ray import serve

    router = serve.get_app_handle("nixl")
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    before = router.stats.remote().result()["transport"]
    for layer in (0, 1):
        y = np.array(router.forward.remote(x.numpy(), layer).result())
        torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, layer),
                                   rtol=1e-5, atol=1e-5)
    after = router.stats.remote().result()["transport"]
    assert after["mode"] == "nixl"
    sent = {path: after["calls"][path] - before["calls"][path] for path in after["calls"]}
    assert sent["nixl"] >= 2 and sent["object_store"] == 0 and sent["by_value"] == 0, sent
