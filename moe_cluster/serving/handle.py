"""`MoEHandle`: the router's handle for Python callers, small requests by value.

Shape legend: T tokens, D model dim.

    from ray import serve
    from moe_cluster.serving.handle import MoEHandle
    moe = MoEHandle(serve.get_app_handle("moe"))
    y = moe.forward(x_TD.numpy(), layer=0).result()     # or `await moe.forward(...)` in a deployment

Serve's default handle sends every argument through the object store (by reference). For a
request of a few tokens that store round trip is most of the call: one token of mixtral-mini
took 23.3 ms through the default handle and 19.9 ms by value on the 2-core machine (README,
Benchmarks: the bench's `handle-auto` mode is this class). By value (`handle.options(_by_reference=False)`, Serve's gRPC path)
has a message limit (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, 4 MiB), so requests above
`by_value_max_bytes` go by reference, where large numpy arrays travel without a copy. The router
chooses the same way for its calls to the experts (serving/transport.py, `transport: auto`).
"""

from __future__ import annotations

import numpy as np
import torch
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from .transport import by_value_limit

__all__ = ["MoEHandle"]


class MoEHandle:
    """Wraps a DeploymentHandle to the MoE router (`serve.get_app_handle(app)`): `forward` as the router's."""

    def __init__(self, handle: DeploymentHandle, by_value_max_bytes: int | None = None) -> None:
        limit = by_value_limit()
        self.by_value_max_bytes = limit if by_value_max_bytes is None else min(by_value_max_bytes, limit)
        self.handle = handle
        self._by_value = handle.options(_by_reference=False)

    def forward(self, hidden_states: torch.Tensor | np.ndarray, layer: int | None = None) -> DeploymentResponse:
        """The router's `forward(hidden_states [T, D], layer)`: `.result()` (or await) gives y [T, D] of the
        input's type and dtype; bad input raises ValueError as through the plain handle."""
        return self.handle_for(hidden_states).forward.remote(hidden_states, layer)

    def handle_for(self, hidden_states: torch.Tensor | np.ndarray) -> DeploymentHandle:
        """The handle a request of these rows goes by: by value up to by_value_max_bytes, else by reference."""
        if isinstance(hidden_states, torch.Tensor):
            nbytes = hidden_states.element_size() * hidden_states.numel()
        else:
            nbytes = np.asarray(hidden_states).nbytes
        return self._by_value if nbytes <= self.by_value_max_bytes else self.handle
