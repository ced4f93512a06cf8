"""Text in and out of a Hugging Face model (no Ray): its tokenizer, chat prompts, streamed text.

- `load_tokenizer(dir)`: the tokenizer saved beside the model (local files only: nothing is
  fetched from the Hub).
- `chat_prompt(tokenizer, messages)`: the prompt ids of a chat, through the tokenizer's own chat
  template, or `PLAIN_CHAT_TEMPLATE` when it has none:

      <|system|>
      You are terse.
      <|user|>
      Hello!
      <|assistant|>

- `TextStream(tokenizer, stop)`: the text of the generated ids, told piece by piece as tokens
  arrive, with O(1) work per token (amortised). Its pieces joined (`finish()` included) are
  exactly `tokenizer.decode(ids, skip_special_tokens=True)`, ended before the first stop string.
  Three stages, each holding back only what may still change:

  1. `Detokenizer`: the text of the ids, decoding a short window only (vLLM's prefix / read
     offsets): the new text is decode(window) past decode(the window's ids told already). It holds
     back an incomplete UTF-8 character ("\ufffd" at the end) and an open run of byte tokens
     `<0x..>` (Llama / Mixtral's ByteFallback decoder makes characters of a run only when the whole
     run is valid UTF-8, else one "\ufffd" per byte; tokenizers' own DecodeStream raises there).
     A transformers fast tokenizer is decoded by its Rust backend, its special ids dropped on
     arrival; any other tokenizer through its own `.decode` (exact when decoding a window gives
     that window's part of the whole text; a decoder that changes text already told gets what is
     new told, never text dropped).
  2. `SpaceCleanup`: transformers' `clean_up_tokenization` (" ." -> ".", " ' " -> "'", " 's" ->
     "'s", ...), which decode applies to the joined text of WordPiece tokenizers made with
     `clean_up_tokenization_spaces=True`. It is a chain of `str.replace` over the whole text, so
     the text is cleaned in pieces cut only after a character that no pattern goes on from.
  3. `StopStrings`: the text ends before the stop string that is complete first (the earliest
     end, then the longest); it holds back an end that may begin one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["load_tokenizer", "chat_prompt", "PLAIN_CHAT_TEMPLATE", "TextStream", "Detokenizer", "SpaceCleanup",
           "StopStrings", "CLEANUP_REPLACEMENTS", "clean_up_spaces"]

PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# transformers' PreTrainedTokenizerBase.clean_up_tokenization, in its order (tests hold the two equal).
# Every replacement only removes spaces: SpaceCleanup relies on it.
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# The characters a pattern goes on from (all but the last of each): a space, ', n, v, r.
CLEANUP_JOINS = frozenset(c for old, _ in CLEANUP_REPLACEMENTS for c in old[:-1])
# A byte token of a ByteFallback decoder (Llama, Mixtral): "<0xE6>".
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def load_tokenizer(directory: str | Path):
    """The tokenizer of a Hugging Face model directory (tokenizer.json / tokenizer_config.json)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no tokenizer in {directory} ({type(exc).__name__}: {exc}); save one there with "
                         "tokenizer.save_pretrained(DIR), or point `tokenizer` at a directory that has one") from None


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt token ids of `messages` ([{"role", "content"}]) followed by the assistant's turn."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class TextStream:
    """The text of the generated tokens of one request, in pieces; `stopped` once a stop string appeared.
    Stop strings are looked for only in the text of the tokens after the first `after` (vLLM's min_tokens)."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), after: int = 0) -> None:
        backend = fast_backend(tokenizer)
        self.detokenizer = Detokenizer.of_backend(backend) if backend is not None else Detokenizer.of(tokenizer)
        self.cleanup = SpaceCleanup() if backend is not None and decode_cleans_up(tokenizer) else None
        self.stops = StopStrings(stop)
        self.after, self.pushed = after, 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token_id: int) -> str:
        """Add a generated token; the new text that is safe to give out now (may be "")."""
        if self.stopped:
            return ""
        self.pushed += 1
        return self._through(self.detokenizer.push(int(token_id)), final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (all that was held back, unless a stop string ended it)."""
        if self.stopped:
            return ""
        return self._through(self.detokenizer.finish(), final=True)

    def _through(self, text: str, final: bool) -> str:
        """`text` of the detokenizer through the cleanup and the stop strings; `final`: nothing comes after."""
        if self.cleanup is not None:
            text = self.cleanup.push(text) + (self.cleanup.finish() if final else "")
        if not final and self.pushed <= self.after:  # within min_tokens: no stop string counts yet
            return text
        return self.stops.push(text) + (self.stops.finish() if final else "")


