"""Evaluation shared by every system: reward, KL to the reference, diversity, length, sample tables, plots.

A *system* is anything that answers prompts: a model (the reference, a PPO or REINFORCE
checkpoint) or best-of-n around a model. Each is wrapped in a *sampler* with one method,
``sample(prompts, reward, generator) -> EvalSamples`` (one response per prompt, in order,
with its reward and the terms of its KL estimate), and ``evaluate(sampler, prompts, reward,
seed=...)`` turns that into one row of metrics:

    reward      reward_mean, reward_median, reward_std, reward_frac_above (share of rewards > threshold)
    KL          kl, kl_se: mean and standard error of the sampler's KL terms (nats, whole response)
                kl_bound: an analytic upper bound where one is known (best-of-n), else None
    diversity   token_entropy (nats), distinct_1, distinct_2 over all generated tokens
    length      length (mean real generated tokens, closing EOS included), eos_rate

KL of a model π to the reference π_ref (``ModelSampler``): one term per sample,

    KL(π‖π_ref) = E_{y∼π}[ Σ_t log π(y_t | y_<t) − log π_ref(y_t | y_<t) ]

summed over the real generated tokens, both models at the sampling settings (temperature,
top-k, top-p): an unbiased estimate whose terms can be negative. Best-of-n has no
per-token log-probability of its own; ``rlhf_scratch.bon`` explains what it reports.

Shapes: B batch, G generated length, V vocab, N samples.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, jaxtyped
from rich.table import Table
from torch import Tensor

from rlhf_scratch.data import fixed_prefix_prompts, load_texts, prompts_from_texts
from rlhf_scratch.models import check_fwd_hooks
from rlhf_scratch.objectives import generated_logits, masked_sequence_sum
from rlhf_scratch.rewards import score_texts
from rlhf_scratch.sampling import Generation, SamplingConfig, encode, filter_logits, generate
from rlhf_scratch.typecheck import typechecker
from rlhf_scratch.config import EvalConfig  # noqa: F401 (defined there: importable without torch)

# Evaluation prompts are cut from texts drawn with this offset added to the seed, so that
# with the built-in corpus they are reviews that neither pretraining (seed 0) nor a
# trainer's prompt pool (seed 1 + seed) has seen.
HELDOUT_SEED_OFFSET = 1000


# --------------------------------------------------------------------------- metrics


@jaxtyped(typechecker=typechecker)
def reward_stats(rewards: Float[Tensor, "n"], threshold: float) -> dict[str, float]:
    """Summary of N rewards.

    mean = Σ r / N;  median = the middle value (mean of the two middle values when N is even);
    std = sqrt(Σ (r − mean)² / (N − 1))  (0 when N = 1);  frac_above = #{r > threshold} / N
    rewards [N] -> {"mean", "median", "std", "frac_above"}
    """
    rewards = rewards.double()
    n = rewards.numel()
    ordered = rewards.sort().values
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {
        "mean": rewards.mean().item(),
        "median": median.item(),
        "std": rewards.std().item() if n > 1 else 0.0,
        "frac_above": (rewards > threshold).double().mean().item(),
    }


@jaxtyped(typechecker=typechecker)
def mean_and_stderr(x: Float[Tensor, "n"]) -> tuple[float, float]:
    """``(mean, standard error)`` of N independent terms: se = sqrt(Σ (x − mean)² / (N − 1)) / sqrt(N); 0 when N = 1."""
    x = x.double()
    if x.numel() == 1:
        return x.item(), 0.0
    return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()


@jaxtyped(typechecker=typechecker)
def sequence_log_ratio(
    logprobs: Float[Tensor, "batch gen"], ref_logprobs: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"]
) -> Float[Tensor, "batch"]:
    """Log-ratio of a whole response: Σ_t (log π(y_t) − log π_ref(y_t)) over its real generated tokens.

    log_ratio[b] = Σ_{t: gen_mask[b, t]} (logprobs[b, t] − ref_logprobs[b, t])      [B, G] -> [B]

    Its mean over responses sampled from π is an unbiased estimate of the sequence KL(π‖π_ref).
    Padding is excluded with ``masked_sequence_sum`` (a −inf log-prob there would otherwise give nan).
    """

    return masked_sequence_sum(logprobs - ref_logprobs, gen_mask)


@jaxtyped(typechecker=typechecker)
def sampling_logprobs(
    logits_gen: Float[Tensor, "batch gen vocab"], tokens: Int[Tensor, "batch gen"], sampling: SamplingConfig
) -> Float[Tensor, "batch gen"]:
    """log π(y_t) under the distribution the sampler actually draws from.

    logprobs[b, t] = log_softmax(filter_logits(logits_gen[b, t], T, top_k, top_p))[tokens[b, t]]
    logits_gen [B, G, V] (the logits that predict the generated tokens), tokens [B, G] -> [B, G]

    Without top-k / top-p this is log_softmax(logits / T). With them, a token outside the kept
    set has log-probability −inf (and a KL that involves it is infinite, as it should be).
    """
    batch, gen, vocab = logits_gen.shape
    filtered = filter_logits(logits_gen.reshape(batch * gen, vocab).float(), sampling.temperature, sampling.top_k, sampling.top_p)
    logprobs_all = F.log_softmax(filtered.reshape(batch, gen, vocab), dim=-1)
    return torch.gather(logprobs_all, dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(sequences: Sequence[Sequence[Hashable]]) -> float:
    """Entropy (nats) of the empirical distribution of all tokens of all sequences pooled together.

    H = −Σ_v (c_v / N) · log(c_v / N),  c_v = count of token v, N = Σ_v c_v  (0 when N = 0)

    This is the diversity measure of the f-DPO paper's seed setup: how spread out the
    generated vocabulary is, not the model's predictive entropy. Tokens may be any hashable
    (token ids, words).
    """
    counts = Counter(token for sequence in sequences for token in sequence)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log(c / total) for c in counts.values())


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct-n: the number of distinct n-grams divided by the total number of n-grams.

    distinct_n = |{n-grams}| / Σ_s max(len(s) − n + 1, 0)   (0 when there is no n-gram)

    n-grams are taken within each sequence (never across two of them) and pooled over all
    sequences, as in Li et al. (2016). 1.0: no n-gram repeats anywhere.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (1 for distinct-1, 2 for distinct-2), got {n}.")
    grams = [tuple(sequence[i : i + n]) for sequence in sequences for i in range(len(sequence) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# --------------------------------------------------------------------------- samples and samplers


@dataclass(eq=False)
class EvalSamples:
    """One response per prompt from a sampler, flattened over all prompts (N of them).

    prompts, responses      N strings (the response without its closing EOS)
    response_tokens         N token-id lists: the response's tokens, closing EOS dropped
    rewards                 Float [N]
    lengths                 Int   [N]   real generated tokens, closing EOS included
    ended_with_eos          Bool  [N]
    kl_terms                Float [M]   independent terms whose mean estimates KL(π‖π_ref) in nats
                                        (one per sample for a model, one per prompt for best-of-n)
    """

    prompts: list[str]
    responses: list[str]
    response_tokens: list[list[int]]
    rewards: Float[Tensor, "n"]
    lengths: Int[Tensor, "n"]
    ended_with_eos: Bool[Tensor, "n"]
    kl_terms: Float[Tensor, "m"]

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def texts(self) -> list[str]:
        return [p + r for p, r in zip(self.prompts, self.responses)]

    @classmethod
    def from_generation(cls, generation: Generation, rewards: Tensor, kl_terms: Tensor,
                        rows: Sequence[int] | None = None) -> "EvalSamples":
        """The rows ``rows`` (default: all) of a generated batch, with their rewards and the KL terms."""
        rows = list(range(len(generation.responses))) if rows is None else [int(r) for r in rows]
        tokens = []
        for row in rows:
            real = generation.response_tokens[row][generation.gen_mask[row]].tolist()
            tokens.append(real[:-1] if bool(generation.ended_with_eos[row]) else real)
        index = torch.tensor(rows, dtype=torch.long)
        return cls(
            prompts=[generation.prompts[r] for r in rows],
            responses=[generation.responses[r] for r in rows],
            response_tokens=tokens,
            rewards=rewards.detach().float().cpu()[index],
            lengths=generation.gen_mask.sum(1)[index].long(),
            ended_with_eos=generation.ended_with_eos[index],
            kl_terms=kl_terms.detach().float().cpu(),
        )

    @classmethod
    def concat(cls, parts: Sequence["EvalSamples"]) -> "EvalSamples":
        return cls(
            prompts=[p for part in parts for p in part.prompts],
            responses=[r for part in parts for r in part.responses],
            response_tokens=[t for part in parts for t in part.response_tokens],
            rewards=torch.cat([part.rewards for part in parts]),
            lengths=torch.cat([part.lengths for part in parts]),
            ended_with_eos=torch.cat([part.ended_with_eos for part in parts]),
            kl_terms=torch.cat([part.kl_terms for part in parts]),
        )


class Sampler(Protocol):
    """A system under evaluation: one response per prompt, with its reward and KL terms."""

    name: str
    rows_per_prompt: int
    """Sequences generated per prompt (1 for a model, the candidate pool for best-of-n); sets the chunk size."""
    kl_bound: float | None
    """An analytic upper bound on KL(π‖π_ref), or None."""

    def sample(self, prompts: list[list[int]], reward, generator: torch.Generator) -> EvalSamples: ...


class ModelSampler:
    """A language model sampled with ``sampling``; its KL terms are Σ_t log π(y_t) − log π_ref(y_t) per response.

    Pass ``reference=bridge`` itself (the same object) for the reference model: its KL terms
    are then exactly 0 without a second forward pass.
    """

    rows_per_prompt = 1
    kl_bound = None

    def __init__(self, name: str, bridge, reference, sampling: SamplingConfig = SamplingConfig(), fwd_hooks: list | tuple = ()):
        self.name = name
        self.bridge = bridge
        self.reference = reference
        self.sampling = sampling
        self.fwd_hooks = check_fwd_hooks(bridge, fwd_hooks) if fwd_hooks else []  # names that run, or a clear error

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], reward, generator: torch.Generator) -> EvalSamples:

        generation = generate(self.bridge, prompts, self.sampling, generator=generator, fwd_hooks=self.fwd_hooks)
        rewards = score_texts(reward, generation.texts, generation.prompts)
        if self.bridge is self.reference and not self.fwd_hooks:
            log_ratio = torch.zeros(len(prompts))
        else:
            device = next(self.bridge.parameters()).device
            sequences, mask = generation.sequences.to(device), generation.attention_mask.to(device)
            P, tokens = generation.prompt_len, generation.response_tokens.to(device)
            with self.bridge.hooks(fwd_hooks=self.fwd_hooks):
                logits = self.bridge(sequences, attention_mask=mask)
            ref_logits = self.reference(sequences, attention_mask=mask)
            logprobs = sampling_logprobs(generated_logits(logits, P), tokens, self.sampling)
            ref_logprobs = sampling_logprobs(generated_logits(ref_logits, P), tokens, self.sampling)
            log_ratio = sequence_log_ratio(logprobs, ref_logprobs, generation.gen_mask.to(device))
        return EvalSamples.from_generation(generation, rewards, kl_terms=log_ratio)


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    """One system's metrics row and the samples they were measured on."""

    system: str
    metrics: dict
    samples: EvalSamples


