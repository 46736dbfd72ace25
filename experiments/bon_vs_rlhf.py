#!/usr/bin/env python
"""Best-of-n vs RLHF on the built-in offline task: the reference, a PPO-trained policy and best-of-4.

The best-of-n seed experiment: train PPO (``PPOConfig()`` defaults: the built-in tiny review model,
prompts = the first 2–8 tokens of held-out built-in reviews, VADER reward), then answer the same
held-out evaluation prompts with the reference, the PPO policy and best-of-4 from the reference, and
compare reward, KL to the reference and diversity (``rlhf_scratch.compare``).

    python experiments/bon_vs_rlhf.py runs/bon_vs_rlhf                  # PPOConfig() defaults
    python experiments/bon_vs_rlhf.py runs/bon_vs_rlhf --phases 20      # a shorter PPO run
    python experiments/bon_vs_rlhf.py runs/b2 --ppo-checkpoint runs/bon_vs_rlhf/ppo/checkpoint  # no training

Writes OUT/ppo/ (the PPO run: metrics, plots, checkpoint) and, in OUT, the comparison report
(report.md, report.csv, reward_vs_kl.png, reward_vs_diversity.png, samples.jsonl) and summary.json
(the table's rows, the PPO summary, the settings and the seconds taken); prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from rlhf_scratch.compare import SystemSpec, run_systems
from rlhf_scratch.evaluation import EvalConfig, markdown_metrics_table
from rlhf_scratch.outputs import write_json
from rlhf_scratch.ppo import PPOConfig, PPOTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--phases", type=int, default=None, help="PPO phases (default: PPOConfig().phases)")
    parser.add_argument("--n", type=int, default=4, help="best-of-n's n (default 4)")
    parser.add_argument("--n-prompts", type=int, default=128, help="held-out evaluation prompts (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ppo-checkpoint", type=Path, default=None, help="skip training and evaluate this PPO checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    console = Console()
    start = time.time()
    ppo_summary, ppo_config = None, None
    checkpoint = args.ppo_checkpoint
    if checkpoint is None:
        overrides = {} if args.phases is None else {"phases": args.phases}
        ppo_config = PPOConfig(out=args.out / "ppo", seed=args.seed, **overrides)
        console.rule(f"PPO: {ppo_config.phases} phases × {ppo_config.batch_size} episodes")
        ppo_summary = PPOTrainer(ppo_config).train(console=console)
        checkpoint = args.out / "ppo" / "checkpoint"
    train_seconds = time.time() - start

    console.rule("Evaluation on held-out prompts")
    # The evaluation samples exactly as PPO did (same SamplingConfig), from the same reference model.
    sampling = ppo_config.sampling if ppo_config is not None else PPOConfig().sampling
    eval_config = EvalConfig(out=args.out, n_prompts=args.n_prompts, seed=args.seed, sampling=sampling)
    systems = [SystemSpec("reference", "reference"), SystemSpec("ppo", "ppo", path=str(checkpoint)),
               SystemSpec(f"best-of-{args.n}", "bon", n=args.n)]
    rows = run_systems(eval_config, systems, title=f"Reference vs PPO vs best-of-{args.n} (built-in offline task)",
                       console=console)
    summary = {
        "rows": rows,
        "ppo": ppo_summary,
        "ppo_checkpoint": str(checkpoint),
        "ppo_phases": ppo_config.phases if ppo_config else None,
        "n": args.n,
        "n_prompts": args.n_prompts,
        "seed": args.seed,
        "seconds_training": train_seconds,
        "seconds": time.time() - start,
    }
    write_json(args.out / "summary.json", summary)
    print(markdown_metrics_table(rows))
    print(f"\n{summary['seconds']:.0f} s in all ({train_seconds:.0f} s PPO training); report in {args.out / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
