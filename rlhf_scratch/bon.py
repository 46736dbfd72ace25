"""Best-of-n: sample n responses per prompt from the reference model, score all, keep the best.

The distribution of best-of-n, exactly (ties broken uniformly at random). Let R be the reward
of a draw y ~ π, F(r) = P(R <= r), F⁻(r) = P(R < r) and q(r) = P(R = r) = F(r) − F⁻(r). The
best of n i.i.d. draws has reward r with probability F(r)^n − F⁻(r)^n; among draws that tie at
r, the kept one is any of them with equal chance, so given its reward r it is distributed as
π(· | R = r). Hence

    π_bon(y) = π(y) · (F(r)^n − F⁻(r)^n) / q(r),     r = reward(y)

and the ratio π_bon/π depends on y only through its reward, so KL(π_bon ‖ π) equals the KL
between the two *reward* distributions. When no two outcomes share a reward and each has
vanishing probability, the ratio is n·F(r)^(n−1) and the KL is exactly log n − (n−1)/n
(0.636 nats at n = 4); in general that value is an upper bound (Beirami et al. 2024,
"Theoretical guarantees on the best-of-n alignment policy"), strictly above the KL when the
reward has atoms (ties).

What ``BestOfNSampler`` reports as the KL of best-of-n around a language model: the policy
has no per-token log-probability of its own, so the issue's estimator Σ_t log π(y_t) −
log π_ref(y_t) cannot be evaluated directly. Since log π_bon(y) − log π_ref(y) =
log[(F^n − F⁻^n)/q](r(y)) is a function of the reward's distribution under the reference, we
estimate that distribution per prompt from a pool of M i.i.d. reference samples (the n
candidates plus M − n more; M = ``pool_size``, default 4n) and report, per prompt, the exact
KL of best-of-n from that empirical reward distribution (``plugin_best_of_n_kl``); the table's
``kl`` is its mean over prompts with the standard error across prompts, next to the bound
``kl_bound`` = log n − (n−1)/n. The plug-in value never exceeds the bound. It handles ties
exactly; for a reward with no ties it is slightly low because M samples discretise the
distribution: with M distinct rewards it equals Σ_k p_k log(M p_k), p_k = (k/M)^n − ((k−1)/M)^n,
e.g. 0.633 instead of 0.636 at n = 4, M = 16 and 1.833 instead of 1.835 at n = 16, M = 64.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.evaluation import EvalSamples
from rlhf_scratch.models import check_fwd_hooks
from rlhf_scratch.rewards import score_texts
from rlhf_scratch.sampling import SamplingConfig, generate
from rlhf_scratch.ties import merge_near_ties
from rlhf_scratch.typecheck import typechecker


def best_of_n_kl_bound(n: int) -> float:
    """log n − (n − 1)/n: KL(π_bon ‖ π) without ties, an upper bound in general (nats)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


