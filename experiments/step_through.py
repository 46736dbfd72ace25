"""Step through one PPO phase by hand, and see that the trainer logs exactly what you compute.

    OMP_NUM_THREADS=1 python experiments/step_through.py                      # built-in model and task, seed 0, CPU
    OMP_NUM_THREADS=1 python experiments/step_through.py --model runs/pre/model  # another model directory

Every step below is what you would type in a notebook; the script asserts that the numbers agree.

1. A trainer from the ``tiny-sentiment`` preset (built-in tiny GPT-2, prompts cut from held-out
   reviews, VADER reward) with a small batch: 16 episodes, minibatches of 4, two epochs, so one
   phase takes 8 optimiser steps. The KL is a loss term here (``kl_mode="loss"``, k3 estimator)
   rather than a reward term (the preset's default), so that every term of the loss is non-zero;
   and ``debug=True`` checks the invariants of ``rlhf_scratch/invariants.py`` along the way.
   One ordinary phase is run first, at 10× the preset's learning rate, so that the policy has
   visibly moved away from the reference.
2. ``memory = trainer.rollout_phase()`` samples 16 responses, reads them with the policy and the
   reference (no grad), scores them and computes advantages. ``print(memory)`` lists each tensor's
   name, dtype, shape and statistics over the real generated tokens.
3. The advantages, by hand: GAE(γ, λ) on the terminal rewards and the rollout's values.
4. ``minibatches = list(trainer.minibatches(memory))`` draws the shuffled minibatches the learning
   phase will step on (from the trainer's seeded generator, as ``learning_phase`` would).
5. On ``mb = minibatches[0]``: one forward pass of the policy, then each objective of
   ``rlhf_scratch/objectives.py`` by hand: the clipped surrogate, the value loss, the entropy
   bonus, the KL penalty, and the total loss = −(surrogate − value loss + entropy bonus − KL penalty).
6. ``breakdown = trainer.learning_phase(memory, minibatches=minibatches)``: ``breakdown[0]`` was
   computed on ``mb`` before the phase's first optimiser step, so it equals the hand computation
   (printed side by side with the absolute difference). Later minibatches see an updated policy
   (their ratio is no longer 1).
7. The phase's metrics (what ``train`` logs to metrics.jsonl): means of the breakdown.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from rlhf_scratch.advantages import gae_advantages, terminal_rewards
from rlhf_scratch.objectives import (
    calc_clipped_surrogate,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_loss,
    generated_logits,
    kl_k3,
    masked_mean,
    taken_logprobs,
)
from rlhf_scratch.ppo import PPOTrainer, preset_configs

TOLERANCE = 1e-6  # float32 rounding; on CPU the two columns agree to the last bit


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; ``--help`` prints them and exits before any model is loaded (or, on a fresh cache, pretrained)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin",
                        help='the model to step through: "builtin" (pretrained first if not cached), a model directory '
                             "or a hub name (default builtin)")
    return parser.parse_args(argv)


def main(model: str = "builtin") -> dict:
    """The walkthrough on ``model`` (the tests pass a tiny random model); returns the largest difference and the time."""
    console = Console(width=120)  # the memory's lines are ~105 characters: don't wrap them when piped
    start = time.perf_counter()

    # 1. A trainer from a preset, with a small batch; one ordinary phase first.
    config = replace(preset_configs()["tiny-sentiment"](), model=model, batch_size=16, minibatch_size=4, ppo_epochs=2, phases=10,
                     lr=3e-4, head_lr=3e-3, kl_mode="loss", kl_estimator="k3", debug=True)
    trainer = PPOTrainer(config)
    trainer.learning_phase(trainer.rollout_phase())

    # 2. The rollout of phase 2, in a replay memory.
    phase_start = time.perf_counter()
    rollout = trainer.sample_and_score()          # ScoredRollout: samples, log-probs, values, KL, rewards, stats
    memory, memory_stats = trainer.build_memory(rollout)
    console.rule("[bold]2. The replay memory of phase 2")
    console.print(memory, highlight=False)
    console.print(f"rollout: {rollout.stats['reward/mean']:+.3f} mean reward, "
                  f"{rollout.stats['objective/kl']:.4f} nats KL to the reference")

    # 3. Advantages by hand: the reward on each response's last real token, then GAE.
    advantages, returns = gae_advantages(terminal_rewards(memory.rewards, memory.gen_mask), memory.values,
                                         memory.gen_mask, config.gamma, config.lam)
    torch.testing.assert_close(advantages, memory.advantages, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(returns, memory.returns, rtol=0, atol=TOLERANCE)
    console.print("3. advantages and returns = GAE(terminal rewards, values): equal to the memory's")

    # 4. The minibatches learning will use.
    minibatches = list(trainer.minibatches(memory))
    mb = minibatches[0]
    console.rule(f"[bold]4-5. Minibatch 0 of {len(minibatches)}, by hand")
    console.print(mb, highlight=False)

    # 5. The objectives by hand on minibatch 0, with the policy as it is before the phase's first step.
    P, mask, T = mb.prompt_len, mb.gen_mask, config.sampling.temperature
    with torch.no_grad():
        output = trainer.policy(mb.sequences, mb.attention_mask)  # logits [B, S, V], values [B, S]
    logits = output.logits / T                                   # log-probs are taken at the sampling temperature
    logprobs = taken_logprobs(logits, mb.sequences, P)           # [B, G]: log π(token at P + i), logits at P − 1 + i
    values = output.values[:, P - 1 : -1]                        # [B, G]: value of the state each token is chosen in
    surrogate = calc_clipped_surrogate(logprobs, mb.logprobs, mb.advantages, mask, config.clip_coef,
                                       config.normalize_advantages)
    value_loss = calc_value_loss(values, mb.returns, mask, config.vf_coef, mb.values, config.clip_range_value)
    entropy_bonus = calc_entropy_bonus(generated_logits(logits, P), mask, config.ent_coef)
    kl_penalty = calc_kl_penalty(kl_k3(logprobs, mb.ref_logprobs), mask, trainer.kl_controller.value)
    loss = -(surrogate - value_loss + entropy_bonus - kl_penalty)
    log_ratio = torch.where(mask, logprobs - mb.logprobs, 0.0)
    by_hand = {
        "surrogate": surrogate, "value_loss": value_loss, "entropy_bonus": entropy_bonus, "kl_penalty": kl_penalty,
        "loss": loss,
        "diag/ratio_mean": masked_mean(log_ratio.exp(), mask),
        "diag/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
    }

    # 6. The learning phase on the same minibatches: breakdown[0] is minibatch 0, before any step.
    lr = trainer.optimizer.param_groups[0]["lr"]
    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    table = Table(title="6. Minibatch 0: objectives by hand vs. logged by learning_phase")
    for column in ("term", "by hand", "learning_phase", "|difference|"):
        table.add_column(column, justify="left" if column == "term" else "right")
    worst = 0.0
    for name, value in by_hand.items():
        logged = breakdown[0][name]
        difference = abs(value.item() - logged)
        worst = max(worst, difference)
        table.add_row(name, f"{value.item():+.8g}", f"{logged:+.8g}", f"{difference:.1e}")
        assert difference <= TOLERANCE * max(1.0, abs(logged)), (name, value.item(), logged)
    console.print(table)
    console.print("The surrogate is mean(Â) = 0 at ratio 1 (advantages are normalised per minibatch): its value is ~0, "
                  "its gradient is not.")
    ratios = [round(row["diag/ratio_mean"], 6) for row in breakdown]
    console.print(f"ratio mean per minibatch: {ratios} (1 before the first step, then the policy moves)")

    # 7. The phase's metrics: means over the minibatches.
    # (PolicyTrainer.run_phase assembles this row the same way.)
    metrics = {"phase": trainer.phase, **rollout.stats, **memory_stats, **trainer.learning_metrics(breakdown), "lr": lr,
               "seconds": time.perf_counter() - phase_start}
    assert metrics["losses/total"] == sum(row["loss"] for row in breakdown) / len(breakdown)
    assert metrics["losses/policy"] == -sum(row["surrogate"] for row in breakdown) / len(breakdown)
    console.rule(f"[bold]7. Phase {metrics['phase']} metrics (one metrics.jsonl row)")
    for key in ("reward/mean", "objective/kl", "objective/entropy", "losses/policy", "losses/value",
                "losses/entropy_bonus", "losses/kl_penalty", "losses/total", "losses/clipfrac", "losses/approx_kl",
                "losses/grad_norm", "lr"):
        console.print(f"  {key:<22} {metrics[key]:+.6g}")
    seconds = time.perf_counter() - start
    console.print(f"[bold green]all hand-computed terms equal the logged ones[/] (largest difference {worst:.1e}); "
                  f"{seconds:.1f} s")
    return {"worst_difference": worst, "seconds": seconds}


if __name__ == "__main__":
    main(model=parse_args().model)
