"""Advantages and returns for the generated tokens: one-step TD and GAE.

Shapes: B batch, G generated length. ``gen_mask: Bool[Tensor, "batch gen"]`` is True
on each row's real generated tokens, which come first (up to and including the
first EOS), and False on the padding after them; row b's last real token is at
index T_b = gen_mask[b].sum() − 1.

``values[:, t]`` is the value of the state *before* generated token t is chosen
(the value head's output at the position whose logits predict token t). The task
reward arrives once, after the last real token. Call these under ``torch.no_grad()``
(or on detached tensors): advantages and returns are targets, not things to train.
"""

import math

import torch
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker


def _check_gen_mask(gen_mask: Tensor) -> Tensor:
    """Return each row's real length T_b + 1, after checking the mask is a non-empty prefix."""
    lengths = gen_mask.sum(dim=1)
    if (lengths == 0).any():
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(
            f"rows {rows} of gen_mask have no real generated token, so there is no token to give the reward to; "
            "keep at least one generated token per row (a response that is just EOS counts as one)."
        )
    positions = torch.arange(gen_mask.shape[1], device=gen_mask.device)
    if not torch.equal(gen_mask, positions < lengths.unsqueeze(1)):
        raise ValueError(
            "gen_mask must be True on a prefix of each row (real tokens first, then post-EOS padding); "
            "build it from the position of the first EOS, and don't left-pad the generated part."
        )
    return lengths


@jaxtyped(typechecker=typechecker)
def terminal_rewards(
    rewards: Float[Tensor, "batch"], gen_mask: Bool[Tensor, "batch gen"]
) -> Float[Tensor, "batch gen"]:
    """Per-token rewards with each row's scalar reward on its last real token.

    token_rewards[b, t] = rewards[b] if t == T_b else 0,  T_b = gen_mask[b].sum() − 1
    rewards [B], gen_mask [B, G] -> [B, G]
    """
    last = _check_gen_mask(gen_mask) - 1
    positions = torch.arange(gen_mask.shape[1], device=gen_mask.device)
    is_last = positions == last.unsqueeze(1)
    return torch.where(is_last, rewards.unsqueeze(1), torch.zeros((), dtype=rewards.dtype, device=rewards.device))


@jaxtyped(typechecker=typechecker)
def one_step_advantages(
    rewards: Float[Tensor, "batch"], values: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"]
) -> Float[Tensor, "batch gen"]:
    """One-step TD advantages with the reward only at the end.

    A_t = V_{t+1} − V_t   for t < T
    A_T = r − V_T
    A_t = 0               for t > T (padding)
    rewards [B], values [B, G], gen_mask [B, G] -> [B, G]

    This is GAE with γ = 1, λ = 0 on ``terminal_rewards(rewards, gen_mask)``.
    """
    token_rewards = terminal_rewards(rewards, gen_mask)
    zero = torch.zeros_like(values)
    # V_{t+1}, taken as 0 after the last real token: the episode has ended, and the
    # value head's output at a padding position is junk (it may even be nan).
    next_real = torch.cat([gen_mask[:, 1:], torch.zeros_like(gen_mask[:, :1])], dim=1)
    next_values = torch.where(next_real, torch.cat([values[:, 1:], zero[:, :1]], dim=1), zero)
    advantages = token_rewards + next_values - values
    return torch.where(gen_mask, advantages, zero)


