"""Update sparsity and rank: which entries of each weight matrix did training change, and how many directions?

After Mukherjee et al. 2025 ("RL finetunes small subnetworks", arXiv 2505.11711): RL updates touch only part of the
parameters, the update ΔW = W_pol − W_ref of each matrix is nevertheless close to full rank, and two runs from the
same reference with different seeds change overlapping entries far more often than chance.

Per weight matrix W [m, n] (TransformerLens views, all heads of a layer side by side: W_Q, W_K, W_V as
[D, H·d_head], W_O as [H·d_head, D], the MLP's W_in/W_gate [D, M] and W_out [M, D], W_E [V, D], W_pos, and W_U
[D, V] unless it is W_Eᵀ); biases and norm scales are left out:

    changed entries, one mask per tolerance (``TOLERANCES``):
        "exact"      ΔW_ij ≠ 0 in the stored precision (float32)
        "bf16"       bf16(W_pol)_ij ≠ bf16(W_ref)_ij: the change survives a bfloat16 round trip (the paper's test)
        "1e-3 RMS"   |ΔW_ij| > 10⁻³ · RMS(W_ref),  RMS(W) = sqrt(mean W²)      (and "1e-2 RMS" likewise)
    share changed      = #changed / (m·n)
    effective rank     = exp(H(p)),  p_i = σ_i / Σ_j σ_j,  H(p) = −Σ p_i log p_i     (σ: singular values of ΔW;
                         Roy & Vetterli 2007: r equal singular values give exactly r; 0 when ΔW = 0)
    rank at 99 % energy = the smallest k with Σ_{i≤k} σ_i² ≥ 0.99 · Σ_i σ_i²
    full rank          = min(m, n)

Two policies trained from the same reference (e.g. two seeds), masks A and B of one matrix at one tolerance,
N = m·n entries, a = |A|, b = |B|:

    Jaccard overlap   J = |A ∩ B| / |A ∪ B|               (1 for identical masks; defined as 1 when both are empty)
    chance            J₀ = (a·b/N) / (a + b − a·b/N)      the overlap two independent uniformly random sets of those
                                                          sizes have on average (expected intersection a·b/N)

``update_sparsity(reference, policy, second=None)`` returns one row per matrix plus a row "all" over every entry;
``sparsity_markdown`` and ``plot_update_sparsity`` turn them into the table and the plot of ``rlhf-scratch diff``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from rlhf_scratch.anatomy import anatomy
from rlhf_scratch.evaluation import markdown_table, pyplot
from rlhf_scratch.model_diff import check_same_architecture
from rlhf_scratch.typecheck import typechecker

TOLERANCES = ("exact", "bf16", "1e-3 RMS", "1e-2 RMS")
"""The changed-entry tests, from the most to the least permissive (see the module docstring)."""
HEADLINE = "bf16"
"""The tolerance the table's overlap columns and the plot's first panel use."""
ENERGY = 0.99


@jaxtyped(typechecker=typechecker)
def changed_mask(w_ref: Float[Tensor, "m n"], w_pol: Float[Tensor, "m n"], tolerance: str) -> Bool[Tensor, "m n"]:
    """Which entries changed under ``tolerance`` (one of ``TOLERANCES``)."""
    if tolerance == "exact":
        return w_pol != w_ref
    if tolerance == "bf16":
        return w_pol.to(torch.bfloat16) != w_ref.to(torch.bfloat16)
    if tolerance.endswith(" RMS"):
        rms = w_ref.double().pow(2).mean().sqrt()
        return (w_pol.double() - w_ref.double()).abs() > float(tolerance.split()[0]) * rms
    raise ValueError(f"unknown tolerance {tolerance!r}; choose from {', '.join(TOLERANCES)}.")


@jaxtyped(typechecker=typechecker)
def effective_rank(singular_values: Float[Tensor, "k"]) -> float:
    """exp(−Σ p log p) with p = σ / Σσ (zeros skipped); 0.0 for an all-zero spectrum."""
    sigma = singular_values.double().clamp_min(0)
    if sigma.sum() <= 0:
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@jaxtyped(typechecker=typechecker)
def energy_rank(singular_values: Float[Tensor, "k"], energy: float = ENERGY) -> int:
    """The smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ² (σ sorted descending); 0 for an all-zero spectrum."""
    power = singular_values.double().sort(descending=True).values.pow(2)
    if power.sum() <= 0:
        return 0
    cumulative = power.cumsum(0) / power.sum()
    # A tiny slack so that a spectrum of r equal values reaches its 99 % at r despite rounding.
    return int((cumulative < energy - 1e-12).sum().item()) + 1


def jaccard(a: Tensor, b: Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks of one shape (1.0 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def chance_jaccard(a: int, b: int, n: int) -> float:
    """Expected Jaccard overlap of independent uniformly random sets of sizes a and b among n: (ab/n)/(a+b−ab/n)."""
    if a == 0 and b == 0:
        return 1.0
    meet = a * b / n
    return meet / (a + b - meet)


def weight_matrices(bridge) -> dict[str, Tensor]:
    """{"embed W_E": [V, D], "pos_embed W_pos": [n_ctx, D], "L0 W_Q": [D, H·d_head], ..., "L0 W_O": [H·d_head, D],
    "L0 W_in": [D, M], "L0 W_gate", "L0 W_out": [M, D], ..., "unembed W_U": [D, V]} (W_U only when not tied to W_E)."""
    facts = anatomy(bridge)
    matrices = {"embed W_E": bridge.W_E}
    if facts.positional_embedding:
        matrices["pos_embed W_pos"] = bridge.W_pos
    for layer, block in enumerate(bridge.blocks):
        for name in ("W_Q", "W_K", "W_V"):
            w = getattr(block.attn, name)  # [H, D, d_head]
            matrices[f"L{layer} {name}"] = w.permute(1, 0, 2).reshape(w.shape[1], -1)
        w_o = block.attn.W_O  # [H, d_head, D]
        matrices[f"L{layer} W_O"] = w_o.reshape(-1, w_o.shape[-1])
        for name in ("W_in", "W_gate", "W_out"):
            w = getattr(block.mlp, name, None)
            if w is not None:
                matrices[f"L{layer} {name}"] = w
    if not facts.tied_unembed:
        matrices["unembed W_U"] = bridge.W_U
    return {name: w.detach().float().cpu() for name, w in matrices.items()}


def _spectrum(delta: Tensor) -> Tensor:
    return torch.linalg.svdvals(delta.double())


def update_sparsity(reference, policy, second=None, tolerances: tuple[str, ...] = TOLERANCES) -> list[dict]:
    """One row per weight matrix (``weight_matrices``) and a last row "all" (entries pooled; no rank):

    {"matrix", "shape": [m, n], "entries", "changed": {tolerance: share}, "effective_rank", "rank_99", "full_rank",
     and with ``second`` (a second policy from the same reference): "overlap": {tolerance: J}, "chance":
     {tolerance: J₀}, "changed_second": {tolerance: share}}.
    """
    check_same_architecture(reference, policy)
    if second is not None:
        check_same_architecture(reference, second, "reference", "second policy")
    ref, pol = weight_matrices(reference), weight_matrices(policy)
    sec = weight_matrices(second) if second is not None else None
    rows, totals = [], {key: {t: 0 for t in tolerances} for key in ("a", "b", "meet", "union")}
    n_all = 0
    for name, w_ref in ref.items():
        w_pol = pol[name]
        masks = {t: changed_mask(w_ref, w_pol, t) for t in tolerances}
        sigma = _spectrum(w_pol - w_ref)
        row = {"matrix": name, "shape": list(w_ref.shape), "entries": w_ref.numel(),
               "changed": {t: m.double().mean().item() for t, m in masks.items()},
               "effective_rank": effective_rank(sigma), "rank_99": energy_rank(sigma), "full_rank": min(w_ref.shape)}
        n_all += w_ref.numel()
        for t, mask in masks.items():
            totals["a"][t] += int(mask.sum())
        if sec is not None:
            second_masks = {t: changed_mask(w_ref, sec[name], t) for t in tolerances}
            row["changed_second"] = {t: m.double().mean().item() for t, m in second_masks.items()}
            row["overlap"] = {t: jaccard(masks[t], second_masks[t]) for t in tolerances}
            row["chance"] = {t: chance_jaccard(int(masks[t].sum()), int(second_masks[t].sum()), w_ref.numel())
                             for t in tolerances}
            for t in tolerances:
                totals["b"][t] += int(second_masks[t].sum())
                totals["meet"][t] += int((masks[t] & second_masks[t]).sum())
                totals["union"][t] += int((masks[t] | second_masks[t]).sum())
        rows.append(row)
    pooled = {"matrix": "all", "shape": None, "entries": n_all,
              "changed": {t: totals["a"][t] / n_all for t in tolerances},
              "effective_rank": None, "rank_99": None, "full_rank": None}
    if sec is not None:
        pooled["changed_second"] = {t: totals["b"][t] / n_all for t in tolerances}
        pooled["overlap"] = {t: 1.0 if totals["union"][t] == 0 else totals["meet"][t] / totals["union"][t]
                             for t in tolerances}
        pooled["chance"] = {t: chance_jaccard(totals["a"][t], totals["b"][t], n_all) for t in tolerances}
    return rows + [pooled]


def _share(value: float) -> str:
    return f"{value:.2%}" if value >= 1e-4 or value == 0 else f"{value:.1e}"


def sparsity_markdown(rows: list[dict], plot_name: str = "update_sparsity.png") -> list[str]:
    """The report section: definitions, one table (one row per matrix), the plot."""
    tolerances = list(rows[0]["changed"])
    paired = "overlap" in rows[0]
    headers = ["matrix", "shape", *[f"changed ({t})" for t in tolerances], "effective rank", f"rank {ENERGY:.0%}",
               "full rank"]
    if paired:
        headers += [f"Jaccard ({HEADLINE})", "chance"]
    table = []
    for row in rows:
        cells = [row["matrix"], "×".join(map(str, row["shape"])) if row["shape"] else f"{row['entries']} entries",
                 *[_share(row["changed"][t]) for t in tolerances]]
        cells += (["", "", ""] if row["effective_rank"] is None
                  else [f"{row['effective_rank']:.1f}", str(row["rank_99"]), str(row["full_rank"])])
        if paired:
            cells += [f"{row['overlap'][HEADLINE]:.3f}", f"{row['chance'][HEADLINE]:.3f}"]
        table.append(cells)
    pooled = rows[-1]
    summary = (f"Over all {pooled['entries']} matrix entries, {_share(pooled['changed'][HEADLINE])} changed in bf16 "
               f"and {_share(pooled['changed']['exact'])} in float32.")
    if paired:
        summary += (f" The second policy changed {_share(pooled['changed_second'][HEADLINE])}; the two changed-entry "
                    f"sets overlap with Jaccard {pooled['overlap'][HEADLINE]:.3f} against {pooled['chance'][HEADLINE]:.3f} "
                    "for independent sets of those sizes.")
    return [
        "## Update sparsity and rank", "",
        "Per weight matrix (all heads of a layer side by side; biases and norm scales left out), the share of "
        "entries that changed: exact = ΔW ≠ 0 in float32; bf16 = bf16(W_pol) ≠ bf16(W_ref), the change survives a "
        "bfloat16 round trip; k RMS = |ΔW| > k·RMS(W_ref). Effective rank of ΔW = exp(−Σ p log p) with p = σ/Σσ "
        f"over its singular values; rank {ENERGY:.0%} = fewest singular directions holding {ENERGY:.0%} of ‖ΔW‖²_F."
        + (" Jaccard = |A∩B|/|A∪B| of the two policies' changed entries (bf16); chance = (ab/N)/(a+b−ab/N), the "
           "mean overlap of independent random sets of the same sizes." if paired else
           " Pass --second-policy DIR (a run from another seed) for the overlap of the changed entries."), "",
        summary, "",
        markdown_table(headers, table), "",
        f"![update sparsity and rank]({plot_name})", "",
    ]


def plot_update_sparsity(rows: list[dict], path: Path) -> Path:
    """Two panels over matrices: share of entries changed per tolerance (and the seed overlap against chance, when
    there is a second policy); effective rank and rank at 99 % energy as fractions of the full rank."""
    plt = pyplot()
    matrices = [r for r in rows if r["effective_rank"] is not None]
    labels = [r["matrix"] for r in matrices]
    x = list(range(len(matrices)))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.32 * len(x) + 2), 7), sharex=True)
    for tolerance in matrices[0]["changed"]:
        axes[0].plot(x, [max(r["changed"][tolerance], 1e-7) for r in matrices], "o-", ms=3, label=f"changed ({tolerance})")
    if "overlap" in matrices[0]:
        axes[0].plot(x, [max(r["overlap"][HEADLINE], 1e-7) for r in matrices], "k^", ms=5,
                     label=f"Jaccard of two seeds ({HEADLINE})")
        axes[0].plot(x, [max(r["chance"][HEADLINE], 1e-7) for r in matrices], "kx", ms=5, label="chance Jaccard")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("share of entries")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [r["effective_rank"] / r["full_rank"] for r in matrices], "o-", label="effective rank / full rank")
    axes[1].plot(x, [r["rank_99"] / r["full_rank"] for r in matrices], "s-", label=f"rank at {ENERGY:.0%} energy / full rank")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("fraction of full rank")
    axes[1].legend(fontsize=7)
    axes[1].set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Update sparsity and rank of ΔW = W_pol − W_ref per weight matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
