"""`MoEHandle`: the router's handle for Python callers, small requests by value.

Shape legend: T tokens, D model dim.

    from ray import serve
    from moe_cluster.serving.handle import MoEHandle
    moe = MoEHandle(serve.get_app_handle("moe"))
    y = moe.forward(x_TD.numpy(), layer=0).result()     # or `await moe.forward(...)` in a deployment

Serve's default handle sends every argument through the object store (by reference). For a
request of a few tokens that store round trip is much of the call: one token of mixtral-mini
took 23.1 ms through the default handle and 19.2 ms by value on the 2-core machine (README,
Benchmarks: the bench's `handle-auto` mode is this class). `MoEHandle` chooses as the router
does for its calls to the experts (serving/transport.py, `transport: auto`, the same
`Transport`): by value (Serve's gRPC path) up to `by_value_max_bytes` (1 MiB by default, as
`AppArgs.by_value_max_bytes`; never above Serve's 4 MiB gRPC message limit), by reference
above it, where large numpy arrays travel without a copy.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from .transport import Transport

__all__ = ["MoEHandle"]


class MoEHandle:
    """Wraps a DeploymentHandle to the MoE router (`serve.get_app_handle(app)`): `forward` as the router's."""

    def __init__(self, handle: DeploymentHandle, by_value_max_bytes: int = 2**20) -> None:
        self.handle = handle
        self.transport = Transport("auto", by_value_max_bytes)  # .calls counts the requests per path

    @property
    def by_value_max_bytes(self) -> int:
        return self.transport.by_value_max_bytes

    def forward(self, hidden_states: torch.Tensor | np.ndarray, layer: int | None = None) -> DeploymentResponse:
        """The router's `forward(hidden_states [T, D], layer)`: `.result()` (or await) gives y [T, D] of the
        input's type and dtype; bad input raises ValueError as through the plain handle."""
        return self.handle_for(hidden_states).forward.remote(hidden_states, layer)

    def handle_for(self, hidden_states: torch.Tensor | np.ndarray) -> DeploymentHandle:
        """The handle a request of these rows goes by: by value up to by_value_max_bytes, else by reference."""
        return self.transport.handle_for_size(self.handle, "router", pickled_bytes(hidden_states))


def pickled_bytes(x: torch.Tensor | np.ndarray) -> int:
    """About what pickling `x` writes: a torch tensor carries its whole storage (a one-row view of a
    [2000, 1024] tensor pickles 8 MB), a numpy array only its own elements."""
    if isinstance(x, torch.Tensor):
        return max(x.untyped_storage().nbytes(), x.element_size() * x.numel())
    return np.asarray(x).nbytes
