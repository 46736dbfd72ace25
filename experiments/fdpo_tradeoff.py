#!/usr/bin/env python
"""f-DPO on the built-in offline task: one pair set, DPO with each divergence, the reward–diversity trade-off.

The f-DPO seed (Wang et al. 2023, "Beyond Reverse KL"): build ONE set of preference pairs from the built-in
model's own samples scored by VADER (``rlhf-scratch pairs``), then train DPO from the built-in model with
each divergence -- reverse KL (plain DPO), Jensen–Shannon, forward KL, and the α-divergence at several α
(the paper's α: → 0 is reverse KL, 1 is forward KL) -- with the same β, learning rate, epochs and seed.
Every trained policy and the reference then answer the same held-out prompts once each, scored by the
true reward (VADER): reward mean, KL to the reference, token entropy and distinct-1/2 (diversity).

    python experiments/fdpo_tradeoff.py runs/fdpo                        # the full run (~10 min on 2 cores)
    python experiments/fdpo_tradeoff.py runs/fdpo_quick --quick          # a smoke run (~1 min)
    python experiments/fdpo_tradeoff.py runs/fdpo2 --pairs runs/fdpo/pairs/pairs.jsonl --beta 0.1

Writes OUT/pairs/ (the pair set, unless --pairs is given), OUT/<divergence>/ (each DPO run: metrics.jsonl,
curves.png, checkpoint/, summary.json), OUT/report.md (the table), OUT/summary.json (rows and settings),
OUT/tradeoff.png (reward against token entropy, distinct-2 and KL, one labelled point per divergence plus
the reference); prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf_scratch.dpo_trainer import DPOConfig, DPOTrainer
from rlhf_scratch.evaluation import EvalConfig, ModelSampler, evaluate, evaluation_prompts, markdown_table, pyplot
from rlhf_scratch.outputs import write_json
from rlhf_scratch.sampling import SamplingConfig

COLUMNS = (("system", "system"), ("reward_mean", "reward mean"), ("kl", "KL (nats)"), ("token_entropy", "token entropy"),
           ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("length", "length"), ("eos_rate", "EOS rate"),
           ("heldout_accuracy", "held-out pair acc."))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few samples, one epoch, few prompts")
    parser.add_argument("--pairs", type=Path, default=None, help="reuse this pair file instead of building one")
    parser.add_argument("--n-samples", type=int, default=4000, help="samples scored to build the pairs (default 4000)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                        help="α values of the alpha divergence (the f-DPO paper's α; default 0.3 0.5 0.7)")
    parser.add_argument("--beta", type=float, default=0.25, help="β of every run (default 0.25)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of every run (default 3e-4)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs over the pairs (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (default 32)")
    parser.add_argument("--n-prompts", type=int, default=256, help="held-out evaluation prompts (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_pairs(args: argparse.Namespace, console: Console) -> tuple[Path, dict | None]:
    """The pair file: ``--pairs`` if given, else ``rlhf-scratch pairs`` with VADER into OUT/pairs."""
    if args.pairs is not None:
        return args.pairs, None
    from rlhf_scratch.preferences import PairsConfig, run_pairs

    console.rule(f"pairs from {args.n_samples} scored samples of the built-in model")
    summary = run_pairs(PairsConfig(n=args.n_samples, samples_per_prompt=4, reward="vader", seed=args.seed,
                                    out=args.out / "pairs"))
    return args.out / "pairs" / "pairs.jsonl", summary


def systems(alphas: list[float]) -> list[tuple[str, str, float]]:
    """(label, divergence, alpha) of every run, from reverse KL through α-divergences to forward KL."""
    return [("rkl", "rkl", 0.5), *[(f"alpha={a:g}", "alpha", a) for a in sorted(alphas)], ("js", "js", 0.5),
            ("fkl", "fkl", 0.5)]


def print_table(console: Console, rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for key, header in COLUMNS:
        table.add_column(header, justify="left" if key == "system" else "right")
    for row in rows:
        table.add_row(*[cell(row, key) for key, _ in COLUMNS])
    console.print(table)


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key == "kl":
        return f"{row['kl']:.3f} ± {row['kl_se']:.3f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def results_table(rows: list[dict]) -> str:
    return markdown_table([header for _, header in COLUMNS], [[cell(row, key) for key, _ in COLUMNS] for row in rows])


def plot_tradeoff(rows: list[dict], path: Path) -> Path:
    """Reward mean against token entropy, distinct-2 and KL: one labelled point per system."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    panels = (("token_entropy", "token entropy (nats)"), ("distinct_2", "distinct-2"),
              ("kl", "KL(π ‖ π_ref), nats per response"))
    for ax, (key, label) in zip(axes, panels):
        for row in rows:
            marker = "s" if row["system"] == "reference" else "o"
            stderr = row["reward_std"] / max(row["n_samples"], 1) ** 0.5
            ax.errorbar(row[key], row["reward_mean"], yerr=stderr, fmt=marker, markersize=7, capsize=3, label=row["system"])
            ax.annotate(row["system"], (row[key], row["reward_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward ± s.e. (VADER, held-out prompts)")
    axes[0].legend(fontsize=7)
    fig.suptitle("f-DPO: reward vs diversity (one pair set, same β and steps for every divergence)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pairs is not None and not args.pairs.is_file():  # before anything is written or loaded
        raise SystemExit(f"fdpo_tradeoff.py: --pairs {args.pairs}: no such file. Give a pair file (.jsonl or .csv, e.g. "
                         "OUT/pairs/pairs.jsonl of an earlier run), or leave --pairs out to build one.")
    if args.quick:
        args.n_samples, args.epochs, args.n_prompts, args.alphas, args.batch_size = 400, 1, 32, [0.5], 8
    console = Console()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs_file, pairs_summary = build_pairs(args, console)
    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.preferences import load_pairs
    from rlhf_scratch.rewards import make_reward

    pairs = load_pairs(pairs_file)
    sampling = SamplingConfig()
    reference = load_bridge("builtin")
    reward = make_reward("vader")
    prompts = evaluation_prompts(EvalConfig(n_prompts=args.n_prompts, seed=args.seed), reference.tokenizer)

    console.rule(f"reference on {len(prompts)} held-out prompts")
    rows = [evaluate(ModelSampler("reference", reference, reference, sampling), prompts, reward, seed=args.seed).metrics]
    runs = {}
    for label, divergence, alpha in systems(args.alphas):
        console.rule(f"DPO {label}: {len(pairs)} pairs, β={args.beta}, lr={args.lr}, {args.epochs} epochs")
        config = DPOConfig(pairs=pairs_file, divergence=divergence, alpha=alpha, beta=args.beta, lr=args.lr,
                           epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, reward=None,
                           sampling=sampling, out=args.out / label.replace("=", "_"))
        clock = time.time()
        trainer = DPOTrainer(config, pairs=pairs)
        summary = trainer.train(console=console)
        # The same prompts and seed for every system; KL against the shared reference.
        metrics = evaluate(ModelSampler(label, trainer.bridge, reference, sampling), prompts, reward, seed=args.seed).metrics
        metrics.update(divergence=divergence, alpha=alpha if divergence == "alpha" else None,
                       heldout_accuracy=summary["heldout_accuracy"], train_loss=summary["loss_final"])
        rows.append(metrics)
        runs[label] = {**summary, "seconds_with_eval": time.time() - clock}
        console.print(f"{label}: reward {metrics['reward_mean']:+.3f}, KL {metrics['kl']:.3f}, "
                      f"token entropy {metrics['token_entropy']:.3f}, distinct-2 {metrics['distinct_2']:.3f}")

    title = f"f-DPO on the built-in task: {len(pairs)} pairs, β={args.beta}, lr={args.lr}, {args.epochs} epochs"
    print_table(console, rows, title)
    plot_tradeoff(rows, args.out / "tradeoff.png")
    seconds = time.time() - start
    report = [
        f"# {title}",
        "",
        f"Pairs: {len(pairs)} from `{pairs_file}` (built-in model samples scored by VADER, chosen above 0, rejected at "
        "or below). Every run starts from the built-in model with the same β, learning rate, epochs, batch size and seed "
        "(sigmoid loss); α is the f-DPO paper's α (f′(x) = (1 − x^−α)/α: α → 0 reverse KL, α = 1 forward KL). "
        f"Evaluation: {len(prompts)} held-out prompts, one sample each (temperature 1, at most "
        f"{sampling.max_new_tokens} new tokens), seed {args.seed}; reward = VADER compound; KL = mean over samples of "
        "Σ_t log π − log π_ref (± s.e.); token entropy = entropy of all generated tokens pooled; distinct-n = distinct "
        "n-grams / all n-grams; EOS rate = share of responses that end with EOS before the token limit; held-out pair "
        "acc. = share of held-out pairs (10%, not trained on) with u_w > u_l.",
        "",
        results_table(rows),
        "",
        f"{seconds:.0f} s in all.",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    (args.out / "report.md").write_text("\n".join(report))
    result = {"rows": rows, "runs": runs, "pairs_file": str(pairs_file), "pairs": pairs_summary, "n_pairs": len(pairs),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "seconds": seconds}
    write_json(args.out / "summary.json", result)
    print(results_table(rows))
    print(f"\n{seconds:.0f} s in all; report in {args.out / 'report.md'}")
    return result


if __name__ == "__main__":
    main()
