"""The configs of the commands that are not trainers: sample, compare, bon, diff, pairs, pretrain, score, inspect.

Plain dataclasses, importable without torch (see ``algorithm_configs``); each command's module re-exports its
config. ``parse_system`` (compare's ``--systems`` syntax) is here because ``CompareConfig`` checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from rlhf_scratch.config import EvalConfig, SamplingConfig, TaskConfig, finite_float_checks


@dataclass
class SampleConfig:
    """Sample responses from a model and print them (optionally scored by a reward)."""

    model: str = "builtin"
    """Model: "builtin", a local model directory or run checkpoint, or a hub name such as gpt2."""
    prompt: str = ""
    """Fixed prompt for every sample (fixed-prefix mode); empty: start from BOS alone."""
    data: str | None = None
    """Dataset mode: prompts are the first 2–8 tokens of texts from "builtin", a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for --data .jsonl/.csv files and datasets."""
    n: Annotated[int, tyro.conf.arg(aliases=["-n"])] = 5
    """Number of samples."""
    reward: str | None = None
    """Score the samples with this reward (vader, chars:., hf:DIR:LABEL)."""
    prepend_bos: bool = True
    """Put the BOS token in front of every prompt (as the built-in model was trained)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    out: Path | None = None
    """If given, write config.json, samples.jsonl and summary.json here."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"-n must be >= 1, got {self.n}.")


SYSTEM_SYNTAX = (
    "Name systems as [LABEL=]KIND[:ARG]: reference | bon:N[:POOL] | ppo:DIR | reinforce:DIR | rloo:DIR | grpo:DIR | dpo:DIR | model:DIR, "
    "e.g. --systems reference ppo:runs/ppo/checkpoint bon:4 bon:16."
)


MODEL_KINDS = ("ppo", "reinforce", "rloo", "grpo", "dpo", "model")


TRAINED_KINDS = ("ppo", "reinforce", "rloo", "grpo", "dpo")
"""Kinds a checkpoint records in its rlhf_scratch.json; ``model:DIR`` accepts any directory."""


@dataclass
class SystemSpec:
    """One system to evaluate: ``kind`` is reference | bon | ppo | reinforce | rloo | grpo | dpo | model."""

    label: str
    kind: str
    path: str | None = None
    n: int | None = None
    pool_size: int | None = None


def parse_system(text: str) -> SystemSpec:
    """``"bon:4"`` → SystemSpec("best-of-4", "bon", n=4); see the module docstring for the syntax."""
    label = None
    head = text.split(":", 1)[0]
    if "=" in head:
        label, text = text.split("=", 1)
        if not label:
            raise ValueError(f"Empty label in system {text!r}. {SYSTEM_SYNTAX}")
    kind, _, arg = text.partition(":")
    if kind == "reference":
        if arg:
            raise ValueError(f"'reference' takes no argument (got {text!r}); set the reference with --model.")
        return SystemSpec(label or "reference", "reference")
    if kind == "bon":
        parts = arg.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"Bad best-of-n system {text!r}: write bon:N or bon:N:POOL with integers, e.g. bon:4.") from None
        if not 1 <= len(numbers) <= 2 or numbers[0] < 1 or (len(numbers) == 2 and numbers[1] < numbers[0]):
            raise ValueError(f"Bad best-of-n system {text!r}: need bon:N with N >= 1, or bon:N:POOL with POOL >= N.")
        n = numbers[0]
        return SystemSpec(label or f"best-of-{n}", "bon", n=n, pool_size=numbers[1] if len(numbers) == 2 else None)
    if kind in MODEL_KINDS:
        if not arg:
            raise ValueError(f"{kind} needs a directory: {kind}:DIR (e.g. {kind}:runs/{kind}/checkpoint).")
        if not Path(arg).expanduser().is_dir():
            raise ValueError(f"System {text!r}: no such directory {arg!r}. A training run's model is in OUT/checkpoint.")
        default = kind if kind != "model" else (Path(arg).parent.name if Path(arg).name == "checkpoint" else Path(arg).name)
        return SystemSpec(label or default, kind, path=arg)
    raise ValueError(f"Unknown system {text!r}. {SYSTEM_SYNTAX}")


@dataclass
class CompareConfig(EvalConfig):
    """Compare systems (reference, checkpoints, best-of-n) on the same held-out prompts; write a report."""

    systems: list[str] = field(default_factory=lambda: ["reference", "bon:4"])
    """Systems to compare, [LABEL=]KIND[:ARG] each: reference | bon:N[:POOL] | ppo:DIR | reinforce:DIR | rloo:DIR | grpo:DIR |
    dpo:DIR | model:DIR."""

    def _checks(self) -> list[tuple[bool, str]]:
        checks = [*super()._checks(), (len(self.systems) >= 1, f"Give at least one system. {SYSTEM_SYNTAX}")]
        labels = [parse_system(s).label for s in self.systems]  # raises ValueError with the syntax on a bad one
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        checks.append((not duplicates, f"Two systems are both called {', '.join(duplicates)}; "
                                       "tell them apart with LABEL=, e.g. ppo_a=ppo:runs/a/checkpoint."))
        return checks


@dataclass
class BonConfig(EvalConfig):
    """Best-of-n from the reference model vs the reference itself, on held-out prompts."""

    n: int = 4
    """Candidates per prompt; the highest-reward one is kept."""
    pool_size: int | None = None
    """Reference samples per prompt used to estimate the KL of best-of-n (>= n; default 4n)."""

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.n >= 1, f"n must be >= 1, got {self.n}."),
            (self.pool_size is None or self.pool_size >= self.n,
             f"pool_size ({self.pool_size}) must be >= n ({self.n}), or omitted for 4n."),
        ]


@dataclass
class DiffConfig:
    """Compare a trained policy with its reference on the same texts: residual stream, weights, log-probs, DLA."""

    policy: str = ""
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    second_policy: str | None = None
    """A second policy trained from the same reference (e.g. another seed): the update-sparsity section then reports
    how much the two runs' changed weight entries overlap, against chance."""
    timeline: Path | None = None
    """Instead of --policy: a run directory trained with --snapshot-every; measure every snapshot against the reference
    and plot the change over phases (timeline.md, timeline_residual.png, timeline_heads.png, timeline.json)."""
    reference: str = "builtin"
    """The model the policy was trained from: "builtin", a model directory, or a hub name."""
    prompts: str = "builtin"
    """Texts: "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 64
    """Number of token sequences both models read."""
    from_samples: bool = True
    """True: each sequence is a held-out prompt (first 2–8 tokens of a text) plus the policy's own sampled response,
    so the diff is measured where the policy's behaviour is; False: the texts themselves (teacher-forced)."""
    max_new_tokens: int = 24
    """Response length with --from-samples."""
    max_tokens: int = 64
    """Texts are cut to this many tokens with --no-from-samples (and to the model's context, with a note, if smaller)."""
    tokens: str | None = None
    """DLA token set, comma-separated words (e.g. "great,loved,wonderful"); default: the top-k tokens whose log-prob rose most."""
    top_k: int = 15
    """Rows of the rose/fell tables and size of the default DLA token set."""
    prepend_bos: bool = True
    """Put BOS in front of each text (as the built-in model was trained)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/diff")
    """Output directory: report.md, residual.png, weight_change.png, dla.png, summary.json, config.json."""

    def __post_init__(self):
        checks = [
            (bool(self.policy) or self.timeline is not None,
             "--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint (or --timeline RUN_DIR)."),
            (self.n_texts >= 1, f"n_texts must be >= 1, got {self.n_texts}."),
            (self.max_new_tokens >= 1 and self.max_tokens >= 2, "max_new_tokens must be >= 1 and max_tokens >= 2."),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class PairsConfig(TaskConfig):
    """Build preference pairs from a model's own samples: sample, score with a reward, pair winners with losers.

    Prompts come from ``--data`` (first min–max tokens of its texts; by default held-out built-in
    reviews) or ``--prompt``; each gets ``samples_per_prompt`` responses."""

    n: int = 5000
    """Number of sampled responses in total (n / samples_per_prompt prompts)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt; pairs are formed within a prompt's responses."""
    threshold: float = 0.0
    """Winner threshold: score > threshold wins, score <= threshold loses. With vader (compound in [-1, 1]), 0.0
    splits positive from neutral-or-negative texts: about half of the built-in model's samples each."""
    batch_size: int = 256
    """Sequences generated per forward batch."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/pairs")
    """Output directory: pairs.jsonl, config.json, summary.json."""

    def _checks(self) -> list[tuple[bool, str]]:
        spp = self.samples_per_prompt
        return [
            *super()._checks(),
            (spp >= 2, f"samples_per_prompt must be >= 2 (pairs are formed within a prompt's responses), got {spp}."),
            (self.n >= max(spp, 1), f"n ({self.n}) must be >= samples_per_prompt ({spp})."),
            (spp < 1 or self.n % spp == 0,
             f"n ({self.n}) must be a multiple of samples_per_prompt ({spp}); e.g. --n {max(spp, 1) * max(self.n // max(spp, 1), 1)}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (math.isfinite(self.threshold), f"threshold must be a finite number, got {self.threshold}."),
        ]


@dataclass
class PretrainConfig:
    """Pretraining of a small GPT-2 on the built-in review corpus or your own text."""

    out: Path | None = None
    """Directory for config.json, summary.json, samples.txt and the model (out/model)."""
    data: Path | None = None
    """Your own text (.txt one text per line, .jsonl or .csv with --column); default: the built-in review corpus."""
    column: str = "text"
    """Column/field holding the text in a .jsonl or .csv --data file."""
    n_texts: int = 24000
    """Number of generated reviews to train on (built-in corpus only)."""
    n_heldout: int = 1000
    """Texts kept apart to measure perplexity: at most a tenth of all texts (fewer with a small --data file; the run
    then says how many it held out)."""
    vocab_size: int = 2048
    """BPE vocabulary size (including the special token)."""
    n_layer: int = 4
    """Transformer blocks (GPT-2 architecture)."""
    n_head: int = 4
    """Attention heads per block (must divide d_model)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_ctx: int = 128
    """Context length in tokens; longer texts are truncated."""
    steps: int = 900
    """Optimizer steps."""
    batch_size: int = 48
    lr: float = 3e-3
    """Peak learning rate (AdamW), with linear warmup over 5% of the steps and cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    n_samples: int = 200
    """Samples drawn after training to measure the English-word share."""
    install_builtin: bool | None = None
    """Install the model as the cached built-in model, which every `--model builtin` command then uses. None
    (default): only when every setting that shapes the model is the default (no --data, --steps, --seed, ...
    changed); otherwise the model goes to --out/model or, without --out, a directory of its own in the cache
    (printed). True: install it even with other settings. False: never."""
    cache_dir: Path | None = None
    """Where the built-in model is cached (default: $RLHF_SCRATCH_CACHE or the user cache dir)."""

    def __post_init__(self):
        for ok, message in finite_float_checks(self):
            if not ok:
                raise ValueError(message)
        if self.data is not None and Path(self.data).is_dir():
            raise ValueError(f"--data {self.data} is a directory; give a .txt, .jsonl or .csv file of texts.")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data}: no such file. Give a .txt, .jsonl or .csv file of texts.")
        for name in ("n_texts", "n_heldout", "vocab_size", "n_layer", "n_head", "d_model", "n_ctx", "steps", "batch_size",
                     "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}).")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + merges), got {self.vocab_size}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.install_builtin and self.data is not None:
            raise ValueError(
                f"--install-builtin True installs a model of the built-in review corpus; a model of --data {self.data} "
                "is used with --model OUT/model (pass --out OUT) instead of replacing the built-in model."
            )


@dataclass
class ScoreConfig:
    """Pairwise accuracy of any reward (rm:DIR, vader, chars:C, hf:DIR:LABEL) on a pair file."""

    pairs: Path
    """Pair file (.jsonl/.csv) or a datasets name."""
    reward: str = "vader"
    """Reward spec: rm:DIR | vader | chars:C | hf:PATH_OR_NAME:LABEL[:prob]."""
    out: Path | None = None
    """If given, write config.json and summary.json here."""
    batch_size: int = 64
    """Texts scored per reward call."""
    limit: int | None = None
    """Use only the first LIMIT pairs."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or omitted, got {self.limit}.")


