"""Three kinds of tokenizer built offline, for tests of streamed text (nothing is downloaded).

- `byte_level_bpe()`: GPT-2 style byte-level BPE (tests/support/tokenizer.py), `<|endoftext|>` special,
  padded with plain added tokens `<|xN|>`.
- `wordpiece()`: a BERT WordPiece tokenizer from a small vocabulary written here, with
  `clean_up_tokenization_spaces=True`, so that decode joins " ' " and " 's" (transformers' cleanup).
- `sentencepiece_bpe()`: a Llama / Mixtral style tokenizer (BPE with byte fallback `<0x..>`, Metaspace
  pre-tokenizer, decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1, 0)) as transformers'
  LlamaTokenizerFast builds it, from pieces trained here on a few sentences.

Each is built once per process (they are read-only in the tests).
"""

from __future__ import annotations

import functools
import json
import string

from .tokenizer import CORPUS, build_tokenizer

SENTENCES = CORPUS + ["A naïve café in 日本 serves crème brûlée.", "It's what they've said: we're done, aren't we?"]

WORDS = ["the", "quick", "brown", "fox", "it", "don", "aren", "what", "they", "we", "you", "i", "hello", "world",
         "naive", "cafe", "s", "t", "m", "n", "ve", "re", "d", "ll", "日", "本", "é", "ü"]
SUFFIXES = ["##s", "##ing", "##ed", "##n", "##t", "##é", "##本"]


@functools.cache
def byte_level_bpe():
    """transformers' PreTrainedTokenizerFast over a byte-level BPE of 400 ids (id 0 `<|endoftext|>` special)."""
    return build_tokenizer(400)


@functools.cache
def wordpiece():
    """transformers' BertTokenizerFast over a small WordPiece vocabulary, cleaning up spaces on decode."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase)
    pieces = specials + list(".,?!'-:") + letters + [f"##{c}" for c in letters] + WORDS + SUFFIXES
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return BertTokenizerFast(vocab=vocab, clean_up_tokenization_spaces=True)


@functools.cache
def sentencepiece_bpe():
    """transformers' LlamaTokenizerFast: `<unk>` `<s>` `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>`, then
    BPE pieces trained on SENTENCES (characters outside them are spelled in byte tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(model["vocab"])
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizerFast(vocab=vocab, merges=merges)


ALL = {"byte_level_bpe": byte_level_bpe, "wordpiece": wordpiece, "sentencepiece_bpe": sentencepiece_bpe}