METRIC_KEYS = ("system", "reward_mean", "reward_median", "reward_std", "reward_frac_above", "kl", "kl_se", "kl_bound",
               "token_entropy", "distinct_1", "distinct_2", "length", "eos_rate", "n_samples", "seconds")
"""Keys of one metrics row, in table order."""


def metrics_row(name: str, samples: EvalSamples, threshold: float, kl_bound: float | None = None, seconds: float = 0.0) -> dict:
    """The metrics of ``samples`` as one row with the keys ``METRIC_KEYS``."""
    stats = reward_stats(samples.rewards, threshold)
    kl, kl_se = mean_and_stderr(samples.kl_terms)
    return {
        "system": name,
        "reward_mean": stats["mean"],
        "reward_median": stats["median"],
        "reward_std": stats["std"],
        "reward_frac_above": stats["frac_above"],
        "kl": kl,
        "kl_se": kl_se,
        "kl_bound": kl_bound,
        "token_entropy": token_entropy(samples.response_tokens),
        "distinct_1": distinct_n(samples.response_tokens, 1),
        "distinct_2": distinct_n(samples.response_tokens, 2),
        "length": samples.lengths.double().mean().item(),
        "eos_rate": samples.ended_with_eos.double().mean().item(),
        "n_samples": len(samples),
        "seconds": seconds,
    }


