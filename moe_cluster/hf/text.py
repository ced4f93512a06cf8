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

- `TextStream`: the text of the generated ids, told piece by piece as tokens arrive. It holds
  back what could still change (an incomplete UTF-8 character, the start of a stop string), so
  the pieces of a streamed answer joined are exactly the text of the unstreamed one: both are
  built by this class. A stop string ends the text before it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_tokenizer", "chat_prompt", "PLAIN_CHAT_TEMPLATE", "TextStream"]

PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


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
    """The text of the generated tokens of one request, in pieces; `stopped` once a stop string appeared."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.told = ""  # the text given out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a generated token; the new text that is safe to give out now (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._tell(text[:cut])
        if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            return ""
        return self._tell(text[:len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The rest of the text once generation ended (what was held back for a stop string)."""
        if self.stopped or not self.ids:
            return ""
        return self._tell(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _tell(self, text: str) -> str:
        if not text.startswith(self.told):  # decoding changed text already given out: keep what was told
            return ""
        piece, self.told = text[len(self.told):], text
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts in `text` (searching only what was not told yet), or None."""
        start = max(0, len(self.told) - max((len(s) for s in self.stop), default=0))
        found = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string (it may complete it)."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
