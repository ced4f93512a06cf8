"""The bench's answers held to the oracle (`reference_forward`), computed once per input; no Ray.

Every mode is checked for every T and every MoE layer; each concurrent client sends its own
input, so that answers mixed up between merged requests would show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.model import MoEModel
from ..core.reference import reference_forward

__all__ = ["ORACLE_ATOL", "ClientRequest", "compute_oracle", "client_requests", "check_against_oracle", "max_abs_diff",
           "wrong_answers"]

ORACLE_ATOL = 1e-5  # fp32: every path computes the oracle's MoE to 1e-5 (DESIGN.md)


@dataclass(frozen=True)
class ClientRequest:
    """What one concurrent client sends, again and again, and the oracle's answer to it."""

    x_TD: np.ndarray
    layer: int
    expected_TD: torch.Tensor  # reference_forward(model, x_TD, layer)


def compute_oracle(model: MoEModel, inputs: dict[int, torch.Tensor], clients: int, client_tokens: int,
                   log: Callable[[str], None]) -> tuple[dict[tuple[int, int], torch.Tensor], list[ClientRequest]]:
    """reference_forward once per input: {(T, layer): y_TD} for every MoE layer, and the
    concurrent clients' requests with their answers."""
    started = time.perf_counter()
    oracle = {(t, layer): reference_forward(model, x_TD, layer)
              for t, x_TD in inputs.items() for layer in model.config.moe_layer_ids}
    requests = client_requests(model, clients, client_tokens)
    log(f"oracle (reference_forward) for {len(oracle)} (T, layer) inputs and {len(requests)} concurrent clients "
        f"in {time.perf_counter() - started:.1f}s")
    return oracle, requests


def client_requests(model: MoEModel, clients: int, tokens: int) -> list[ClientRequest]:
    """One request per concurrent client: its own input (seeded by its index: an answer handed
    to the wrong client shows), the first MoE layer (the one the single-client runs time, so
    that the router can merge them all as before), and the oracle's answer, computed once."""
    config = model.config
    layer = config.moe_layer_ids[0]
    requests = []
    for i in range(clients):
        x_TD = torch.randn(tokens, config.d_model, generator=torch.Generator().manual_seed(10_000 + i))
        requests.append(ClientRequest(x_TD.numpy(), layer, reference_forward(model, x_TD, layer)))
    return requests


def check_against_oracle(callers: dict[str, Callable], layers_of: dict[str, tuple[int, ...]],
                         inputs: dict[int, torch.Tensor],
                         oracle: dict[tuple[int, int], torch.Tensor]) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {T: {layer: max |call(x_T, layer) - oracle|}}}, one call per mode, T and layer."""
    return {mode: {str(t): {str(layer): max_abs_diff(call(x_TD, layer), oracle[(t, layer)])
                            for layer in layers_of[mode]}
                   for t, x_TD in inputs.items()}
            for mode, call in callers.items()}


def max_abs_diff(y_TD: torch.Tensor | np.ndarray, expected_TD: torch.Tensor) -> float:
    """max |y - expected|; inf when the shapes differ (a wrong answer, not a crash of the bench)."""
    y_TD = _as_tensor(y_TD)
    if y_TD.shape != expected_TD.shape:
        return float("inf")
    return float((y_TD.to(expected_TD.dtype) - expected_TD).abs().max())


def _as_tensor(y: torch.Tensor | np.ndarray) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y))  # a copy: Ray's arrays are read-only


def wrong_answers(max_diff: dict[str, dict[str, dict[str, float]]],
                  concurrent_diff: dict[str, dict[str, float]]) -> list[str]:
    """'mode T=t layer=l: diff' for every check over ORACLE_ATOL (NaN counts as wrong); [] if all are right."""
    wrong = [f"{mode} T={t} layer={layer}: {diff:.2e}" for mode, per_t in max_diff.items()
             for t, per_layer in per_t.items() for layer, diff in per_layer.items() if not diff <= ORACLE_ATOL]
    wrong += [f"{mode} with concurrent clients: {check['max_abs_diff']:.2e}" for mode, check in concurrent_diff.items()
              if not check["max_abs_diff"] <= ORACLE_ATOL]
    return wrong
