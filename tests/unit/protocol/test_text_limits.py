"""The one token-limit check of text requests (protocol/limits.py TextLimits) and the /v1/generate request's
values (protocol/bodies.py check_generate_request): every fault a 400 naming the field at fault, no model."""

import pytest

from moe_cluster.protocol.bodies import check_generate_request
from moe_cluster.protocol.errors import WireError
from moe_cluster.protocol.limits import TextLimits

LIMITS = TextLimits(max_input_tokens=24, max_new_tokens=8, context=20, max_kv_tokens=18)


def refused(limits, *args, **kwargs) -> WireError:
    with pytest.raises(WireError) as raised:
        limits.new_tokens(*args, **kwargs)
    assert raised.value.status == 400
    return raised.value


def test_what_fits_and_the_default_new_tokens():
    assert LIMITS.new_tokens(4, 8) == 8
    assert LIMITS.new_tokens(4, None) == 8  # max_new_tokens
    assert LIMITS.new_tokens(14, None) == 4  # what the KV cache leaves (18 - 14)
    assert LIMITS.new_tokens(16, 0) == 0  # echo scoring: no new token
    assert TextLimits(16, 8).new_tokens(16, None) == 8  # no context, no KV cap
    assert LIMITS.max_model_len == 18 and TextLimits(16, 8).max_model_len == 24 and TextLimits(16, 8, 20).max_model_len == 20


@pytest.mark.parametrize("args, param, code, message", [
    ((25, 1), "prompt", "context_length_exceeded", "the prompt has 25 tokens, over this server's limit of 24"),
    ((4, 9), "max_tokens", "invalid_value", "max_tokens 9 is over this server's limit of 8 (max_new_tokens)"),
    ((12, 7), "max_tokens", "context_length_exceeded",
     "the prompt's 12 tokens + max_tokens 7 = 19 exceed the KV cache (max_kv_tokens) of 18 tokens"),
    ((18, None), "prompt", "context_length_exceeded", "leave no room for a new token in the KV cache"),
])
def test_each_fault_names_its_field_and_numbers(args, param, code, message):
    error = refused(LIMITS, *args)
    assert (error.param, error.code) == (param, code) and message in error.message, error.message


def test_the_models_context_and_a_prompt_alone_past_a_cap():
    context_first = TextLimits(64, 8, context=20, max_kv_tokens=100)
    error = refused(context_first, 15, 6)
    assert (error.param, error.message) == ("max_tokens", "the prompt's 15 tokens + max_tokens 6 = 21 exceed the "
                                                          "model's context of 20 tokens")
    assert refused(context_first, 21, 0).param == "prompt"  # the prompt alone does not fit
    assert refused(context_first, 20, None, prompt_param="messages").param == "messages"


GOOD = ([[1, 2, 3], [4, 5, 6]], 4)


@pytest.mark.parametrize("input_ids, new, param, message", [
    ([1, 2], 1, "input_ids", "[[1, 2, 3]]"),
    ([[]], 1, "input_ids", "non-empty"),
    ([[1, 2], [3]], 1, "input_ids", "same length"),
    ([[1, True]], 1, "input_ids", "integers only"),
    ([[1, 2], [3, 128]], 1, "input_ids[1]", "token id 128 (input_ids[1][1]) is outside the model's vocabulary [0, 128)"),
    ([[1]], 0, "max_new_tokens", "positive integer"),
    ([[1] * 9, [1] * 9], 1, "input_ids", "the prompt has 2x9 = 18 tokens, over this server's limit of 16"),
    ([[1]], 9, "max_new_tokens", "max_new_tokens 9 is over this server's limit of 8"),
    ([[1] * 12], 7, "max_new_tokens", "exceed the model's context of 18"),
])
def test_generate_requests(input_ids, new, param, message):
    limits = TextLimits(16, 8, context=18)
    assert check_generate_request(*GOOD, 128, limits) == GOOD
    with pytest.raises(WireError) as raised:
        check_generate_request(input_ids, new, 128, limits)
    assert (raised.value.status, raised.value.param) == (400, param) and message in raised.value.message
