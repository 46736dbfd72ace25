"""PPO: the config, the trainer, and the command. The loop it runs in is ``policy_trainer.PolicyTrainer``.

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

This module supplies the PPO parts: ``build_memory`` (reward shaping, GAE) and ``compute_losses``
(the objective). Shared with REINFORCE (``policy_trainer.py``): sampling and scoring, hooks,
``--debug`` invariants, the loop, outputs, checkpoints and ``PPOTrainer.resume(config)``.
"""
from __future__ import annotations


import torch
from torch import Tensor

from rlhf_scratch.advantages import RunningMoments, gae_advantages, terminal_rewards
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import (
    calc_clipped_surrogate,
    calc_entropy_bonus_from_logprobs,
    calc_value_loss,
    masked_whiten,
    ppo_diagnostics,
)
from rlhf_scratch.optimization import NonFiniteLossError, check_finite  # noqa: F401 (NonFiniteLossError re-exported)
from rlhf_scratch.policy_trainer import PolicyTrainer, ScoredRollout, breakdown_means, run_trainer
from rlhf_scratch.algorithm_configs import PPOConfig, preset_configs  # noqa: F401 (defined there: importable without torch)


class PPOTrainer(PolicyTrainer):
    """PPO with a value head on the final residual stream, GAE and the clipped surrogate.

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

    title = "PPO"
    kind = "ppo"
    saves_value_head = True
    nonfinite_hint = ("Lower the learning rate, check the reward for extreme values, "
                      "or clip the value loss (--clip-range-value).")

    def init_algorithm_state(self) -> None:
        self.reward_moments = RunningMoments()
        """Running statistics of the task rewards (used with normalize_rewards); kept in checkpoints."""

    def algorithm_state(self) -> dict:
        return {"reward_moments": self.reward_moments.state_dict()}

    def load_algorithm_state(self, state: dict) -> None:
        self.reward_moments.load_state_dict(state["reward_moments"])

    def param_groups(self) -> list[dict]:
        """Trunk at ``lr`` and value head at ``head_lr``."""
        return [
            {"params": self.policy.trunk_parameters(), "lr": self.config.lr},
            {"params": self.policy.head_parameters(), "lr": self.config.head_lr},
        ]

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        """Shape the rewards (no-EOS penalty, normalisation, per-token KL), run GAE, and fill a ``ReplayMemory``."""
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
            token_rewards = token_rewards - self.kl_controller.value * rollout.kl_per_token
        advantages, returns = gae_advantages(token_rewards, rollout.values, gen_mask, config.gamma, config.lam)

        return rollout.to_memory(rollout.values, advantages, returns, keep_ref_logits=self.keeps_ref_logits), {}

    # ------------------------------------------------------------------ learning
    def compute_losses(self, minibatch: ReplayMemory) -> tuple[dict[str, Tensor], Tensor]:
        """Every term of the PPO objective on one minibatch (with grad), by name; and the new log-probs (detached)."""
        config = self.config
        P, mask = minibatch.prompt_len, minibatch.gen_mask
        output = self.learning_forward(minibatch)
        logits_gen, logp_gen, logprobs = self.generated_logprobs(output.logits, minibatch.sequences, P)
        values = output.values[:, P - 1 : -1]
        advantages = minibatch.advantages
        if config.normalize_advantages:
            # Over the whole minibatch's real positions: a rank's slice or a micro-batch takes the whole one's moments.
            whole = minibatch.part_of
            advantages = masked_whiten(advantages, mask, moments_of=None if whole is None else (whole.advantages, whole.gen_mask))

        terms = {
            "surrogate": calc_clipped_surrogate(logprobs, minibatch.logprobs, advantages, mask, config.clip_coef,
                                                normalize_advantages=False),
            "value_loss": calc_value_loss(values, minibatch.returns, mask, config.vf_coef, minibatch.values, config.clip_range_value),
            "entropy_bonus": calc_entropy_bonus_from_logprobs(logp_gen, mask, config.ent_coef),
        }
        terms["kl_penalty"] = self.kl_loss_term(logprobs, logits_gen, minibatch)
        # Every term is a mean over real tokens: a piece of a minibatch (a rank's slice, a micro-batch) gives its share.
        terms = {name: self.token_share(value, minibatch) for name, value in terms.items()}
        for name, value in terms.items():
            check_finite(name, value, self.nonfinite_hint)
        # The objective is maximised; the loss is its negative.
        terms["loss"] = -(terms["surrogate"] - terms["value_loss"] + terms["entropy_bonus"] - terms["kl_penalty"])
        diagnostics = ppo_diagnostics(logprobs.detach(), minibatch.logprobs, mask, config.clip_coef)
        terms.update({f"diag/{k}": v if k.endswith("_max") else self.token_share(v, minibatch) for k, v in diagnostics.items()})
        return terms, logprobs.detach()

    def minibatches(self, memory: ReplayMemory):
        """``ppo_epochs`` passes over the memory, each in a fresh shuffle of ``minibatch_size`` episodes."""
        return self.shuffled_minibatches(memory, self.config.minibatch_size, self.config.ppo_epochs)

    def learning_metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """The fixed loss metric names logged once per phase (means over the phase's minibatches)."""
        metrics = breakdown_means(breakdown, {
            "losses/policy": "surrogate", "losses/value": "value_loss", "losses/entropy_bonus": "entropy_bonus",
            "losses/kl_penalty": "kl_penalty", "losses/total": "loss", "losses/clipfrac": "diag/clipfrac",
            "losses/approx_kl": "diag/approx_kl", "losses/grad_norm": "grad_norm",
        })
        return {**metrics, "losses/policy": -metrics["losses/policy"]}  # the surrogate is maximised; the loss is its negative


def run_ppo(config: PPOConfig) -> dict:
    return run_trainer(PPOTrainer, config)
