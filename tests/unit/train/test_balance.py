"""Balancing: the Switch loss is 1 when balanced and pushes probability off an overloaded expert;
the loss-free bias moves toward underloaded experts; the max violation."""

import torch

from moe_cluster.train.balance import loss_free_update, max_violation, router_z_loss, switch_aux_loss


def test_switch_loss_is_one_when_balanced_and_more_when_not():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert torch.isclose(switch_aux_loss(uniform, torch.tensor([4, 4, 4, 4])), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    assert switch_aux_loss(skewed, torch.tensor([13, 1, 1, 1])) > 2.0


def test_switch_loss_lowers_the_probability_of_the_overloaded_expert():
    logits = torch.zeros(8, 4, requires_grad=True)
    switch_aux_loss(torch.softmax(logits, -1), torch.tensor([10, 2, 2, 2])).backward()
    assert logits.grad[:, 0].min() > 0 and logits.grad[:, 1:].max() < 0  # descent lowers expert 0


def test_z_loss():
    assert torch.isclose(router_z_loss(torch.zeros(3, 4)), torch.log(torch.tensor(4.0)) ** 2)


def test_loss_free_bias_moves_by_u_toward_underloaded_experts():
    bias = torch.zeros(4)
    loss_free_update(bias, torch.tensor([10, 2, 6, 6]), rate=0.01)  # mean 6
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]), atol=1e-9, rtol=0)


def test_max_violation():
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0.0
    assert abs(max_violation(torch.tensor([10, 2, 4, 4])) - 1.0) < 1e-12
