#!/usr/bin/env python
"""REINFORCE vs PPO at an equal number of episodes, on the built-in offline task.

Both start from the built-in tiny review model with the same prompts (first 2–8 tokens of held-out
built-in reviews), VADER reward, KL coefficient, sampler, phases and batch size, so they see the
same number of episodes (phases × batch size); PPO takes ``ppo_epochs · batch / minibatch`` gradient
steps per phase on them, REINFORCE one (its defaults). The reference, both policies and best-of-4
then answer the same held-out prompts (``rlhf_scratch.compare``).

    python experiments/reinforce_vs_ppo.py runs/reinforce_vs_ppo                # 20 phases × 64 episodes each
    python experiments/reinforce_vs_ppo.py runs/rvp --phases 40 --reinforce-lr 3e-4

Writes OUT/ppo/ and OUT/reinforce/ (the two runs) and the comparison report in OUT (report.md,
report.csv, plots, samples.jsonl, summary.json with the rows and both training summaries);
prints the table.
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
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--phases", type=int, default=20, help="phases of each trainer (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per phase (default 64)")
    parser.add_argument("--minibatch-size", type=int, default=None,
                        help="PPO minibatch; must divide --batch-size (default: min(16, batch size))")
    parser.add_argument("--reinforce-lr", type=float, default=None, help="REINFORCE learning rate (default: REINFORCEConfig().lr)")
    parser.add_argument("--n-prompts", type=int, default=128, help="held-out evaluation prompts (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.minibatch_size is None:
        args.minibatch_size = min(16, args.batch_size)
    try:  # a bad size is refused here, before any training, with the config's own message
        build_configs(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def build_configs(args) -> tuple[PPOConfig, REINFORCEConfig]:
    shared = dict(phases=args.phases, batch_size=args.batch_size, seed=args.seed)
    ppo_config = PPOConfig(out=args.out / "ppo", minibatch_size=args.minibatch_size, **shared)
    reinforce_config = REINFORCEConfig(out=args.out / "reinforce", **shared,
                                       **({} if args.reinforce_lr is None else {"lr": args.reinforce_lr}))
    return ppo_config, reinforce_config


def main(argv=None) -> dict:
    args = parse_args(argv)
    console = Console()
    start = time.time()
    ppo_config, reinforce_config = build_configs(args)
    summaries, seconds = {}, {}
    for name, trainer_class, config in (("ppo", PPOTrainer, ppo_config), ("reinforce", REINFORCETrainer, reinforce_config)):
        console.rule(f"{name}: {config.phases} phases × {config.batch_size} episodes")
        clock = time.time()
        summaries[name] = trainer_class(config).train(console=console)
        seconds[name] = time.time() - clock

    console.rule("Evaluation on held-out prompts")
    eval_config = EvalConfig(out=args.out, n_prompts=args.n_prompts, seed=args.seed, sampling=ppo_config.sampling)
    systems = [SystemSpec("reference", "reference"),
               SystemSpec("ppo", "ppo", path=str(args.out / "ppo" / "checkpoint")),
               SystemSpec("reinforce", "reinforce", path=str(args.out / "reinforce" / "checkpoint")),
               SystemSpec("best-of-4", "bon", n=4)]
    rows = run_systems(eval_config, systems, title=f"REINFORCE vs PPO, {args.phases * args.batch_size} episodes each",
                       console=console)
    summary = {"rows": rows, "training": summaries, "seconds_training": seconds, "episodes": args.phases * args.batch_size,
               "seed": args.seed, "seconds": time.time() - start}
    write_json(args.out / "summary.json", summary)
    print(markdown_metrics_table(rows))
    print(f"\n{summary['seconds']:.0f} s in all; report in {args.out / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
