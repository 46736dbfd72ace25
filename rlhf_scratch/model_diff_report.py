"""``rlhf-scratch diff``: what did RLHF change? The command, its report, tables and plots.

``run_diff(DiffConfig)`` reads the same sequences with both models (``model_diff.collect``), measures
the residual stream, weights, log-probs, direct logit attribution (``model_diff.py``, formulas
there) and update sparsity and rank (``update_sparsity.py``; with ``--second-policy`` the overlap of two
runs' changed entries), and writes ``report.md``, ``residual.png``, ``weight_change.png``, ``dla.png``,
``update_sparsity.png``, ``summary.json`` and ``config.json``
(``rlhf-scratch diff --reference builtin --policy runs/ppo/checkpoint --out runs/diff``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, code_cell, markdown_table, pyplot
from rlhf_scratch.model_diff import (
    cached_hook_names,
    collect,
    head_change_grid,
    load_pair,
    logprob_change_by_token,
    mean_probs,
    model_dla,
    parse_token_set,
    residual_stream_change,
    rose_and_fell,
    weight_change,
)
from rlhf_scratch.models import (
    CHECKPOINT_META_FILE,
    complete_checkpoint_dir,
    load_bridge,
    looks_like_path,
    read_checkpoint_meta,
)
from rlhf_scratch.outputs import write_json
from rlhf_scratch.sampling import SamplingConfig, encode, generate, left_pad, padding_id
from rlhf_scratch.update_sparsity import plot_update_sparsity, sparsity_markdown, update_sparsity
from rlhf_scratch.command_configs import DiffConfig  # noqa: F401 (defined there: importable without torch)


def _check_policy_source(policy: str) -> None:
    # "owner/name" may be a hub id; "runs/ppo/checkpoint", "./x", or "runs/x" with runs/ on disk is a path.
    if looks_like_path(policy) and not complete_checkpoint_dir(policy).is_dir():
        raise FileNotFoundError(
            f"--policy {policy}: no such checkpoint directory. Pass the checkpoint/ folder of a training run, "
            "e.g. `rlhf-scratch ppo --out runs/ppo` writes runs/ppo/checkpoint."
        )


def diff_sequences(config: DiffConfig, policy_bridge) -> tuple[Tensor, Tensor, int]:
    """The token sequences both models read: (tokens [N, S], attention_mask [N, S], prompt_len P or 0)."""

    tokenizer = policy_bridge.tokenizer
    texts = load_texts(config.prompts, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)

    def encode_text(text: str) -> list[int]:
        return encode(tokenizer, text, prepend_bos=config.prepend_bos)

    if config.from_samples:
        prompts = prompts_from_texts(texts, encode_text, config.n_texts, seed=config.seed + HELDOUT_SEED_OFFSET,
                                     decode=tokenizer.decode)
        generator = torch.Generator().manual_seed(config.seed)
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens)
        parts = [generate(policy_bridge, prompts[i : i + config.batch_size], sampling, generator=generator)
                 for i in range(0, len(prompts), config.batch_size)]
        # One common width so that activations of all batches stack: re-pad every row to the longest.
        rows = [g.sequences[r][g.attention_mask[r].bool()].tolist() for g in parts for r in range(len(g.prompts))]
        tokens, mask = left_pad(rows, padding_id(tokenizer))
        return tokens, mask, max(g.prompt_len for g in parts)
    width = min(config.max_tokens, policy_bridge.cfg.n_ctx)
    encoded = [encode_text(text)[:width] for text in texts[: config.n_texts]]
    tokens, mask = left_pad(encoded, padding_id(tokenizer))
    return tokens, mask, 0


@dataclass
class BothReadings:
    """Reference and policy on the same sequences: residual-stream caches and per-token-id log-prob/probability means.

    ref_cache, pol_cache    {hook name: [N, S, D]} at ``cached_hook_names``
    delta_logprob           [V] mean over real positions of log π(v) − log π_ref(v)   (``logprob_change_by_token``)
    ref_prob, pol_prob      [V] mean over real positions of π_ref(v), π(v)
    n_positions             number of real positions
    """

    ref_cache: dict
    pol_cache: dict
    delta_logprob: Tensor
    ref_prob: Tensor
    pol_prob: Tensor
    n_positions: Tensor


def read_both(reference, policy, tokens: Tensor, mask: Tensor, batch_size: int) -> BothReadings:
    """Run both models batch by batch on ``tokens`` [N, S] (``mask`` [N, S]); only one batch of vocabulary-sized
    logits per model is alive at a time."""
    bool_mask = mask.bool()
    names = cached_hook_names(policy.cfg.n_layers)
    sums = {key: torch.zeros(policy.cfg.d_vocab, dtype=torch.float64) for key in ("delta", "ref_prob", "pol_prob")}
    ref_parts, pol_parts = [], []
    for start in range(0, tokens.shape[0], batch_size):
        rows, logits = slice(start, start + batch_size), {}
        ref_parts.append(collect(reference, tokens[rows], mask[rows], names, batch_size,
                                 on_logits=lambda _, value: logits.__setitem__("ref", value)))
        pol_parts.append(collect(policy, tokens[rows], mask[rows], names, batch_size,
                                 on_logits=lambda _, value: logits.__setitem__("pol", value)))
        # Batch means weighted by their number of real positions give the mean over all positions.
        batch_mask = bool_mask[rows]
        count = batch_mask.sum().double()
        sums["delta"] += logprob_change_by_token(logits["ref"], logits["pol"], batch_mask).double() * count
        sums["ref_prob"] += mean_probs(logits["ref"], batch_mask).double() * count
        sums["pol_prob"] += mean_probs(logits["pol"], batch_mask).double() * count
    n_positions = bool_mask.sum().double()
    return BothReadings(
        ref_cache={name: torch.cat([part[name] for part in ref_parts]) for name in names},
        pol_cache={name: torch.cat([part[name] for part in pol_parts]) for name in names},
        delta_logprob=sums["delta"] / n_positions, ref_prob=sums["ref_prob"] / n_positions,
        pol_prob=sums["pol_prob"] / n_positions, n_positions=n_positions,
    )


def run_diff(config: DiffConfig) -> dict:
    """Run reference and policy on the same sequences; write report.md, plots, summary.json; return the summary."""


    console = Console()
    _check_policy_source(config.policy)
    if config.second_policy:
        _check_policy_source(config.second_policy)
    torch.manual_seed(config.seed)
    reference, policy, facts = load_pair(config.reference, config.policy, config.device, "diff")
    given_tokens = parse_token_set(config.tokens, policy.tokenizer) if config.tokens else None  # fail before the work
    notes = []
    meta_file = complete_checkpoint_dir(config.policy) / CHECKPOINT_META_FILE
    if meta_file.is_file():
        base = read_checkpoint_meta(meta_file).get("base_model")
        if base is not None and str(base) != config.reference:
            notes.append(f"Note: the checkpoint says it was trained from {base!r}, but the reference here is {config.reference!r}.")

    tokens, mask, prompt_len = diff_sequences(config, policy)
    if not config.from_samples and config.max_tokens > policy.cfg.n_ctx:
        notes.append(f"Note: --max-tokens {config.max_tokens} is above the model's context of {policy.cfg.n_ctx} "
                     f"tokens: texts were cut to {policy.cfg.n_ctx}.")
        console.print(notes[-1])
    bool_mask = mask.bool()
    n_layers = policy.cfg.n_layers
    console.print(f"diff: {tokens.shape[0]} sequences of up to {tokens.shape[1]} tokens "
                  f"({'policy samples' if config.from_samples else 'texts'}), {int(bool_mask.sum())} positions")
    both = read_both(reference, policy, tokens, mask, config.batch_size)
    ref_cache, pol_cache, n_positions = both.ref_cache, both.pol_cache, both.n_positions
    delta, ref_prob, pol_prob = both.delta_logprob, both.ref_prob, both.pol_prob

    def decode(token_id: int) -> str:
        return policy.tokenizer.decode([token_id])

    residual = residual_stream_change(ref_cache, pol_cache, bool_mask)
    weights = weight_change(reference, policy)
    second = load_bridge(config.second_policy, device=config.device) if config.second_policy else None
    sparsity = update_sparsity(reference, policy, second)
    columns = {"delta_logprob": delta.float(), "delta_prob": (pol_prob - ref_prob).float(),
               "ref_prob": ref_prob.float(), "pol_prob": pol_prob.float()}
    rose, fell = rose_and_fell(delta.float(), config.top_k, decode, columns)
    mass_rose, mass_fell = rose_and_fell(columns["delta_prob"], config.top_k, decode, columns)
    token_ids = given_tokens or [r["token_id"] for r in rose]
    dla = {}
    for name, bridge, cache in (("reference", reference, ref_cache), ("policy", policy, pol_cache)):
        dla[name] = model_dla(bridge, cache, bool_mask, token_ids)
    dla_rows = [{"component": r["component"], "reference": r["contribution"], "policy": p["contribution"],
                 "change": p["contribution"] - r["contribution"]}
                for r, p in zip(dla["reference"]["rows"], dla["policy"]["rows"])]

    summary = {
        "reference": config.reference, "policy": config.policy, "n_sequences": int(tokens.shape[0]),
        "n_positions": int(n_positions.item()), "from_samples": config.from_samples, "prompt_len": prompt_len,
        "residual": residual,
        "weights_top": sorted(weights, key=lambda r: -r["rel_change"])[:20],
        "weights": weights,
        "logprob_rose": rose, "logprob_fell": fell, "prob_rose": mass_rose, "prob_fell": mass_fell,
        "dla_tokens": [decode(t) for t in token_ids], "dla_token_ids": token_ids,
        "dla": dla_rows,
        "dla_logit_difference": {name: dla[name]["logit_difference"] for name in dla},
        "dla_check_max_error": max(dla[name]["check_error"] for name in dla),
        "dla_soft_cap": facts.logit_soft_cap,
        "anatomy": facts.describe(),
        "update_sparsity": sparsity,
    }
    summary["interpretation"] = interpretation(summary)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    plot_residual(residual, out / "residual.png")
    plot_weight_change(weights, n_layers, facts.n_heads, out / "weight_change.png", facts.n_kv_heads)
    plot_dla(dla_rows, summary["dla_tokens"], out / "dla.png")
    plot_update_sparsity(sparsity, out / "update_sparsity.png")
    write_diff_report(out, config, summary, notes)
    write_json(out / "summary.json", summary)
    print_diff_tables(console, summary)
    console.print(summary["interpretation"])
    console.print(sparsity_markdown(sparsity)[4])  # the one-sentence summary of the update-sparsity section
    console.print(f"outputs in {out} (report.md, residual.png, weight_change.png, dla.png, update_sparsity.png, summary.json)")
    return summary


def interpretation(summary: dict) -> str:
    """One plain sentence from the numbers: largest residual change, largest weight change, tokens, DLA."""
    residual = [r for r in summary["residual"] if r["layer"] != "embed"] or summary["residual"]
    top_resid = max(residual, key=lambda r: r["rel_norm"])
    components = [r for r in summary["dla"] if r["component"] != "bias"]
    top_dla = max(components, key=lambda r: abs(r["change"]))
    diff = summary["dla_logit_difference"]
    # The residual stream accumulates: the block that adds the most change is the largest step between rows.
    steps = [(b["layer"], b["rel_norm"] - a["rel_norm"]) for a, b in zip(summary["residual"], summary["residual"][1:])]
    step = max(steps, key=lambda s: s[1]) if steps else (top_resid["layer"], top_resid["rel_norm"])
    text = (f"Largest residual change at {top_resid['layer']} (relative norm {top_resid['rel_norm']:.3f}, "
            f"cosine {top_resid['cosine']:.3f}), the largest step at {step[0]} ({step[1]:+.3f}); "
            "weights changed most in " + ", ".join(f"{r['component']} ({r['rel_change']:.2%})" for r in summary["weights_top"][:3]))
    rose = ", ".join(repr(r["token"]) for r in summary["logprob_rose"][:5])
    fell = ", ".join(repr(r["token"]) for r in summary["logprob_fell"][:5])
    gained = ", ".join(repr(r["token"]) for r in summary["prob_rose"][:5])
    lost = ", ".join(repr(r["token"]) for r in summary["prob_fell"][:5])
    text += (f". Log-prob rose most for {rose}, fell most for {fell}; probability mass moved to {gained} and away "
             f"from {lost}. The DLA token set's logit difference went from "
             f"{diff['reference']:+.3f} to {diff['policy']:+.3f}; the largest change came from {top_dla['component']} "
             f"({top_dla['change']:+.3f}).")
    return text


# --------------------------------------------------------------------------- tables and plots


def _prob(p: float, sign: str = "") -> str:
    return f"{p:{sign}.4f}" if abs(p) >= 1e-3 or p == 0 else f"{p:{sign}.1e}"


def _token_rows(rows: list[dict]) -> list[list[str]]:
    return [[code_cell(r["token"]), f"{r['delta_logprob']:+.3f}", _prob(r["delta_prob"], "+"), _prob(r["ref_prob"]),
             _prob(r["pol_prob"])] for r in rows]


def write_diff_report(out: Path, config: DiffConfig, summary: dict, notes: list[str]) -> Path:
    """report.md: the four tables, the plots, and the one-line interpretation."""

    source = "the policy's own samples on held-out prompts" if config.from_samples else f"texts from {config.prompts}"
    cap = summary.get("dla_soft_cap")
    cap_note = (f" The model soft-caps its logits (c·tanh(z/c), c = {cap:g}); DLA decomposes the pre-cap logits z, "
                "which are linear in the residual stream; the token tables use the capped logits the model outputs."
                if cap else "")
    token_headers = ["token", "Δ mean log-prob", "Δ mean p", "mean p (reference)", "mean p (policy)"]
    text = [
        f"# What did RLHF change? `{config.policy}` vs `{config.reference}`", "",
        f"Both models read the same {summary['n_sequences']} sequences ({source}); every number is a mean over "
        f"their {summary['n_positions']} real token positions. Model: {summary.get('anatomy', '?')}.", "",
        *(notes and [*notes, ""]),
        f"**Summary.** {summary['interpretation']}", "",
        "## Residual stream per layer", "",
        "Mean over positions of cos(h_pol, h_ref) and of ‖h_pol − h_ref‖ / ‖h_ref‖, at the embeddings "
        "(`blocks.0.hook_resid_pre`) and after each block (`blocks.L.hook_resid_post`).", "",
        markdown_table(["layer", "cosine", "relative norm"],
                  [[r["layer"], f"{r['cosine']:.4f}", f"{r['rel_norm']:.4f}"] for r in summary["residual"]]), "",
        "![residual stream change](residual.png)", "",
        "## Largest weight changes", "",
        "‖W_pol − W_ref‖_F / ‖W_ref‖_F per attention head (W_Q, W_K, W_V, W_O), per MLP (W_in, W_out), "
        "embeddings, unembedding and LayerNorm scales γ (10 largest; all rows in summary.json). With Adam every "
        "weight moves by a similar amount per step whatever its gradient's size, so a matrix with small weights "
        "shows a large relative change: read the RMS change per entry (‖ΔW‖_F / sqrt(#entries)) beside it.", "",
        markdown_table(["component", "relative change", "‖ΔW‖_F", "RMS change per entry"],
                  [[r["component"], f"{r['rel_change']:.4%}", f"{r['abs_change']:.4f}", f"{r['rms_change']:.2e}"]
                   for r in summary["weights_top"][:10]]), "",
        "![weight change per head](weight_change.png)", "",
        "## Tokens whose log-probability rose most", "",
        "Δ = mean over positions of log π_pol(v) − log π_ref(v) over the full next-token distribution.", "",
        markdown_table(token_headers, _token_rows(summary["logprob_rose"])), "",
        "## Tokens whose log-probability fell most", "",
        markdown_table(token_headers, _token_rows(summary["logprob_fell"])), "",
        "## Where the probability mass moved", "",
        "Ranked by Δ mean p = mean over positions of π_pol(v) − π_ref(v): the tokens the policy now samples more "
        "(or less) often. A log-prob change of a rare token can be large while its probability barely moves.", "",
        "Gained most:", "",
        markdown_table(token_headers, _token_rows(summary["prob_rose"])), "",
        "Lost most:", "",
        markdown_table(token_headers, _token_rows(summary["prob_fell"])), "",
        "## Direct logit attribution", "",
        f"Token set T = {', '.join(code_cell(t) for t in summary['dla_tokens'])}"
        f"{' (from --tokens)' if config.tokens else ' (the tokens that rose most)'}. Direction d = mean_T W_U[:, t] − "
        "mean_v W_U[:, v]; contribution of component c = mean over positions of ((c − m(c))/s)·(γ ⊙ d), with s the "
        "final norm's scale of the full residual and m(c) = mean c for LayerNorm, 0 for RMSNorm; 'bias' = β·d + "
        "mean_T b_U − mean b_U. Each column sums to that model's mean logit difference mean_T logit_t − mean_v logit_v "
        f"(reference {summary['dla_logit_difference']['reference']:+.3f}, policy "
        f"{summary['dla_logit_difference']['policy']:+.3f}; largest check error {summary['dla_check_max_error']:.1e})."
        f"{cap_note}", "",
        markdown_table(["component", "reference", "policy", "change"],
                  [[r["component"], f"{r['reference']:+.3f}", f"{r['policy']:+.3f}", f"{r['change']:+.3f}"] for r in summary["dla"]]), "",
        "![direct logit attribution](dla.png)", "",
        *sparsity_markdown(summary["update_sparsity"]),
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def print_diff_tables(console, summary: dict) -> None:

    table = Table(title="Residual stream: policy vs reference")
    for header in ("layer", "cosine", "relative norm"):
        table.add_column(header, justify="right")
    for r in summary["residual"]:
        table.add_row(r["layer"], f"{r['cosine']:.4f}", f"{r['rel_norm']:.4f}")
    console.print(table)
    table = Table(title="Largest weight changes")
    table.add_column("component")
    table.add_column("relative change", justify="right")
    for r in summary["weights_top"][:8]:
        table.add_row(r["component"], f"{r['rel_change']:.4%}")
    console.print(table)
    for title, rose, fell, key, digits in (
        ("Mean log-prob change Δ log p", summary["logprob_rose"], summary["logprob_fell"], "delta_logprob", 3),
        ("Probability mass moved Δ p", summary["prob_rose"], summary["prob_fell"], "delta_prob", 4),
    ):
        table = Table(title=title)
        for header in ("rose", "Δ", "fell", "Δ "):
            table.add_column(header, justify="right")
        for up, down in zip(rose, fell):
            table.add_row(repr(up["token"]), f"{up[key]:+.{digits}f}", repr(down["token"]), f"{down[key]:+.{digits}f}")
        console.print(table)
    table = Table(title="Direct logit attribution to the token set")
    for header in ("component", "reference", "policy", "change"):
        table.add_column(header, justify="right")
    for r in summary["dla"]:
        table.add_row(r["component"], f"{r['reference']:+.3f}", f"{r['policy']:+.3f}", f"{r['change']:+.3f}")
    console.print(table)


def plot_residual(rows: list[dict], path: Path) -> Path:
    """Two panels over layers: mean cosine similarity and mean relative norm of the difference."""

    plt = pyplot()
    labels = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(labels, [r["cosine"] for r in rows], "o-")
    axes[0].set_ylabel("mean cos(h_pol, h_ref)")
    axes[1].plot(labels, [r["rel_norm"] for r in rows], "o-", color="tab:red")
    axes[1].set_ylabel("mean ‖h_pol − h_ref‖ / ‖h_ref‖")
    for ax in axes:
        ax.set_xlabel("residual stream")
        ax.grid(alpha=0.3)
    fig.suptitle("Residual stream, policy vs reference on the same tokens\n(embed = blocks.0.hook_resid_pre, "
                 "L = blocks.L.hook_resid_post)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weight_change(rows: list[dict], n_layers: int, n_heads: int, path: Path, n_kv_heads: int | None = None) -> Path:
    """Heatmaps layer × head of the relative change of W_Q, W_K, W_V, W_O (W_K, W_V per K/V head when there are fewer
    of them), and the MLPs' W_in (W_gate) W_out per layer."""

    plt = pyplot()
    n_kv_heads = n_kv_heads or n_heads
    widths = {"W_Q": n_heads, "W_K": n_kv_heads, "W_V": n_kv_heads, "W_O": n_heads}
    grids = {m: head_change_grid(rows, m, n_layers, width) for m, width in widths.items()}
    mlp_matrices = [m for m in ("W_in", "W_gate", "W_out") if any(row["matrix"] == m for row in rows)]
    mlp = torch.zeros(n_layers, len(mlp_matrices))
    for row in rows:
        if row["matrix"] in mlp_matrices and row["layer"] is not None:
            mlp[row["layer"], mlp_matrices.index(row["matrix"])] = row["rel_change"]
    vmax = max(max(g.max().item() for g in grids.values()), mlp.max().item(), 1e-12)
    fig, axes = plt.subplots(1, 5, figsize=(3.0 * 5, 0.55 * n_layers + 2.2),
                             gridspec_kw={"width_ratios": [widths[m] for m in widths] + [max(2, n_heads // 2)]})
    image = None
    for ax, (matrix, grid) in zip(axes, [*grids.items(), ("MLP", mlp)]):
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(matrix)
        ax.set_yticks(range(n_layers), [f"L{l}" for l in range(n_layers)])
        if matrix == "MLP":
            ax.set_xticks(range(len(mlp_matrices)), mlp_matrices, rotation=45, fontsize=8)
        else:
            grouped = widths[matrix] != n_heads
            ax.set_xticks(range(widths[matrix]), [f"{'KV' if grouped else 'H'}{h}" for h in range(widths[matrix])])
            ax.set_xlabel("K/V head" if grouped else "head")
        if n_layers * grid.shape[1] <= 64:
            for (i, j), value in zip(((i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])), grid.flatten().tolist()):
                ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label="‖ΔW‖_F / ‖W_ref‖_F (cells: %)")
    fig.suptitle("Relative weight change per attention head and per MLP", y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dla(rows: list[dict], tokens: list[str], path: Path) -> Path:
    """Bars per residual-stream component: contribution to the token set's logit difference, policy vs reference."""

    plt = pyplot()
    labels = [r["component"] for r in rows]
    x = torch.arange(len(rows)).numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4))
    ax.bar(x - 0.2, [r["reference"] for r in rows], width=0.4, label="reference")
    ax.bar(x + 0.2, [r["policy"] for r in rows], width=0.4, label="policy")
    ax.plot(x, [r["change"] for r in rows], "k_", markersize=14, mew=2, label="policy − reference")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("contribution to mean_T logit − mean logit")
    shown = ", ".join(repr(t) for t in tokens[:8]) + (" ..." if len(tokens) > 8 else "")
    ax.set_title(f"Direct logit attribution to T = {shown}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