def evaluate(sampler: Sampler, prompts: list[list[int]], reward, seed: int = 0, threshold: float = 0.5,
             batch_size: int = 64) -> EvalResult:
    """Sample one response per prompt from ``sampler`` (seeded) and measure it.

    Prompts are processed in chunks of ``max(1, batch_size // sampler.rows_per_prompt)``, all
    from one ``torch.Generator`` seeded with ``seed``: the same sampler, prompts, seed and
    batch size give the same numbers.
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt.")
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, batch_size // max(sampler.rows_per_prompt, 1))
    parts = [sampler.sample(prompts[i : i + chunk], reward, generator) for i in range(0, len(prompts), chunk)]
    samples = EvalSamples.concat(parts)
    row = metrics_row(sampler.name, samples, threshold, kl_bound=sampler.kl_bound, seconds=time.time() - start)
    return EvalResult(system=sampler.name, metrics=row, samples=samples)


# --------------------------------------------------------------------------- configuration shared by `bon` and `compare`


def evaluation_prompts(config: EvalConfig, tokenizer) -> list[list[int]]:
    """``config.n_prompts`` held-out prompts (token ids), the same for every system.

    Dataset mode: the first k ∈ [min, max] tokens of texts from ``load_texts(data, seed=seed +
    HELDOUT_SEED_OFFSET)`` (for the built-in corpus, reviews that neither pretraining nor a
    trainer's prompt pool drew). Fixed-prefix mode: ``n_prompts`` copies of ``--prompt``.
    """

    def encode_text(text: str) -> list[int]:
        return encode(tokenizer, text, prepend_bos=config.prepend_bos)

    if config.prompt is not None:
        return fixed_prefix_prompts(config.prompt, encode_text, config.n_prompts)
    texts = load_texts(config.data, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)
    return prompts_from_texts(texts, encode_text, config.n_prompts, min_tokens=config.min_prompt_tokens,
                              max_tokens=config.max_prompt_tokens, seed=config.seed + HELDOUT_SEED_OFFSET,
                              decode=tokenizer.decode)


# --------------------------------------------------------------------------- tables


def _format(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_kl(row: dict) -> str:
    """``0.512 ± 0.031`` and, where a bound is known, ``(≤ 0.636)``."""
    text = f"{row['kl']:.3f} ± {row['kl_se']:.3f}"
    if row.get("kl_bound") is not None:
        text += f" (bound {row['kl_bound']:.3f})"
    return text


TABLE_COLUMNS = (("system", "system"), ("reward_mean", "reward mean"), ("reward_median", "reward median"),
                 ("kl", "KL (nats)"), ("token_entropy", "token entropy"), ("distinct_2", "distinct-2"),
                 ("length", "length"))
"""(key, header) of the comparison table's columns."""


def table_cells(row: dict) -> list[str]:
    return [format_kl(row) if key == "kl" else _format(row[key]) for key, _ in TABLE_COLUMNS]


def print_metrics_table(console, rows: list[dict], title: str = "Evaluation") -> None:
    """The comparison table (system, reward mean/median, KL, token entropy, distinct-2, length)."""

    table = Table(title=title)
    for _, header in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "system" else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    console.print(table)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def code_cell(text: str, limit: int | None = None) -> str:
    """``text`` as inline code for a table cell: escapes shown (repr, unquoted), | escaped, ` written as '; its
    first ``limit`` characters after escaping (all when None)."""
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'")[:limit] + "`"


def number_cell(value, digits: int, sign: str = "") -> str:
    """``value`` to ``digits`` decimals (``sign`` "+": always signed), or – where it is None or NaN."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{sign}.{digits}f}"


def markdown_metrics_table(rows: list[dict]) -> str:
    return markdown_table([header for _, header in TABLE_COLUMNS], [table_cells(row) for row in rows])


def print_sample_table(console, results: list[EvalResult], rows: int) -> None:
    """The first ``rows`` prompts and each system's response to them, with its reward."""

    table = Table(title="Samples (same prompts, same seed)", show_lines=True)
    table.add_column("prompt", style="cyan", max_width=20)
    for result in results:
        table.add_column(result.system, max_width=36)
    for i in range(min(rows, min(len(r.samples) for r in results))):
        cells = [f"{r.samples.responses[i]} [bold]({r.samples.rewards[i].item():+.2f})[/]" for r in results]
        table.add_row(results[0].samples.prompts[i], *cells)
    console.print(table)


def markdown_sample_table(results: list[EvalResult], rows: int) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| prompt | " + " | ".join(r.system for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for i in range(min(rows, min(len(r.samples) for r in results))):
        cells = [f"{cell(r.samples.responses[i])} ({r.samples.rewards[i].item():+.2f})" for r in results]
        lines.append(f"| {cell(results[0].samples.prompts[i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training outputs (PPO, REINFORCE)


def print_before_after(console, before, before_rewards: list[float], after, after_rewards: list[float], reward) -> None:
    """A table of the same prompts answered by the reference (before) and the trained policy (after)."""

    name = getattr(reward, "name", "reward")
    table = Table(title=f"Samples before and after training (reward: {name})", show_lines=True)
    table.add_column("prompt", style="cyan", max_width=24)
    table.add_column("before", max_width=48)
    table.add_column(name, justify="right")
    table.add_column("after", max_width=48)
    table.add_column(name, justify="right")
    for prompt, b, rb, a, ra in zip(before.prompts, before.responses, before_rewards, after.responses, after_rewards):
        table.add_row(prompt, b, f"{rb:+.2f}", a, f"{ra:+.2f}")
    mean_before = sum(before_rewards) / len(before_rewards)
    mean_after = sum(after_rewards) / len(after_rewards)
    table.caption = f"mean {name}: before {mean_before:+.3f}, after {mean_after:+.3f}"
    console.print(table)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed; imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], out: Path) -> list[Path]:
    """``reward.png`` (mean ± std per phase) and ``kl.png`` (sequence KL to the reference), with the held-out
    evaluations of ``--eval-every`` as points where the history has them."""
    plt = pyplot()

    phases = [row["phase"] for row in history]
    paths = []
    mean = [row["reward/mean"] for row in history]
    std = [row["reward/std"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(phases, mean, label="mean reward")
    ax.fill_between(phases, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    evaluated = [row for row in history if "eval/reward_mean" in row]  # --eval-every
    if evaluated:
        ax.plot([row["phase"] for row in evaluated], [row["eval/reward_mean"] for row in evaluated], "o-",
                label="held-out evaluation")
    ax.set_xlabel("phase")
    ax.set_ylabel("reward")
    ax.set_title("Reward of each phase's rollout")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "reward.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(phases, [row["objective/kl"] for row in history], label="KL(π‖π_ref) by the run's estimator, summed over tokens")
    if all("objective/kl_exact" in row for row in history):  # --log-exact-kl
        ax.plot(phases, [row["objective/kl_exact"] for row in history], label="exact KL, summed over tokens")
    if evaluated:
        ax.plot([row["phase"] for row in evaluated], [row["eval/kl"] for row in evaluated], "o-",
                label="held-out evaluation (sampled estimate)")
    ax.set_xlabel("phase")
    ax.set_ylabel("nats")
    ax.set_title("KL to the reference model")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "kl.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
