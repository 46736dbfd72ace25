"""``rlhf-scratch diff --timeline RUN``: when and where training changed the model, phase by phase.

A run trained with ``--snapshot-every N`` keeps the policy's weights every N phases in
``RUN/snapshots/phase_NNNN/``. The timeline measures each snapshot (and the final checkpoint)
against the reference with the measures of ``rlhf-scratch diff`` (``model_diff.py``), on one
fixed set of sequences (the final policy's samples on held-out prompts, or the texts with
``--no-from-samples``), so that the rows differ only by the weights:

    residual stream   mean ‖h_pol − h_ref‖ / ‖h_ref‖ at each residual point        → timeline_residual.png
    weights           ‖ΔW‖_F / ‖W_ref‖_F per head (mean over W_Q, W_K, W_V, W_O)   → timeline_heads.png
    log-probs         the tokens whose mean log-prob rose and fell most            → timeline.md

Outputs in ``--out``: timeline.json (every row), the two plots, timeline.md and config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from rlhf_scratch.anatomy import require_supported
from rlhf_scratch.evaluation import markdown_table, pyplot
from rlhf_scratch.model_diff import check_same_architecture, residual_stream_change, rose_and_fell, weight_change
from rlhf_scratch.model_diff_report import DiffConfig, diff_sequences, read_both, run_diff
from rlhf_scratch.models import CHECKPOINT_META_FILE, load_bridge, read_checkpoint_meta
from rlhf_scratch.outputs import write_json
from rlhf_scratch.policy_resume import SNAPSHOTS_DIR

HEAD_MATRICES = ("W_Q", "W_K", "W_V", "W_O")


def timeline_models(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(phase, model directory)`` of every snapshot of a run and of its final checkpoint, in phase order."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--timeline {run_dir}: no such run directory (the --out of a training run).")
    snapshots = sorted((run_dir / SNAPSHOTS_DIR).glob("phase_*"))
    if not snapshots:
        raise FileNotFoundError(f"{run_dir} has no {SNAPSHOTS_DIR}/: train it with --snapshot-every N (e.g. "
                                f"`rlhf-scratch ppo --snapshot-every 5 --out {run_dir}`), then run diff --timeline.")
    models = {int(read_checkpoint_meta(directory / CHECKPOINT_META_FILE)["phase"]): directory for directory in snapshots}
    checkpoint = run_dir / "checkpoint"
    if (checkpoint / CHECKPOINT_META_FILE).is_file():
        models.setdefault(int(read_checkpoint_meta(checkpoint / CHECKPOINT_META_FILE)["phase"]), checkpoint)
    return sorted(models.items())


def head_changes(weights: list[dict]) -> dict[str, float]:
    """{"L0.H1": mean over W_Q, W_K, W_V, W_O of that query head's relative change, ...} from ``weight_change`` rows.

    With grouped-query attention (fewer W_K/W_V rows than W_Q rows per layer) query head h is charged the change of
    the K/V head it reads, h // (n_heads / n_kv_heads), as Hugging Face's ``repeat_kv`` shares them.
    """
    by_matrix: dict[tuple[int, str], dict[int, float]] = {}
    for row in weights:
        if row["matrix"] in HEAD_MATRICES and row["head"] is not None:
            by_matrix.setdefault((row["layer"], row["matrix"]), {})[row["head"]] = row["rel_change"]
    result = {}
    for layer in sorted({layer for layer, _ in by_matrix}):
        query, key = by_matrix[(layer, "W_Q")], by_matrix[(layer, "W_K")]
        group = max(1, len(query) // len(key))
        for head in sorted(query):
            values = [query[head], by_matrix[(layer, "W_O")][head], key[head // group], by_matrix[(layer, "W_V")][head // group]]
            result[f"L{layer}.H{head}"] = sum(values) / len(values)
    return result


def run_timeline(config: DiffConfig) -> dict:
    """Measure every snapshot of ``config.timeline`` against ``config.reference``; write the outputs; return the summary."""
    console = Console()
    models = timeline_models(config.timeline)
    torch.manual_seed(config.seed)
    reference = load_bridge(config.reference, device=config.device)
    final = load_bridge(models[-1][1], device=config.device)
    check_same_architecture(reference, final, f"reference {config.reference!r}", f"run {config.timeline}")
    require_supported(reference, "diff --timeline")
    tokens, mask, _ = diff_sequences(config, final)  # one set of sequences for every phase

    def decode(token_id: int) -> str:
        return final.tokenizer.decode([token_id])

    rows = []
    for phase, directory in models:
        policy = final if directory == models[-1][1] else load_bridge(directory, device=config.device)
        both = read_both(reference, policy, tokens, mask, config.batch_size)
        rose, fell = rose_and_fell(both.delta_logprob.float(), config.top_k, decode)
        rows.append({
            "phase": phase, "model": str(directory),
            "residual": residual_stream_change(both.ref_cache, both.pol_cache, mask.bool()),
            "heads": head_changes(weight_change(reference, policy)),
            "logprob_rose": rose, "logprob_fell": fell,
        })
        console.print(f"phase {phase}: residual change at the last layer "
                      f"{rows[-1]['residual'][-1]['rel_norm']:.4f}; rose most: {rose[0]['token']!r}")
    summary = {"run": str(config.timeline), "reference": config.reference, "n_sequences": int(tokens.shape[0]),
               "from_samples": config.from_samples, "phases": [row["phase"] for row in rows], "rows": rows}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_json(out / "timeline.json", summary)
    plot_residual_timeline(rows, out / "timeline_residual.png")
    plot_head_timeline(rows, out / "timeline_heads.png")
    (out / "timeline.md").write_text(timeline_markdown(summary))
    console.print(f"outputs in {out} (timeline.md, timeline_residual.png, timeline_heads.png, timeline.json)")
    return summary


def run_diff_command(config: DiffConfig) -> dict:
    """The ``diff`` command: the timeline of a run with ``--timeline``, else one policy against the reference."""
    return run_timeline(config) if config.timeline is not None else run_diff(config)


def timeline_markdown(summary: dict) -> str:
    top = 5
    table = [[str(row["phase"]), f"{row['residual'][-1]['rel_norm']:.4f}",
              "{} ({:.2%})".format(*max(row["heads"].items(), key=lambda item: item[1])),
              ", ".join(repr(r["token"]) for r in row["logprob_rose"][:top]),
              ", ".join(repr(r["token"]) for r in row["logprob_fell"][:top])] for row in summary["rows"]]
    headers = ["phase", "residual change, last layer", "head that changed most", f"top {top} log-prob rose",
               f"top {top} log-prob fell"]
    return (f"# What training changed, phase by phase\n\nRun `{summary['run']}` against the reference "
            f"`{summary['reference']}`, on the same {summary['n_sequences']} sequences at every phase "
            f"({'the final policy samples' if summary['from_samples'] else 'texts'}).\n\n"
            f"{markdown_table(headers, table)}\n\n![residual](timeline_residual.png)\n\n![heads](timeline_heads.png)\n")


def plot_residual_timeline(rows: list[dict], path: Path) -> Path:
    """One line per residual point (embed, L0, ...): mean relative change against the reference, over phases."""
    plt = pyplot()
    phases = [row["phase"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for index, point in enumerate(rows[0]["residual"]):
        ax.plot(phases, [row["residual"][index]["rel_norm"] for row in rows], "o-", label=point["layer"])
    ax.set_xlabel("phase")
    ax.set_ylabel("mean ‖h_pol − h_ref‖ / ‖h_ref‖")
    ax.set_title("Residual stream change against the reference, by phase")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head_timeline(rows: list[dict], path: Path) -> Path:
    """A heatmap head × phase of each head's relative weight change (mean over W_Q, W_K, W_V, W_O)."""
    plt = pyplot()
    heads = list(rows[0]["heads"])
    grid = torch.tensor([[row["heads"][head] for row in rows] for head in heads])
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows) + 3), max(3, 0.22 * len(heads) + 1.5)))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(rows)), [str(row["phase"]) for row in rows])
    ax.set_yticks(range(len(heads)), heads, fontsize=7 if len(heads) <= 48 else 4)
    ax.set_xlabel("phase")
    fig.colorbar(image, ax=ax, label="‖ΔW‖_F / ‖W_ref‖_F, mean of Q, K, V, O")
    ax.set_title("Attention-head weight change against the reference, by phase")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
