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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_scratch.advantages import RunningMoments, gae_advantages, terminal_rewards
from rlhf_scratch.config import PolicyTrainingConfig
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
from rlhf_scratch.sampling import SamplingConfig


@dataclass
class PPOConfig(PolicyTrainingConfig):
    """PPO on a TransformerLens policy. Defaults: the built-in offline sentiment task."""

    # --- how much (PPO) ---
    minibatch_size: int = 16
    """Episodes per gradient step; must divide batch_size."""
    ppo_epochs: int = 4
    """Passes over each phase's replay memory (gradient steps per phase = ppo_epochs · batch/minibatch)."""

    # --- optimisation (PPO) ---
    head_lr: float = 1e-3
    """Peak learning rate of the value head (new, randomly initialised: it needs to move faster)."""

    # --- PPO objective ---
    clip_coef: float = 0.2
    """ε of the clipped surrogate: ratio clipped to [1−ε, 1+ε]."""
    vf_coef: float = 0.5
    """Value loss weight: ½·vf_coef·mean((V − returns)²)."""
    clip_range_value: float | None = None
    """Clip new values to ±this around the rollout's values (None: no value clipping)."""
    ent_coef: float = 0.001
    """Entropy bonus weight."""
    normalize_advantages: bool = True
    """Normalise advantages over each minibatch's real positions (mean 0, std 1)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE; λ=0 with γ=1 is the one-step TD advantage A_t = V_{t+1} − V_t (A_T = r − V_T)."""
    normalize_rewards: bool = False
    """Divide task rewards by their running standard deviation (kept across phases)."""
    no_eos_penalty: float | None = None
    """If set, a response that reached max_new_tokens without EOS gets this reward instead."""

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (1 <= self.minibatch_size <= self.batch_size,
             f"minibatch_size must be in [1, batch_size={self.batch_size}], got {self.minibatch_size}."),
            (self.batch_size % max(self.minibatch_size, 1) == 0,
             f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size}); "
             f"e.g. use --minibatch-size {max(d for d in range(1, max(self.minibatch_size, 1) + 1) if self.batch_size % d == 0)}."),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}."),
            (self.head_lr > 0, f"head_lr must be > 0, got {self.head_lr}."),
            (0 < self.clip_coef < 1, f"clip_coef must be in (0, 1), got {self.clip_coef}."),
            (self.vf_coef >= 0 and self.ent_coef >= 0, "vf_coef and ent_coef must be >= 0."),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}."),
            (self.clip_range_value is None or self.clip_range_value > 0,
             f"clip_range_value must be > 0, or omitted for no value clipping; got {self.clip_range_value}."),
            (self.no_eos_penalty is None or math.isfinite(self.no_eos_penalty),
             f"no_eos_penalty must be a finite reward (e.g. -1.0), or omitted; got {self.no_eos_penalty}."),
        ]

    @property
    def steps_per_phase(self) -> int:
        return self.ppo_epochs * self.batch_size // self.minibatch_size


def preset_configs() -> dict:
    """Named starting points for ``rlhf-scratch ppo --preset NAME`` (the first is the default)."""
    return {
        # The built-in offline task: the tiny review model, prompts cut from held-out
        # reviews, VADER sentiment as the reward.
        "tiny-sentiment": lambda: PPOConfig(),
        # ARENA-style fixed prefix on the tiny model: reward = number of periods.
        "tiny-periods": lambda: PPOConfig(
            reward="chars:.", prompt="The movie", phases=30, kl_coef=0.02, lr=5e-5,
            sampling=SamplingConfig(max_new_tokens=32),
        ),
        # The TRL IMDB recipe: gpt2 policy, IMDB prompts of 2–8 tokens, POSITIVE logit of
        # lvwerra/distilbert-imdb. Needs the hub (or local copies passed with --model/--reward/--data).
        "gpt2-imdb": lambda: PPOConfig(
            model="gpt2", data="stanfordnlp/imdb", reward="hf:lvwerra/distilbert-imdb:POSITIVE",
            prepend_bos=False, lr=1.41e-5, head_lr=1.41e-4, batch_size=128, minibatch_size=32, ppo_epochs=4,
            phases=100, kl_coef=0.2, adaptive_kl=True, target_kl=6.0, ent_coef=0.0,
            sampling=SamplingConfig(max_new_tokens=16),
        ),
        # The ARENA RLHF exercise: gpt2-small, prefix "This is", reward = period count.
        "arena-gpt2": lambda: PPOConfig(
            model="gpt2", prompt="This is", reward="chars:.", batch_size=128, minibatch_size=32, ppo_epochs=2,
            phases=100, lr=2e-5, head_lr=5e-4, kl_coef=2.5, kl_mode="loss", kl_estimator="exact",
            ent_coef=0.001, lam=0.0, gamma=1.0, warmup_phases=10, final_lr_scale=0.1,
            sampling=SamplingConfig(max_new_tokens=30),
        ),
    }


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
