"""The configs of the trainers (PPO, REINFORCE, RLOO, GRPO, DPO, the reward model), and PPO's presets.

Plain dataclasses, importable without torch: ``rlhf-scratch ppo --help`` and a configuration error answer
before any heavy library loads. Every field is a documented command-line flag; ``_checks`` rejects bad
values with a message that says how to fix them. The trainers import their config from here (and
re-export it: ``from rlhf_scratch.ppo import PPOConfig`` works as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf_scratch.config import EvalConfig, PolicyTrainingConfig, SamplingConfig, TaskConfig, finite_float_checks


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


@dataclass
class REINFORCEConfig(PolicyTrainingConfig):
    """REINFORCE with a moving-average baseline. Defaults: the built-in offline sentiment task."""

    lr: float = 3e-4
    """Peak learning rate. REINFORCE takes one step per phase (PPO 16), so it needs a larger one; on the built-in
    task, 20 phases reach a reward of about 0.24 at 1e-4, 0.46 at 3e-4 and 0.69 (with a KL of 5 nats) at 1e-3."""
    minibatch_size: int | None = None
    """Episodes per gradient step (must divide batch_size); None: the whole batch, one step per phase."""
    baseline: Literal["mean", "ema"] = "mean"
    """"mean": b = mean of every earlier reward; "ema": b ← decay·b + (1 − decay)·(this phase's mean reward)."""
    baseline_decay: float = 0.9
    """Decay of the "ema" baseline."""

    def _checks(self) -> list[tuple[bool, str]]:
        mb = self.minibatch_size
        return [
            *super()._checks(),
            (mb is None or (1 <= mb <= self.batch_size and self.batch_size % mb == 0),
             f"minibatch_size ({mb}) must divide batch_size ({self.batch_size}); omit it for one step per phase."),
            (0 <= self.baseline_decay < 1, f"baseline_decay must be in [0, 1), got {self.baseline_decay}."),
        ]


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


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO: REINFORCE with a leave-one-out baseline from k samples per prompt. Defaults: the built-in task."""

    lr: float = 3e-4
    """Peak learning rate (one step per phase by default, as REINFORCE)."""


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


Divergence = Literal["rkl", "fkl", "js", "alpha"]


LossType = Literal["sigmoid", "hinge"]


@dataclass
class DPOConfig(TaskConfig):
    """DPO / f-DPO from preference pairs. Defaults: the built-in model; evaluation on the built-in task with VADER."""

    pairs: Path | None = None
    """Preference pairs (required): a .jsonl/.csv with prompt, chosen, rejected (e.g. DIR/pairs.jsonl written by
    `rlhf-scratch pairs --out DIR`), or a datasets name in the HelpSteer2 binarized layout."""
    max_pairs: int | None = None
    """Use at most this many pairs (None: all)."""
    reward: str | None = "vader"
    """True reward for evaluating the trained policy and the reference on held-out prompts (not used in training):
    vader | chars:. | hf:PATH:LABEL; None skips that evaluation."""

    # --- the loss ---
    loss: LossType = "sigmoid"
    """"sigmoid": −log σ(β(f′_w − f′_l)) (DPO); "hinge": max(0, 1 − β(f′_w − f′_l)) (SLiC)."""
    divergence: Divergence = "rkl"
    """f-divergence to the reference: rkl (reverse KL, plain DPO) | fkl (forward KL) | js (Jensen–Shannon) | alpha."""
    alpha: float = 0.5
    """α of --divergence alpha, f′(x) = (1 − x^−α)/α (the f-DPO paper's α: → 0 reverse KL, 1 forward KL); must be > 0.
    TRL 1.x's f_alpha_divergence_coef is 1 − α."""
    beta: float = 0.1
    """β: scale of the implicit reward; larger β keeps the policy closer to the reference."""

    # --- optimisation ---
    epochs: int = 3
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimiser step (2·batch_size sequences per forward pass)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    warmup_steps: int = 5
    """Linear warmup length in optimiser steps, then linear decay to final_lr_scale·lr."""
    final_lr_scale: float = 0.1
    """Learning-rate multiplier at the last step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value."""
    heldout_fraction: float = 0.1
    """Share of pairs held out (not trained on; split by prompt, so no held-out prompt is trained on) to measure pair
    accuracy after each epoch; 0: none."""

    # --- evaluation and run ---
    n_eval_prompts: int = 128
    """Held-out prompts on which the trained policy and the reference are evaluated with --reward."""
    eval_batch_size: int = 64
    """Sequences per forward pass when computing reference log-probs and when evaluating."""
    table_rows: int = 6
    """Rows of the reference-vs-DPO sample table printed at the end."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = None
    """Output directory (config.json, metrics.jsonl, curves.png, checkpoint/, summary.json)."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when there is no network)."""
    wandb_project: str = "rlhf_scratch"
    """W&B project name (with --wandb)."""
    checkpoint_every: int = 0
    """Write OUT/checkpoint every this many optimiser steps as well as at the end (0: only at the end)."""
    checkpoint_minutes: float = 10.0
    """Also write OUT/checkpoint after a step once this many minutes have passed since the last one (0: off)."""
    eval_every: int = 0
    """Evaluate the policy every this many steps and after the last, on n_eval_prompts held-out prompts with --reward
    (eval/* metrics in the step's row); 0: off. Training is unchanged."""
    resume: Path | None = None
    """Continue a run from its checkpoint: the run's --out directory or its checkpoint/ folder. The run's saved config
    is used; flags you pass must agree with it, except out, device, wandb, checkpoint_every, checkpoint_minutes,
    eval_every and table_rows. The remaining steps log what an uninterrupted run logs."""

    def _checks(self) -> list[tuple[bool, str]]:
        alpha_ok = self.divergence != "alpha" or (math.isfinite(self.alpha) and self.alpha > 0)
        return [
            *super()._checks(),
            (self.pairs is not None or self.resume is not None,
             "--pairs FILE is required: a .jsonl/.csv of (prompt, chosen, rejected) rows, e.g. "
             "`rlhf-scratch pairs --out runs/pairs` then `rlhf-scratch dpo --pairs runs/pairs/pairs.jsonl`."),
            (self.max_pairs is None or self.max_pairs >= 2, f"max_pairs must be >= 2 or None (all), got {self.max_pairs}."),
            (self.beta > 0, f"beta must be > 0 (typical: 0.05–0.5), got {self.beta}."),
            (alpha_ok, f"alpha must be > 0 for --divergence alpha, got {self.alpha}. α → 0 is reverse KL "
                       "(use --divergence rkl); α = 1 is forward KL (--divergence fkl); e.g. --alpha 0.5."),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.lr > 0, f"lr must be > 0, got {self.lr}."),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0 (0: no warmup), got {self.warmup_steps}."),
            (0 <= self.final_lr_scale <= 1, f"final_lr_scale must be in [0, 1], got {self.final_lr_scale}."),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}."),
            (0 <= self.heldout_fraction < 1,
             f"heldout_fraction must be in [0, 1) (0: no held-out pairs), got {self.heldout_fraction}."),
            (self.n_eval_prompts >= 1, f"n_eval_prompts must be >= 1, got {self.n_eval_prompts}."),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}."),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}."),
            (self.checkpoint_minutes >= 0, f"checkpoint_minutes must be >= 0 (0: off), got {self.checkpoint_minutes}."),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0: off), got {self.eval_every}."),
        ]

    def eval_config(self):
        """The ``EvalConfig`` of the final evaluation (same model, prompts source, sampler and seed)."""

        return EvalConfig(model=self.model, reward=self.reward or "vader", data=self.data, column=self.column,
                          prompt=self.prompt, min_prompt_tokens=self.min_prompt_tokens,
                          max_prompt_tokens=self.max_prompt_tokens, prepend_bos=self.prepend_bos,
                          sampling=self.sampling, n_prompts=self.n_eval_prompts, batch_size=self.eval_batch_size,
                          table_rows=self.table_rows, seed=self.seed, device=self.device)


