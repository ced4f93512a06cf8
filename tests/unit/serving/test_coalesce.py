"""The router's request coalescing, with the in-process model standing in for the experts."""

import asyncio
import itertools

import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.core.dispatch import expert_counts, make_plan
from moe_cluster.core.reference import reference_forward
from moe_cluster.core.routing import route
from moe_cluster.serving.coalesce import Coalescer, MergedBatchError

SMALL = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, num_layers=2)
MODEL = MoEModel.random(ModelConfig(**SMALL), seed=0)
MODELS = {"float32": MODEL, "bfloat16": MoEModel.random(ModelConfig(**SMALL, dtype="bfloat16"), seed=0)}
F32 = MODEL.config.torch_dtype


def _plan(x, layer, model=MODEL):
    weights, ids = route(x.to(model.config.torch_dtype), model.layer(layer).gate_and_shared.gate, model.config)
    return make_plan(weights, ids, model.config.num_experts)


class FakeCluster:
    """The router's distributed forward, computed in process by `model`."""

    def __init__(self, fail=False, model=MODEL):
        self.batch_sizes = []
        self.batch_dtypes = []
        self.run_started_s = []  # loop time each batch reached the "cluster"
        self.fail = fail
        self.model = model

    async def run(self, x, layer):
        self.batch_sizes.append(x.shape[0])
        self.batch_dtypes.append(x.dtype)
        self.run_started_s.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.01)  # the expert round trip
        if self.fail:
            raise RuntimeError("expert deployment 'expert-1' failed")
        return self.model.forward(x, layer), _plan(x, layer, self.model)


def test_concurrent_requests_merge_and_get_their_own_answers():
    cluster = FakeCluster()
    inputs = [torch.randn(n, 16) for n in (3, 1, 7, 5, 2, 9)]

    async def main():
        coalescer = Coalescer(cluster.run, F32, max_batch_tokens=100, wait_s=0.002)
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
    """Every batch run gets rows of its own layer only, and every request its own layer's answer."""
    cluster = FakeCluster()
    batches = []  # (layer the batch ran for, layers its rows came from)
    layers = (0, 0, 0, 0, 1, 1)
    # Column 0 tags each row with its request's layer (100 or 200): a row in the wrong batch shows.
    inputs = [torch.cat([torch.full((4, 1), 100.0 * (layer + 1)), torch.randn(4, 15)], dim=1) for layer in layers]

    async def run(x, layer):
        batches.append((layer, set((x[:, 0] / 100 - 1).long().tolist())))
        return await cluster.run(x, layer)

    async def main():
        coalescer = Coalescer(run, F32, max_batch_tokens=10, wait_s=0.0)
        return await asyncio.gather(*(coalescer.submit(x, layer) for x, layer in zip(inputs, layers)))

    results = asyncio.run(main())
    assert sorted(cluster.batch_sizes) == [8, 8, 8]  # layer 0: 4+4 | 4+4 (max 10 tokens); layer 1: 4+4
    assert sorted(batches) == [(0, {0}), (0, {0}), (1, {1})]
    for x, layer, (y, _) in zip(inputs, layers, results):
        torch.testing.assert_close(y, MODEL.forward(x, layer), rtol=1e-5, atol=1e-5)


async def _lone_request_wait_s(coalescer, cluster):
    """Seconds a lone request waits in `coalescer` before its batch starts to run in `cluster`."""
    started = asyncio.get_running_loop().time()
    await coalescer.submit(torch.randn(2, 16), 0)
    return cluster.run_started_s[-1] - started


def test_a_lone_request_after_a_burst_does_not_wait_for_stragglers():
    """After 8 concurrent requests the coalescer expects 8 again; a lone request must not sit out
    wait_s (0.2 s) for stragglers that never come, but start as on a fresh router (at once)."""
    async def main():
        fresh = FakeCluster()
        fresh_s = await _lone_request_wait_s(Coalescer(fresh.run, F32, max_batch_tokens=100, wait_s=0.2), fresh)
        cluster = FakeCluster()
        coalescer = Coalescer(cluster.run, F32, max_batch_tokens=100, wait_s=0.2)
        await asyncio.gather(*(coalescer.submit(torch.randn(2, 16), 0) for _ in range(8)))
        assert list(coalescer.recent_sizes) == [8]  # one merged batch: the coalescer expects 8 again
        return fresh_s, await _lone_request_wait_s(coalescer, cluster)

    fresh_s, after_burst_s = asyncio.run(main())
    # Before the fix it waited the whole 0.2 s; now ~1 ms (the pace the burst's requests came at).
    assert after_burst_s < 0.1, f"waited {after_burst_s:.3f} s after a burst vs {fresh_s:.3f} s fresh"


def test_clients_in_a_closed_loop_still_travel_together():
    """4 clients each send their next request when their answer comes, 2 ms apart: after the first
    round their requests ride in one batch every round, although the layer is idle in between
    (a coalescer that forgot them at idle would split them into 1 + 3 every round: ~20 batches)."""
    cluster = FakeCluster()

    async def client(coalescer, i):
        for _ in range(10):
            await asyncio.sleep(0.002 * i)  # the client's own turnaround
            await coalescer.submit(torch.randn(2, 16), 0)

    async def main():
        coalescer = Coalescer(cluster.run, F32, max_batch_tokens=100, wait_s=0.2)
        await asyncio.gather(*(client(coalescer, i) for i in range(4)))
        return list(coalescer.recent_sizes)

    sizes = asyncio.run(main())
    # Ideally [1, 4 x 9, 3]: the first client starts alone, the others ride with its second request, it
    # finishes first. A busy machine may split a round now and then (a client later than the pace).
    assert sizes[:2] == [1, 4] and len(sizes) <= 13, sizes


