"""The direct channel's wire format (protocol/channel.py), no Ray, no sockets.

Round trips per dtype; each malformed header, size mismatch and wrong secret refused with
ChannelMessageError and a message that says what; a hypothesis fuzz that the decoders never
raise anything else, for arbitrary bytes and for headers close to valid ones.
"""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_cluster.protocol.channel import (CallHeader, ChannelMessageError, decode_answer, decode_call, dtype_of_wire,
                                          encode_answer, encode_call, encode_error)

SECRET = "s3cret-of-this-app"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIRE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}


def _call(rows=None, dtype="float32", spans=((3, 2), (5, 1))):
    rows = np.arange(3 * 4, dtype=WIRE[dtype]).reshape(3, 4) if rows is None else rows
    return encode_call(CallHeader(7, 1, spans, dtype, "fp0123"), rows, SECRET)


def _bytes(frames):
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", sorted(WIRE))
def test_call_and_answer_round_trip(dtype):
    rows = (np.arange(12) * 3).astype(WIRE[dtype]).reshape(3, 4)
    header, got = decode_call(_bytes(_call(rows, dtype)), SECRET)
    assert header == CallHeader(7, 1, ((3, 2), (5, 1)), dtype, "fp0123")
    assert got.dtype == rows.dtype and np.array_equal(got, rows) and not got.flags.writeable
    answer = decode_answer(_bytes(encode_answer(7, rows[::-1], dtype)))
    assert answer.request_id == 7 and answer.error is None and np.array_equal(answer.rows, rows[::-1])


def test_an_answer_travels_in_the_dtype_it_has():
    """The expert replica names its answer's own dtype (the caller's answer check then says what a wrong
    expert really answered, as on Serve's path); a dtype no model has cannot travel."""
    for dtype, wire in WIRE.items():
        assert dtype_of_wire(np.zeros((1, 2), wire)) == dtype
    with pytest.raises(ChannelMessageError, match="float64 cannot travel"):
        dtype_of_wire(np.zeros((1, 2), np.float64))


def test_error_answer_round_trip():
    answer = decode_answer(_bytes(encode_error(9, "busy", "12 calls wait")))
    assert (answer.request_id, answer.rows, answer.error, answer.message) == (9, None, "busy", "12 calls wait")


def test_wrong_or_missing_secret_is_refused():
    frames = _bytes(_call())
    with pytest.raises(ChannelMessageError, match="secret"):
        decode_call(frames, "another-secret")
    meta = msgpack.unpackb(frames[0])
    del meta["secret"]
    with pytest.raises(ChannelMessageError, match="secret"):
        decode_call([msgpack.packb(meta), frames[1]], SECRET)


def _with(change, frames=None):
    frames = frames or _bytes(_call())
    meta = msgpack.unpackb(frames[0])
    change(meta)
    return [msgpack.packb(meta), frames[1]]


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(shape=[3, 5]), "bytes but the rows frame has"),
    (lambda m: m.update(shape=[4, 4]), "bytes but the rows frame has"),
    (lambda m: m.update(dtype="float16"), "bytes but the rows frame has"),
    (lambda m: m.update(dtype="float64"), "dtype must be one of"),
    (lambda m: m.update(shape=[12]), "shape must be"),
    (lambda m: m.update(shape=[-3, -4]), "shape must be"),
    (lambda m: m.update(spans=[[3, 2]]), "spans cover 2 rows but 3"),
    (lambda m: m.update(spans=[[3, 2], [5, "1"]]), "each span"),
    (lambda m: m.update(spans="all"), "spans must be"),
    (lambda m: m.update(id=-1), "id must be"),
    (lambda m: m.update(id=True), "id must be"),
    (lambda m: m.update(layer=None), "layer must be"),
    (lambda m: m.update(fp=5), "fp"),
    (lambda m: m.update(v=2), "version"),
    (lambda m: m.update(kind="answer"), "kind"),
])
def test_malformed_call_headers_are_refused(change, match):
    with pytest.raises(ChannelMessageError, match=match):
        decode_call(_with(change), SECRET)


def test_frames_and_headers_that_are_not_a_call():
    frames = _bytes(_call())
    for bad in ([], [frames[0]], frames + [b""], [b"\xc1", frames[1]], [msgpack.packb([1, 2]), frames[1]],
                [b"x" * 70000, frames[1]], [frames[0], 12], "not frames"):
        with pytest.raises(ChannelMessageError):
            decode_call(bad, SECRET)


def test_malformed_answers_are_refused():
    good = _bytes(encode_answer(3, np.zeros((2, 4), np.float32), "float32"))
    for bad in (good[:1], [good[0], good[1][:-1]], [msgpack.packb({"v": 1, "kind": "error", "id": 3,
                                                                    "error": "exploded", "message": ""})],
                _bytes(encode_error(3, "busy", "x")) + [b""], _bytes(_call())):
        with pytest.raises(ChannelMessageError):
            decode_answer(bad)


def test_encoders_refuse_rows_of_another_dtype_or_rank():
    with pytest.raises(ChannelMessageError, match="rows must be"):
        _call(np.zeros((3, 4), np.float64))
    with pytest.raises(ChannelMessageError, match="rows must be"):
        encode_answer(1, np.zeros(4, np.float32), "float32")


# --- fuzz: the decoders raise ChannelMessageError and nothing else -------------------------------

def _decodes_or_refuses(frames):
    for decode in (lambda f: decode_call(f, SECRET), decode_answer):
        try:
            decode(frames)
        except ChannelMessageError as exc:
            assert str(exc)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_fuzz_arbitrary_frames(frames):
    _decodes_or_refuses(frames)


_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=8),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4), max_leaves=12)
_KEYS = st.sampled_from(["v", "kind", "id", "layer", "spans", "dtype", "shape", "fp", "secret", "error", "message"])


@FUZZ
@given(st.dictionaries(_KEYS, _VALUES, max_size=6), st.binary(max_size=64), st.booleans())
def test_fuzz_headers_close_to_valid(changes, rows, answer):
    base = msgpack.unpackb(bytes((encode_answer(3, np.zeros((2, 2), np.float32), "float32") if answer
                                  else _call())[0]))
    base.update(changes)
    try:
        header = msgpack.packb(base)
    except (OverflowError, ValueError, TypeError):
        return  # not encodable: nothing a peer could send
    _decodes_or_refuses([header, rows])
    _decodes_or_refuses([header])
