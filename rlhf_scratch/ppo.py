"""PPO: the algorithm (a value: advantages, a pure loss, metrics, its state), its trainer, and the command.

The loop it runs in is ``policy_trainer.PolicyTrainer``; its config is ``algorithm_configs.PPOConfig``.

One phase, step by step (every arrow is a plain call you can step into)::

    prompts ─► generate (KV cache) ─► sequences [B, S], attention_mask [B, S], gen_mask [B, G]
      ├─► policy forward (no grad) ─► logprobs [B, G] (at the sampling temperature), values [B, G]
      ├─► reference forward (no grad) ─► ref_logprobs [B, G]  (+ ref logits [B, G, V] only if needed)
      └─► reward on decoded text ─► rewards [B]
    token rewards [B, G] = reward at the last real token (− kl_coef·KL_t per token, if kl_mode="reward")
    GAE(γ, λ) ─► advantages, returns [B, G] ─► ReplayMemory
    for each shuffled minibatch (ppo_epochs passes):
        policy forward with the value hook ─► objective = surrogate − value loss + entropy bonus
        (− kl_coef·KL if kl_mode="loss") ─► backward, clip grad norm, AdamW step
    scheduler step (once per phase), KL controller update

Index convention: generated token i sits at column P + i, its log-prob comes from the
logits at column P − 1 + i, and ``values[:, i]`` (read at the same column P − 1 + i) is
the value of the state in which token i is chosen.

This module supplies the PPO parts (``PPO``): ``build_memory`` (reward shaping, GAE) and ``loss`` (the
objective's terms). Shared with every algorithm: the rollout (``rollout.py``), the learner (``learner.py``), the
loop, hooks, ``--debug`` invariants, outputs, checkpoints and ``PPOTrainer.resume(config)`` (``policy_trainer.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlhf_scratch.advantages import RunningMoments, gae_advantages, terminal_rewards
from rlhf_scratch.algorithm import LearningPass, breakdown_means, kl_loss_term, shuffled_minibatches
from rlhf_scratch.algorithm_configs import PPOConfig, preset_configs  # noqa: F401 (defined there: importable without torch)
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import calc_clipped_surrogate, calc_entropy_bonus_from_logprobs, calc_value_loss, masked_whiten
from rlhf_scratch.optimization import NonFiniteLossError  # noqa: F401 (re-exported)
from rlhf_scratch.policy_trainer import PolicyTrainer, run_trainer
from rlhf_scratch.rollout import ScoredRollout, keeps_ref_logits


class PPO:
    """The PPO algorithm: GAE advantages from the value head, the clipped surrogate, the value loss and the entropy
    bonus (module docstring). Its state: the running reward moments of ``normalize_rewards``."""

    title, kind = "PPO", "ppo"
    saves_value_head = True
    clipped = True
    group_size = 1
    share = {"surrogate": "tokens", "value_loss": "tokens", "entropy_bonus": "tokens", "kl_penalty": "tokens"}
    """Every term is a mean over real tokens: a piece of a minibatch (a rank's slice, a micro-batch) gives its share."""
    nonfinite_hint = ("Lower the learning rate, check the reward for extreme values, "
                      "or clip the value loss (--clip-range-value).")

    def __init__(self, config: PPOConfig):
        self.config = config
        self.reward_moments = RunningMoments()
        """Running statistics of the task rewards (used with normalize_rewards); kept in checkpoints."""

    def param_groups(self, policy) -> list[dict]:
        """The trunk at ``lr``, the value head at ``head_lr``."""
        return [{"params": policy.trunk_parameters(), "lr": self.config.lr},
                {"params": policy.head_parameters(), "lr": self.config.head_lr}]

    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout, kl_coef: float) -> tuple[ReplayMemory, dict[str, float]]:
        """Token rewards (the task reward at the last real token, optionally with no_eos_penalty and normalised;
        − kl_coef·KL_t per token with kl_mode="reward"), then GAE(γ, λ): advantages and returns [B, G]."""
        config = self.config
        gen_mask = rollout.gen_mask
        task_rewards = rollout.rewards.clone()
        if config.no_eos_penalty is not None:
            task_rewards = torch.where(rollout.generation.ended_with_eos.to(config.device), task_rewards, config.no_eos_penalty)
        if config.normalize_rewards:
            _, std = self.reward_moments.update(task_rewards)
            task_rewards = task_rewards / max(std, 1e-8)

        token_rewards = terminal_rewards(task_rewards, gen_mask)
        if config.kl_mode == "reward":
            token_rewards = token_rewards - kl_coef * rollout.kl_per_token
        advantages, returns = gae_advantages(token_rewards, rollout.values, gen_mask, config.gamma, config.lam)
        return rollout.to_memory(rollout.values, advantages, returns, keep_ref_logits=keeps_ref_logits(config)), {}

    def minibatches(self, memory: ReplayMemory, generator: torch.Generator):
        """``ppo_epochs`` passes over the batch, each a fresh shuffle cut into ``minibatch_size`` episodes."""
        return shuffled_minibatches(memory, self.config.minibatch_size, self.config.ppo_epochs, generator)

    def loss(self, learning_pass: LearningPass, minibatch: ReplayMemory, kl_coef: float) -> dict[str, Tensor]:
        """The objective's terms on one minibatch, with grad: the clipped surrogate (advantages whitened over the
        whole minibatch's real positions), the value loss, the entropy bonus and (kl_mode="loss") the KL penalty."""
        config, mask = self.config, minibatch.gen_mask
        advantages = minibatch.advantages
        if config.normalize_advantages:
            # Over the whole minibatch's real positions: a rank's slice or a micro-batch takes the whole one's moments.
            whole = minibatch.part_of
            advantages = masked_whiten(advantages, mask, moments_of=None if whole is None else (whole.advantages, whole.gen_mask))
        return {
            "surrogate": calc_clipped_surrogate(learning_pass.logprobs, minibatch.logprobs, advantages, mask,
                                                config.clip_coef, normalize_advantages=False),
            "value_loss": calc_value_loss(learning_pass.values, minibatch.returns, mask, config.vf_coef, minibatch.values,
                                          config.clip_range_value),
            "entropy_bonus": calc_entropy_bonus_from_logprobs(learning_pass.logp_gen, mask, config.ent_coef),
            "kl_penalty": kl_loss_term(config, kl_coef, learning_pass, minibatch),
        }

    @staticmethod
    def total(terms: dict[str, Tensor]) -> Tensor:
        """The objective is maximised; the loss is its negative: −(surrogate − value_loss + entropy_bonus − kl_penalty)."""
        return -(terms["surrogate"] - terms["value_loss"] + terms["entropy_bonus"] - terms["kl_penalty"])

    def metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        metrics = breakdown_means(breakdown, {
            "losses/policy": "surrogate", "losses/value": "value_loss", "losses/entropy_bonus": "entropy_bonus",
            "losses/kl_penalty": "kl_penalty", "losses/total": "loss", "losses/clipfrac": "diag/clipfrac",
            "losses/approx_kl": "diag/approx_kl", "losses/grad_norm": "grad_norm",
        })
        return {**metrics, "losses/policy": -metrics["losses/policy"]}  # the surrogate is maximised; the loss is its negative

    def state_dict(self) -> dict:
        return {"reward_moments": self.reward_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_moments.load_state_dict(state["reward_moments"])


class PPOTrainer(PolicyTrainer):
    """PPO with a value head on the final residual stream, GAE and the clipped surrogate: the loop with ``PPO`` in it.

    Use it in a notebook or debugger one call at a time::

        trainer = PPOTrainer(PPOConfig(phases=3))
        rollout = trainer.sample_and_score()         # ScoredRollout: the samples, log-probs, values, KL, rewards, stats
        memory, _ = trainer.build_memory(rollout)    # a ReplayMemory; print(memory) shows shapes and statistics
        minibatches = list(trainer.minibatches(memory))
        stats = trainer.learning_phase(memory, minibatches=minibatches)  # one dict of loss terms per minibatch
        trainer.train()                              # or the remaining phases with logging and outputs
        trainer = PPOTrainer.resume(PPOConfig(resume="runs/ppo"))  # continue a run from its checkpoint

    ``stats[0]`` equals the objectives of ``rlhf_scratch.objectives`` called by hand on
    ``minibatches[0]`` before ``learning_phase`` (see ``experiments/step_through.py``).
    """

    algorithm_class = PPO


def run_ppo(config: PPOConfig) -> dict:
    return run_trainer(PPOTrainer, config)
