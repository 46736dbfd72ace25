#!/usr/bin/env python
"""Reward models from preferences, then RL against them: does optimising a learned reward raise the true one?

On the built-in offline task (the tiny review model, prompts cut from held-out reviews):

1. pairs: sample ``--n`` responses (4 per prompt) from the built-in model, score them with VADER (the
   *true* reward here), pair responses above 0 with responses at or below 0 (``run_pairs``);
2. reward models: train three from the built-in model on the same pairs and the same held-out split --
   Bradley–Terry (``bt``), Bradley–Terry with margin m = VADER score difference (``margin``), and a
   distributional head over K = 10 ratings (``dist``) -- and measure held-out pairwise accuracy. VADER's
   own accuracy on the held-out pairs is measured the same way (``run_score``); it is the ceiling (1.0
   by construction: the pairs are defined by its scores);
3. RL: PPO (or REINFORCE) from the built-in model against each learned reward (``--reward rm:DIR``);
   For comparison, the same RL against VADER itself (the row "vader", an upper reference);
4. evaluation: the reference and each trained policy answer the same held-out prompts; their samples are
   scored with the learned reward and with VADER, and the KL to the reference is measured.

    python experiments/reward_model_levels.py runs/rm_levels            # ~10 min on 2 idle cores
    python experiments/reward_model_levels.py runs/rm_smoke --quick     # smoke run, ~1 min

Writes OUT/pairs/, OUT/rm_{bt,margin,dist}/ (reward models), OUT/{ppo|reinforce}_{loss}/ (policies),
OUT/report.md and OUT/summary.json; prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf_scratch.evaluation import EvalConfig, ModelSampler, evaluate, evaluation_prompts
from rlhf_scratch.models import load_bridge
from rlhf_scratch.outputs import write_json
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.preferences import PairsConfig, run_pairs
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
from rlhf_scratch.reward_model_training import RewardModelConfig, ScoreConfig, run_score, train_reward_model
from rlhf_scratch.rewards import make_reward, score_texts

LOSSES = ("bt", "margin", "dist")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step (~1 min)")
    parser.add_argument("--n", type=int, default=8000, help="sampled responses for the pairs (default 8000)")
    parser.add_argument("--rm-epochs", type=int, default=2, help="reward-model epochs (default 2)")
    parser.add_argument("--algo", choices=("ppo", "reinforce"), default="ppo", help="RL algorithm (default ppo)")
    parser.add_argument("--phases", type=int, default=20, help="RL phases per reward model (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="RL episodes per phase (default 64)")
    parser.add_argument("--minibatch-size", type=int, default=None,
                        help="PPO minibatch; must divide --batch-size (default: min(16, batch size))")
    parser.add_argument("--n-prompts", type=int, default=256, help="held-out evaluation prompts (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.rm_epochs, args.phases, args.batch_size, args.n_prompts = 400, 1, 3, 16, 32
    if args.minibatch_size is None:
        args.minibatch_size = min(16, args.batch_size)
    try:  # refuse a bad RL size now, not after the pairs and the reward models are built
        rl_config(args, "vader", args.out / "check")
    except ValueError as error:
        parser.error(str(error))
    return args


def rl_config(args, reward: str, out: Path):
    """PPO/REINFORCE on the built-in task against ``reward``. Rewards are divided by their running std for PPO
    (the three learned rewards have different scales: a raw logit difference vs an expected rating 0..9)."""
    shared = dict(reward=reward, phases=args.phases, batch_size=args.batch_size, seed=args.seed, out=out,
                  warmup_phases=min(2, args.phases - 1), table_rows=4)
    if args.algo == "ppo":
        return PPOConfig(normalize_rewards=True, minibatch_size=args.minibatch_size, **shared)
    return REINFORCEConfig(**shared)


def main(argv=None) -> dict:
    args = parse_args(argv)
    console = Console()
    start = time.time()
    timings = {}

    console.rule(f"1. pairs from {args.n} VADER-scored samples of the built-in model")
    clock = time.time()
    pairs = run_pairs(PairsConfig(n=args.n, seed=args.seed, out=args.out / "pairs"))
    pairs_file = args.out / "pairs" / "pairs.jsonl"
    timings["pairs"] = time.time() - clock

    console.rule("2. reward models (bt, margin, dist) on the same pairs and held-out split")
    rms = {}
    for loss in LOSSES:
        clock = time.time()
        rms[loss] = train_reward_model(RewardModelConfig(pairs=pairs_file, loss=loss, epochs=args.rm_epochs,
                                                         seed=args.seed, out=args.out / f"rm_{loss}"))
        timings[f"rm_{loss}"] = time.time() - clock
    heldout_file = args.out / "rm_bt" / "heldout_pairs.jsonl"  # the same split for every loss (same seed, same pairs)
    vader_ceiling = run_score(ScoreConfig(pairs=heldout_file, reward="vader", out=args.out / "score_vader"))

    console.rule(f"3. {args.algo} against each learned reward and VADER ({args.phases} phases × {args.batch_size} episodes)")
    trainer_class = PPOTrainer if args.algo == "ppo" else REINFORCETrainer
    rewards = {loss: f"rm:{args.out / f'rm_{loss}'}" for loss in LOSSES} | {"vader": "vader"}
    training = {}
    for name, spec in rewards.items():
        clock = time.time()
        training[name] = trainer_class(rl_config(args, spec, args.out / f"{args.algo}_{name}")).train(console=console)
        timings[f"{args.algo}_{name}"] = time.time() - clock

    console.rule(f"4. evaluation on {args.n_prompts} held-out prompts: learned reward and true reward (VADER)")
    clock = time.time()
    eval_config = EvalConfig(n_prompts=args.n_prompts, seed=args.seed)
    reference = load_bridge("builtin")
    prompts = evaluation_prompts(eval_config, reference.tokenizer)
    vader = make_reward("vader")
    reference_result = evaluate(ModelSampler("reference", reference, reference, eval_config.sampling), prompts, vader,
                                seed=args.seed)
    rows = []
    for name, spec in rewards.items():
        learned = make_reward(spec)
        policy = load_bridge(args.out / f"{args.algo}_{name}" / "checkpoint")
        result = evaluate(ModelSampler(f"{args.algo}_{name}", policy, reference, eval_config.sampling), prompts, vader,
                          seed=args.seed)
        rows.append({
            "loss": name,
            "heldout_accuracy": rms[name]["pairwise_accuracy"] if name in rms else vader_ceiling["pairwise_accuracy"],
            "train_accuracy": rms[name]["train_pairwise_accuracy"] if name in rms else None,
            "learned_reward_before": score_texts(learned, reference_result.samples.texts).mean().item(),
            "learned_reward_after": score_texts(learned, result.samples.texts).mean().item(),
            "vader_before": reference_result.metrics["reward_mean"],
            "vader_after": result.metrics["reward_mean"],
            "kl": result.metrics["kl"],
            "kl_se": result.metrics["kl_se"],
            "token_entropy_after": result.metrics["token_entropy"],
        })
    timings["evaluation"] = time.time() - clock

    summary = {
        "rows": rows,
        "vader_heldout_accuracy": vader_ceiling["pairwise_accuracy"],
        "pairs": pairs,
        "reward_models": rms,
        "training": training,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timings": timings,
        "seconds": time.time() - start,
    }
    write_json(args.out / "summary.json", summary)
    report = markdown_report(summary)
    (args.out / "report.md").write_text(report)
    print_table(console, summary)
    console.print(f"{summary['seconds']:.0f} s in all; report in {args.out / 'report.md'}")
    return summary


HEADERS = ("reward", "accuracy", "own reward", "VADER", "KL (nats)")
"""accuracy: held-out pairwise accuracy; own reward, VADER: mean on the reference's → the policy's samples."""


def row_cells(row: dict) -> list[str]:
    return [row["loss"], f"{row['heldout_accuracy']:.3f}",
            f"{row['learned_reward_before']:+.3f} → {row['learned_reward_after']:+.3f}",
            f"{row['vader_before']:+.3f} → {row['vader_after']:+.3f}", f"{row['kl']:.2f} ± {row['kl_se']:.2f}"]


def print_table(console, summary: dict) -> None:
    table = Table(title=f"Reward models from VADER-labelled pairs, then {summary['settings']['algo']} against each "
                        "(last row: against VADER itself)",
                  caption="accuracy: held-out pairwise accuracy; rewards: mean on the reference's → the policy's samples")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == HEADERS[0] else "right", no_wrap=True)
    for row in summary["rows"]:
        table.add_row(*row_cells(row))
    console.print(table)
    console.print(f"VADER's own held-out pairwise accuracy (the ceiling): {summary['vader_heldout_accuracy']:.3f}")


def markdown_report(summary: dict) -> str:
    s, p = summary["settings"], summary["pairs"]
    n_heldout = summary["reward_models"]["bt"]["n_heldout"]
    n_train = summary["reward_models"]["bt"]["n_train"]
    columns = ("| reward | held-out pairwise accuracy | own reward: reference → policy | VADER: reference → policy "
               "| KL to the reference (nats) |")
    lines = [
        "# Reward models from preferences: does optimising the learned reward raise the true one?",
        "",
        f"Pairs: {p['n_pairs']} from {p['n_samples']} VADER-scored samples of the built-in model "
        f"({p['n_prompts']} prompts × 4, threshold {p['threshold']:g}); {n_train} training and {n_heldout} held-out pairs. "
        f"Reward models: {s['rm_epochs']} epoch(s) from the built-in model. RL: {s['algo']}, {s['phases']} phases × "
        f"{s['batch_size']} episodes against each learned reward, and against VADER itself (last row, for comparison). "
        "A reward named by a loss is the reward model trained with it. "
        f"Evaluation: {s['n_prompts']} held-out prompts, one sample each; the reference's and each policy's samples are "
        "scored with the reward the policy was trained on and with VADER (the true reward); KL is the policy's sequence "
        "KL to the reference (nats, ± standard error).",
        "",
        columns,
        "|" + "---|" * len(HEADERS),
        *["| " + " | ".join(row_cells(row)) + " |" for row in summary["rows"]],
        "",
        f"VADER's own pairwise accuracy on the held-out pairs: {summary['vader_heldout_accuracy']:.3f} (the ceiling: the "
        "pairs are defined by its scores). Chance is 0.5.",
        "",
        f"Wall time: {summary['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings"].items()) + ").",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