@jaxtyped(typechecker=typechecker)
def best_of_n_distribution(rewards: Float[Tensor, "k"], probs: Float[Tensor, "k"], n: int) -> Float[Tensor, "k"]:
    """Exact distribution of the best of n i.i.d. draws from a discrete distribution, ties broken at random.

    π_bon(y) = π(y) · (F(r_y)^n − F⁻(r_y)^n) / q(r_y)
    F(r) = Σ_{z: r_z <= r} π(z),  F⁻(r) = Σ_{z: r_z < r} π(z),  q(r) = F(r) − F⁻(r)
    rewards, probs [K] (outcome y has reward rewards[y] and probability probs[y]) -> [K]

    Outcomes may share a reward (ties); an outcome with probability 0 gets 0. ``probs`` must
    sum to 1. Computed in float64 (F^n − F⁻^n loses digits when F⁻ is close to F).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if (probs < 0).any() or abs(probs.double().sum().item() - 1) > 1e-6:
        raise ValueError(f"probs must be a probability vector (>= 0, sum 1); they sum to {probs.double().sum().item()}.")
    r, p = rewards.double(), probs.double()
    at_or_below = r[None, :] <= r[:, None]  # [K, K]: outcome z (column) has reward <= that of y (row)
    below = r[None, :] < r[:, None]
    F = (p[None, :] * at_or_below).sum(1)
    F_minus = (p[None, :] * below).sum(1)
    q = F - F_minus
    ratio = torch.where(q > 0, (F**n - F_minus**n) / q.clamp(min=1e-300), torch.zeros_like(q))
    return (p * ratio).to(probs.dtype)


@jaxtyped(typechecker=typechecker)
def kl_divergence(p: Float[Tensor, "k"], q: Float[Tensor, "k"]) -> Float[Tensor, ""]:
    """KL(p ‖ q) = Σ_i p_i log(p_i / q_i) over i with p_i > 0 (nats); [K], [K] -> []."""
    p64, q64 = p.double(), q.double()
    terms = torch.where(p64 > 0, p64 * (p64.clamp(min=1e-300).log() - q64.clamp(min=1e-300).log()), torch.zeros_like(p64))
    return terms.sum().to(p.dtype)


@jaxtyped(typechecker=typechecker)
def best_of_n_kl(rewards: Float[Tensor, "k"], probs: Float[Tensor, "k"], n: int) -> Float[Tensor, ""]:
    """Exact KL(π_bon ‖ π) of best-of-n from a discrete distribution (ties handled).

    KL = Σ_y π_bon(y) · log(π_bon(y) / π(y)),  π_bon = best_of_n_distribution(rewards, probs, n)
    rewards, probs [K] -> []. Never above ``best_of_n_kl_bound(n)``.
    """
    return kl_divergence(best_of_n_distribution(rewards, probs, n), probs)


@jaxtyped(typechecker=typechecker)
def plugin_best_of_n_kl(pool_rewards: Float[Tensor, "m"], n: int) -> Float[Tensor, ""]:
    """KL of best-of-n estimated from the rewards of M i.i.d. reference samples for one prompt.

    KL̂ = best_of_n_kl(pool_rewards, [1/M] * M, n)      [M] -> []

    i.e. the exact KL of best-of-n when the reward distribution is the pool's empirical one
    (equal rewards are ties). Consistent as M grows; see the module docstring for its small
    downward bias on rewards without ties.
    """
    m = pool_rewards.shape[0]
    return best_of_n_kl(pool_rewards, torch.full((m,), 1.0 / m, dtype=pool_rewards.dtype), n)


@jaxtyped(typechecker=typechecker)
def select_best(rewards: Float[Tensor, "prompts n"]) -> Int[Tensor, "prompts"]:
    """Column of the highest reward in each row: best[i] = argmax_j rewards[i, j]      [P, n] -> [P]

    Ties go to the first tied column; since the n candidates are i.i.d., that is a uniformly
    random one of the tied candidates, as ``best_of_n_distribution`` assumes.
    """
    return rewards.argmax(dim=1)


class BestOfNSampler:
    """Best-of-n around a model: n candidates per prompt from ``reference``, the highest-reward one kept.

    ``kl_terms`` are one ``plugin_best_of_n_kl`` per prompt, from a pool of ``pool_size`` reference
    samples (the n candidates first, then more); ``kl_bound`` = log n − (n−1)/n.
    """

    def __init__(self, reference, n: int, sampling: SamplingConfig = SamplingConfig(), pool_size: int | None = None,
                 name: str | None = None, fwd_hooks: list | tuple = ()):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        pool_size = 4 * n if pool_size is None else pool_size
        if pool_size < n:
            raise ValueError(f"pool_size ({pool_size}) must be >= n ({n}): the n candidates are part of the pool.")
        self.reference = reference
        self.n = n
        self.sampling = sampling
        self.pool_size = pool_size
        self.name = name or f"best-of-{n}"
        self.fwd_hooks = check_fwd_hooks(reference, fwd_hooks) if fwd_hooks else []  # names that run, or a clear error
        self.rows_per_prompt = pool_size
        self.kl_bound = best_of_n_kl_bound(n)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], reward, generator: torch.Generator) -> EvalSamples:

        m = self.pool_size
        expanded = [prompt for prompt in prompts for _ in range(m)]
        generation = generate(self.reference, expanded, self.sampling, generator=generator, fwd_hooks=self.fwd_hooks)
        pool = score_texts(reward, generation.texts, generation.prompts).view(len(prompts), m)
        tied = merge_near_ties(pool.double())  # rounding-level differences are ties: the same choice on every CPU
        best = select_best(tied[:, : self.n])
        rows = (torch.arange(len(prompts)) * m + best.cpu()).tolist()
        kl_terms = torch.stack([plugin_best_of_n_kl(tied[i], self.n) for i in range(len(prompts))]).float()
        return EvalSamples.from_generation(generation, pool.flatten(), kl_terms=kl_terms, rows=rows)


# --------------------------------------------------------------------------- command