LOSS_HEAD = {"bt": "scalar", "margin": "scalar", "dist": "dist"}


@dataclass
class RewardModelConfig:
    """Train a reward model on preference pairs (Bradley–Terry, with margin, or distributional)."""

    pairs: Path | None = None
    """Pair file (.jsonl/.csv with prompt, chosen, rejected[, margin | chosen_score, rejected_score]) or a datasets name
    (required, unless --resume)."""
    loss: Literal["bt", "margin", "dist"] = "bt"
    """"bt": −log σ(r_w − r_l); "margin": −log σ(r_w − r_l − m) with m = margin (or chosen_score − rejected_score);
    "dist": K-way rating head, −log Σ_ij p_w(i) p_l(j) σ(α(i − j))."""
    model: str = "builtin"
    """Trunk to start from: "builtin", a model directory or policy checkpoint, or a hub name."""
    num_ratings: int = 10
    """K, the number of ratings (0..K−1) of the distributional head."""
    alpha: float = 1.0
    """α of the distributional loss: how sharply a higher rating beats a lower one (σ(α) for one rating step)."""
    epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per gradient step (2× as many texts in one forward pass)."""
    lr: float = 3e-4
    """Peak learning rate of the trunk (linear decay to 0 over training)."""
    head_lr: float = 1e-3
    """Learning rate of the head (new, zero-initialised: it needs to move faster)."""
    weight_decay: float = 0.0
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    max_grad_norm: float = 1.0
    heldout_fraction: float = 0.1
    """Share of pairs held out to measure pairwise accuracy, split by prompt (no held-out prompt is trained on); 0: none."""
    limit: int | None = None
    """Use only the first LIMIT pairs of the file."""
    prepend_bos: bool = True
    """Put BOS in front of every text (as the built-in model was trained)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = Path("runs/rm")
    """Output directory: reward_model/, checkpoint/ (to --resume), metrics.jsonl, heldout_pairs.jsonl, config.json,
    summary.json (None: write nothing)."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when there is no network)."""
    wandb_project: str = "rlhf_scratch"
    """W&B project name (with --wandb)."""
    checkpoint_every: int = 0
    """Write OUT/checkpoint every this many epochs as well as at the end (0: only at the end)."""
    checkpoint_minutes: float = 10.0
    """Also write OUT/checkpoint after an epoch once this many minutes have passed since the last one (0: off)."""
    eval_every: int = 1
    """Measure the held-out pairwise accuracy every this many epochs and after the last (0: only in the summary)."""
    resume: Path | None = None
    """Continue a run from its checkpoint: the run's --out directory or its checkpoint/ folder (the run's saved config
    is used; flags you pass must agree with it, except out, device, wandb, checkpoint_every, checkpoint_minutes and
    eval_every). The remaining epochs log what an uninterrupted run logs."""

    def __post_init__(self):
        checks = [
            *finite_float_checks(self),
            (self.loss in LOSS_HEAD, f"loss must be one of {tuple(LOSS_HEAD)}, got {self.loss!r}."),
            (self.num_ratings >= 2, f"num_ratings must be >= 2, got {self.num_ratings}."),
            (self.alpha > 0 and math.isfinite(self.alpha), f"alpha must be a positive number, got {self.alpha}."),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.lr >= 0 and self.head_lr > 0, f"need lr >= 0 (0 freezes the trunk) and head_lr > 0, got {self.lr}, {self.head_lr}."),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}."),
            (0 <= self.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}."),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1 or omitted, got {self.limit}."),
            (self.pairs is not None or self.resume is not None,
             "--pairs FILE is required: a .jsonl/.csv of (prompt, chosen, rejected) rows, e.g. `rlhf-scratch pairs --out "
             "runs/pairs` then `rlhf-scratch rm --pairs runs/pairs/pairs.jsonl`."),
            (self.checkpoint_every >= 0 and self.checkpoint_minutes >= 0 and self.eval_every >= 0,
             "checkpoint_every, checkpoint_minutes and eval_every must be >= 0 (0: off)."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
