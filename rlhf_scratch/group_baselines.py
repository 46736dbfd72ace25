"""RLOO and GRPO (and Dr. GRPO): k samples per prompt, each judged against the other samples of its prompt.

No value head: the baseline of a response comes from its group, the k responses sampled for the
same prompt in the same phase. One phase, on the same engine as PPO and REINFORCE::

    B / k prompts, each repeated k times ─► generate ─► sequences [B, S], gen_mask [B, G]
      ├─► policy and reference forward (no grad) ─► log π_old, log π_ref, KL_t        (policy_trainer)
      └─► reward ─► r [B];  r' = r − kl_coef · Σ_t KL_t with kl_mode="reward"        (sequence_rewards)
    RLOO:  A_i = r'_i − mean of the other k − 1 r' of its prompt                      (advantages.rloo_advantages)
           loss = −mean_b(A_b · Σ_t log π(y_{b,t}))                                   (reinforce.reinforce_loss)
    GRPO:  A_i = (r'_i − mean_group) / (std_group + eps)                             (advantages.grpo_advantages)
           objective = aggregate_t(min(ratio_t·A, clip(ratio_t)·A)) − kl_coef · aggregate_t(KL_t)
           aggregate: per-response mean, then mean over responses (GRPO);
           Dr. GRPO: no std division, Σ_t / max_new_tokens (no length bias)          (objectives.aggregate_tokens)

RLOO is REINFORCE with the leave-one-out baseline (its loss, minibatches and metrics are
``REINFORCETrainer``'s). GRPO is a clipped-ratio update like PPO's, without the value head and
with the KL as a loss term (k3, the paper's choice) by default. Outputs, resume, hooks and
``--debug`` are the shared ones of ``policy_trainer.PolicyTrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.advantages import constant_groups, grpo_advantages, rloo_advantages
from rlhf_scratch.config import PolicyTrainingConfig
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import (
    aggregate_tokens,
    clipped_surrogate_per_token,
    ppo_diagnostics,
)
from rlhf_scratch.optimization import check_finite
from rlhf_scratch.policy_trainer import PolicyTrainer, ScoredRollout, breakdown_means, run_trainer
from rlhf_scratch.reinforce import REINFORCETrainer


@dataclass
class GroupConfig(PolicyTrainingConfig):
    """What the group-baseline trainers share: k samples per prompt."""

    group_size: int = 8
    """Samples per prompt (k >= 2, must divide batch_size): the batch holds batch_size / k prompts, each k times."""
    minibatch_size: int | None = None
    """Episodes per gradient step (must divide batch_size); None: the whole batch, one step per pass."""

    def _checks(self) -> list[tuple[bool, str]]:
        mb = self.minibatch_size
        return [
            *super()._checks(),
            (self.group_size >= 2 and self.batch_size % self.group_size == 0,
             f"group_size ({self.group_size}) must be >= 2 and divide batch_size ({self.batch_size})."),
            (mb is None or (1 <= mb <= self.batch_size and self.batch_size % mb == 0),
             f"minibatch_size ({mb}) must divide batch_size ({self.batch_size}); omit it for one step per pass."),
        ]


class GroupSampling:
    """Mixin: each phase samples batch_size / k prompts and repeats each k times (a prompt's samples are contiguous)."""

    def rollout_prompts(self) -> list[list[int]]:
        """This rank's prompts: (batch_size / W) / k distinct ones, each k times; a group never spans two ranks."""
        k = self.config.group_size
        return [prompt for prompt in self.sample_prompts(self.config.batch_size // distributed.world_size() // k)
                for _ in range(k)]

    def check_batch_split(self, config) -> None:
        super().check_batch_split(config)
        local = config.batch_size // distributed.world_size()
        if local % config.group_size != 0:
            raise ValueError(f"Each rank's share of the batch ({local} = {config.batch_size} / {distributed.world_size()} "
                             f"processes) must be a multiple of group_size ({config.group_size}): a group is sampled "
                             "on one rank.")

    def group_stats(self, rewards: Tensor, advantage: Tensor) -> dict[str, float]:
        k = self.config.group_size
        within = (rewards.view(-1, k) - rewards.view(-1, k)[:, :1]).std(dim=1)  # each group's spread: the signal
        return {
            "group/reward_std": within.mean().item(),
            # groups that teach nothing: tested by equality (a float std of equal values can be a rounding-level > 0)
            "group/zero_advantage_frac": constant_groups(rewards, k).float().mean().item(),
            "group/advantage_std": advantage.std().item(),
        }


# --------------------------------------------------------------------------- RLOO


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO: REINFORCE with a leave-one-out baseline from k samples per prompt. Defaults: the built-in task."""

    lr: float = 3e-4
    """Peak learning rate (one step per phase by default, as REINFORCE)."""


class RLOOTrainer(GroupSampling, REINFORCETrainer):
    """REINFORCE whose baseline is each response's leave-one-out group mean (``advantages.rloo_advantages``)::

        trainer = RLOOTrainer(RLOOConfig(phases=3))
        memory = trainer.rollout_phase()        # advantages = r'_i − mean of the other k − 1, on every real token
        trainer.learning_phase(memory)
    """

    title = "RLOO"
    kind = "rloo"

    def init_algorithm_state(self) -> None:
        """No state: the baseline comes from the phase's own samples."""

    def algorithm_state(self) -> dict:
        return {}

    def load_algorithm_state(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        shaped = self.sequence_rewards(rollout)
        advantage = rloo_advantages(shaped, self.config.group_size)
        stats = {"reinforce/shaped_reward": shaped.mean().item(), **self.group_stats(shaped, advantage)}
        return self.memory_with_sequence_advantages(rollout, advantage), stats


# --------------------------------------------------------------------------- GRPO


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO (and Dr. GRPO with --dr-grpo): group-standardised advantages and a clipped ratio. Defaults: the built-in task."""

    lr: float = 1e-4
    """Peak learning rate."""
    minibatch_size: int | None = 16
    """Episodes per gradient step (must divide batch_size); None: the whole batch."""
    epochs: int = 1
    """Passes over each phase's samples (μ in the paper); the ratio differs from 1 from the second step on."""
    clip_coef: float = 0.2
    """ε of the clipped ratio."""
    kl_mode: Literal["reward", "loss"] = "loss"
    """"loss" (GRPO): kl_coef · KL is a loss term; "reward": −kl_coef · Σ_t KL_t is subtracted from the reward."""
    kl_estimator: Literal["exact", "k1", "k3"] = "k3"
    """Per-token KL: "k3" (r−1) − log r, the paper's choice; "k1" log π − log π_ref; "exact" the full distribution."""
    kl_coef: float = 0.04
    """β, the weight of the KL to the reference (0.04 in the paper)."""
    dr_grpo: bool = False
    """Dr. GRPO: A = r − mean_group (no division by the std) and token sums divided by max_new_tokens
    (no per-response length normalisation)."""
    advantage_eps: float = 1e-4
    """eps in (r − mean) / (std + eps)."""

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}."),
            (self.clip_coef > 0, f"clip_coef must be > 0, got {self.clip_coef}."),
            (self.advantage_eps > 0, f"advantage_eps must be > 0, got {self.advantage_eps}."),
        ]


class GRPOTrainer(GroupSampling, PolicyTrainer):
    """GRPO on a TransformerLens policy, sharing the sampler, reward, outputs and checkpoints of PPO::

        trainer = GRPOTrainer(GRPOConfig(phases=3))          # GRPOConfig(dr_grpo=True): Dr. GRPO
        memory = trainer.rollout_phase()        # advantages = group-standardised r', on every real token
        trainer.learning_phase(memory)          # one clipped-ratio step per minibatch
    """

    title = "GRPO"
    kind = "grpo"

    @property
    def aggregation(self) -> str:
        return "constant" if self.config.dr_grpo else "sequence-mean"

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        config = self.config
        shaped = self.sequence_rewards(rollout)
        advantage = grpo_advantages(shaped, config.group_size, scale_by_std=not config.dr_grpo, eps=config.advantage_eps)
        return self.memory_with_sequence_advantages(rollout, advantage), self.group_stats(shaped, advantage)

    def compute_losses(self, minibatch: ReplayMemory) -> tuple[dict[str, Tensor], Tensor]:
        """The clipped surrogate and the KL term, each aggregated over tokens as GRPO (or Dr. GRPO) does; the new
        log-probs (detached)."""
        config = self.config
        mask = minibatch.gen_mask
        logits = self.learning_forward(minibatch).logits
        logits_gen, _, logprobs = self.generated_logprobs(logits, minibatch.sequences, minibatch.prompt_len)

        def aggregate(per_token: Tensor) -> Tensor:
            return aggregate_tokens(per_token, mask, self.aggregation, config.sampling.max_new_tokens)

        surrogate = clipped_surrogate_per_token(logprobs, minibatch.logprobs, minibatch.advantages, mask, config.clip_coef)
        terms = {"surrogate": aggregate(surrogate), "kl_penalty": torch.zeros((), device=logprobs.device)}
        if config.kl_mode == "loss":
            kl = self.per_token_kl(logprobs, minibatch.ref_logprobs, logits_gen, minibatch.ref_logits_gen)
            terms["kl_penalty"] = self.kl_controller.value * aggregate(kl)
        # Both are means over responses: a piece of a minibatch (a rank's slice, a micro-batch) gives its share.
        terms = {name: self.row_share(value, minibatch) for name, value in terms.items()}
        for name, value in terms.items():
            check_finite(name, value, self.nonfinite_hint)
        terms["loss"] = -(terms["surrogate"] - terms["kl_penalty"])
        diagnostics = ppo_diagnostics(logprobs.detach(), minibatch.logprobs, mask, config.clip_coef)
        terms.update({f"diag/{k}": v if k.endswith("_max") else self.token_share(v, minibatch) for k, v in diagnostics.items()})
        return terms, logprobs.detach()

    def minibatches(self, memory: ReplayMemory):
        """``epochs`` passes over the batch, each in a fresh shuffle (advantages were computed per group before)."""
        return self.shuffled_minibatches(memory, self.config.minibatch_size or len(memory), self.config.epochs)

    def learning_metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """PPO's metric names where they apply."""
        metrics = breakdown_means(breakdown, {
            "losses/policy": "surrogate", "losses/kl_penalty": "kl_penalty", "losses/total": "loss",
            "losses/clipfrac": "diag/clipfrac", "losses/approx_kl": "diag/approx_kl", "losses/grad_norm": "grad_norm",
        })
        return {**metrics, "losses/policy": -metrics["losses/policy"]}  # the surrogate is maximised


def run_rloo(config: RLOOConfig) -> dict:
    return run_trainer(RLOOTrainer, config)


def run_grpo(config: GRPOConfig) -> dict:
    return run_trainer(GRPOTrainer, config)
