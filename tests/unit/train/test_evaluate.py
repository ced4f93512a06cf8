"""Perplexity: non-overlapping windows, each scored alone; known answers for known models."""

import math

import torch

from moe_cluster.train.evaluate import perplexity, unigram_perplexity, windows
from moe_cluster.train.pipeline import perplexity_tokens


def test_windows_do_not_overlap_and_drop_a_last_single_token():
    wins = windows(list(range(10)), 4)
    assert [w.tolist() for w in wins] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(windows(list(range(9)), 4)) == 2
    assert perplexity_tokens(list(range(10)), 4) == 3 + 3 + 1
    assert perplexity_tokens(list(range(9)), 4) == 6


def test_uniform_logits_give_the_vocabulary_size():
    ppl, tokens = perplexity(lambda ids: torch.zeros(*ids.shape, 50), list(range(37)), 8)
    assert math.isclose(ppl, 50.0, rel_tol=1e-6) and tokens == perplexity_tokens(list(range(37)), 8)


def test_each_window_is_scored_alone():
    """A model that predicts the first token of its window for every position: exact on a text made of
    runs of one token per window, wrong at every step if windows were scored with earlier context."""
    def first_token_of_the_window(ids_BS):
        logits = torch.full((*ids_BS.shape, 10), -1e4)
        logits.scatter_(-1, ids_BS[:, :1, None].expand(-1, ids_BS.shape[1], 1), 0.0)
        return logits

    text = [3] * 5 + [7] * 5 + [1] * 5
    ppl, tokens = perplexity(first_token_of_the_window, text, 5)
    assert tokens == 12 and math.isclose(ppl, 1.0, rel_tol=1e-6)


def test_unigram_of_the_exact_frequencies():
    train = torch.tensor([0, 0, 1, 1])
    ppl = unigram_perplexity(train, [0, 1, 0, 1, 0], 5, vocab_size=2)  # add-one: p = 1/2 each
    assert math.isclose(ppl, 2.0, rel_tol=1e-9)