def test_a_failed_batch_fails_every_request_in_it():
    async def main():
        coalescer = Coalescer(FakeCluster(fail=True).run, F32, max_batch_tokens=100)
        return await asyncio.gather(*(coalescer.submit(torch.randn(2, 16), 0) for _ in range(3)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "expert-1" in str(r) for r in results)


# Tolerances of an answer against the oracle, by the coarser of the model's and the request's dtype.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
REQUEST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _request(dtype, seed):
    """x_TD for one request; the fp32 one carries values above fp16's maximum (65504)."""
    x = torch.randn(3 + seed, 16, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.float32:
        x[0] *= 1e5
        assert x.abs().max() > 65504
    return x.to(dtype)


def _coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _assert_close_by_row(y_TD, expected_TD, rtol, atol):
    """assert_close with atol scaled by each row's largest expected value (at least 1): rounding
    errors scale with the terms summed, and a row of inputs ~1e5 has outputs ~1e10 that partly
    cancel, so a merged batch (other matmul blocking) may differ from the lone oracle there."""
    scale_T1 = expected_TD.double().abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    torch.testing.assert_close(y_TD.double() / scale_T1, expected_TD.double() / scale_T1, rtol=rtol, atol=atol)


@pytest.mark.parametrize("model_dtype", sorted(MODELS))
@pytest.mark.parametrize("order", list(itertools.permutations(REQUEST_DTYPES)),
                         ids=lambda order: "-".join(str(d).removeprefix("torch.") for d in order))
def test_merged_requests_keep_their_own_precision(model_dtype, order):
    """One batch of fp16, bf16 and fp32 requests, computed in the model dtype: every answer equals
    the oracle on that request alone, in the request's dtype (never the first request's dtype)."""
    model = MODELS[model_dtype]
    cluster = FakeCluster(model=model)
    blocker = _request(torch.float32, seed=0)
    inputs = [_request(dtype, seed=1 + i) for i, dtype in enumerate(order)]

    async def main():
        coalescer = Coalescer(cluster.run, model.config.torch_dtype, max_batch_tokens=100, wait_s=0.002)
        first = asyncio.ensure_future(coalescer.submit(blocker, 0))
        await asyncio.sleep(0.002)  # the blocker's batch is in flight: the three queue up behind it
        merged = await asyncio.gather(*(coalescer.submit(x, 0) for x in inputs))
        return [await first, *merged], coalescer

    results, coalescer = asyncio.run(main())
    assert list(coalescer.recent_sizes) == [1, 3]  # the three requests really rode in one batch
    assert cluster.batch_sizes == [blocker.shape[0], sum(x.shape[0] for x in inputs)]
    assert cluster.batch_dtypes == [model.config.torch_dtype] * 2  # computed in the model dtype
    for x, (y, counts) in zip([blocker, *inputs], results):
        expected = reference_forward(model, x.to(model.config.torch_dtype), 0).to(x.dtype)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.isfinite(y).all()
        _assert_close_by_row(y, expected, **TOLERANCE[_coarser(x.dtype, model.config.torch_dtype)])
        assert counts == expert_counts(_plan(x, 0, model))


def test_a_lone_request_is_computed_in_the_model_dtype():
    cluster = FakeCluster()
    x = _request(torch.bfloat16, seed=4)

    async def main():
        return await Coalescer(cluster.run, F32, max_batch_tokens=100).submit(x, 1)

    y, _ = asyncio.run(main())
    assert cluster.batch_dtypes == [F32] and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference_forward(MODEL, x.float(), 1).bfloat16(), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("requests", [1, 3])
@pytest.mark.parametrize("cut", ["one row short", "wrong D", "no rows"])
def test_a_batch_output_of_the_wrong_shape_fails_every_request(requests, cut):
    """Cutting a short answer back into requests would leave the last ones short: all fail instead."""
    async def broken_run(x, layer):
        y = MODEL.forward(x, layer)
        y = {"one row short": y[:-1], "wrong D": y[:, :-1], "no rows": y[:0]}[cut]
        return y, _plan(x, layer)

    async def main():
        coalescer = Coalescer(broken_run, F32, max_batch_tokens=100, wait_s=0.002)
        results = await asyncio.gather(*(coalescer.submit(torch.randn(2, 16), 0) for _ in range(requests)),
                                       return_exceptions=True)
        return results, coalescer

    results, coalescer = asyncio.run(main())
    assert list(coalescer.recent_sizes) == [requests]
    assert len(results) == requests
    for result in results:
        assert isinstance(result, MergedBatchError), result
        assert f"merged batch of {requests} request(s) for layer 0" in str(result)
        assert f"input [{2 * requests}, 16]" in str(result)


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
        coalescer = Coalescer(slow_run, F32, max_batch_tokens=100)
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
