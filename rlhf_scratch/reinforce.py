"""REINFORCE with a moving-average baseline: the simplest policy gradient, on the same engine as PPO.

One phase::

    prompts ─► generate ─► sequences [B, S], gen_mask [B, G]          (policy_trainer.sample_and_score:
      ├─► policy and reference forward (no grad) ─► log-probs, KL_t    the same sampler, reward and
      └─► reward on decoded text ─► r [B]                              statistics as PPO)
    r' = r − kl_coef · Σ_t KL_t          (kl_mode="reward"; "loss" adds kl_coef·mean KL_t to the loss instead)
    A  = r' − b                          b: the moving average of the r' of *earlier* phases
    loss = −mean_b( A_b · Σ_t log π(y_{b,t}) ) over real generated tokens ─► one AdamW step per minibatch
    b ← update with this phase's r'

The gradient of the loss is −mean_b A_b ∇ log π(y_b): a sample with a reward above the
baseline has its log-probability raised, one below lowered. The baseline does not bias the
gradient (E[∇ log π(y)] = 0) but reduces its variance. There is no value head, no ratio, no
clipping and no reuse of samples: each phase's batch gives ``batch_size / minibatch_size``
steps (one by default).

Logging, samples, resumable checkpoints (``checkpoint/``, no value head; the baseline is kept),
``--debug`` invariants, forward hooks and ``summary.json`` keys are those of PPO (``policy_trainer.PolicyTrainer``).
``ReinforceUpdate`` is the update (minibatches, the loss ``reinforce_terms``, total, metrics) without the baseline:
RLOO (``group_baselines.RLOO``) shares it with its own advantages.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor

from rlhf_scratch.algorithm import (
    CriticFree,
    LearningPass,
    breakdown_means,
    kl_loss_term,
    memory_with_sequence_advantages,
    sequence_rewards,
    shuffled_minibatches,
)
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import masked_sequence_sum
from rlhf_scratch.policy_trainer import PolicyTrainer, run_trainer
from rlhf_scratch.rollout import ScoredRollout
from rlhf_scratch.typecheck import typechecker
from rlhf_scratch.algorithm_configs import REINFORCEConfig  # noqa: F401 (defined there: importable without torch)


class MovingAverageBaseline:
    """A running average of past rewards, the baseline b of REINFORCE.

    mode "mean":  after batches r^(1..k) of sizes n_1..n_k,  b = Σ_j Σ_i r^(j)_i / Σ_j n_j
    mode "ema":   b ← r̄^(1) after the first batch, then b ← decay·b + (1 − decay)·r̄^(k)
                  (r̄^(k) the mean of batch k)
    ``value`` is None before the first update.
    """

    def __init__(self, mode: Literal["mean", "ema"] = "mean", decay: float = 0.9):
        if mode not in ("mean", "ema"):
            raise ValueError(f"baseline mode must be 'mean' or 'ema', got {mode!r}.")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.mode, self.decay = mode, decay
        self.value: float | None = None
        self.count = 0

    @jaxtyped(typechecker=typechecker)
    def update(self, rewards: Float[Tensor, "batch"]) -> float:
        """Fold a batch of rewards [B] into the average; returns the new value."""
        batch_mean, n = rewards.double().mean().item(), rewards.numel()
        if self.value is None:
            self.value = batch_mean
        elif self.mode == "mean":
            self.value = (self.value * self.count + batch_mean * n) / (self.count + n)
        else:
            self.value = self.decay * self.value + (1 - self.decay) * batch_mean
        self.count += n
        return self.value

    def state_dict(self) -> dict:
        """Everything needed to resume exactly."""
        return {"mode": self.mode, "decay": self.decay, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.mode, self.decay = state["mode"], float(state["decay"])
        self.value = None if state["value"] is None else float(state["value"])
        self.count = int(state["count"])


@jaxtyped(typechecker=typechecker)
def reinforce_loss(seq_logprobs: Float[Tensor, "batch"], advantages: Float[Tensor, "batch"]) -> Float[Tensor, ""]:
    """REINFORCE loss, to be *minimised*.

    loss = −(1/B) Σ_b A_b · log π(y_b),   A_b = r_b − b (a constant: no gradient flows through it)
    seq_logprobs [B] (Σ_t log π(y_t), with grad), advantages [B] -> []

    ∂loss/∂ log π(y_b) = −A_b / B: gradient descent raises log π(y_b) when A_b > 0 and lowers it when A_b < 0.
    """
    return -(advantages.detach() * seq_logprobs).mean()


def reinforce_terms(learning_pass: LearningPass, minibatch: ReplayMemory, config, kl_coef: float) -> dict[str, Tensor]:
    """The REINFORCE loss (and the KL term with kl_mode="loss") on one minibatch, with grad: ``policy_loss`` a mean
    over responses (``reinforce_loss`` of Σ_t log π(y_t) and the advantage each real token of a row carries),
    ``kl_penalty`` a mean over real tokens."""
    mask = minibatch.gen_mask
    # Every real token of a row carries the row's advantage; read it back as one number per row.
    advantages = minibatch.advantages.sum(1) / mask.sum(1).clamp(min=1)
    return {"policy_loss": reinforce_loss(masked_sequence_sum(learning_pass.logprobs, mask), advantages),
            "kl_penalty": kl_loss_term(config, kl_coef, learning_pass, minibatch)}


REINFORCE_SHARE = {"policy_loss": "rows", "kl_penalty": "tokens"}
"""A mean over rows and a mean over real tokens: a piece of a minibatch gives its share of each."""
REINFORCE_METRICS = {"losses/policy": "policy_loss", "losses/kl_penalty": "kl_penalty", "losses/total": "loss",
                     "losses/grad_norm": "grad_norm"}
"""PPO's metric names where they apply (losses/policy, losses/kl_penalty, ...)."""


