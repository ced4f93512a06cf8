"""Log-probabilities of a sequence's tokens from the model's logits (torch, no Ray).

    token_logprob(logits_V, token_id, k)     a generated token: its logprob and the k most likely there
    prompt_logprobs(logits_SV, ids, k)       every prompt token, from the prefill's logits of every position
                                             (position i predicts token i + 1; the first token: no logprob)

Raw: log_softmax of the model's logits in float32, before temperature, penalties or cuts (vLLM's
default `logprobs_mode`, raw_logprobs), so a token's logprob is what the model gives it whatever
the sampling. Shapes: S prompt positions, V vocabulary, C a chunk of positions.
"""

from __future__ import annotations

import torch

from ..protocol.openai_logprobs import TokenLogprob

__all__ = ["token_logprob", "prompt_logprobs", "LogprobsError"]

CHUNK = 256  # prompt positions made float32 at a time: a long prompt's [S, V] in float32 would be GBs


class LogprobsError(RuntimeError):
    """The model's logits are NaN where a logprob is asked: there is none to tell."""


def _positions(logprobs_CV: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """A TokenLogprob per row: ids[c]'s logprob in row c, and the row's k most likely (id, logprob)."""
    if torch.isnan(logprobs_CV).any():
        raise LogprobsError("the model's logits contain NaN: no logprob can be told")
    chosen_C = logprobs_CV.gather(1, torch.tensor(ids, dtype=torch.long)[:, None])[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(ids, chosen_C)]
    top = torch.topk(logprobs_CV, min(k, logprobs_CV.shape[-1]), dim=-1)  # a vocabulary may be smaller than k
    return [TokenLogprob(t, lp, tuple(zip(top_ids, top_lps)))
            for t, lp, top_ids, top_lps in zip(ids, chosen_C, top.indices.tolist(), top.values.tolist())]


def token_logprob(logits_V: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The logprob of `token_id` under logits [V], and the k most likely tokens there."""
    return _positions(torch.log_softmax(logits_V.float()[None], dim=-1), [token_id], k)[0]


def prompt_logprobs(logits_SV: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """The logprob of every prompt token (the first: None) from the prefill's logits [S, V] of `ids` [S]."""
    positions = [TokenLogprob(ids[0])]
    for start in range(0, len(ids) - 1, CHUNK):
        logprobs_CV = torch.log_softmax(logits_SV[start:start + CHUNK].float(), dim=-1)
        positions += _positions(logprobs_CV[:len(ids) - 1 - start], ids[start + 1:start + 1 + CHUNK], k)
    return positions