@jaxtyped(typechecker=typechecker)
def gae_advantages(
    token_rewards: Float[Tensor, "batch gen"],
    values: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"],
    gamma: float,
    lam: float,
) -> tuple[Float[Tensor, "batch gen"], Float[Tensor, "batch gen"]]:
    """Generalised advantage estimation (Schulman et al. 2016), and the returns it implies.

    δ_t = r_t + γ·V_{t+1}·[t+1 real] − V_t
    A_t = δ_t + γλ·A_{t+1}·[t+1 real]
    returns_t = A_t + V_t
    token_rewards, values, gen_mask [B, G] -> (advantages [B, G], returns [B, G]), 0 on padding

    λ = 0 gives one-step TD (A_t = δ_t); λ = 1, γ = 1 gives Monte-Carlo returns
    (returns_t = Σ_{k>=t} r_k). ``token_rewards`` is usually ``terminal_rewards(...)``,
    optionally minus a per-token KL penalty.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma={gamma} and lam={lam} must both lie in [0, 1] (typical: gamma=1, lam=0.95).")
    _check_gen_mask(gen_mask)
    zero_col = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zero_col, zero_col  # beyond the last column there is nothing
    columns = []
    # Backwards over G: A_t needs A_{t+1}. G is small (tens of tokens), so a loop is clear and cheap.
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # What column t hands to column t−1: V_t and A_t if t is real, else 0 (the
        # episode ended before t; this also stops junk at padding from flowing back).
        real = gen_mask[:, t]
        next_value = torch.where(real, values[:, t], zero_col)
        next_advantage = torch.where(real, advantage, zero_col)
        columns.append(next_advantage)
    advantages = torch.stack(columns[::-1], dim=1)
    returns = torch.where(gen_mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


class RunningMoments:
    """Running mean and standard deviation of every value seen so far, batch by batch.

    Batches are merged with Chan et al.'s parallel algorithm: for counts n_a, n_b,
    means μ_a, μ_b and sums of squared deviations M_a, M_b, with δ = μ_b − μ_a,
        n = n_a + n_b,  μ = μ_a + δ·n_b/n,  M = M_a + M_b + δ²·n_a·n_b/n,
    so the result equals the mean and std of all values concatenated, without
    storing them. ``std`` is the unbiased sample std, sqrt(M/(n − 1)), like
    ``torch.std``; before two values have been seen it is 1.0 (so dividing by it
    changes nothing). Statistics are kept as Python floats (double precision).

    Attributes: ``mean``, ``std``, ``var`` (= std²), ``count``.
    Used for optional reward normalisation: (r − mean)/std, or scaling: r/std.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @jaxtyped(typechecker=typechecker)
    def update(self, x: Float[Tensor, "n"]) -> tuple[float, float]:
        """Merge the values ``x`` [n] into the running statistics; return the new (mean, std).

        Note: TRL's RunningMoments.update returns the *batch's* mean and std; this
        returns the running ones (the batch's are one ``x.mean(), x.std()`` away).
        """
        if x.numel() == 0:
            raise ValueError("RunningMoments.update got an empty tensor; pass at least one value.")
        x = x.detach().to(torch.float64)
        n_b = x.numel()
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self._m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n
        self.var = self._m2 / (n - 1) if n >= 2 else 1.0
        self.std = math.sqrt(self.var)
        return self.mean, self.std

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume exactly."""
        return {"mean": self.mean, "m2": self._m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()``."""
        self.mean = float(state["mean"])
        self._m2 = float(state["m2"])
        self.count = int(state["count"])
        self.var = self._m2 / (self.count - 1) if self.count >= 2 else 1.0
        self.std = math.sqrt(self.var)


# --------------------------------------------------------------------------- group baselines (RLOO, GRPO)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [B] as [B / k, k]: row g holds the k samples of prompt g (samples of a prompt are contiguous)."""
    if group_size < 2 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the batch ({rewards.shape[0]}): each prompt "
                         "needs at least two samples for a baseline from its group.")
    return rewards.view(-1, group_size)


@jaxtyped(typechecker=typechecker)
def rloo_advantages(rewards: Float[Tensor, "batch"], group_size: int) -> Float[Tensor, "batch"]:
    """RLOO (Ahmadian et al. 2024): each sample's baseline is the mean reward of the *other* k − 1 samples of its prompt.

    A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean_group(r))          [B] -> [B]

    Leaving the sample out keeps the baseline independent of r_i, so the gradient stays unbiased.
    """
    centred = _centred_groups(rewards, group_size)
    # The right-hand form on centred groups: a group of equal rewards gives exactly 0 in any dtype.
    return (group_size / (group_size - 1) * centred).reshape(-1)


@jaxtyped(typechecker=typechecker)
def grpo_advantages(
    rewards: Float[Tensor, "batch"], group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Float[Tensor, "batch"]:
    """GRPO (Shao et al. 2024): rewards standardised within each prompt's group of k samples.

    A_i = (r_i − mean_group(r)) / (std_group(r) + eps)     (std with Bessel's correction, as TRL)      [B] -> [B]
    Dr. GRPO (Liu et al. 2025), ``scale_by_std=False``: A_i = r_i − mean_group(r); dividing by the std
    weighs prompts whose samples barely differ (too easy or too hard) as much as informative ones.
    A group of identical rewards gets A = 0 exactly, in float32 and bfloat16 (see ``_centred_groups``: a float
    mean of k equal values is often not that value, and dividing the leftover by std + eps ≈ 1e-4 would magnify
    it 10,000×, pushing every sample of the group the same way).
    """
    centred = _centred_groups(rewards, group_size)
    if scale_by_std:
        centred = centred / (centred.std(dim=1, keepdim=True) + eps)  # std is shift-invariant: that of the rewards
    return centred.reshape(-1)


def _centred_groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [B] as [B / k, k] minus each group's mean, computed as (r − r_0) − mean(r − r_0), r_0 the group's
    first member. Equal to r − mean(r) in exact arithmetic; a group of equal rewards gives exactly 0 (r − r_0 is
    exactly 0, and so is the mean of zeros), where r − mean(r) leaves a rounding-level rest in float32 and bfloat16."""
    groups = _groups(rewards, group_size)
    shifted = groups - groups[:, :1]
    return shifted - shifted.mean(dim=1, keepdim=True)


@jaxtyped(typechecker=typechecker)
def constant_groups(rewards: Float[Tensor, "batch"], group_size: int) -> Bool[Tensor, "groups"]:
    """Which groups hold k exactly equal rewards (they get A = 0 from GRPO and RLOO, teaching nothing).    [B] -> [B/k]

    Tested by equality, not by std == 0: the float std of equal values is often a rounding-level non-zero."""
    groups = _groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1)
