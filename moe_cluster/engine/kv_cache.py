"""Each sequence's KV cache, allocated once, and the attention that reads it where it lies (torch, no Ray).

    SequenceKV(capacity)  per decoder layer: keys [H_kv, capacity, d_k] and values [H_kv, capacity, d_v],
                          made at the sequence's first forward for its whole life (prompt + max_new_tokens);
                          a forward writes its new positions in place; `length` advances once it succeeded
    default_max_kv_tokens the tokens all caches may hold together (engine/scheduler.py admits by it)
    packed attention      transformers' attention interface PACKED: a step's tokens come as ONE row [1, T],
                          each sequence's new tokens in turn (vLLM's flattened batch); each sequence's
                          queries attend to its own cache in place: no padding to the longest, no copy of
                          what is cached, whatever the mix of prefill chunks and decoding tokens

Cost per step: writing the new positions, and attention's own reads of each cache (the one thing
that grows with context). A model call outside a packed step (HF `generate`, /v1/generate) gets
transformers' SDPA attention and masks, unchanged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["SequenceKV", "PACKED", "use_packed_attention", "packed_step", "default_max_kv_tokens"]

PACKED = "moe_cluster_packed"  # the name of the attention implementation in transformers' registries
# The members of the packed forward running in this thread: (cache, new tokens), in the row's order.
_STEP: contextvars.ContextVar[list[tuple["SequenceKV", int]] | None] = contextvars.ContextVar("packed_step",
                                                                                              default=None)


class SequenceKV:
    """One sequence's keys and values of every attention layer, `capacity` positions each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # positions written by forwards that succeeded
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [H_kv, capacity, d_k]
        self.values: dict[int, torch.Tensor] = {}  # layer -> [H_kv, capacity, d_v]

    def write(self, layer: int, k_HCd: torch.Tensor, v_HCd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store C new positions after `length`; (keys, values) [H, length + C, d] of the layer: views."""
        end = self.length + k_HCd.shape[1]
        if end > self.capacity:
            raise RuntimeError(f"a sequence's KV cache holds {self.capacity} positions, {end} were asked: the "
                               "scheduler gave it more tokens than it was admitted with")
        if layer not in self.keys:
            H, _, d_k = k_HCd.shape
            self.keys[layer] = k_HCd.new_empty(H, self.capacity, d_k)
            self.values[layer] = v_HCd.new_empty(v_HCd.shape[0], self.capacity, v_HCd.shape[2])
        self.keys[layer][:, self.length:end] = k_HCd
        self.values[layer][:, self.length:end] = v_HCd
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@contextmanager
def packed_step(members: list[tuple[SequenceKV, int]]) -> Iterator[None]:
    """The forward run inside, in this thread, is packed: `members` (cache, new tokens) in the row's order."""
    token = _STEP.set(members)
    try:
        yield
    finally:
        _STEP.reset(token)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Make the model's attention PACKED: in a packed step, each sequence against its own cache; outside one,
    transformers' SDPA attention and its masks, as before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(*args, **kwargs):  # a packed step needs no mask: each sequence's positions are known here
        return None if _STEP.get() is not None else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(PACKED, _packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, mask)
    model.set_attn_implementation(PACKED)


def _packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface. In a packed step: query [1, H_q, T, d_k], key/value [1, H_kv, T, d]
    of the step's new tokens; returns [1, T, H_q, d_v]."""
    members = _STEP.get()
    if members is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    # The window of the layer's mask: an attribute of sliding layers in some families (Qwen2-MoE passes no
    # argument), the argument in others (Mixtral)
    window = getattr(module, "sliding_window", sliding_window)
    out, start = [], 0
    for kv, count in members:
        end = start + count
        keys_HLd, values_HLd = kv.write(module.layer_idx, key[0, :, start:end], value[0, :, start:end])
        out.append(_attend(query[0, :, start:end], keys_HLd, values_HLd, scaling, window))
        start = end
    return torch.cat(out, dim=1).transpose(0, 1)[None], None


def _attend(q_HCd: torch.Tensor, k_HLd: torch.Tensor, v_HLd: torch.Tensor, scaling: float | None,
            window: int | None) -> torch.Tensor:
    """The last C positions of a sequence of L attending causally to its L cached ones; [H_q, C, d_v]."""
    C, L = q_HCd.shape[1], k_HLd.shape[1]
    gqa = q_HCd.shape[0] != k_HLd.shape[0]
    mask = None
    if C == 1 and window is not None and L > window:  # a decoding token sees the last `window` positions
        k_HLd, v_HLd = k_HLd[:, L - window:], v_HLd[:, L - window:]
    elif C > 1:  # a prompt chunk: position L - C + i sees the positions up to its own
        query_pos = torch.arange(L - C, L, device=q_HCd.device)[:, None]
        key_pos = torch.arange(L, device=q_HCd.device)[None]
        mask = key_pos <= query_pos
        if window is not None:  # transformers' sliding window: key > query - window
            mask &= key_pos > query_pos - window
    return F.scaled_dot_product_attention(q_HCd[None], k_HLd[None], v_HLd[None], attn_mask=mask, scale=scaling,
                                          enable_gqa=gqa)[0]


def default_max_kv_tokens(bytes_per_token: int, device: torch.device, fraction: float = 0.5) -> int:
    """`fraction` of the memory free now on `device`, in KV positions: the GPU's free memory; on the CPU,
    MemAvailable, or what this process's cgroup (a Kubernetes pod's limit) has left, if less. Measured
    once, at start: replicas that share a node or a GPU should each be given max_kv_tokens instead."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else min(_mem_available(), _cgroup_left())
    return max(1, int(free * fraction) // max(1, bytes_per_token))


def _mem_available() -> int:
    """/proc/meminfo's MemAvailable in bytes (what Linux could give without swapping); 8 GiB elsewhere."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def _cgroup_left() -> int:
    """The memory limit of this process's cgroup minus its usage (v2, else v1); no limit: a huge number."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read(limit_file).strip(), _read(usage_file).strip()
        if limit.isdigit() and usage.isdigit():
            return max(0, int(limit) - int(usage))
    return 1 << 62


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
