"""The forwards of the decode loop (no Ray): one prompt's prefill, a batch of decoding sequences.

    prefill(ids)             one sequence, its exact shape [1, S]: logits of its last position (of
                             every position: `every_position`, for the prompt's logprobs), its KV
                             cache (per decoder layer: keys, values [1, H, S, d])
    decode(tokens, caches)   B sequences of different lengths, one new token each, as ONE batched
                             forward [B, 1]: each cache is left-padded to the longest (the padding
                             masked out, positions per sequence), as transformers' batched generate
                             does with left padding; each sequence's new keys/values are appended
                             to its own cache

Batching the decode is what makes concurrent sequences cheap: a decode step of one sequence
reads every dense weight (attention, the LM head) for one row, B sequences read them once for B
rows. The caches stay per sequence, so sequences join and leave between steps freely.
Models whose cache is not plain per-layer keys/values (sliding windows, linear attention) are
decoded one sequence per forward (`batched` False), which is exact in the same way.

Device: the inputs are made on the model's device and the caches stay there; the logits come back
on the CPU, where the sampler, penalties and logprobs work (the chosen ids are needed on the CPU
anyway, and a seeded draw then gives the same tokens whatever device the model runs on).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KV", "Forwards"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values [1, H, L, d]


class Forwards:
    def __init__(self, model: nn.Module) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model
        self.device = next(model.parameters()).device
        self._new_cache = DynamicCache
        # transformers 5 renamed the forward's past_key_values to cache (the old name warns)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.batched = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)

    def prefill(self, ids: list[int], every_position: bool = False) -> tuple[torch.Tensor, KV]:
        """(logits [1, V] of the last position, or [S, V] of every position, on the CPU; the KV cache) of one
        prompt."""
        cache = self._new_cache(config=self.model.config)
        ids_1S = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self._forward(ids_1S, torch.ones_like(ids_1S), None, cache, keep=0 if every_position else 1)
        return logits[0], [(layer.keys, layer.values) for layer in cache.layers]

    def decode(self, tokens: list[int], caches: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """(logits [B, V] on the CPU, the caches with the new token) of B sequences, one token each."""
        lengths = [kv[0][0].shape[2] for kv in caches]
        longest = max(lengths)
        padded = [(torch.cat([F.pad(kv[i][0], (0, 0, longest - n, 0)) for kv, n in zip(caches, lengths)]),
                   torch.cat([F.pad(kv[i][1], (0, 0, longest - n, 0)) for kv, n in zip(caches, lengths)]))
                  for i in range(len(caches[0]))]
        cache = self._new_cache(ddp_cache_data=padded, config=self.model.config)
        mask_BL = torch.tensor([[0] * (longest - n) + [1] * (n + 1) for n in lengths], dtype=torch.long,
                               device=self.device)
        positions_B1 = torch.tensor([[n] for n in lengths], dtype=torch.long, device=self.device)
        ids_B1 = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        logits = self._forward(ids_B1, mask_BL, positions_B1, cache)[:, -1]
        new = [[(torch.cat([kv[i][0], layer.keys[b:b + 1, :, -1:]], dim=2),
                 torch.cat([kv[i][1], layer.values[b:b + 1, :, -1:]], dim=2)) for i, layer in enumerate(cache.layers)]
               for b, kv in enumerate(caches)]
        return logits, new

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, cache,
                 keep: int = 1) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` positions (0: every position), on the CPU."""
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **{self._cache_arg: cache})
        return out.logits.cpu()  # a no-op on the CPU
