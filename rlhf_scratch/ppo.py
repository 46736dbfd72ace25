"""The PPO trainer: ``rollout_phase() -> ReplayMemory``, ``learning_phase(memory)``, ``train()``.

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

Around the loop: ``fwd_hooks`` (TransformerLens ``(name, fn)`` pairs) act on every policy pass
and never on the reference; ``debug=True`` checks the invariants of ``invariants.py`` each
phase; ``save_checkpoint`` writes a resumable checkpoint atomically (``checkpoint.py``), and
``resume=DIR`` continues a run so that its remaining phases log what an uninterrupted run would.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rlhf_scratch import invariants
from rlhf_scratch.config import TaskConfig
from rlhf_scratch.advantages import RunningMoments, gae_advantages, terminal_rewards
from rlhf_scratch.checkpoint import (
    FORMAT_VERSION,
    find_checkpoint,
    read_resume_state,
    resumed_config,
    same_fingerprint,
    weights_fingerprint,
    write_resume_state,
)
from rlhf_scratch.kl_control import AdaptiveKLController, FixedKLController
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.models import PolicyWithValueHead, load_bridge, load_policy, make_reference, save_model_dir
from rlhf_scratch.outputs import atomic_dir, to_jsonable
from rlhf_scratch.optimization import NonFiniteLossError, check_finite, clipped_step  # noqa: F401 (re-exported)
from rlhf_scratch.objectives import (
    calc_clipped_surrogate,
    calc_entropy_bonus,
    calc_value_loss,
    entropy_per_token,
    generated_logits,
    kl_exact,
    kl_k1,
    kl_k3,
    masked_mean,
    ppo_diagnostics,
    taken_logprobs,
)
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import Generation, SamplingConfig, encode, generate, padding_id
from rlhf_scratch.schedule import warmup_decay_lambda


@dataclass
class PolicyTrainingConfig(TaskConfig):
    """Fields shared by every trainer of a policy by sampling (PPO, REINFORCE): the task, the amount of
    training, the optimiser, the KL to the reference, and the run. Defaults: the built-in offline sentiment task."""

    reference: str | None = None
    """Reference model for the KL penalty (default: a frozen copy of the starting policy)."""

    # --- how much ---
    phases: int = 40
    """Number of rollout + learning phases."""
    batch_size: int = 64
    """Episodes (prompt + response) sampled per phase."""

    # --- optimisation ---
    lr: float = 3e-5
    """Peak learning rate of the trunk (the language model)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of every optimised parameter (trunk, and value head for PPO) to this value."""
    warmup_phases: int = 2
    """Linear warmup length in phases (the schedule steps once per phase)."""
    final_lr_scale: float = 0.1
    """Learning-rate multiplier reached at the last phase (linear decay after warmup)."""

    # --- KL to the reference ---
    kl_coef: float = 0.05
    """Weight of the KL penalty (initial value when adaptive)."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """"reward": −kl_coef·KL_t is added to each token's reward (Ziegler et al., TRL); "loss": kl_coef·KL is a loss term (ARENA)."""
    kl_estimator: Literal["exact", "k1", "k3"] = "k1"
    """Per-token KL: "exact" full-distribution Σ_v π(v) log(π(v)/π_ref(v)); "k1" log π − log π_ref; "k3" (r−1) − log r."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""

    # --- run ---
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None
    """Output directory (config.json, metrics.jsonl, samples.jsonl, plots, checkpoint/, summary.json)."""
    samples_per_phase: int = 4
    """Rows written to samples.jsonl per phase."""
    table_rows: int = 6
    """Rows of the before/after sample table printed at the end."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when there is no network)."""
    wandb_project: str = "rlhf_scratch"
    checkpoint_every: int = 0
    """Write OUT/checkpoint every this many phases as well as at the end (0: only at the end)."""
    resume: Path | None = None
    """Continue a run from its checkpoint: the run's --out directory or its checkpoint/ folder. The run's saved config
    is used; flags you pass must agree with it, except out, device, wandb, checkpoint_every, debug and the sample
    rows written. Metrics for the remaining phases equal an uninterrupted run's."""

    # --- debugging ---
    debug: bool = False
    """Check invariants every phase (masks, no NaN, ratio = 1 on the first minibatch, approx-KL bound) and stop
    with an InvariantError naming the first that fails (see rlhf_scratch/invariants.py)."""
    debug_max_approx_kl: float = 1.0
    """With --debug: the largest approx-KL(π_old ‖ π) a minibatch may reach (default-task runs peak near 0.01)."""

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.phases >= 1, f"phases must be >= 1, got {self.phases}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.lr > 0, f"lr must be > 0, got {self.lr}."),
            (0 <= self.warmup_phases < self.phases,
             f"warmup_phases must be in [0, phases={self.phases}), got {self.warmup_phases}."),
            (0 <= self.final_lr_scale <= 1, f"final_lr_scale must be in [0, 1], got {self.final_lr_scale}."),
            (self.kl_coef >= 0, f"kl_coef must be >= 0 (0 turns the KL penalty off), got {self.kl_coef}."),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}."),
            (self.target_kl > 0 and self.kl_horizon > 0, "target_kl and kl_horizon must be > 0."),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}."),
            (self.debug_max_approx_kl > 0, f"debug_max_approx_kl must be > 0, got {self.debug_max_approx_kl}."),
        ]


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


