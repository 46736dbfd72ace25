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
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor

from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import masked_sequence_sum
from rlhf_scratch.optimization import check_finite
from rlhf_scratch.policy_trainer import PolicyTrainer, ScoredRollout, breakdown_means, run_trainer
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


class REINFORCETrainer(PolicyTrainer):
    """REINFORCE on a TransformerLens policy, sharing PPO's sampler, reward, outputs and checkpoints.

    ::

        trainer = REINFORCETrainer(REINFORCEConfig(phases=3))
        memory = trainer.rollout_phase()        # ReplayMemory: advantages = r' − b on every real token
        stats = trainer.learning_phase(memory)  # one dict of loss terms per minibatch
        trainer.train()                         # or all phases with logging and outputs
    """

    title = "REINFORCE"
    kind = "reinforce"
    saves_value_head = False

    def init_algorithm_state(self) -> None:
        self.baseline = MovingAverageBaseline(self.config.baseline, self.config.baseline_decay)

    def algorithm_state(self) -> dict:
        return {"baseline": self.baseline.state_dict()}

    def load_algorithm_state(self, state: dict) -> None:
        self.baseline.load_state_dict(state["baseline"])

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        """Advantages A = r' − b (the baseline before this batch) on every real token, then update b.

        r' = r − kl_coef·Σ_t KL_t with kl_mode="reward", else r. The first batch, with no
        earlier rewards, uses its own mean as b. ``values`` and ``returns`` are zeros (no critic).
        """
        shaped = self.sequence_rewards(rollout)
        baseline = self.baseline.value if self.baseline.value is not None else shaped.mean().item()
        advantage = shaped - baseline
        self.baseline.update(shaped)
        stats = {
            "reinforce/baseline": baseline,
            "reinforce/shaped_reward": shaped.mean().item(),
            "reinforce/advantage_std": advantage.std().item() if len(advantage) > 1 else 0.0,
        }
        return self.memory_with_sequence_advantages(rollout, advantage), stats

    def compute_losses(self, minibatch: ReplayMemory) -> tuple[dict[str, Tensor], Tensor]:
        """The REINFORCE loss (and the KL term with kl_mode="loss") on one minibatch, with grad; and the
        new log-probs (detached)."""
        mask = minibatch.gen_mask
        logits = self.learning_forward(minibatch).logits
        logits_gen, _, logprobs = self.generated_logprobs(logits, minibatch.sequences, minibatch.prompt_len)
        # Every real token of a row carries the row's advantage; read it back as one number per row.
        advantages = minibatch.advantages.sum(1) / mask.sum(1).clamp(min=1)
        # A mean over rows and a mean over real tokens: a piece of a minibatch gives its share of each.
        terms = {"policy_loss": self.row_share(reinforce_loss(masked_sequence_sum(logprobs, mask), advantages), minibatch)}
        terms["kl_penalty"] = self.token_share(self.kl_loss_term(logprobs, logits_gen, minibatch),
                                               minibatch)
        for name, value in terms.items():
            check_finite(name, value, self.nonfinite_hint)
        terms["loss"] = terms["policy_loss"] + terms["kl_penalty"]
        return terms, logprobs.detach()

    def minibatches(self, memory: ReplayMemory):
        """One pass over the batch in shuffled minibatches (the whole batch unless --minibatch-size)."""
        return self.shuffled_minibatches(memory, self.config.minibatch_size or len(memory), 1)

    def learning_metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """PPO's metric names where they apply (losses/policy, losses/kl_penalty, ...)."""
        return breakdown_means(breakdown, {"losses/policy": "policy_loss", "losses/kl_penalty": "kl_penalty",
                                           "losses/total": "loss", "losses/grad_norm": "grad_norm"})


def run_reinforce(config: REINFORCEConfig) -> dict:
    return run_trainer(REINFORCETrainer, config)
