"""TextStream: the pieces of a streamed answer joined are exactly tokenizer.decode(ids, skip_special_tokens=True),
ended before the first stop string, for byte-level BPE, WordPiece with space cleanup and SentencePiece-style BPE
with byte fallback (tests/support/tokenizers_zoo.py, built offline), with O(1) decode work per token."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_cluster.engine.text import CLEANUP_REPLACEMENTS, SpaceCleanup, StopStrings, TextStream, clean_up_spaces
from tests.support.tokenizers_zoo import ALL, byte_level_bpe, sentencepiece_bpe, wordpiece

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def streamed(tokenizer, ids, stop=()) -> tuple[list[str], str]:
    """The pieces told by push, one per id, and the text of finish()."""
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.finish()


def first_stop_cut(text: str, stops) -> str:
    """`text` ended before the stop string complete first, read one character at a time (the reference)."""
    for end in range(len(text) + 1):
        starts = [text[:end].find(s) for s in stops if s and s in text[:end]]
        if starts:
            return text[:min(starts)]
    return text


def expected(tokenizer, ids, stop=()) -> str:
    return first_stop_cut(tokenizer.decode(ids, skip_special_tokens=True), stop)


def tokens(tokenizer, *pieces: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(p) for p in pieces]


class DecodeOnly:
    """A tokenizer that is not a transformers fast tokenizer: only `decode`, counting the ids it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


# --- examples -------------------------------------------------------------------------------------------------

def test_byte_level_bpe_holds_back_a_character_split_over_tokens():
    tokenizer = byte_level_bpe()
    ids = tokenizer("naïve 日本 😀 fox")["input_ids"]
    pieces, rest = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == "naïve 日本 😀 fox" == tokenizer.decode(ids)
    assert len(ids) > len("naïve 日本 😀 fox")  # the characters are split over byte tokens...
    assert "\ufffd" not in "".join(pieces) and "😀" in pieces  # ...and told whole


def test_wordpiece_cleanup_joins_quotes_across_tokens():
    tokenizer = wordpiece()
    ids = tokenizer("it ' s what they ' ve said , aren ' t we ?")["input_ids"]
    assert tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True) == \
        "it ' s what they ' ve said, aren ' t we?"  # the Rust decoder cleans per token only
    pieces, rest = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == "it's what they've said, aren't we?" == tokenizer.decode(ids, skip_special_tokens=True)
    assert rest == ""  # told as it went, not all at the end
    assert pieces[:4] == ["", "it", "", "'s"]  # [CLS] told nothing; "it ' s" waited for the s after the quote


def test_wordpiece_cleanup_that_chains():
    """" ' " -> "'" can make a " 's" that the later " 's" -> "'s" joins again: "x  ' s" -> "x 's" -> "x's"."""
    tokenizer = wordpiece()
    assert clean_up_spaces("x  ' s") == "x's" == tokenizer.clean_up_tokenization("x  ' s")
    cleanup = SpaceCleanup()
    told = [cleanup.push(p) for p in ["x", " ", " ", "'", " ", "s", " y"]] + [cleanup.finish()]
    assert told == ["x", "", "", "", "", "'s", " y", ""]  # the spaces and the quote waited for the s


def test_sentencepiece_byte_fallback_characters_and_a_run_that_turns_invalid():
    tokenizer = sentencepiece_bpe()
    ids = tokenizer("naïve 日本 😀 fox")["input_ids"]
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(ids)  # the emoji is spelled in byte tokens
    pieces, rest = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == "naïve 日本 😀 fox" == tokenizer.decode(ids)
    # E6 97 A5 is 日, but a fourth byte makes the run invalid: ByteFallback gives one "\ufffd" per byte
    ids = tokens(tokenizer, "▁the", "<0xE6>", "<0x97>", "<0xA5>", "<0x80>", "▁the")
    pieces, rest = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == "the\ufffd\ufffd\ufffd\ufffd the" == tokenizer.decode(ids)
    assert "日" not in "".join(pieces)


def test_special_tokens_vanish_even_inside_a_byte_run():
    tokenizer = sentencepiece_bpe()
    ids = tokens(tokenizer, "▁the", "<0xE6>", "</s>", "<0x97>", "<0xA5>", "<s>", "<0x80>", "▁the", "</s>")
    pieces, rest = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True) == "the\ufffd\ufffd\ufffd\ufffd the"
    for tokenizer in (byte_level_bpe(), wordpiece()):
        text_ids = tokenizer("the quick fox")["input_ids"]
        ids = [tokenizer.all_special_ids[0]] + text_ids[:2] + [tokenizer.all_special_ids[-1]] + text_ids[2:]
        pieces, rest = streamed(tokenizer, ids)
        assert "".join(pieces) + rest == "the quick fox" == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("forced", [False, True])
def test_a_bpe_tokenizer_is_cleaned_up_only_when_forced(forced):
    """transformers 5 ignores clean_up_tokenization_spaces for a BPE model unless told it may corrupt the text."""
    tokenizer = copy.deepcopy(sentencepiece_bpe())
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = forced
    ids = tokenizer("we ' re here , aren ' t we ?")["input_ids"]
    pieces, rest = streamed(tokenizer, ids)
    text = "we're here, aren't we?" if forced else "we ' re here , aren ' t we ?"
    assert "".join(pieces) + rest == text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(ALL))
