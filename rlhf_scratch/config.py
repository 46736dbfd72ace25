"""The config every system shares: which model, which reward, which prompts, which sampler.

Each command's config (``PPOConfig``, ``REINFORCEConfig``, ``EvalConfig``, ...) extends
``TaskConfig``; the trainers of a policy by sampling (PPO, REINFORCE) share ``PolicyTrainingConfig``; every field is a documented command-line flag, and ``__post_init__``
rejects bad values with a message that says how to fix them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A config value was refused (by a config's ``__post_init__``); the message says how to fix it."""


@contextlib.contextmanager
def config_errors_raised():
    """Within, a config that ``tyro.cli`` fails to build raises ``ConfigError`` with the one-line message of its
    ``__post_init__``, instead of tyro drawing a multi-line box and exiting (its parse-error hook, tyro >= 1.0;
    on a tyro without it the box stays)."""
    try:
        import tyro._errors as errors  # private in tyro 1.0: absent elsewhere, then the box stays
    except ImportError:
        errors = None
    hook = getattr(errors, "on_parse_error", None)
    failure = getattr(errors, "InstantiationFailure", None)
    if hook is None or failure is None:
        yield
        return

    def raise_it(event) -> None:
        if isinstance(event, failure):
            flags = getattr(getattr(getattr(event, "argument", None), "lowered", None), "name_or_flags", None)
            raise ConfigError(f"{'/'.join(flags)}: {event.message}" if flags else event.message)

    with hook(raise_it):
        yield


def finite_float_checks(config) -> list[tuple[bool, str]]:
    """One check per float field of a config dataclass: finite. NaN passes every ``x >= 0`` check and inf most
    (``--kl-coef inf`` used to fail only after loading the model, as a NaN loss)."""
    return [(math.isfinite(value), f"{f.name} must be a finite number, got {value}.")
            for f in dataclasses.fields(config) if isinstance(value := getattr(config, f.name), float)]


LORA_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "mlp.gate")
"""The matrices LoRA can adapt, by their TransformerLens names (``blocks.L.attn.q``; ``mlp.gate``: gated MLPs only)."""
LORA_GROUPS = {"attn": LORA_TARGETS[:4], "mlp": LORA_TARGETS[4:], "all": LORA_TARGETS}


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    """``"q,v"`` / ``"attn.q,mlp.in"`` / ``"attn"`` / ``"all"`` → the target names (``LORA_TARGETS`` order); an
    unknown name is a ``ConfigError`` that lists the known ones."""
    chosen = set()
    for item in (part.strip() for part in str(spec).split(",")):
        if item in LORA_GROUPS:
            chosen.update(LORA_GROUPS[item])
        elif item in LORA_TARGETS or (item and f"attn.{item}" in LORA_TARGETS) or (item and f"mlp.{item}" in LORA_TARGETS):
            chosen.add(item if "." in item else (f"attn.{item}" if f"attn.{item}" in LORA_TARGETS else f"mlp.{item}"))
        else:
            raise ConfigError(f"--lora-targets: unknown target {item!r}; choose from {', '.join(LORA_TARGETS)} (short: "
                              "q, k, v, o, in, out, gate) or the groups attn, mlp, all, comma-separated.")
    return tuple(t for t in LORA_TARGETS if t in chosen)


