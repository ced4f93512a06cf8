"""The runner's MoE call sources (serving/runner_moe.py), without Ray: what a failed or late call becomes."""

import pytest
import torch

from moe_cluster.serving.errors import DeadlineExceeded, InternalError, http_status
from moe_cluster.serving.runner_moe import RouterMoE


class Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def result(self, timeout_s):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class Handle:
    """A router handle whose forward answers `outcome` (a tensor, or an exception to raise)."""

    def __init__(self, outcome):
        self.sent = []
        self.forward = self
        self.outcome = outcome

    def remote(self, x_TD, layer):
        self.sent.append(Response(self.outcome))
        return self.sent[-1]


def test_a_late_router_call_is_a_504_and_is_cancelled():
    handle = Handle(TimeoutError("result not ready"))
    with pytest.raises(DeadlineExceeded, match="moe_timeout_s=2s") as error:
        RouterMoE(handle, "bound", 2.0)(torch.ones(3, 4), 1)
    assert http_status(error.value) == 504 and handle.sent[0].cancelled


def test_a_refused_call_is_a_500_naming_the_layer_and_an_answer_comes_back_on_the_rows_device():
    with pytest.raises(InternalError, match="MoE layer 1: ValueError: rows refused") as error:
        RouterMoE(Handle(ValueError("rows refused")), "bound", 2.0)(torch.ones(3, 4), 1)
    assert http_status(error.value) == 500
    assert torch.equal(RouterMoE(Handle(torch.zeros(3, 4)), "bound", 2.0)(torch.ones(3, 4), 1), torch.zeros(3, 4))