def check_fwd_hooks(bridge, fwd_hooks) -> list:
    """``fwd_hooks`` as a list, after checking each is a ``(name, fn)`` pair whose name exists on ``bridge``.

    TransformerLens would raise a bare KeyError for a misspelt name, and only at the first forward
    pass; this says so at once and lists the closest names. A name may also be a filter function
    ``name -> bool`` (TransformerLens convention).
    """
    import difflib

    hooks = list(fwd_hooks)
    known = bridge.hook_dict
    for item in hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise ValueError(f"Each forward hook must be a (name, function) pair, got {item!r}.")
        name = item[0]
        if isinstance(name, str) and name not in known:
            close = difflib.get_close_matches(name, list(known), n=6, cutoff=0.6)
            suggestion = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"No hook named {name!r} on this model.{suggestion} "
                "See every name with sorted(bridge.hook_dict), e.g. blocks.0.attn.hook_z [batch, pos, head, d_head] "
                "or blocks.0.hook_mlp_out [batch, pos, d_model]."
            )
        if not isinstance(name, str) and not callable(name):
            raise ValueError(f"A hook's name must be a string or a filter function name -> bool, got {name!r}.")
    return hooks


@dataclass(eq=False, repr=False)
class ScoredRollout:
    """One sampled batch, read by the policy and the reference (no grad) and scored by the reward.

    generation      Generation        the sampled batch (prompts, responses, masks, decoded texts)
    sequences       Int   [B, S]      prompt (left-padded to P) then the G generated tokens
    attention_mask  Int   [B, S]      1 on real tokens
    gen_mask        Bool  [B, G]      True on real generated tokens (through the first EOS)
    logprobs        Float [B, G]      log π(token) at the sampling temperature
    values          Float [B, G]      value head at each state (unused by trainers without a critic)
    ref_logprobs    Float [B, G]      log π_ref(token) at the sampling temperature
    ref_logits_gen  Float [B, G, V]   reference logits at the generated positions (temperature-scaled)
    kl_per_token    Float [B, G]      KL_t with the configured estimator, 0 on padding
    rewards         Float [B]         the task reward of each response
    """

    generation: Generation
    sequences: Tensor
    attention_mask: Tensor
    gen_mask: Tensor
    logprobs: Tensor
    values: Tensor
    ref_logprobs: Tensor
    ref_logits_gen: Tensor
    kl_per_token: Tensor
    rewards: Tensor

    @property
    def prompt_len(self) -> int:
        return self.generation.prompt_len

    def to_memory(self, values: Tensor, advantages: Tensor, returns: Tensor, keep_ref_logits: bool) -> ReplayMemory:
        """The replay memory a trainer learns from: this rollout plus its values, advantages and returns.

        ``ref_logits_gen`` [B, G, V] is kept only when ``keep_ref_logits`` (an exact KL loss term needs it).
        """
        return ReplayMemory(
            sequences=self.sequences,
            attention_mask=self.attention_mask,
            gen_mask=self.gen_mask,
            logprobs=self.logprobs,
            ref_logprobs=self.ref_logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
            rewards=self.rewards,
            prompt_len=self.prompt_len,
            ref_logits_gen=self.ref_logits_gen if keep_ref_logits else None,
        )

    def __repr__(self) -> str:
        return f"ScoredRollout({self.generation!r}, mean reward {self.rewards.mean().item():+.3f})"