class ReinforceUpdate:
    """REINFORCE's update, for any algorithm whose ``build_memory`` puts one advantage per response on its real tokens
    (REINFORCE here, RLOO in ``group_baselines``): one pass over the batch in shuffled minibatches, the loss
    ``reinforce_terms``, total = policy_loss + kl_penalty, PPO's metric names. Uses ``self.config``."""

    clipped = False
    share = REINFORCE_SHARE

    def minibatches(self, memory: ReplayMemory, generator: torch.Generator):
        """One pass over the batch in shuffled minibatches (the whole batch unless --minibatch-size)."""
        return shuffled_minibatches(memory, self.config.minibatch_size or len(memory), 1, generator)

    def loss(self, learning_pass: LearningPass, minibatch: ReplayMemory, kl_coef: float) -> dict[str, Tensor]:
        """``reinforce_terms`` with the advantages ``build_memory`` stored."""
        return reinforce_terms(learning_pass, minibatch, self.config, kl_coef)

    @staticmethod
    def total(terms: dict[str, Tensor]) -> Tensor:
        return terms["policy_loss"] + terms["kl_penalty"]

    def metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        return breakdown_means(breakdown, REINFORCE_METRICS)


class REINFORCE(ReinforceUpdate, CriticFree):
    """REINFORCE with a moving-average baseline: A = r' − b, the baseline b of earlier phases (module docstring)."""

    title, kind = "REINFORCE", "reinforce"
    group_size = 1

    def __init__(self, config: REINFORCEConfig):
        self.config = config
        self.baseline = MovingAverageBaseline(config.baseline, config.baseline_decay)

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout, kl_coef: float) -> tuple[ReplayMemory, dict[str, float]]:
        """Advantages A = r' − b (the baseline before this batch) on every real token, then update b.

        r' = r − kl_coef·Σ_t KL_t with kl_mode="reward", else r. The first batch, with no
        earlier rewards, uses its own mean as b. ``values`` and ``returns`` are zeros (no critic).
        """
        shaped = sequence_rewards(self.config, kl_coef, rollout)
        baseline = self.baseline.value if self.baseline.value is not None else shaped.mean().item()
        advantage = shaped - baseline
        self.baseline.update(shaped)
        stats = {
            "reinforce/baseline": baseline,
            "reinforce/shaped_reward": shaped.mean().item(),
            "reinforce/advantage_std": advantage.std().item() if len(advantage) > 1 else 0.0,
        }
        return memory_with_sequence_advantages(self.config, rollout, advantage), stats

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state["baseline"])


class REINFORCETrainer(PolicyTrainer):
    """REINFORCE on a TransformerLens policy, sharing PPO's sampler, reward, outputs and checkpoints.

    ::

        trainer = REINFORCETrainer(REINFORCEConfig(phases=3))
        memory = trainer.rollout_phase()        # ReplayMemory: advantages = r' − b on every real token
        stats = trainer.learning_phase(memory)  # one dict of loss terms per minibatch
        trainer.train()                         # or all phases with logging and outputs
    """

    algorithm_class = REINFORCE


def run_reinforce(config: REINFORCEConfig) -> dict:
    return run_trainer(REINFORCETrainer, config)
