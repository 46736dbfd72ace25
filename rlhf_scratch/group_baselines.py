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

RLOO is REINFORCE with the leave-one-out baseline: it shares REINFORCE's update (``reinforce.ReinforceUpdate``:
minibatches, the loss ``reinforce_terms``, total, metrics) and has its own ``build_memory``. GRPO is a clipped-ratio update like PPO's, without
the value head and with the KL as a loss term (k3, the paper's choice) by default. Both are values plugged
into the one loop (``policy_trainer.PolicyTrainer``): outputs, resume, hooks and ``--debug`` are shared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_scratch.advantages import constant_groups, grpo_advantages, rloo_advantages
from rlhf_scratch.algorithm import (
    CriticFree,
    LearningPass,
    breakdown_means,
    memory_with_sequence_advantages,
    sequence_rewards,
    shuffled_minibatches,
)
from rlhf_scratch.algorithm_configs import GRPOConfig, GroupConfig, RLOOConfig  # noqa: F401 (defined there: importable without torch)
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import aggregate_tokens, clipped_surrogate_per_token, per_token_kl
from rlhf_scratch.policy_trainer import PolicyTrainer, run_trainer
from rlhf_scratch.reinforce import ReinforceUpdate
from rlhf_scratch.rollout import ScoredRollout


def group_stats(rewards: Tensor, advantage: Tensor, group_size: int) -> dict[str, float]:
    """The group metrics: the mean within-group reward spread, the share of groups whose rewards are all equal (they
    teach nothing), and the advantages' spread."""
    k = group_size
    within = (rewards.view(-1, k) - rewards.view(-1, k)[:, :1]).std(dim=1)  # each group's spread: the signal
    return {
        "group/reward_std": within.mean().item(),
        # groups that teach nothing: tested by equality (a float std of equal values can be a rounding-level > 0)
        "group/zero_advantage_frac": constant_groups(rewards, k).float().mean().item(),
        "group/advantage_std": advantage.std().item(),
    }


class GroupAlgorithm(CriticFree):
    """What the group-baseline algorithms share: k samples per prompt (the trainer samples batch_size / k prompts and
    repeats each k times, contiguously), no value head, no state of their own."""

    def __init__(self, config: GroupConfig):
        self.config = config
        self.group_size = config.group_size

    def state_dict(self) -> dict:
        """No state: the baseline comes from the phase's own samples."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------- RLOO


class RLOO(ReinforceUpdate, GroupAlgorithm):
    """REINFORCE whose baseline is each response's leave-one-out group mean (``advantages.rloo_advantages``); the
    update (minibatches, loss, total, metrics) is REINFORCE's (``reinforce.ReinforceUpdate``)."""

    title, kind = "RLOO", "rloo"

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout, kl_coef: float) -> tuple[ReplayMemory, dict[str, float]]:
        shaped = sequence_rewards(self.config, kl_coef, rollout)
        advantage = rloo_advantages(shaped, self.config.group_size)
        stats = {"reinforce/shaped_reward": shaped.mean().item(), **group_stats(shaped, advantage, self.group_size)}
        return memory_with_sequence_advantages(self.config, rollout, advantage), stats


class RLOOTrainer(PolicyTrainer):
    """RLOO on a TransformerLens policy::

        trainer = RLOOTrainer(RLOOConfig(phases=3))
        memory = trainer.rollout_phase()        # advantages = r'_i − mean of the other k − 1, on every real token
        trainer.learning_phase(memory)
    """

    algorithm_class = RLOO


# --------------------------------------------------------------------------- GRPO


class GRPO(GroupAlgorithm):
    """Group-standardised advantages and a clipped ratio, each term aggregated over tokens as GRPO (or Dr. GRPO) does."""

    title, kind = "GRPO", "grpo"
    clipped = True
    share = {"surrogate": "rows", "kl_penalty": "rows"}
    """Both are means over responses: a piece of a minibatch (a rank's slice, a micro-batch) gives its share."""

    @property
    def aggregation(self) -> str:
        return "constant" if self.config.dr_grpo else "sequence-mean"

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout, kl_coef: float) -> tuple[ReplayMemory, dict[str, float]]:
        config = self.config
        shaped = sequence_rewards(config, kl_coef, rollout)
        advantage = grpo_advantages(shaped, config.group_size, scale_by_std=not config.dr_grpo, eps=config.advantage_eps)
        return memory_with_sequence_advantages(config, rollout, advantage), group_stats(shaped, advantage, self.group_size)

    def minibatches(self, memory: ReplayMemory, generator: torch.Generator):
        """``epochs`` passes over the batch, each in a fresh shuffle (advantages were computed per group before)."""
        return shuffled_minibatches(memory, self.config.minibatch_size or len(memory), self.config.epochs, generator)

    def loss(self, learning_pass: LearningPass, minibatch: ReplayMemory, kl_coef: float) -> dict[str, Tensor]:
        """The clipped surrogate and the KL term, each aggregated over tokens as GRPO (or Dr. GRPO) does."""
        config, mask, logprobs = self.config, minibatch.gen_mask, learning_pass.logprobs

        def aggregate(per_token: Tensor) -> Tensor:
            return aggregate_tokens(per_token, mask, self.aggregation, config.sampling.max_new_tokens)

        surrogate = clipped_surrogate_per_token(logprobs, minibatch.logprobs, minibatch.advantages, mask, config.clip_coef)
        terms = {"surrogate": aggregate(surrogate), "kl_penalty": torch.zeros((), device=logprobs.device)}
        if config.kl_mode == "loss":
            kl = per_token_kl(config.kl_estimator, logprobs, minibatch.ref_logprobs, learning_pass.logits_gen,
                              minibatch.ref_logits_gen)
            terms["kl_penalty"] = kl_coef * aggregate(kl)
        return terms

    @staticmethod
    def total(terms: dict[str, Tensor]) -> Tensor:
        return -(terms["surrogate"] - terms["kl_penalty"])

    def metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """PPO's metric names where they apply."""
        metrics = breakdown_means(breakdown, {
            "losses/policy": "surrogate", "losses/kl_penalty": "kl_penalty", "losses/total": "loss",
            "losses/clipfrac": "diag/clipfrac", "losses/approx_kl": "diag/approx_kl", "losses/grad_norm": "grad_norm",
        })
        return {**metrics, "losses/policy": -metrics["losses/policy"]}  # the surrogate is maximised


class GRPOTrainer(PolicyTrainer):
    """GRPO on a TransformerLens policy, sharing the sampler, reward, outputs and checkpoints of PPO::

        trainer = GRPOTrainer(GRPOConfig(phases=3))          # GRPOConfig(dr_grpo=True): Dr. GRPO
        memory = trainer.rollout_phase()        # advantages = group-standardised r', on every real token
        trainer.learning_phase(memory)          # one clipped-ratio step per minibatch
    """

    algorithm_class = GRPO


def run_rloo(config: RLOOConfig) -> dict:
    return run_trainer(RLOOTrainer, config)


def run_grpo(config: GRPOConfig) -> dict:
    return run_trainer(GRPOTrainer, config)
