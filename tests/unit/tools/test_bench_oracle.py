"""The bench's oracle checks catch wrong answers (no Ray cluster): a mode that computes the
wrong layer, a short answer, NaN, a concurrent client handed another client's answer."""

import math

import pytest
import torch

from moe_cluster.core.config import preset_config
from moe_cluster.core.model import MoEModel
from moe_cluster.core.reference import reference_forward
from moe_cluster.tools.bench import BenchSettings, concurrent_calls
from moe_cluster.tools.bench_oracle import ORACLE_ATOL, check_against_oracle, client_requests, compute_oracle, max_abs_diff, wrong_answers

MODEL = MoEModel.random(preset_config("tiny"), seed=3)
LAYERS = MODEL.config.moe_layer_ids  # (0, 1)
INPUTS = {t: torch.randn(t, MODEL.config.d_model, generator=torch.Generator().manual_seed(t)) for t in (1, 5)}


def test_oracle_is_computed_once_per_input_and_layer():
    oracle, requests = compute_oracle(MODEL, INPUTS, clients=3, client_tokens=4, log=lambda _: None)
    assert set(oracle) == {(t, layer) for t in INPUTS for layer in LAYERS}
    torch.testing.assert_close(oracle[(5, 1)], reference_forward(MODEL, INPUTS[5], 1), rtol=0, atol=0)
    assert [r.layer for r in requests] == [0, 0, 0]  # the timed layer, so that the router merges them
    assert not torch.equal(torch.from_numpy(requests[0].x_TD), torch.from_numpy(requests[2].x_TD))  # own inputs
    for r in requests:
        torch.testing.assert_close(r.expected_TD, reference_forward(MODEL, torch.from_numpy(r.x_TD), r.layer))


def test_right_modes_pass_and_wrong_ones_are_named():
    oracle, _ = compute_oracle(MODEL, INPUTS, clients=0, client_tokens=1, log=lambda _: None)
    callers = {
        "right": lambda x, layer: MODEL.forward(x, layer),
        "always_layer_0": lambda x, layer: MODEL.forward(x, 0),
        "short": lambda x, layer: MODEL.forward(x, layer)[:-1],
        "nan": lambda x, layer: torch.full_like(x, float("nan")),
    }
    max_diff = check_against_oracle(callers, {mode: LAYERS for mode in callers}, INPUTS, oracle)
    assert set(max_diff) == set(callers) and set(max_diff["right"]) == {"1", "5"}
    assert all(d < ORACLE_ATOL for per_t in max_diff["right"].values() for d in per_t.values())
    assert max_diff["always_layer_0"]["5"]["0"] < ORACLE_ATOL < max_diff["always_layer_0"]["5"]["1"]
    assert max_diff["short"]["5"]["0"] == math.inf
    wrong = wrong_answers(max_diff, {"handle": {"answers_checked": 3, "max_abs_diff": 0.0}})
    assert {w.split(":")[0] for w in wrong} == {
        "always_layer_0 T=1 layer=1", "always_layer_0 T=5 layer=1",
        *(f"{mode} T={t} layer={layer}" for mode in ("short", "nan") for t in (1, 5) for layer in (0, 1))}


def test_concurrent_clients_answers_are_each_checked():
    settings = BenchSettings(clients=3, client_tokens=4, client_requests=2)
    requests = client_requests(MODEL, settings.clients, settings.client_tokens)
    right = lambda: (lambda x, layer: MODEL.forward(torch.from_numpy(x), layer))  # noqa: E731
    latencies, wall, diffs = concurrent_calls(right, requests, settings)
    assert len(latencies) == 3 * 2 and wall > 0
    assert len(diffs) == 3 * (2 + 1) and max(diffs) < ORACLE_ATOL  # warm-up answers are checked too
    # every client handed client 0's answer: the others' answers are wrong
    first = requests[0]
    mixed_up = lambda: (lambda x, layer: MODEL.forward(torch.from_numpy(first.x_TD), first.layer))  # noqa: E731
    _, _, diffs = concurrent_calls(mixed_up, requests, settings)
    assert sum(d > ORACLE_ATOL for d in diffs) == 2 * (2 + 1)
    expected = first.expected_TD
    assert max_abs_diff(expected + 0.5, expected) == pytest.approx(0.5)
    assert max_abs_diff(expected.numpy(), expected) == 0.0  # numpy answers are compared too
    assert max_abs_diff(expected[:-1], expected) == float("inf")  # a short answer is wrong, not a crash