@dataclass
class InspectConfig:
    """One sample of a PPO policy: value, reward, advantage and return per token, and the value lens."""

    checkpoint: str
    """A PPO checkpoint directory (with value_head.safetensors), e.g. runs/ppo/checkpoint."""
    prompt: str = ""
    """Prompt text (empty: BOS alone)."""
    response: str | None = None
    """Inspect this response instead of sampling one."""
    reward: str | None = None
    """Reward spec (default: the run's reward, from the checkpoint's resume_state.json or the run's config.json; else vader)."""
    reference: str | None = None
    """Reference model for the per-token KL term (e.g. builtin); default: none, rewards without KL."""
    max_new_tokens: int = 24
    """Length of a sampled response."""
    prepend_bos: bool = True
    """Put BOS in front of the prompt (as the built-in model was trained)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = None
    """If given: value_lens.png, tokens.csv, summary.json, config.json."""

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("--checkpoint is required: a PPO checkpoint directory, e.g. runs/ppo/checkpoint.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.response is not None and not self.response:
            raise ValueError("--response must not be empty; omit it to sample a response.")


DIRECTIONS = ("policy_into_reference", "reference_into_policy")
"""The two directions of ``rlhf-scratch patch``: which model's activations are patched into which."""


@dataclass
class PatchConfig:
    """Activation patching between a trained policy and its reference, on the policy's own samples."""

    policy: str = ""
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    reference: str = "builtin"
    """The model the policy was trained from: "builtin", a model directory, or a hub name."""
    prompts: str = "builtin"
    """Prompt texts: "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 32
    """Number of prompts; each gets one sampled policy response (the sequences both models read)."""
    max_new_tokens: int = 16
    """Response length."""
    reward: str | None = "vader"
    """Reward whose gap is patched (vader, chars:., hf:..., rm:DIR); "none" skips it (it samples anew for each
    component, the slowest measure)."""
    tokens: str | None = None
    """Token set, comma-separated words (single tokens); default: the top_k tokens whose mean probability rose most
    at response positions."""
    top_k: int = 5
    """Size of the default token set."""
    direction: str = "both"
    """policy_into_reference, reference_into_policy, or both."""
    greedy: int = 0
    """Also select N heads and MLPs by greedy forward selection (policy -> reference; each step adds the component
    that recovers the most of --greedy-metric together with those already chosen) and report each prefix beside the
    n best singles; 0 = off."""
    greedy_metric: str = "kl"
    """What greedy selection maximises: kl (the sequence KL recovered) or tokens (the token set's log-prob)."""
    prepend_bos: bool = True
    """Put BOS in front of each prompt (as the built-in model was trained)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the prompts and of every sampling (the same seed gives the same run)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/patch")
    """Output directory: report.md, patch_<direction>.png, summary.json, config.json."""

    def __post_init__(self):
        checks = [
            (bool(self.policy), "--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint."),
            (self.n_texts >= 1 and self.max_new_tokens >= 1, "n_texts and max_new_tokens must be >= 1."),
            (self.top_k >= 1 and self.batch_size >= 1, "top_k and batch_size must be >= 1."),
            (self.direction in (*DIRECTIONS, "both"), f"--direction {self.direction!r}: choose from {', '.join(DIRECTIONS)} or both."),
            (self.greedy >= 0, f"--greedy must be >= 0 (how many components to select; 0 = off), got {self.greedy}."),
            (self.greedy_metric in ("kl", "tokens"), f"--greedy-metric {self.greedy_metric!r}: choose kl or tokens."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.reward is not None and self.reward.lower() == "none":
            self.reward = None


@dataclass
class LensConfig:
    """Activation Difference Lens and steering: what does the policy's mean residual difference on unrelated text say?"""

    policy: str = ""
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    reference: str = "builtin"
    """The model the policy was trained from: "builtin", a model directory, or a hub name."""
    texts: str = "builtin"
    """Held-out text the policy never trained on: "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 64
    """Number of texts Δ is averaged over."""
    first_k: int = 5
    """Δ averages the first k real positions of each text (BOS included when prepended)."""
    top_k: int = 10
    """Top tokens of the lens per layer."""
    layer: int | None = None
    """Steer at blocks.{layer}.hook_resid_post; default: the middle layer (n_layers // 2)."""
    alphas: str = "0,1,2,4,8"
    """Steering strengths α (comma-separated); α = 0 is the unsteered reference."""
    tokens: str | None = None
    """Token set whose log-prob the steering sweep reports; default: the lens's top_k tokens at the steering layer."""
    reward: str | None = "vader"
    """Reward of the steered reference's samples (vader, chars:., hf:..., rm:DIR); "none" skips sampling."""
    n_prompts: int = 32
    """Held-out prompts the steered reference answers (for the reward)."""
    max_new_tokens: int = 16
    """Response length of the steered samples."""
    max_tokens: int = 32
    """Texts are cut to this many tokens."""
    prepend_bos: bool = True
    """Put BOS in front of each text (as the built-in model was trained)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the texts, prompts and sampling."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/lens")
    """Output directory: report.md, steering.png, summary.json, config.json."""

    def __post_init__(self):
        checks = [
            (bool(self.policy), "--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint."),
            (self.n_texts >= 1 and self.first_k >= 1 and self.top_k >= 1, "n_texts, first_k and top_k must be >= 1."),
            (self.n_prompts >= 1 and self.max_new_tokens >= 1 and self.max_tokens >= 2,
             "n_prompts and max_new_tokens must be >= 1, max_tokens >= 2."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.alpha_values  # noqa: B018 (refuses bad --alphas now)
        if self.reward is not None and self.reward.lower() == "none":
            self.reward = None


    @property
    def alpha_values(self) -> list[float]:
        try:
            values = [float(a) for a in self.alphas.split(",") if a.strip()]
        except ValueError:
            raise ValueError(f"--alphas {self.alphas!r}: give comma-separated numbers such as 0,1,2,4,8.") from None
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"--alphas {self.alphas!r}: give finite comma-separated numbers such as 0,1,2,4,8.")
        return values


@dataclass
class ExportConfig:
    """Write a model as a plain save_pretrained directory; a LoRA run's adapters merged into its weights (W + s·B A)."""

    model: str
    """What to export: a run's --out or checkpoint/ folder (LoRA: base weights + lora_adapters.safetensors), or any model."""
    out: Path
    """Where the merged model goes (config.json, model.safetensors, tokenizer; value_head.safetensors if it has one)."""
    device: str = "cpu"
    """Where the model is loaded and merged: cpu, cuda, cuda:N or mps."""