def test_stop_strings_spanning_tokens(name):
    tokenizer = ALL[name]()
    ids = tokenizer("the quick brown fox jumps")["input_ids"]
    pieces, rest = streamed(tokenizer, ids, ["brown f"])
    assert "".join(pieces) == "the quick " and rest == ""
    assert all("b" not in p for p in pieces)  # "b", "br", ... was held back until it was sure
    # the stop string complete first wins, not the one that starts first
    pieces, rest = streamed(tokenizer, ids, ["quick brown", "ck"])
    assert "".join(pieces) + rest == "the qui"


def test_stop_strings_see_the_cleaned_text():
    tokenizer = wordpiece()
    ids = tokenizer("it ' s what they ' ve said")["input_ids"]
    assert "".join(streamed(tokenizer, ids, ["'ve"])[0]) == "it's what they"
    pieces, rest = streamed(tokenizer, ids, [" ' "])  # gone in the cleaned text: no stop
    assert "".join(pieces) + rest == "it's what they've said"


@pytest.mark.parametrize("name", ["byte_level_bpe", "sentencepiece_bpe"])
def test_a_tokenizer_with_only_decode_gets_the_same_text(name):
    tokenizer = ALL[name]()
    ids = tokenizer("naïve 日本 😀 fox jumps")["input_ids"]
    pieces, rest = streamed(DecodeOnly(tokenizer), ids, ["jum"])
    assert "".join(pieces) + rest == "naïve 日本 😀 fox "


def test_a_decoder_that_changes_told_text_drops_nothing():
    """A decode that cleans spaces across tokens (not reproduced for a tokenizer with only `decode`): the words all
    come out, in order."""
    tokenizer = wordpiece()
    ids = tokenizer("it ' s what they ' ve said")["input_ids"]
    pieces, rest = streamed(DecodeOnly(tokenizer), ids)
    assert ("".join(pieces) + rest).replace(" ", "") == tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("fast", [True, False])
def test_decode_work_per_token_is_bounded(name, fast):
    """Ids passed to the decode function grow linearly with the answer (re-decoding all would be ~n^2/2), through the
    Rust backend and through a tokenizer with only `decode`."""
    tokenizer = ALL[name]()
    ids = tokenizer(" ".join(["The quick brown fox jumps over the lazy dog, naïve 日本 😀 it's."] * 50))["input_ids"]
    assert len(ids) > 1000
    stream = TextStream(tokenizer if fast else DecodeOnly(tokenizer))
    decode, decoded = stream.detokenizer.decode, [0]

    def counting(window):
        decoded[0] += len(window)
        return decode(window)

    stream.detokenizer.decode = counting
    text = "".join(stream.push(i) for i in ids) + stream.finish()
    if fast or name != "wordpiece":  # (a decode-only WordPiece is not cleaned up across tokens)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded[0] < 12 * len(ids)


# --- properties ---------------------------------------------------------------------------------------------------

def interesting_ids(tokenizer) -> list[int]:
    """Ids a random draw rarely hits but that matter: special ids, byte tokens, quotes and punctuation."""
    pieces = [f"<0x{b:02X}>" for b in (0x80, 0x97, 0xA5, 0xE6, 0xF0, 0x9F, 0x98, 0x41, 0x20)] + ["'", "s", "t", "ve"]
    known = [i for i in tokens(tokenizer, *pieces) if i is not None and i != tokenizer.unk_token_id]
    return sorted(set(tokenizer.all_special_ids + known + tokenizer("it's, we ' re . ! ?")["input_ids"]))


@st.composite
def ids_and_stops(draw, name):
    tokenizer = ALL[name]()
    any_id = st.integers(0, len(tokenizer) - 1)
    ids = draw(st.lists(st.one_of(any_id, st.sampled_from(interesting_ids(tokenizer))), max_size=40))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    inside = st.builds(lambda i, n: text[i:i + n], st.integers(0, max(len(text) - 1, 0)), st.integers(1, 4))
    stops = draw(st.lists(st.one_of(inside, st.text(min_size=1, max_size=3)), max_size=3))
    return ids, [s for s in stops if s]


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("with_stops", [False, True])
def test_streamed_text_is_the_decode_of_random_ids(name, with_stops):
    tokenizer = ALL[name]()

    @PROPERTY
    @given(ids_and_stops(name))
    def check(case):
        ids, stops = case
        stops = stops if with_stops else []
        pieces, rest = streamed(tokenizer, ids, stops)
        assert "".join(pieces) + rest == expected(tokenizer, ids, stops)

    check()


@PROPERTY
@given(st.text(alphabet=" 'nvrtsmeab.,?!x", max_size=30), st.lists(st.integers(0, 30), max_size=6))
def test_space_cleanup_in_pieces_is_transformers_cleanup_of_the_whole(text, cuts):
    assert clean_up_spaces(text) == wordpiece().clean_up_tokenization(text)
    cleanup = SpaceCleanup()
    bounds = [0] + sorted(cuts) + [len(text)]
    told = "".join(cleanup.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + cleanup.finish()
    assert told == clean_up_spaces(text)


def test_cleanup_replacements_only_remove_spaces():
    for old, new in CLEANUP_REPLACEMENTS:
        assert old.startswith(" ") and old.replace(" ", "") == new.replace(" ", "") and len(new) < len(old)


@PROPERTY
@given(st.text(alphabet="abc", max_size=20), st.lists(st.integers(0, 20), max_size=5),
       st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_the_same_however_the_text_is_split(text, cuts, stops):
    stream = StopStrings(stops)
    bounds = [0] + sorted(cuts) + [len(text)]
    told = "".join(stream.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + stream.finish()
    assert told == first_stop_cut(text, stops)
    assert stream.stopped == (told != text or any(s in text for s in stops))
