"""The corpus: split by document with a fixed seed, both domains, roff stripped; the tokenizer."""

import gzip

from moe_cluster.train import data
from moe_cluster.train.data import EOS, encode_documents, load_corpus, train_tokenizer


def test_split_is_by_document_deterministic_and_has_both_domains():
    corpus = load_corpus(seed=3, chars_per_domain=80_000)
    again = load_corpus(seed=3, chars_per_domain=80_000)
    assert [d.source for d in corpus.val] == [d.source for d in again.val]
    assert not {d.source for d in corpus.train} & {d.source for d in corpus.val}
    assert {d.domain for d in corpus.train} == {d.domain for d in corpus.val} == {"code", "prose"}
    other = load_corpus(seed=4, chars_per_domain=80_000)
    assert [d.source for d in other.val] != [d.source for d in corpus.val]


def test_man_pages_lose_their_markup(tmp_path):
    page = tmp_path / "tool.1.gz"
    page.write_bytes(gzip.compress(b'.\\" a comment\n.TH TOOL 1\n.SH NAME\ntool \\- does \\fBthings\\fR\n'
                                   b'.PP\nIt reads \\fIfiles\\fP.\n'))
    assert data._read_man(page) == "TOOL 1\nNAME\ntool - does things\nIt reads files."


def test_tokenizer_round_trips_and_separates_documents_by_eos():
    corpus = load_corpus(seed=0, chars_per_domain=150_000)
    tokenizer = train_tokenizer([d.text for d in corpus.train], vocab_size=400)
    assert tokenizer.token_to_id(EOS) == 0 and tokenizer.get_vocab_size() == 400
    text = corpus.val[0].text
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: lossless
    stream = encode_documents(tokenizer, corpus.val[:3])
    assert int((stream == 0).sum()) == 3 and int(stream[-1]) == 0
