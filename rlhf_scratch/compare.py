"""``rlhf-scratch compare`` and ``rlhf-scratch bon``: systems on the same held-out prompts, one table, one report.

``bon`` is ``compare`` with two fixed systems, the reference and best-of-n from it (``run_bon``).

Systems are named on the command line, one word each, ``[LABEL=]KIND[:ARG]``:

    reference            the reference model (``--model``) itself
    bon:N                best-of-N from the reference (``bon:N:M`` also sets the KL pool to M samples)
    ppo:DIR              a PPO checkpoint (a run's ``checkpoint/`` folder)
    reinforce:DIR        a REINFORCE checkpoint
    rloo:DIR, grpo:DIR   an RLOO or GRPO checkpoint
    dpo:DIR              a DPO checkpoint
    model:DIR            any other model directory
    LABEL=...            the same, shown as LABEL (needed when two systems would share a name)

e.g. ``rlhf-scratch compare --out runs/cmp --systems reference ppo:runs/ppo/checkpoint bon:4 bon:16``.
Every system answers the same prompts with the same seed; the metrics are those of
``rlhf_scratch.evaluation`` (reward, KL to the reference, diversity, length).

Outputs in ``--out``: ``config.json``; ``report.md`` (the table, the per-system details, the sample
table and the plots); ``report.csv`` (every metric); ``reward_vs_kl.png``; ``reward_vs_diversity.png``;
``samples.jsonl`` (every response of every system with its reward); ``summary.json``
(``{"rows": [one dict per system with system, reward_mean, reward_median, kl, token_entropy,
distinct_2, length, ...], ...}``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from rich.console import Console

from rlhf_scratch.bon import BestOfNSampler
from rlhf_scratch.evaluation import (
    METRIC_KEYS,
    EvalConfig,
    EvalResult,
    ModelSampler,
    evaluate,
    evaluation_prompts,
    markdown_metrics_table,
    markdown_sample_table,
    print_metrics_table,
    print_sample_table,
    pyplot,
)
from rlhf_scratch.models import CHECKPOINT_META_FILE, complete_checkpoint_dir, load_bridge, read_checkpoint_meta
from rlhf_scratch.outputs import append_jsonl, write_json
from rlhf_scratch.rewards import make_reward
from rlhf_scratch.command_configs import BonConfig, CompareConfig, MODEL_KINDS, SYSTEM_SYNTAX, SystemSpec, TRAINED_KINDS, parse_system  # noqa: F401 (defined there: importable without torch)


def build_sampler(spec: SystemSpec, reference, config: EvalConfig):
    """The sampler of one system; checkpoints must share the reference's tokenizer (the prompts are token ids)."""

    if spec.kind == "reference":
        return ModelSampler(spec.label, reference, reference, config.sampling)
    if spec.kind == "bon":
        return BestOfNSampler(reference, spec.n, config.sampling, pool_size=spec.pool_size, name=spec.label)
    meta_file = complete_checkpoint_dir(spec.path) / CHECKPOINT_META_FILE
    saved_kind = read_checkpoint_meta(meta_file).get("kind") if meta_file.is_file() else None
    if spec.kind in TRAINED_KINDS and saved_kind in TRAINED_KINDS and saved_kind != spec.kind:
        raise ValueError(f"{spec.path} is a {saved_kind} checkpoint (its {CHECKPOINT_META_FILE} says so): name it "
                         f"{saved_kind}:{spec.path}, so that the report labels it correctly.")
    bridge = load_bridge(spec.path, device=config.device)
    if bridge.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise ValueError(
            f"{spec.label} ({spec.path}) has a different tokenizer from the reference {config.model!r}; "
            "compare checkpoints trained from the reference (or pass that model as --model)."
        )
    return ModelSampler(spec.label, bridge, reference, config.sampling)


def run_systems(config: EvalConfig, systems: list[SystemSpec], title: str, console=None) -> list[dict]:
    """Evaluate ``systems`` on the same prompts, print the tables, write the report if ``config.out``; the rows."""


    console = console or Console()
    torch.manual_seed(config.seed)
    reference = load_bridge(config.model, device=config.device)
    reward = make_reward(config.reward)
    prompts = evaluation_prompts(config, reference.tokenizer)
    results: list[EvalResult] = []
    for spec in systems:
        sampler = build_sampler(spec, reference, config)
        with console.status(f"evaluating {spec.label} on {len(prompts)} prompts"):
            result = evaluate(sampler, prompts, reward, seed=config.seed, threshold=config.threshold,
                              batch_size=config.batch_size)
        console.print(f"{spec.label}: reward {result.metrics['reward_mean']:+.3f}, KL {result.metrics['kl']:.3f} "
                      f"({result.metrics['seconds']:.1f} s)")
        results.append(result)
    if config.table_rows:
        print_sample_table(console, results, config.table_rows)
    print_metrics_table(console, [r.metrics for r in results], title=title)
    if config.out is not None:
        write_report(Path(config.out), config, results, title)
        console.print(f"report in {Path(config.out) / 'report.md'}")
    return [r.metrics for r in results]


def run_compare(config: CompareConfig) -> dict:
    rows = run_systems(config, [parse_system(s) for s in config.systems], title="Comparison on held-out prompts")
    return {"rows": rows}


# --------------------------------------------------------------------------- report


