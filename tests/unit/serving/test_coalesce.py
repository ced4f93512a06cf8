"""The router's request coalescing, with the in-process model standing in for the experts."""

import asyncio

import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.core.dispatch import expert_counts, make_plan
from moe_cluster.core.routing import route
from moe_cluster.serving.coalesce import Coalescer

MODEL = MoEModel.random(ModelConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, num_layers=2), seed=0)


def _plan(x, layer):
    weights, ids = route(x, MODEL.layer(layer).gate_and_shared.gate, MODEL.config)
    return make_plan(weights, ids, MODEL.config.num_experts)


class FakeCluster:
    def __init__(self, fail=False):
        self.batch_sizes = []
        self.fail = fail

    async def run(self, x, layer):
        self.batch_sizes.append(x.shape[0])
        await asyncio.sleep(0.01)  # the expert round trip
        if self.fail:
            raise RuntimeError("expert deployment 'expert-1' failed")
        return MODEL.forward(x, layer), _plan(x, layer)


def test_concurrent_requests_merge_and_get_their_own_answers():
    cluster = FakeCluster()
    inputs = [torch.randn(n, 16) for n in (3, 1, 7, 5, 2, 9)]

    async def main():
        coalescer = Coalescer(cluster.run, max_batch_tokens=100, wait_s=0.002)
        first = asyncio.ensure_future(coalescer.submit(inputs[0], 1))
        await asyncio.sleep(0.002)  # the first batch is in flight now
        rest = await asyncio.gather(*(coalescer.submit(x, 1) for x in inputs[1:]))
        return [await first, *rest], coalescer

    results, coalescer = asyncio.run(main())
    assert cluster.batch_sizes == [3, 24]  # the first starts at once, the rest ride together
    assert (coalescer.requests, coalescer.batches) == (6, 2)
    for x, (y, counts) in zip(inputs, results):
        torch.testing.assert_close(y, MODEL.forward(x, 1), rtol=1e-5, atol=1e-5)
        assert counts == expert_counts(_plan(x, 1))


def test_batches_respect_max_tokens_and_layers_stay_apart():
    cluster = FakeCluster()

    async def main():
        coalescer = Coalescer(cluster.run, max_batch_tokens=10, wait_s=0.0)
        jobs = [coalescer.submit(torch.randn(4, 16), layer) for layer in (0, 0, 0, 0, 1, 1)]
        return await asyncio.gather(*jobs)

    asyncio.run(main())
    assert sorted(cluster.batch_sizes) == [8, 8, 8]  # layer 0: 4+4 | 4+4 (max 10 tokens); layer 1: 4+4


def test_a_failed_batch_fails_every_request_in_it():
    async def main():
        coalescer = Coalescer(FakeCluster(fail=True).run, max_batch_tokens=100)
        return await asyncio.gather(*(coalescer.submit(torch.randn(2, 16), 0) for _ in range(3)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "expert-1" in str(r) for r in results)


def test_dtype_of_each_request_is_kept():
    async def main():
        coalescer = Coalescer(FakeCluster().run, max_batch_tokens=100)
        return await asyncio.gather(coalescer.submit(torch.randn(2, 16), 0),
                                    coalescer.submit(torch.randn(3, 16).bfloat16(), 0))

    (y32, _), (y16, _) = asyncio.run(main())
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16


@pytest.mark.parametrize("start, stop", [(0, 5), (2, 4), (4, 5), (3, 3)])
def test_expert_counts_of_a_token_range(start, stop):
    x = torch.randn(5, 16)
    assert expert_counts(_plan(x, 0), start, stop) == expert_counts(_plan(x[start:stop], 0))


def test_timed_out_requests_leave_and_cancel_their_batch():
    """A batch whose requests all timed out stops holding the layer; later requests run at once."""
    calls = []

    async def slow_run(x, layer):
        calls.append(x.shape[0])
        try:
            await asyncio.sleep(10)  # an expert round trip that will not finish in time
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise
        return MODEL.forward(x, layer), _plan(x, layer)

    async def main():
        coalescer = Coalescer(slow_run, max_batch_tokens=100)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(coalescer.submit(torch.randn(3, 16), 0), 0.05)
        await asyncio.sleep(0.01)
        coalescer.run = FakeCluster().run
        x = torch.randn(2, 16)
        y, _ = await asyncio.wait_for(coalescer.submit(x, 0), 1.0)  # not stuck behind the dead batch
        return x, y

    x, y = asyncio.run(main())
    assert calls == [3, "cancelled"]
    torch.testing.assert_close(y, MODEL.forward(x, 0))
