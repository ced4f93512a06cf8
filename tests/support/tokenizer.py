"""A small byte-level BPE tokenizer made offline with the `tokenizers` library, for tiny HF models.

`save_tokenizer(directory, vocab_size)` trains it on a few built-in sentences, pads its vocabulary
to exactly `vocab_size` ids (added tokens `<|xN|>`, so that every id a random model can generate
decodes to something) and saves it as transformers' PreTrainedTokenizerFast beside the model
(tokenizer.json + tokenizer_config.json), with `<|endoftext|>` (id 0) as its EOS token. It has no
chat template: chat requests use the server's plain template.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few experts and adds their answers.",
    "Hello, how are you? I am fine, thank you. What is the capital of France? Paris.",
    "Ray Serve runs each expert in its own deployment, and the router sends each expert its tokens.",
    "Once upon a time there was a small model that learned to count: one, two, three, four, five.",
]
EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int):
    """A transformers PreTrainedTokenizerFast with exactly `vocab_size` ids (at least 300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError("a byte-level tokenizer needs at least 300 ids (256 bytes, merges, EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 600), special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens([f"<|x{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def save_tokenizer(directory: str | Path, vocab_size: int):
    """Build the tokenizer and save it in `directory` (a HF model directory); returns it."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
