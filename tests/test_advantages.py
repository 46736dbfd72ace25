"""Tests for rlhf_scratch.advantages: GAE and one-step TD worked out by hand."""

import math

import pytest
import torch

from rlhf_scratch.advantages import (
    RunningMoments,
    gae_advantages,
    one_step_advantages,
    terminal_rewards,
)

NAN = float("nan")

# Two rows, G = 3: row 0 has 3 real tokens, row 1 has 2 (its last column is post-EOS padding,
# holding junk that must never be read).
GEN_MASK = torch.tensor([[True, True, True], [True, True, False]])
VALUES = torch.tensor([[0.5, 1.0, 2.0], [1.0, -1.0, 7.0]])
REWARDS = torch.tensor([1.0, 2.0])


def test_terminal_rewards_by_hand():
    assert terminal_rewards(REWARDS, GEN_MASK).tolist() == [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]


def test_terminal_rewards_rejects_a_row_with_no_real_token():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\] of gen_mask have no real generated token"):
        terminal_rewards(torch.zeros(2), mask)


def test_a_gen_mask_with_holes_is_rejected():
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="prefix"):
        terminal_rewards(torch.zeros(1), mask)


def test_gae_by_hand():
    """γ = 0.9, λ = 0.8, so γλ = 0.72.

    Row 0 (T = 2), V = (0.5, 1.0, 2.0), r = 1 at t = 2:
        δ2 = 1 − 2.0 = −1.0            A2 = −1.0
        δ1 = 0.9·2.0 − 1.0 = 0.8       A1 = 0.8 + 0.72·(−1.0) = 0.08
        δ0 = 0.9·1.0 − 0.5 = 0.4       A0 = 0.4 + 0.72·0.08 = 0.4576
        returns = A + V = (0.9576, 1.08, 1.0)
    Row 1 (T = 1), V = (1.0, −1.0, [7.0 padding]), r = 2 at t = 1:
        δ1 = 2 − (−1.0) = 3.0          A1 = 3.0      (bootstrapping from the padding's 7.0 would give 9.3)
        δ0 = 0.9·(−1.0) − 1.0 = −1.9   A0 = −1.9 + 0.72·3.0 = 0.26
        returns = (1.26, 2.0, 0)
    """
    advantages, returns = gae_advantages(terminal_rewards(REWARDS, GEN_MASK), VALUES, GEN_MASK, gamma=0.9, lam=0.8)
    assert advantages.tolist() == [pytest.approx([0.4576, 0.08, -1.0]), pytest.approx([0.26, 3.0, 0.0])]
    assert returns.tolist() == [pytest.approx([0.9576, 1.08, 1.0]), pytest.approx([1.26, 2.0, 0.0])]


def test_one_step_advantages_by_hand():
    # row 0: (V1 − V0, V2 − V1, r − V2) = (0.5, 1.0, −1.0); row 1: (V1 − V0, r − V1, 0) = (−2.0, 3.0, 0)
    got = one_step_advantages(REWARDS, VALUES, GEN_MASK)
    assert got.tolist() == [pytest.approx([0.5, 1.0, -1.0]), pytest.approx([-2.0, 3.0, 0.0])]


def random_rollout(batch=5, gen=6):
    lengths = torch.tensor([6, 1, 3, 5, 2])[:batch]
    mask = torch.arange(gen) < lengths.unsqueeze(1)
    return torch.randn(batch), torch.randn(batch, gen), mask


def test_gae_with_lambda_0_gamma_1_is_one_step_td():
    rewards, values, mask = random_rollout()
    advantages, returns = gae_advantages(terminal_rewards(rewards, mask), values, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(advantages, one_step_advantages(rewards, values, mask), atol=1e-6)


def test_gae_with_lambda_1_gamma_1_gives_monte_carlo_returns():
    """The return at every real position is the terminal reward: nothing is discounted or bootstrapped."""
    rewards, values, mask = random_rollout()
    advantages, returns = gae_advantages(terminal_rewards(rewards, mask), values, mask, gamma=1, lam=1)
    expected = torch.where(mask, rewards.unsqueeze(1).expand_as(mask), 0.0)
    assert torch.allclose(returns, expected, atol=1e-5)
    assert torch.allclose(advantages, torch.where(mask, expected - values, 0.0), atol=1e-5)


def test_discounting_by_hand():
    # λ = 1, γ = 0.5, values 0, reward 8 at t = 2: returns = (8·0.25, 8·0.5, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, returns = gae_advantages(terminal_rewards(torch.tensor([8.0]), mask), torch.zeros(1, 3), mask, 0.5, 1.0)
    assert returns.tolist() == [[2.0, 4.0, 8.0]]


def test_padding_is_zero_and_junk_there_never_leaks():
    rewards, values, mask = random_rollout()
    token_rewards = terminal_rewards(rewards, mask)
    clean = gae_advantages(token_rewards, values, mask, 0.95, 0.9) + (one_step_advantages(rewards, values, mask),)
    spoiled_values = torch.where(mask, values, NAN)
    spoiled_rewards = torch.where(mask, token_rewards, NAN)
    dirty = gae_advantages(spoiled_rewards, spoiled_values, mask, 0.95, 0.9) + (
        one_step_advantages(rewards, spoiled_values, mask),
    )
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)
        assert (d[~mask] == 0).all()


def test_gae_rejects_gamma_or_lambda_outside_0_1():
    rewards, values, mask = random_rollout()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gae_advantages(values, values, mask, gamma=1.1, lam=0.9)


def test_running_moments_match_torch_on_the_concatenation():
    batches = [torch.randn(5) * 3 + 1, torch.randn(1) + 10, torch.randn(17) * 0.1, torch.randn(3) - 4]
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        mean, std = moments.update(batch)
        seen = torch.cat(batches[: i + 1]).double()
        assert mean == pytest.approx(seen.mean().item(), rel=1e-6)
        assert moments.mean == mean and moments.std == std and moments.count == seen.numel()
        if seen.numel() >= 2:
            assert std == pytest.approx(seen.std().item(), rel=1e-6)  # unbiased, like torch.std
            assert moments.var == pytest.approx(std**2)


def test_running_moments_by_hand_and_resume():
    moments = RunningMoments()
    assert moments.update(torch.tensor([4.0])) == (4.0, 1.0)  # one value: std is the neutral 1.0
    # {4, 1, 7}: mean 4, unbiased var (0 + 9 + 9)/2 = 9
    assert moments.update(torch.tensor([1.0, 7.0])) == (pytest.approx(4.0), pytest.approx(3.0))
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    extra = torch.tensor([0.5, -2.0])
    assert resumed.update(extra) == moments.update(extra)
    with pytest.raises(ValueError, match="empty"):
        moments.update(torch.zeros(0))
    assert math.isfinite(moments.std)