def lora_targets_check(spec: str) -> tuple[bool, str]:
    """``(ok, message)`` for ``_checks``: ``spec`` parses (``parse_lora_targets``)."""
    try:
        parse_lora_targets(spec)
    except ConfigError as error:
        return False, str(error)
    return True, ""


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 24
    """Maximum number of generated tokens per response."""
    temperature: float = 1.0
    """Softmax temperature; log-probs used in training are taken at this temperature too."""
    top_k: int | None = None
    """Keep only the k most likely tokens at each step (None: no top-k filter)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with total probability >= top_p (1.0: off)."""
    stop_at_eos: bool = True
    """End a response at its first EOS token; later positions become padding."""
    compiled_decoding: bool = False
    """Compile the single-token decoding step with torch.compile (a static KV cache; seconds to a minute of compiling
    per batch size and cache length, then faster steps: see benchmarks/README.md). Only where the steps run as the
    plain module (no hooks); opt-in."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature}. For greedy decoding use a "
                "small temperature such as 1e-3 or top_k=1."
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no filter), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off.")


@dataclass
class TaskConfig:
    """The model, reward, prompts and sampler of a run. Defaults: the built-in offline sentiment task."""

    model: str = "builtin"
    """Model: "builtin", a local model directory or run checkpoint, or a hub name such as gpt2 (the policy to
    start from when training, the reference when evaluating)."""
    reward: str = "vader"
    """Reward: vader | chars:. | hf:PATH_OR_NAME:LABEL[:prob] | rm:DIR (a reward model trained with `rlhf-scratch rm`)."""
    data: str = "builtin"
    """Prompt texts (dataset mode): "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets prompt sources."""
    prompt: str | None = None
    """Fixed-prefix mode: every row gets this prompt (overrides --data)."""
    min_prompt_tokens: int = 2
    """Dataset mode: shortest prompt, in tokens (first k tokens of a text, k uniform in [min, max])."""
    max_prompt_tokens: int = 8
    """Dataset mode: longest prompt, in tokens."""
    prepend_bos: bool = True
    """Put BOS in front of each prompt (the built-in model was trained that way)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """(condition, message saying how to fix it) pairs; subclasses add their own."""
        return [
            *finite_float_checks(self),
            (1 <= self.min_prompt_tokens <= self.max_prompt_tokens,
             f"need 1 <= min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, {self.max_prompt_tokens}."),
            (self.prompt is None or self.prompt != "", "--prompt must not be empty; omit it to use --data."),
        ]


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
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of every optimised parameter (trunk, and value head for PPO) to this value."""
    warmup_phases: int | None = None
    """Linear warmup length in phases (the schedule steps once per phase); None: 2, or phases − 1 when a run has
    fewer than 3 phases (so a quick `--phases 1` or `--phases 2` trial runs). 0: no warmup."""
    final_lr_scale: float = 0.1
    """Learning-rate multiplier reached at the last phase (linear decay after warmup)."""

    grad_accum_steps: int = 1
    """Cut each minibatch (each rank's share of it, data-parallel) into this many micro-batches, one forward and
    backward each, then one optimiser step: the gradient of the whole minibatch with the activations of one
    micro-batch in memory. Must divide the minibatch (per rank)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward passes of the policy and the reference under torch.autocast in this dtype (not generation);
    log-softmax, KL, losses, weights and the optimiser state stay float32."""
    lora_rank: int = 0
    """Train low-rank adapters of this rank instead of every weight (0: off, full-parameter training). The base weights
    are frozen, only the adapters (and PPO's value head) train, and the reference is the same model with the adapters
    switched off: no second copy of the weights (rlhf_scratch/lora.py, docs/lora.md). LoRA wants a larger --lr than
    full-parameter training (about 10x)."""
    lora_alpha: float | None = None
    """LoRA scale numerator: each adapted matrix computes W x + (alpha / rank)·B A x. None: alpha = rank (scale 1)."""
    lora_targets: str = "all"
    """Matrices LoRA adapts, comma-separated: attn.q, attn.k, attn.v, attn.o, mlp.in, mlp.out, mlp.gate (short: q, k,
    v, o, in, out, gate), or the groups attn, mlp, all (all: every one the model family has)."""
    plain_forward: bool = True
    """Run the forward passes no hook watches (the rollout's decoding steps, policy and reference passes, the learning
    passes) as the plain Hugging Face module on the bridge's own weights: the same function to float rounding,
    without the TransformerLens hook points' overhead (rlhf_scratch/plain_forward.py, plain_decoding.py). Passes with
    hooks always go through the bridge. False: every pass through the bridge."""
    separate_rollout_forward: bool = False
    """Read the old policy's log-probs and values with a separate forward pass over the sampled batch. By default
    they are taken from the generation's own decoding steps when that is exact (float32, no hooks, dropout off: the
    same function, to float rounding), and this pass runs only where it is not (--dtype bfloat16, hooks)."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input for the backward pass of the learning forward and recompute the rest
    then (rlhf_scratch/checkpointing.py): the same gradients, much less activation memory, one more forward of each block (+12% learning-pass CPU time at GPT-2-small).
    Applies to the plain forward (a learning pass with hooks goes through the bridge and keeps every activation)."""
    reference_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen reference's weights: bfloat16 or float16 halve its memory; its log-probs then differ
    from float32 ones by rounding, which adds to the measured KL (docs/memory.md gives the figures)."""

    # --- KL to the reference ---
    kl_coef: float = 0.05
    """Weight of the KL penalty (initial value when adaptive)."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """"reward": −kl_coef·KL_t is added to each token's reward (Ziegler et al., TRL); "loss": kl_coef·KL is a loss term (ARENA)."""
    kl_estimator: Literal["exact", "k1", "k3"] = "k1"
    """Per-token KL: "exact" full-distribution Σ_v π(v) log(π(v)/π_ref(v)); "k1" log π − log π_ref; "k3" (r−1) − log r."""
    log_exact_kl: bool = False
    """Also log objective/kl_exact, the exact full-vocabulary KL of each response summed over its tokens (one more
    pass over [batch, tokens, vocab] per rollout). objective/kl is always the sum of the configured estimator's KL_t
    (as in TRL); with kl_estimator="exact" the two are the same."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""

    # --- run ---
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = None
    """Output directory (config.json, metrics.jsonl, samples.jsonl, plots, checkpoint/, summary.json)."""
    samples_per_phase: int = 4
    """Rows written to samples.jsonl per phase."""
    table_rows: int = 6
    """Rows of the before/after sample table printed at the end."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when there is no network)."""
    wandb_project: str = "rlhf_scratch"
    """W&B project name (with --wandb)."""
    checkpoint_every: int = 0
    """Write OUT/checkpoint every this many phases as well as at the end (0: only at the end)."""
    checkpoint_minutes: float = 10.0
    """Also write OUT/checkpoint after a phase once this many minutes have passed since the last one (or the start),
    so that even a `kill -9` loses at most that much training; 0: off. (Ctrl-C and SIGTERM always checkpoint.)"""
    stop_after_phase: int | None = None
    """Stop after this phase with the checkpoint written, as a Ctrl-C would (exit status 0): to cut a long run into
    jobs, or to try --resume. Continue with --resume OUT (this flag is not carried over). None: run every phase."""
    snapshot_every: int = 0
    """Save the policy's weights every this many phases in OUT/snapshots/phase_NNNN/ (a model directory, not a resume
    checkpoint) for `rlhf-scratch diff --timeline OUT`; 0: off. Each costs the model's size on disk."""
    eval_every: int = 0
    """Evaluate the policy every this many phases and after the last, on eval_prompts held-out prompts with the shared
    evaluation (eval/* metrics: reward, KL to the reference, entropy, distinct-n, length); 0: off. Training is unchanged."""
    eval_prompts: int = 64
    """Held-out prompts of --eval-every (the same ones, sampled with the same seed, at every evaluation)."""
    resume: Path | None = None
    """Continue a run from its checkpoint: the run's --out directory or its checkpoint/ folder. The run's saved config
    is used; flags you pass must agree with it, except out, device, wandb, checkpoint_every, snapshot_every,
    eval_every, debug and the sample rows written. Metrics for the remaining phases equal an uninterrupted run's."""

    # --- debugging ---
    debug: bool = False
    """Check invariants every phase (masks, no NaN, sampling = rollout, ratio = 1 on the first minibatch, approx-KL
    bound) and stop with an InvariantError naming the first that fails (see rlhf_scratch/invariants.py)."""
    debug_max_approx_kl: float = 1.0
    """With --debug: the largest approx-KL(π_old ‖ π) a minibatch may reach (default-task runs peak near 0.01)."""

    @property
    def effective_warmup_phases(self) -> int:
        """The warmup the schedule uses: warmup_phases, or by default min(2, phases − 1)."""
        return min(2, self.phases - 1) if self.warmup_phases is None else self.warmup_phases

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.phases >= 1, f"phases must be >= 1, got {self.phases}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.lr > 0, f"lr must be > 0, got {self.lr}."),
            (self.warmup_phases is None or 0 <= self.warmup_phases < self.phases,
             f"warmup_phases must be in [0, phases={self.phases}), got {self.warmup_phases}: pass --warmup-phases 0 "
             f"(no warmup) or at most {self.phases - 1}, or leave it out (2, fewer in a short run)."),
            (0 <= self.final_lr_scale <= 1, f"final_lr_scale must be in [0, 1], got {self.final_lr_scale}."),
            (self.kl_coef >= 0, f"kl_coef must be >= 0 (0 turns the KL penalty off), got {self.kl_coef}."),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}."),
            (self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}."),
            (self.lora_rank >= 0, f"lora_rank must be a positive integer (or 0: no LoRA), got {self.lora_rank}."),
            (self.lora_alpha is None or self.lora_rank > 0,
             f"lora_alpha={self.lora_alpha} was given without --lora-rank: pass --lora-rank R too (or drop --lora-alpha)."),
            (self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}."),
            lora_targets_check(self.lora_targets),
            (self.plain_forward or not self.gradient_checkpointing,
             "gradient_checkpointing needs the plain forward: drop --no-plain-forward, or --gradient-checkpointing."),
            (self.lora_rank == 0 or self.reference is not None or self.reference_dtype == "float32",
             f"reference_dtype={self.reference_dtype} has no effect with LoRA: the reference is the policy's own frozen "
             "weights with the adapters off (no copy to shrink). Drop --reference-dtype, or give --reference MODEL."),
            (self.target_kl > 0 and self.kl_horizon > 0, "target_kl and kl_horizon must be > 0."),
            (self.samples_per_phase >= 0, f"samples_per_phase must be >= 0, got {self.samples_per_phase}."),
            (self.table_rows >= 1, f"table_rows must be >= 1 (rows of the before/after table), got {self.table_rows}."),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}."),
            (self.checkpoint_minutes >= 0, f"checkpoint_minutes must be >= 0 (0: off), got {self.checkpoint_minutes}."),
            (self.stop_after_phase is None or self.stop_after_phase >= 1,
             f"stop_after_phase must be >= 1 (or left out), got {self.stop_after_phase}."),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0: off), got {self.eval_every}."),
            (self.snapshot_every >= 0, f"snapshot_every must be >= 0 (0: off), got {self.snapshot_every}."),
            (self.eval_prompts >= 1, f"eval_prompts must be >= 1, got {self.eval_prompts}."),
            (self.debug_max_approx_kl > 0, f"debug_max_approx_kl must be > 0, got {self.debug_max_approx_kl}."),
        ]


@dataclass
class EvalConfig(TaskConfig):
    """Evaluation of systems on held-out prompts (shared fields of `bon` and `compare`)."""

    n_prompts: int = 128
    """Number of held-out prompts; every system answers the same ones, once each."""
    threshold: float = 0.5
    """reward_frac_above is the share of rewards above this value."""
    batch_size: int = 64
    """Sequences generated per forward batch."""
    table_rows: int = 6
    """Prompts shown in the sample table."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = None
    """Output directory (config.json, summary.json, report files)."""

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.table_rows >= 0, f"table_rows must be >= 0, got {self.table_rows}."),
            (math.isfinite(self.threshold), f"threshold must be a finite reward, got {self.threshold}."),
        ]
