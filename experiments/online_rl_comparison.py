#!/usr/bin/env python
"""PPO, REINFORCE, RLOO and GRPO at an equal number of sampled episodes, with best-of-n as the sampling baseline.

Every trainer starts from the built-in tiny review model with the same prompts (first 2–8 tokens of
built-in reviews), VADER reward, sampler, phases and batch size, so each samples phases × batch
episodes; each keeps its own defaults otherwise (learning rate, steps per phase, KL handling: see
docs/baselines-and-evaluation.md). The reference, every policy and best-of-4 then answer the same
held-out prompts with the shared evaluation (``rlhf_scratch.compare``: reward, KL to the reference,
token entropy, distinct-n). With several seeds the table gives mean ± standard error over seeds.

    python experiments/online_rl_comparison.py runs/online_rl                     # 20 phases × 64, seed 0
    python experiments/online_rl_comparison.py runs/online_rl --seeds 0 1 2 --phases 40

Writes OUT/seed_S/{ppo,reinforce,rloo,grpo}/ (the runs) and OUT/seed_S/report.md (each seed's
comparison), then OUT/summary.json, OUT/table.md and OUT/reward_vs_kl.png over the seeds; prints the table.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from rich.console import Console

from rlhf_scratch.compare import SystemSpec, run_systems
from rlhf_scratch.evaluation import EvalConfig
from rlhf_scratch.group_baselines import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from rlhf_scratch.outputs import write_json
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer

TRAINERS = {
    "ppo": (PPOTrainer, PPOConfig),
    "reinforce": (REINFORCETrainer, REINFORCEConfig),
    "rloo": (RLOOTrainer, RLOOConfig),
    "grpo": (GRPOTrainer, GRPOConfig),
}
METRICS = ("reward_mean", "kl", "token_entropy", "distinct_2", "length")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--phases", type=int, default=20, help="phases of each trainer (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per phase (default 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    parser.add_argument("--methods", nargs="+", default=list(TRAINERS), choices=list(TRAINERS), help="trainers to run")
    parser.add_argument("--bon", type=int, default=4, help="n of the best-of-n baseline (default 4)")
    parser.add_argument("--n-prompts", type=int, default=128, help="held-out evaluation prompts (default 128)")
    return parser.parse_args(argv)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def run_seed(args, seed: int, console: Console) -> tuple[list[dict], dict]:
    out = args.out / f"seed_{seed}"
    summaries = {}
    for name in args.methods:
        trainer_class, config_class = TRAINERS[name]
        warmup = min(config_class.warmup_phases, args.phases - 1)  # the default warmup, shortened for very short runs
        config = config_class(out=out / name, phases=args.phases, batch_size=args.batch_size, seed=seed, warmup_phases=warmup)
        console.rule(f"seed {seed}, {name}: {config.phases} phases × {config.batch_size} episodes")
        clock = time.time()
        summaries[name] = {**trainer_class(config).train(console=console), "wall_seconds": time.time() - clock}
    systems = [SystemSpec("reference", "reference"), SystemSpec(f"best-of-{args.bon}", "bon", n=args.bon)]
    systems += [SystemSpec(name, name, path=str(out / name / "checkpoint")) for name in args.methods]
    eval_config = EvalConfig(out=out, n_prompts=args.n_prompts, seed=seed, sampling=PPOConfig().sampling)
    rows = run_systems(eval_config, systems, title=f"seed {seed}: {args.phases * args.batch_size} episodes each",
                       console=console)
    return rows, summaries


def plot(table: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for system, metrics in table.items():
        (kl, kl_se), (reward, reward_se) = metrics["kl"], metrics["reward_mean"]
        axes.errorbar(kl, reward, xerr=kl_se, yerr=reward_se, fmt="o", capsize=3, label=system)
    axes.set_xlabel("KL to the reference (nats per response)")
    axes.set_ylabel("mean VADER reward (held-out prompts)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    console = Console()
    start = time.time()
    per_seed = {seed: run_seed(args, seed, console) for seed in args.seeds}
    systems = [row["system"] for row in per_seed[args.seeds[0]][0]]
    table = {
        system: {metric: mean_and_se([next(r for r in rows if r["system"] == system)[metric] for rows, _ in per_seed.values()])
                 for metric in METRICS}
        for system in systems
    }
    header = "| system | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for system, metrics in table.items():
        cells = [f"{m:.3f} ± {se:.3f}" if len(args.seeds) > 1 else f"{m:.3f}" for m, se in metrics.values()]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(markdown + "\n")
    plot(table, args.out / "reward_vs_kl.png")
    summary = {"table": {s: {m: list(v) for m, v in metrics.items()} for s, metrics in table.items()},
               "training": {seed: summaries for seed, (_, summaries) in per_seed.items()},
               "seeds": args.seeds, "phases": args.phases, "batch_size": args.batch_size,
               "episodes": args.phases * args.batch_size, "seconds": time.time() - start}
    write_json(args.out / "summary.json", summary)
    print(markdown)
    print(f"\n{summary['seconds']:.0f} s in all; per-seed reports in {args.out}/seed_*/report.md")
    return summary


if __name__ == "__main__":
    main()