class PolicyTrainer:
    """The parts every trainer of a policy by sampling shares (PPO, REINFORCE).

    It holds the policy, a frozen reference, the reward, the prompt pool, the optimiser, the
    learning-rate schedule and the KL controller; it samples and scores a batch
    (``sample_and_score``), takes a clipped optimiser step (``optimizer_step``), ends a phase
    (``end_phase``), and runs the whole loop with logging, outputs and checkpoints (``train``).
    A subclass supplies ``rollout_phase``, ``minibatches``, ``compute_losses`` and ``phase_metrics``,
    and keeps any state of its own in ``init_algorithm_state`` / ``algorithm_state`` /
    ``load_algorithm_state`` (so that checkpoints resume it).

    ``fwd_hooks`` — TransformerLens hooks ``(name, fn)`` — are applied to every pass of the
    policy: generation, the rollout's forward pass and the learning forward pass; never to the
    reference. They live only for the duration of each pass (nothing stays attached to the bridge).
    ``reference`` (a bridge) replaces the default reference (a frozen copy of the starting policy,
    or ``config.reference``); a resumed run reloads the run's reference unless one is given.
    """

    title = "policy"
    """Name in progress bars and messages."""
    kind = "policy"
    """Written to the checkpoint's metadata."""
    saves_value_head = False
    """Whether the checkpoint includes the value head."""

    def __init__(self, config: PolicyTrainingConfig, policy: PolicyWithValueHead | None = None, reward=None,
                 fwd_hooks: list | tuple = (), reference=None):
        resume_state, checkpoint = None, None
        if config.resume is not None:
            if policy is not None:
                raise ValueError("With resume, the policy is loaded from the checkpoint: don't pass policy= as well.")
            checkpoint = find_checkpoint(config.resume)
            resume_state = read_resume_state(checkpoint)
            if resume_state["kind"] != self.kind:
                raise ValueError(f"{checkpoint} is a {resume_state['kind']} checkpoint; resume it with "
                                 f"`rlhf-scratch {resume_state['kind']} --resume {config.resume}`.")
            config = resumed_config(config, resume_state["config"], checkpoint)
        self.config = config
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.prompt_rng = random.Random(config.seed)
        source = checkpoint if checkpoint is not None else config.model
        self.policy = (policy or load_policy(source, device=config.device)).to(config.device)
        self.policy.eval()  # dropout off: log-probs must be reproducible between passes
        self.reference, self.reference_source = self._make_reference(reference, policy, resume_state)
        self.reference_fingerprint = weights_fingerprint(self.reference)
        self.reward = reward or make_reward(config.reward)
        self.fwd_hooks = check_fwd_hooks(self.policy.bridge, fwd_hooks)
        self.prompt_pool = self._build_prompt_pool()

        self.optimizer = torch.optim.AdamW(self.param_groups(), weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_decay_lambda(config.phases, config.warmup_phases, config.final_lr_scale)
        )
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.phase = 0
        """Phases completed (the next phase is ``phase + 1``); checkpoints record it."""
        self.history: list[dict] = []
        """The metrics of every completed phase logged by ``train`` (restored on resume)."""
        self.table_prompts: list[list[int]] | None = None
        """The prompts of the before/after sample table, drawn once per run."""
        self.elapsed_seconds = 0.0
        self.last_logprobs: Tensor | None = None
        """log π of the last minibatch's generated tokens (detached), from ``compute_losses``; read by --debug."""
        self.init_algorithm_state()
        if resume_state is not None:
            self.load_resume_state(resume_state)

    def _make_reference(self, reference, policy, resume_state) -> tuple:
        """The frozen reference and where it came from (a model source, or None for an in-memory model).

        Fresh run: ``reference`` if given, else ``config.reference``, else a copy of the starting
        policy. Resumed run: ``reference`` if given, else the source recorded in the checkpoint;
        either way it must be the model the run started with (checked by a weights fingerprint).
        """
        config = self.config
        if reference is not None:
            bridge, source = reference, None
        elif config.reference:
            bridge, source = load_bridge(config.reference, device=config.device), config.reference
        elif resume_state is not None:
            source = resume_state["reference"]["source"]
            if source is None:
                raise ValueError(
                    "This run's reference was an in-memory model (the trainer was given policy= or reference=), so "
                    "the checkpoint cannot reload it: pass reference=<the starting model's bridge> to the trainer."
                )
            bridge = load_bridge(source, device=config.device)
        else:
            bridge, source = self.policy.bridge, (config.model if policy is None else None)
        frozen = make_reference(bridge)
        if resume_state is not None and not same_fingerprint(weights_fingerprint(frozen), resume_state["reference"]["fingerprint"]):
            raise ValueError(
                f"The reference model ({source or 'passed in'}) is not the one this run started with (its weights differ). "
                "A resumed run must keep the original reference: pass the run's starting model."
            )
        return frozen, source

    # ------------------------------------------------------------------ state kept in checkpoints
    def init_algorithm_state(self) -> None:
        """Create the subclass's own state (PPO: reward statistics; REINFORCE: the baseline)."""

    def algorithm_state(self) -> dict:
        """The subclass's own state, for the checkpoint (JSON values and tensors)."""
        return {}

    def load_algorithm_state(self, state: dict) -> None:
        """Restore ``algorithm_state()``."""

    def resume_state(self) -> dict:
        """Everything beyond the weights that the next phase depends on, for ``save_checkpoint``."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "python": self.prompt_rng.getstate()}
        if torch.cuda.is_available() and str(self.config.device).startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "phase": self.phase,
            "config": to_jsonable(self.config),
            "reference": {"source": self.reference_source, "fingerprint": self.reference_fingerprint},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "algorithm": self.algorithm_state(),
            "rng": rng,
            "table_prompts": self.table_prompts,
            "history": self.history,
            "elapsed_seconds": self.elapsed_seconds,
        }

    def load_resume_state(self, state: dict) -> None:
        """Restore ``resume_state()`` into this freshly built trainer (same model and config)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in state["optimizer"]["state"].items():
            saved = tuple(moments["exp_avg"].shape)
            if index >= len(params) or tuple(params[index].shape) != saved:
                have = tuple(params[index].shape) if index < len(params) else "no such parameter"
                raise ValueError(f"The checkpoint's optimizer state does not fit this model (parameter {index}: saved "
                                 f"{list(saved)}, model {have}); resume with the model the run trained.")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.load_algorithm_state(state["algorithm"])
        self.phase, self.history = state["phase"], list(state["history"])
        self.table_prompts, self.elapsed_seconds = state["table_prompts"], state["elapsed_seconds"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.prompt_rng.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: the trunk at ``lr``."""
        return [{"params": self.policy.trunk_parameters(), "lr": self.config.lr}]

    # ------------------------------------------------------------------ prompts
    def encode_text(self, text: str) -> list[int]:
        return encode(self.policy.tokenizer, text, prepend_bos=self.config.prepend_bos)

    def _build_prompt_pool(self) -> list[list[int]]:
        """Token-id prompts to draw each phase's batch from."""
        from rlhf_scratch.data import fixed_prefix_prompts, load_texts, prompts_from_texts

        if self.config.prompt is not None:
            return fixed_prefix_prompts(self.config.prompt, self.encode_text, 1)
        texts = load_texts(self.config.data, column=self.config.column, seed=self.config.seed)
        return prompts_from_texts(
            texts, self.encode_text, n=max(len(texts), self.config.batch_size),
            min_tokens=self.config.min_prompt_tokens, max_tokens=self.config.max_prompt_tokens, seed=self.config.seed,
        )

    def sample_prompts(self, n: int) -> list[list[int]]:
        return [self.prompt_pool[self.prompt_rng.randrange(len(self.prompt_pool))] for _ in range(n)]

    # ------------------------------------------------------------------ rollout
    def per_token_kl(self, logprobs: Tensor, ref_logprobs: Tensor, logits_gen: Tensor | None = None,
                     ref_logits_gen: Tensor | None = None) -> Tensor:
        """KL_t [B, G] with the configured estimator."""
        if self.config.kl_estimator == "exact":
            return kl_exact(logits_gen, ref_logits_gen)
        if self.config.kl_estimator == "k3":
            return kl_k3(logprobs, ref_logprobs)
        return kl_k1(logprobs, ref_logprobs)

    @property
    def keeps_ref_logits(self) -> bool:
        """Whether the replay memory keeps reference logits [B, G, V]: only for an exact KL loss term."""
        return self.config.kl_mode == "loss" and self.config.kl_estimator == "exact"

    def kl_loss_term(self, logprobs: Tensor, logits_gen: Tensor, minibatch: ReplayMemory) -> Tensor:
        """kl_coef · masked_mean(KL_t) with kl_mode="loss" (with grad), else 0; KL_t by the configured estimator."""
        if self.config.kl_mode != "loss":
            return torch.zeros((), device=logprobs.device)
        kl = self.per_token_kl(logprobs, minibatch.ref_logprobs, logits_gen, minibatch.ref_logits_gen)
        return self.kl_controller.value * masked_mean(kl, minibatch.gen_mask)

    @torch.no_grad()
    def sample_and_score(self, prompts: list[list[int]] | None = None) -> ScoredRollout:
        """Sample a batch, read it with the policy and the reference, and score it.

        Sets ``last_generation`` and ``last_rollout_stats`` (reward, exact sequence KL, entropy,
        response length, EOS rate, timings).
        """
        config = self.config
        prompts = prompts if prompts is not None else self.sample_prompts(config.batch_size)
        clock = time.perf_counter()
        timings = {}
        generation = generate(self.policy.bridge, prompts, config.sampling, generator=self.generator, fwd_hooks=self.fwd_hooks)
        self.last_generation = generation
        sequences = generation.sequences.to(config.device)
        attention_mask = generation.attention_mask.to(config.device)
        gen_mask = generation.gen_mask.to(config.device)
        P = generation.prompt_len
        timings["time/generate"], clock = time.perf_counter() - clock, time.perf_counter()

        # Old policy: log-probs at the sampling temperature and values of each state.
        output = self.policy(sequences, attention_mask, fwd_hooks=self.fwd_hooks)
        scaled_logits = output.logits / config.sampling.temperature
        logits_gen = generated_logits(scaled_logits, P)
        logprobs = taken_logprobs(scaled_logits, sequences, P)
        values = output.values[:, P - 1 : -1]
        if config.debug:
            invariants.check_sampling_matches_rollout(generation.sampled_logprobs, logprobs, generation.gen_mask,
                                                      where=f"phase {self.phase + 1}, rollout")
        timings["time/policy_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Reference: the same tokens under the frozen starting model.
        ref_scaled_logits = self.reference(sequences, attention_mask=attention_mask) / config.sampling.temperature
        ref_logits_gen = generated_logits(ref_scaled_logits, P)
        ref_logprobs = taken_logprobs(ref_scaled_logits, sequences, P)
        exact_kl = torch.where(gen_mask, kl_exact(logits_gen, ref_logits_gen), 0.0)
        # The exact KL is always logged; with the exact estimator it is also the penalty.
        kl_per_token = exact_kl if config.kl_estimator == "exact" else torch.where(
            gen_mask, self.per_token_kl(logprobs, ref_logprobs), 0.0)
        timings["time/reference_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Task reward on the decoded text.
        rewards = score_texts(self.reward, generation.texts).to(config.device)
        timings["time/reward"] = time.perf_counter() - clock

        self.last_rollout_stats = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            # Sequence KL: Σ over a response's generated tokens, averaged over responses.
            "objective/kl": exact_kl.sum(1).mean().item(),
            "objective/kl_estimate": kl_per_token.sum(1).mean().item(),
            "objective/kl_coef": self.kl_controller.value,
            "objective/entropy": masked_mean(entropy_per_token(logits_gen), gen_mask).item(),
            "response/length": gen_mask.sum(1).float().mean().item(),
            "response/eos_rate": generation.ended_with_eos.float().mean().item(),
            **timings,
        }
        return ScoredRollout(
            generation=generation, sequences=sequences, attention_mask=attention_mask, gen_mask=gen_mask,
            logprobs=logprobs, values=values, ref_logprobs=ref_logprobs, ref_logits_gen=ref_logits_gen,
            kl_per_token=kl_per_token, rewards=rewards,
        )

    # ------------------------------------------------------------------ learning
    def optimizer_step(self, loss: Tensor) -> float:
        """Backward, clip the global gradient norm of every optimised parameter, step; returns the norm."""
        return clipped_step(self.optimizer, loss, self.config.max_grad_norm).item()

    def end_phase(self) -> None:
        """One scheduler step and one KL-controller update per phase."""
        self.scheduler.step()
        self.kl_controller.update(self.last_rollout_stats["objective/kl"], self.config.batch_size)
        self.phase += 1

    def rollout_phase(self, prompts: list[list[int]] | None = None) -> ReplayMemory:
        raise NotImplementedError

    def minibatches(self, memory: ReplayMemory):
        """The shuffled minibatches one learning phase steps on."""
        raise NotImplementedError

    def compute_losses(self, minibatch: ReplayMemory) -> dict[str, Tensor]:
        raise NotImplementedError

    def learning_phase(self, memory: ReplayMemory, minibatches: list[ReplayMemory] | None = None) -> list[dict[str, float]]:
        """One AdamW step per minibatch; returns each minibatch's loss breakdown (and grad norm), in order.

        ``minibatches`` (default: ``self.minibatches(memory)``, drawn now) lets you draw them first and
        look at them: ``breakdown[i]`` is computed on ``minibatches[i]`` before its own step, so
        ``breakdown[0]`` is what the objectives give on ``minibatches[0]`` with the policy as it was
        before this call. With ``config.debug`` the invariants (``rlhf_scratch.invariants``) are
        checked first on the memory, then on each minibatch before its step.
        """
        if self.config.debug:
            tokenizer = self.policy.tokenizer
            eos = tokenizer.eos_token_id if self.config.sampling.stop_at_eos else None
            invariants.check_memory(memory, eos_id=eos, pad_id=padding_id(tokenizer), where=f"phase {self.phase + 1}")
        breakdown = []
        clock = time.perf_counter()
        for index, minibatch in enumerate(minibatches if minibatches is not None else self.minibatches(memory)):
            terms = self.compute_losses(minibatch)
            if self.config.debug:
                self.check_minibatch(index, minibatch)
            grad_norm = self.optimizer_step(terms["loss"])
            breakdown.append({**{name: value.item() for name, value in terms.items()}, "grad_norm": grad_norm})
        self.last_learning_seconds = time.perf_counter() - clock
        self.end_phase()
        return breakdown

    def check_minibatch(self, index: int, minibatch: ReplayMemory) -> None:
        """--debug checks on a minibatch after ``compute_losses``, before its step (no extra forward pass):
        ratio = 1 on the phase's first minibatch, approx-KL below the bound on every one."""
        where = f"phase {self.phase + 1}, minibatch {index}"
        if index == 0:
            invariants.check_ratio_is_one(self.last_logprobs, minibatch.logprobs, minibatch.gen_mask, where=where)
        invariants.check_approx_kl(self.last_logprobs, minibatch.logprobs, minibatch.gen_mask,
                                   self.config.debug_max_approx_kl, where=where)

    def phase_metrics(self, breakdown: list[dict[str, float]], seconds: float, lr: float) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ outputs
    def sample_table(self, model_bridge, prompts: list[list[int]], seed: int) -> tuple[Generation, list[float]]:
        """Samples from ``model_bridge`` on fixed prompts with a fixed seed, and their rewards."""
        generation = generate(model_bridge, prompts, self.config.sampling, generator=torch.Generator().manual_seed(seed))
        return generation, score_texts(self.reward, generation.texts).tolist()

    def save_checkpoint(self, directory: Path) -> Path:
        """A resumable checkpoint, written atomically (``outputs.atomic_dir``; layout in ``rlhf_scratch.checkpoint``):
        the policy (save_pretrained layout, safetensors), the value head if any, and ``resume_state()``."""
        meta = {"kind": self.kind, "phase": self.phase, "base_model": self.config.model, "reference": self.reference_source}
        with atomic_dir(directory) as staging:
            save_model_dir(self.policy.bridge, staging, value_head=self.policy.value_head if self.saves_value_head else None,
                           meta=meta)
            write_resume_state(staging, self.resume_state())
        return Path(directory)

    def train(self, console=None, stop_after: int | None = None) -> dict:
        """Run the phases left (all of them for a new trainer) with progress bar, logging and outputs; returns the summary.

        A trainer that has completed phases (resumed from a checkpoint, or stepped by hand)
        continues from phase ``self.phase + 1``: metrics.jsonl and samples.jsonl keep their rows
        up to that phase and grow from there. ``stop_after=k`` stops after phase k (as if the run
        were interrupted there), with the checkpoint and outputs written.
        """
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from rlhf_scratch.outputs import append_jsonl, filter_jsonl, write_json
        from rlhf_scratch.evaluation import plot_curves, print_before_after

        config = self.config
        console = console or Console()
        last_phase = config.phases if stop_after is None else min(stop_after, config.phases)
        if last_phase < 1:
            raise ValueError(f"stop_after must be >= 1, got {stop_after}.")
        out = Path(config.out) if config.out is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                # Rows of phases this trainer has not completed are dropped: all of them for a new run,
                # those logged after the checkpoint by a run that was killed later, when resuming.
                filter_jsonl(out / name, lambda row: row.get("phase", 0) <= self.phase)
            write_json(out / "config.json", config)
        run = _start_wandb(config) if config.wandb else None

        if self.table_prompts is None:
            self.table_prompts = self.sample_prompts(config.table_rows)
        before, before_rewards = self.sample_table(self.reference, self.table_prompts, seed=config.seed + 1)
        history = self.history
        start, elapsed_before = time.time(), self.elapsed_seconds
        saved_phase, first_phase = None, self.phase
        columns = [TextColumn(f"[bold]{self.title}[/] phase {{task.completed}}/{{task.total}}"), BarColumn(),
                   TextColumn("reward {task.fields[reward]:+.3f}  kl {task.fields[kl]:.3f}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(self.kind, total=config.phases, completed=self.phase, reward=float("nan"), kl=float("nan"))
            while self.phase < last_phase:
                phase_start = time.time()
                lr = self.optimizer.param_groups[0]["lr"]
                memory = self.rollout_phase()
                breakdown = self.learning_phase(memory)
                metrics = self.phase_metrics(breakdown, time.time() - phase_start, lr)
                history.append(metrics)
                progress.update(task, advance=1, reward=metrics["reward/mean"], kl=metrics["objective/kl"])
                if out is not None:
                    append_jsonl(out / "metrics.jsonl", metrics)
                    generation = self.last_generation
                    for row in range(min(config.samples_per_phase, len(generation.prompts))):
                        append_jsonl(out / "samples.jsonl", {
                            "phase": self.phase, "prompt": generation.prompts[row],
                            "response": generation.responses[row], "reward": memory.rewards[row].item(),
                        })
                    if config.checkpoint_every and self.phase % config.checkpoint_every == 0:
                        self.elapsed_seconds = elapsed_before + time.time() - start
                        self.save_checkpoint(out / "checkpoint")
                        saved_phase = self.phase
                if run is not None:
                    run.log(metrics, step=self.phase)

        if not history:
            raise ValueError(f"No phase to run or summarise: the trainer has completed {self.phase} of {config.phases} phases.")
        self.elapsed_seconds = elapsed_before + time.time() - start
        if out is not None and saved_phase != self.phase and (self.phase > first_phase or not (out / "checkpoint").exists()):
            self.save_checkpoint(out / "checkpoint")  # before the sample table: the state is the phase's end
        after, after_rewards = self.sample_table(self.policy.bridge, self.table_prompts, seed=config.seed + 1)
        print_before_after(console, before, before_rewards, after, after_rewards, self.reward)
        last = history[-5:]
        summary = {
            "reward_first": history[0]["reward/mean"],
            "reward_last": sum(m["reward/mean"] for m in last) / len(last),
            "kl_last": sum(m["objective/kl"] for m in last) / len(last),
            "phases": len(history),
            "episodes": len(history) * config.batch_size,
            "seconds": self.elapsed_seconds,
        }
        if out is not None:
            plot_curves(history, out)
            write_json(out / "summary.json", summary)
            console.print(f"outputs in {out} (checkpoint: {out / 'checkpoint'})")
        if run is not None:
            run.summary.update(summary)
            run.finish()
        stopped = f", stopped after phase {self.phase} of {config.phases}" if self.phase < config.phases else ""
        console.print(
            f"{self.title}: reward {summary['reward_first']:+.3f} → {summary['reward_last']:+.3f} (mean of last {len(last)} phases), "
            f"KL {summary['kl_last']:.3f} nats, {summary['episodes']} episodes in {summary['seconds']:.0f} s{stopped}"
        )
        return summary


class PPOTrainer(PolicyTrainer):
    """Holds the policy, the reference, the reward, the optimizer and the schedule.

    Use it in a notebook or debugger one call at a time::

        trainer = PPOTrainer(PPOConfig(phases=3))
        memory = trainer.rollout_phase()             # a ReplayMemory; print(memory) shows shapes and statistics
        minibatches = list(trainer.minibatches(memory))
        stats = trainer.learning_phase(memory, minibatches=minibatches)  # one dict of loss terms per minibatch
        trainer.train()                              # or the remaining phases with logging and outputs

    ``stats[0]`` equals the objectives of ``rlhf_scratch.objectives`` called by hand on
    ``minibatches[0]`` before ``learning_phase`` (see ``experiments/step_through.py``).
    """

    title = "PPO"
    kind = "ppo"
    saves_value_head = True

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
    def rollout_phase(self, prompts: list[list[int]] | None = None) -> ReplayMemory:
        """Sample a batch, score it, and fill a ``ReplayMemory`` with everything learning needs."""
        config = self.config
        rollout = self.sample_and_score(prompts)
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

        return rollout.to_memory(rollout.values, advantages, returns, keep_ref_logits=self.keeps_ref_logits)

    # ------------------------------------------------------------------ learning
    def compute_losses(self, minibatch: ReplayMemory) -> dict[str, Tensor]:
        """Every term of the PPO objective on one minibatch (with grad), by name."""
        config = self.config
        P, mask = minibatch.prompt_len, minibatch.gen_mask
        output = self.policy(minibatch.sequences, minibatch.attention_mask, fwd_hooks=self.fwd_hooks)
        scaled_logits = output.logits / config.sampling.temperature
        logits_gen = generated_logits(scaled_logits, P)
        logprobs = taken_logprobs(scaled_logits, minibatch.sequences, P)
        values = output.values[:, P - 1 : -1]
        self.last_logprobs = logprobs.detach()

        terms = {
            "surrogate": calc_clipped_surrogate(
                logprobs, minibatch.logprobs, minibatch.advantages, mask, config.clip_coef, config.normalize_advantages
            ),
            "value_loss": calc_value_loss(values, minibatch.returns, mask, config.vf_coef, minibatch.values, config.clip_range_value),
            "entropy_bonus": calc_entropy_bonus(logits_gen, mask, config.ent_coef),
        }
        terms["kl_penalty"] = self.kl_loss_term(logprobs, logits_gen, minibatch)
        for name, value in terms.items():
            check_finite(name, value)
        # The objective is maximised; the loss is its negative.
        terms["loss"] = -(terms["surrogate"] - terms["value_loss"] + terms["entropy_bonus"] - terms["kl_penalty"])
        terms.update({f"diag/{k}": v for k, v in ppo_diagnostics(logprobs.detach(), minibatch.logprobs, mask, config.clip_coef).items()})
        return terms

    def minibatches(self, memory: ReplayMemory):
        """``ppo_epochs`` passes over the memory, each in a fresh shuffle of ``minibatch_size`` episodes."""
        return memory.minibatches(self.config.minibatch_size, self.config.ppo_epochs, generator=self.generator)

    def phase_metrics(self, breakdown: list[dict[str, float]], seconds: float, lr: float) -> dict:
        """The fixed metric names logged once per phase."""
        def mean(key: str) -> float:
            return sum(row[key] for row in breakdown) / len(breakdown)

        return {
            "phase": self.phase,
            **self.last_rollout_stats,
            "losses/policy": -mean("surrogate"),
            "losses/value": mean("value_loss"),
            "losses/entropy_bonus": mean("entropy_bonus"),
            "losses/kl_penalty": mean("kl_penalty"),
            "losses/total": mean("loss"),
            "losses/clipfrac": mean("diag/clipfrac"),
            "losses/approx_kl": mean("diag/approx_kl"),
            "losses/grad_norm": mean("grad_norm"),
            "lr": lr,
            "time/learning": self.last_learning_seconds,
            "seconds": seconds,
        }


def _start_wandb(config: PolicyTrainingConfig):
    """A wandb run; offline mode unless WANDB_MODE says otherwise (no network here)."""
    import os

    import wandb

    from rlhf_scratch.outputs import to_jsonable

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=config.wandb_project, config=to_jsonable(config), mode=mode,
                      dir=str(config.out) if config.out else None)


def run_ppo(config: PPOConfig) -> dict:
    return PPOTrainer(config).train()
