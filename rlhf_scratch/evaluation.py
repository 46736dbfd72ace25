"""Shared evaluation output: before/after sample tables and training-curve plots."""

from __future__ import annotations

from pathlib import Path


def print_before_after(console, before, before_rewards: list[float], after, after_rewards: list[float], reward) -> None:
    """A table of the same prompts answered by the reference (before) and the trained policy (after)."""
    from rich.table import Table

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


def plot_curves(history: list[dict], out: Path) -> list[Path]:
    """``reward.png`` (mean ± std per phase) and ``kl.png`` (sequence KL to the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [row["phase"] for row in history]
    paths = []
    mean = [row["reward/mean"] for row in history]
    std = [row["reward/std"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(phases, mean, label="mean reward")
    ax.fill_between(phases, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    ax.set_xlabel("phase")
    ax.set_ylabel("reward")
    ax.set_title("Reward of each phase's rollout")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "reward.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(phases, [row["objective/kl"] for row in history], label="KL(π‖π_ref), exact, summed over tokens")
    ax.set_xlabel("phase")
    ax.set_ylabel("nats")
    ax.set_title("KL to the reference model")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "kl.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
