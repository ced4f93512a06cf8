"""Training text that is on every machine, split by document, and its byte-level BPE tokenizer.

Domains (a label per document, so that expert specialisation can be seen):
- `code`: Python's own standard library source (`*.py` next to the running interpreter's `os.py`);
- `prose`: the English manual pages (`/usr/share/man/man[1-8]`, roff markup stripped), or,
  where a machine has none (slim containers), the docstrings of the standard library.

Documents are listed in sorted order, shuffled with the seed, cut at `max_doc_chars` and
taken until each domain has `chars_per_domain` characters; 1 in `val_every` goes to the
validation split (by document: no document is in both). The tokenizer is trained on the
training split only (`tokenizers` byte-level BPE) and saved as `tokenizer.json`; documents
are joined by the end-of-text token `<|endoftext|>` (id 0).
"""

from __future__ import annotations

import ast
import gzip
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Document", "Corpus", "load_corpus", "train_tokenizer", "encode_documents", "EOS", "DOC_SEPARATOR"]

EOS = "<|endoftext|>"
DOC_SEPARATOR = "\n" + EOS + "\n"  # between documents of val.txt: one text, scored as it is


@dataclass(frozen=True)
class Document:
    domain: str  # "code" | "prose"
    source: str  # the file it came from
    text: str


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    val: list[Document]

    @property
    def domains(self) -> list[str]:
        return sorted({d.domain for d in self.train + self.val})

    def val_text(self) -> str:
        return DOC_SEPARATOR.join(d.text for d in self.val)


def load_corpus(seed: int, chars_per_domain: int, max_doc_chars: int = 12_000, val_every: int = 10) -> Corpus:
    """Both domains, split by document with `seed` (same seed, same split on the same machine)."""
    docs = _take(_code_documents(), "code", seed, chars_per_domain, max_doc_chars)
    prose = _take(_man_documents(), "prose", seed, chars_per_domain, max_doc_chars)
    if not prose:  # no manual pages on this machine: the stdlib's docstrings are the prose
        prose = _take(_docstring_documents(), "prose", seed, chars_per_domain, max_doc_chars)
    train, val = [], []
    for domain_docs in (docs, prose):
        for i, doc in enumerate(domain_docs):
            (val if i % val_every == val_every - 1 else train).append(doc)
    if not val or not train:
        raise ValueError(f"too little text to split ({len(train)} train, {len(val)} val documents): "
                         "raise chars_per_domain")
    return Corpus(train, val)


def _take(sources, domain: str, seed: int, budget: int, max_chars: int) -> list[Document]:
    paths = sorted(sources)
    random.Random(f"{seed}-{domain}").shuffle(paths)
    out, total = [], 0
    for path, reader in ((p, sources[p]) for p in paths):
        if total >= budget:
            break
        text = reader(path)
        if text and len(text.strip()) >= 200:
            text = text[:max_chars]
            out.append(Document(domain, str(path), text))
            total += len(text)
    return out


def _stdlib_files() -> list[Path]:
    root = Path(os.__file__).parent
    return [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]


def _read_source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _code_documents() -> dict:
    return {p: _read_source for p in _stdlib_files()}


def _docstring_documents() -> dict:
    def docstrings(path: Path) -> str:
        try:
            tree = ast.parse(_read_source(path))
        except (SyntaxError, ValueError):
            return ""
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        return "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))

    return {p: docstrings for p in _stdlib_files()}


def _man_documents(per_prefix: int = 20) -> dict:
    """The English manual pages, at most `per_prefix` of each command family (the part of the name
    before the first `_`, `-` or `.`), so that one tool's hundreds of generated pages do not dominate."""
    root = Path("/usr/share/man")
    pages = sorted(p for section in range(1, 9) for p in (root / f"man{section}").glob("*.gz"))
    kept: dict[str, int] = {}
    out = {}
    for page in pages:
        prefix = re.split(r"[_.-]", page.name, maxsplit=1)[0]
        kept[prefix] = kept.get(prefix, 0) + 1
        if kept[prefix] <= per_prefix:
            out[page] = _read_man
    return out


_ROFF_ESCAPE = re.compile(r"\\f(\(..|\[[^]]*\]|.)|\\\*(\(..|\[[^]]*\]|.)|\\\((..)|\\\[[^]]*\]|\\[&|^%]")
_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "TH", "Nm", "Nd", "Sh", "Ar", "Fl"}


def _read_man(path: Path) -> str:
    """The text of a gzipped roff manual page: macro lines dropped, except those that carry text."""
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if raw.startswith(".so "):  # a link to another page
        return ""
    lines = []
    for line in raw.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro not in _TEXT_MACROS or not rest:
                continue
            line = rest.replace('"', "")
        line = _ROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers`) trained on `texts`; id 0 is EOS. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_documents(tokenizer, docs: list[Document]) -> torch.Tensor:
    """One int64 stream: the documents' tokens, each followed by EOS."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([d.text for d in docs]):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
