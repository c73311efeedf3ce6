import math

import pytest
import torch

from packrl.rl.advantages import group_advantages, uniform_groups


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    eps = 1e-4
    adv = group_advantages(rewards, eps=eps)
    # row 0: mean 0.5, population std 0.5
    s = 0.5 / (0.5 + eps)
    torch.testing.assert_close(adv[0], torch.tensor([s, -s, -s, s]))
    # row 1: all equal -> exactly zero
    assert torch.equal(adv[1], torch.zeros(4))
    # row 2: mean 0.75, population std sqrt(6.75 / 4)
    std = math.sqrt(6.75 / 4)
    expected = torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (std + eps)
    torch.testing.assert_close(adv[2], expected)


def test_group_advantages_unscaled_and_unit_variance():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [10.0, 0.0, 5.0]])
    centred = group_advantages(rewards, scale_by_std=False)
    torch.testing.assert_close(centred, torch.tensor([[1.0, -1.0, 0.0], [5.0, -5.0, 0.0]]))
    scaled = group_advantages(rewards, eps=1e-8)
    # population std -> each group has unit variance and zero mean
    torch.testing.assert_close(scaled.pow(2).mean(dim=1), torch.ones(2))
    torch.testing.assert_close(scaled.mean(dim=1), torch.zeros(2))


def test_group_of_one_gets_zero_advantage():
    assert torch.equal(group_advantages(torch.tensor([[0.7], [0.1]])), torch.zeros(2, 1))


def test_uniform_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert uniform_groups(rewards).tolist() == [True, False, True]


def test_bad_rewards_are_named():
    with pytest.raises(ValueError, match="rewards must be a"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="floating point"):
        uniform_groups(torch.ones(2, 2, dtype=torch.long))