class Detokenizer:
    """The text of token ids told one by one, in pieces that no later id changes.

    `window` holds the ids from where the piece before last ended: its first `told` ids (those of
    the last piece) were told already, `told_text` is their decode there, and a new piece is
    decode(window) past `told_text`. A piece ends only after a whole character and outside a byte
    run, so decoding from there gives the same text as decoding from the start; the window's first
    ids are decoded as context only (Strip, WordPiece's "##" and spaces treat a first token
    differently). Byte runs are seen only through a backend or `convert_ids_to_tokens`."""

    def __init__(self, decode: Callable[[list[int]], str], skipped: frozenset[int] = frozenset(),
                 token_of: Callable[[int], str | None] | None = None) -> None:
        self.decode = decode  # ids -> text
        self.skipped = skipped  # ids that decode to nothing anywhere (special tokens)
        self.token_of = token_of  # id -> token string, to see byte tokens; None: the tokenizer cannot tell
        self.window: list[int] = []
        self.told = 0
        self.told_text = ""

    @classmethod
    def of_backend(cls, backend) -> Detokenizer:
        """Through a `tokenizers.Tokenizer` (the Rust side of a transformers fast tokenizer)."""
        special = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        return cls(lambda ids: backend.decode(ids, skip_special_tokens=True), special, backend.id_to_token)

    @classmethod
    def of(cls, tokenizer) -> Detokenizer:
        """Through any object with transformers' `decode(ids, skip_special_tokens=True)`."""
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                   token_of=getattr(tokenizer, "convert_ids_to_tokens", None))

    def push(self, token_id: int) -> str:
        """Add an id; the text it completes (may be "")."""
        if token_id in self.skipped:
            return ""
        self.window.append(token_id)
        if self._is_byte_token(token_id):  # a byte run's text depends on all of its bytes: wait for its end
            return ""
        text = self.decode(self.window)
        if text.endswith("\ufffd") or len(text) <= len(self.told_text):  # half a character, or nothing new
            return ""
        piece = new_part(self.told_text, text)
        self.window = self.window[self.told:]
        self.told = len(self.window)
        self.told_text = self.decode(self.window)
        return piece

    def finish(self) -> str:
        """The text held back (a character left incomplete is "\ufffd", as decode gives it)."""
        text = self.decode(self.window)
        piece = new_part(self.told_text, text)
        self.told, self.told_text = len(self.window), text
        return piece

    def _is_byte_token(self, token_id: int) -> bool:
        token = self.token_of(token_id) if self.token_of is not None else None
        return isinstance(token, str) and BYTE_TOKEN.fullmatch(token) is not None


def new_part(told: str, text: str) -> str:
    """What `text` has past `told`: past all of it when it starts with it (always, with a Rust decoder),
    else past their common start (a decoder that changed text already told: what is new is told again)."""
    if text.startswith(told):
        return text[len(told):]
    return text[len(os.path.commonprefix([told, text])):]


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: " ." -> ".", " ' " -> "'", " 's" -> "'s", ..."""
    for old, new in CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


class SpaceCleanup:
    """`clean_up_spaces` of a text told in pieces, in pieces.

    The text is cut after a character no pattern goes on from (none of CLEANUP_JOINS). Replacements
    only remove spaces, so that character stays the last of its side through every step, no match
    of any step crosses the cut, and each side is cleaned as if alone. What is after the last such
    character waits (it is short: a few spaces, quotes, n, v, r)."""

    def __init__(self) -> None:
        self.pending = ""  # raw text after the last cut

    def push(self, text: str) -> str:
        self.pending += text
        cut = len(self.pending)
        while cut > 0 and self.pending[cut - 1] in CLEANUP_JOINS:
            cut -= 1
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return clean_up_spaces(ready)

    def finish(self) -> str:
        ready, self.pending = self.pending, ""
        return clean_up_spaces(ready)


class StopStrings:
    """A text told in pieces, ended before its first stop string (the one complete first: the earliest
    end, then the longest, so the cut is the same however the text is split). It holds back the
    longest end of the text that is the start of a stop string: no stop string can begin before it."""

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # held back: the start of a stop string, perhaps
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.pending = True, ""
            return text[:cut]
        keep = len(text) - self._may_begin_stop(text)
        self.pending = text[keep:]
        return text[:keep]

    def finish(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _first_stop(self, text: str) -> int | None:
        """Where the stop string complete first in `text` starts, or None."""
        found = [(start + len(s), start) for s in self.stops if (start := text.find(s)) >= 0]
        return min(found)[1] if found else None

    def _may_begin_stop(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string (it may complete it).
        Only ends that begin with a stop string's first character are compared (the protocol caps a
        stop string's length: this runs for every token, in the thread every sequence shares)."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text[-n] == s[0] and s.startswith(text[-n:]):
                    longest = n
                    break
        return longest


def fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer whose decode is transformers' own
    (the Rust decode, then perhaps the space cleanup); None for anything else."""
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
    except ImportError:
        return None
    kind = type(tokenizer)
    own_decode = (isinstance(tokenizer, PreTrainedTokenizerFast)
                  and kind.decode is PreTrainedTokenizerBase.decode
                  and kind._decode is PreTrainedTokenizerFast._decode
                  and kind.clean_up_tokenization is PreTrainedTokenizerBase.clean_up_tokenization)
    return tokenizer.backend_tokenizer if own_decode else None


def decode_cleans_up(tokenizer) -> bool:
    """Whether transformers' fast decode cleans up spaces, as it decides (transformers 5: never for a BPE
    model unless forced, since it would eat the spaces before punctuation)."""
    if not tokenizer.clean_up_tokenization_spaces:
        return False
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(tokenizer.backend_tokenizer.model).__name__ != "BPE" or forced
