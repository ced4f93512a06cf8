import pytest
import torch

from moe_cluster.core.dispatch import add_rows, combine, expert_chunks, gather_rows, make_plan


def _plan():
    # 4 tokens, top-2 over 5 experts; expert 3 gets nothing
    ids = torch.tensor([[1, 0], [0, 2], [4, 1], [1, 4]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    return make_plan(weights, ids, num_experts=5), ids, weights


def test_plan_groups_rows_by_expert_in_token_order():
    plan, _, _ = _plan()
    assert plan.counts == (2, 3, 1, 0, 2)
    assert plan.offsets == (0, 2, 5, 6, 6, 8)
    assert plan.token_ids_N.tolist() == [0, 1, 0, 2, 3, 1, 2, 3]
    torch.testing.assert_close(plan.weights_N, torch.tensor([0.4, 0.7, 0.6, 0.5, 0.9, 0.3, 0.5, 0.1]))


def test_chunks_skip_empty_experts_and_respect_max_rows():
    plan, _, _ = _plan()
    assert [(c.expert, c.start, c.stop) for c in expert_chunks(plan)] == [(0, 0, 2), (1, 2, 5), (2, 5, 6), (4, 6, 8)]
    chunks = expert_chunks(plan, max_rows=2)
    assert [(c.expert, c.size) for c in chunks] == [(0, 2), (1, 1), (1, 2), (2, 1), (4, 2)]
    assert [c.start for c in chunks] == [0, 2, 3, 5, 6]
    with pytest.raises(ValueError, match="max_rows"):
        expert_chunks(plan, max_rows=0)


def test_chunks_of_a_big_group_are_even():
    ids = torch.zeros(1000, 1, dtype=torch.int64)
    plan = make_plan(torch.ones(1000, 1), ids, num_experts=2)
    sizes = [c.size for c in expert_chunks(plan, max_rows=300)]
    assert sizes == [250, 250, 250, 250]


def test_gather_and_combine_compute_the_weighted_sum():
    plan, ids, weights = _plan()
    x = torch.randn(4, 3)
    x_ND = gather_rows(x, plan)
    scale = torch.arange(1.0, 6.0)  # "expert e" multiplies its input by e + 1
    expert_of_row = torch.repeat_interleave(torch.arange(5), plan.counts_E)
    y = combine(plan, x_ND * scale[expert_of_row].unsqueeze(-1))
    expected = torch.stack([sum(weights[t, j] * (ids[t, j] + 1) * x[t] for j in range(2)) for t in range(4)])
    torch.testing.assert_close(y, expected)


def test_empty_batch():
    plan = make_plan(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64), num_experts=4)
    assert expert_chunks(plan) == []
    assert combine(plan, torch.zeros(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("max_rows", [None, 1, 7, 64])
def test_chunk_by_chunk_equals_all_at_once_bit_for_bit(max_rows):
    # top-3 so that the order in which a token's rows are summed matters in float32
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(50)])
    weights = torch.rand(50, 3, generator=generator)
    plan = make_plan(weights, ids, num_experts=6)
    x = torch.randn(50, 16, generator=generator)
    out_ND = torch.tanh(gather_rows(x, plan)) * 3.7  # some "expert"
    y = torch.zeros(50, 16)
    for chunk in expert_chunks(plan, max_rows):
        assert torch.equal(gather_rows(x, plan, chunk.start, chunk.stop), gather_rows(x, plan)[chunk.start:chunk.stop])
        add_rows(y, plan, chunk.start, out_ND[chunk.start:chunk.stop])
    assert torch.equal(y, combine(plan, out_ND))


def test_pack_calls_one_call_per_owner_within_max_rows():
    """Chunks of experts 0-3 owned by "a" and 4-7 by "b": one call per owner, split at max_rows rows,
    chunks never split and kept in plan order inside a call."""
    from moe_cluster.core.dispatch import ExpertChunk, pack_calls

    sizes = {0: 3, 1: 5, 2: 4, 5: 2, 6: 7}
    chunks, start = [], 0
    for expert, size in sizes.items():
        chunks.append(ExpertChunk(expert, start, start + size))
        start += size
    owner = lambda e: "a" if e < 4 else "b"  # noqa: E731
    assert pack_calls(chunks, owner) == [("a", [0, 1, 2]), ("b", [3, 4])]
    # At most 8 rows a call: 3+5 fill a's first call, 4 opens its second; 2+7 > 8 splits b.
    assert pack_calls(chunks, owner, max_rows=8) == [("a", [0, 1]), ("a", [2]), ("b", [3]), ("b", [4])]
    # A chunk larger than max_rows (expert_chunks never makes one) still travels whole.
    assert pack_calls([ExpertChunk(0, 0, 10)], owner, max_rows=4) == [("a", [0])]
    assert pack_calls([], owner) == []