def run_bon(config: BonConfig) -> dict:
    """Evaluate the reference and best-of-n on the same prompts; write config.json, summary.json, report.md."""
    systems = [SystemSpec("reference", "reference"), SystemSpec(f"best-of-{config.n}", "bon", n=config.n, pool_size=config.pool_size)]
    rows = run_systems(config, systems, title=f"Best-of-{config.n} vs the reference")
    bon = rows[-1]
    summary = {
        "rows": rows,
        "n": config.n,
        "reward_mean": bon["reward_mean"],
        "reward_gain": bon["reward_mean"] - rows[0]["reward_mean"],
        "kl": bon["kl"],
        "kl_se": bon["kl_se"],
        "kl_bound": bon["kl_bound"],
    }
    if config.out is not None:
        write_json(config.out / "summary.json", summary)
    return summary


def write_report(out: Path, config: EvalConfig, results: list[EvalResult], title: str) -> None:
    """config.json, report.md, report.csv, reward_vs_kl.png, reward_vs_diversity.png, samples.jsonl, summary.json."""

    out.mkdir(parents=True, exist_ok=True)
    rows = [r.metrics for r in results]
    write_json(out / "config.json", config)
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(METRIC_KEYS))
        writer.writeheader()
        writer.writerows([{k: ("" if row[k] is None else row[k]) for k in METRIC_KEYS} for row in rows])
    plot_reward_vs_kl(rows, out / "reward_vs_kl.png")
    plot_reward_vs_diversity(rows, out / "reward_vs_diversity.png")
    (out / "samples.jsonl").unlink(missing_ok=True)
    for result in results:
        for prompt, response, reward in zip(result.samples.prompts, result.samples.responses, result.samples.rewards.tolist()):
            append_jsonl(out / "samples.jsonl", {"system": result.system, "prompt": prompt, "response": response, "reward": reward})

    details = ["| system | reward std | reward > threshold | KL ± s.e. | KL bound | distinct-1 | EOS rate | samples | seconds |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        bound = "–" if row["kl_bound"] is None else f"{row['kl_bound']:.3f}"
        details.append(f"| {row['system']} | {row['reward_std']:.3f} | {row['reward_frac_above']:.3f} | "
                       f"{row['kl']:.3f} ± {row['kl_se']:.3f} | {bound} | {row['distinct_1']:.3f} | "
                       f"{row['eos_rate']:.3f} | {row['n_samples']} | {row['seconds']:.1f} |")
    prompts = f"fixed prefix {config.prompt!r}" if config.prompt is not None else (
        f"first {config.min_prompt_tokens}–{config.max_prompt_tokens} tokens of held-out texts from {config.data!r}")
    text = [
        f"# {title}",
        "",
        f"Reference model `{config.model}`, reward `{config.reward}`, {config.n_prompts} prompts ({prompts}), "
        f"one response per prompt and system, seed {config.seed}, at most {config.sampling.max_new_tokens} new tokens, "
        f"temperature {config.sampling.temperature}.",
        "",
        markdown_metrics_table(rows),
        "",
        "KL (nats, whole response) to the reference: for a model, the mean over its samples of "
        "Σ_t log π(y_t) − log π_ref(y_t) (± its standard error); for best-of-n, the mean over prompts of the exact KL "
        "of best-of-n from the empirical reward distribution of a pool of reference samples (see `rlhf_scratch/bon.py`), "
        "with the analytic bound log n − (n−1)/n in brackets. Token entropy: entropy (nats) of the empirical distribution "
        "of all generated tokens; distinct-2: distinct token bigrams / all bigrams; length: generated tokens per response "
        "(closing EOS included).",
        "",
        f"## Details (reward threshold {config.threshold})",
        "",
        *details,
        "",
        "## Samples",
        "",
        markdown_sample_table(results, config.table_rows),
        "",
        "## Plots",
        "",
        "![reward vs KL](reward_vs_kl.png)",
        "",
        "![reward vs diversity](reward_vs_diversity.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
    write_json(out / "summary.json", {"rows": rows, "n_prompts": config.n_prompts, "seed": config.seed,
                                      "reward": config.reward, "model": config.model})


def plot_reward_vs_kl(rows: list[dict], path: Path) -> Path:
    """Mean reward against KL to the reference (± s.e.); best-of-n's analytic bound as a hollow marker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        points = ax.errorbar(row["kl"], row["reward_mean"], xerr=row["kl_se"], fmt="o", capsize=3, label=row["system"])
        if row["kl_bound"] is not None:
            ax.plot([row["kl"], row["kl_bound"]], [row["reward_mean"]] * 2, ":", color=points[0].get_color())
            ax.plot(row["kl_bound"], row["reward_mean"], "o", mfc="none", color=points[0].get_color())
        ax.annotate(row["system"], (row["kl"], row["reward_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("KL(π ‖ π_ref), nats per response (hollow: best-of-n bound)")
    ax.set_ylabel("mean reward")
    ax.set_title("Reward vs KL to the reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reward_vs_diversity(rows: list[dict], path: Path) -> Path:
    """Mean reward against token entropy and against distinct-2 (the reward–diversity trade-off)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "token_entropy", "token entropy (nats)"), (axes[1], "distinct_2", "distinct-2")):
        for row in rows:
            ax.plot(row[key], row["reward_mean"], "o", label=row["system"])
            ax.annotate(row["system"], (row[key], row["reward_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
    axes[0].set_ylabel("mean reward")
    axes[0].legend(fontsize=8)
    fig.suptitle("Reward vs diversity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
