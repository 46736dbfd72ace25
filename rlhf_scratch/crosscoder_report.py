"""``rlhf-scratch crosscode``: a BatchTopK crosscoder on the paired activations of a reference and its policy.

``run_crosscode(CrosscodeConfig)`` runs both models on the same tokens (held-out text the policy never trained on,
and the policy's own samples on held-out prompts), reads one hook (default ``blocks.{n_layers // 2}.hook_resid_post``)
at every real position but the BOS (an attention-sink outlier), trains a crosscoder on 90 % of the tokens
(``crosscoder.train_crosscoder``) and reports, on the other 10 %, the explained variance and, on all, the dead
fraction; then per latent the relative decoder norm r_j (reference-only ↔ shared ↔ policy-only), Latent Scaling
ν^ε and ν^r, the top-activating contexts (with the share of the pre-activation each model's encoder half gives),
and the logit effect through each model's own final norm and unembedding:

    logit effect_m(j) = N_lin,m(d_j^m) · W_U,m     [V]

where d_j^m = W_dec[j, m] / s_m is the latent's decoder row in model m's raw units and N_lin is the final norm's
linear part (centring for LayerNorm, then γ; no division by the scale, no β, no soft-cap): the direct effect of
adding the latent to the residual stream if nothing downstream changed. Writes report.md, relative_norms.png,
summary.json, crosscoder.pt, features.html (the listed latents as a static page) and config.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from rlhf_scratch.anatomy import final_norm_parameters, unembedding
from rlhf_scratch.crosscoder import (
    MODELS,
    dead_fraction,
    decoder_directions,
    encode_all,
    explained_variance,
    latent_class,
    latent_scaling,
    state,
    train_crosscoder,
)
from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, code_cell, markdown_table, number_cell, pyplot
from rlhf_scratch.feature_html import write_feature_page
from rlhf_scratch.model_diff import load_pair_at_layer
from rlhf_scratch.outputs import write_json
from rlhf_scratch.patching_report import policy_samples
from rlhf_scratch.sampling import encode, left_pad, padding_id
from rlhf_scratch.research_configs import CrosscodeConfig  # noqa: F401 (defined there: importable without torch)


@dataclass
class PairedActivations:
    """x [N, 2, D] (reference, policy) at one hook for N token positions, and where each came from."""

    x: Tensor
    tokens: Tensor
    """[R, S] the token rows both models read."""
    row: Tensor
    """[N] row of each position in ``tokens``."""
    position: Tensor
    """[N] its column."""
    source: list[str]
    """Per row: "text" or "sample"."""
    mask: Tensor | None = None
    """[R, S] attention mask of ``tokens`` (1 at real tokens)."""


@torch.no_grad()
def paired_activations(reference, policy, hook: str, tokens: Tensor, mask: Tensor, sources: list[str],
                       skip_first: bool, batch_size: int = 32) -> PairedActivations:
    """Both models' ``hook`` activations at every real position of ``tokens`` [R, S] (mask [R, S]), except each row's
    first real position when ``skip_first`` (the BOS). Activations are float32 on the CPU."""
    keep = mask.bool().clone()
    if skip_first:
        first = mask.long().cumsum(dim=1) == 1
        keep &= ~first
    parts = [[], []]
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        for m, bridge in enumerate((reference, policy)):
            device = next(bridge.parameters()).device
            _, cache = bridge.run_with_cache(tokens[rows].to(device), attention_mask=mask[rows].to(device),
                                             names_filter=lambda name: name == hook)
            if hook not in cache:
                raise ValueError(f"--hook {hook!r} is not an activation of this model; use e.g. "
                                 f"blocks.0.hook_resid_post (see `rlhf-scratch diff` for the hook names).")
            acts = cache[hook]
            if acts.ndim != 3:
                raise ValueError(f"--hook {hook!r} has shape {tuple(acts.shape)}; the crosscoder reads [batch, pos, d_model] hooks.")
            parts[m].append(acts.float().cpu()[keep[rows]])
    where = keep.nonzero()
    x = torch.stack([torch.cat(parts[0]), torch.cat(parts[1])], dim=1)
    return PairedActivations(x=x, tokens=tokens, row=where[:, 0], position=where[:, 1], source=sources, mask=mask)


def logit_effects(bridge, directions: Tensor) -> Tensor:
    """N_lin(d) · W_U for each row of ``directions`` [F, D] -> [F, V] (module docstring)."""
    norm = final_norm_parameters(bridge)
    W_U, _ = unembedding(bridge)
    d = directions.to(W_U.device).float()
    if norm.center:
        d = d - d.mean(dim=-1, keepdim=True)
    return ((d * norm.weight.to(d.device)) @ W_U).cpu()


def context_of(paired: PairedActivations, index: int, decode, width: int = 8) -> str:
    """The up to ``width`` real tokens ending at position ``index``, the read token in [[ ]]."""
    row, pos = int(paired.row[index]), int(paired.position[index])
    start = max(0, pos - width + 1)
    before = paired.tokens[row, start:pos]
    if paired.mask is not None:
        before = before[paired.mask[row, start:pos].bool()]  # no left padding
    return decode(before.tolist()) + "[[" + decode([int(paired.tokens[row, pos])]) + "]]"


def context_tokens(paired: PairedActivations, index: int, activations: Tensor, decode, width: int = 12) -> list:
    """[(token text, activation)] for the up to ``width`` real tokens ending at position ``index`` (activations [N]
    of one feature over the paired positions; 0 at positions that were not read, e.g. BOS)."""
    row, pos = int(paired.row[index]), int(paired.position[index])
    in_row = paired.row == row
    by_position = dict(zip(paired.position[in_row].tolist(), activations[in_row].tolist()))
    start = max(0, pos - width + 1)
    real = paired.mask[row].bool() if paired.mask is not None else torch.ones(paired.tokens.shape[1], dtype=torch.bool)
    return [(decode([int(paired.tokens[row, p])]), by_position.get(p, 0.0)) for p in range(start, pos + 1) if real[p]]


def latent_rows(model, paired: PairedActivations, latents: list[int], effects: list[Tensor], decode, top_k: int) -> list[dict]:
    """Per latent: r, class, firing frequency, Latent Scaling, logit-effect top tokens per model, top contexts."""
    f, _ = encode_all(model, paired.x)
    x_norm = model.normalise(paired.x)
    halves = [x_norm[:, m] @ model.W_enc[m].detach() for m in range(2)]  # each model's encoder half [N, F]
    r = model.relative_norms()
    scaling = {row["latent"]: row for row in latent_scaling(model, paired.x, latents)}
    rows = []
    for j in latents:
        active = f[:, j] > 0
        top = torch.topk(f[:, j], min(top_k, int(active.sum()))).indices.tolist() if active.any() else []
        contexts = []
        for i in top:
            ref_half, pol_half = halves[0][i, j].item(), halves[1][i, j].item()
            contexts.append({"context": context_of(paired, i, decode), "activation": f[i, j].item(),
                             "tokens": context_tokens(paired, i, f[:, j], decode),
                             "source": paired.source[int(paired.row[i])],
                             "policy_share": pol_half / (abs(ref_half) + abs(pol_half)) if ref_half or pol_half else float("nan")})
        row = {"latent": j, "relative_norm": r[j].item(), "class": latent_class(r[j].item()),
               "frequency": active.float().mean().item(), "max_activation": f[:, j].max().item(),
               "text_frequency": active[[paired.source[int(i)] == "text" for i in paired.row]].float().mean().item(),
               "contexts": contexts, **{k: v for k, v in scaling[j].items() if k != "latent"}}
        for m, name in enumerate(MODELS):
            values, ids = torch.topk(effects[m][j], top_k)
            row[f"logit_tokens_{name}"] = [decode([t]) for t in ids.tolist()]
            row[f"logit_token_ids_{name}"] = ids.tolist()
            row[f"logit_values_{name}"] = values.tolist()
        rows.append(row)
    return rows


def run_crosscode(config: CrosscodeConfig) -> dict:
    """Collect paired activations, train, analyse; write report.md, relative_norms.png, summary.json, crosscoder.pt."""
    console = Console()
    reference, policy, facts, layer = load_pair_at_layer(config, "crosscode")
    hook = config.hook or f"blocks.{layer}.hook_resid_post"
    if hook not in reference.hook_dict:
        raise ValueError(f"--hook {hook!r} is not a hook of this model; e.g. blocks.{layer}.hook_resid_post.")

    def encode_text(text: str) -> list[int]:
        return encode(policy.tokenizer, text, prepend_bos=config.prepend_bos)

    started = time.perf_counter()
    heldout = load_texts(config.texts, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)
    width = min(config.max_tokens, reference.cfg.n_ctx)
    rows = [encode_text(t)[:width] for t in heldout[: config.n_texts]]
    sources = ["text"] * len(rows)
    if config.n_samples:
        prompts = prompts_from_texts(heldout[config.n_texts :] or heldout, encode_text, config.n_samples,
                                     seed=config.seed + HELDOUT_SEED_OFFSET + 2, decode=policy.tokenizer.decode)
        sample_tokens, sample_mask, _ = policy_samples(policy, prompts, config.max_new_tokens, config.batch_size, config.seed)
        rows += [sample_tokens[r][sample_mask[r].bool()].tolist() for r in range(sample_tokens.shape[0])]
        sources += ["sample"] * sample_tokens.shape[0]
    tokens, mask = left_pad(rows, padding_id(policy.tokenizer))
    paired = paired_activations(reference, policy, hook, tokens, mask, sources, config.prepend_bos, config.batch_size)
    collected = time.perf_counter() - started
    n = paired.x.shape[0]
    split = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_eval = max(1, n // 10)
    train_x, eval_x = paired.x[split[n_eval:]], paired.x[split[:n_eval]]
    console.print(f"crosscode: {n} paired positions at {hook} ({len(rows)} sequences); training on {train_x.shape[0]}")
    started = time.perf_counter()
    model = train_crosscoder(train_x, config.settings,
                             log=lambda step, m: console.print(f"  step {step}: mse {m['mse']:.4f}, dead {m['dead_fraction']:.3f}"))
    trained = time.perf_counter() - started
    ev = explained_variance(model, eval_x)
    dead = dead_fraction(model, paired.x)
    r = model.relative_norms()
    f, _ = encode_all(model, paired.x)
    alive = (f > 0).any(dim=0)
    by_class = {name: [j for j in range(model.n_latents) if alive[j] and latent_class(r[j].item()) == name]
                for name in ("policy-only", "reference-only", "shared", "mixed")}
    alive_ids = [j for j in range(model.n_latents) if alive[j]]
    policy_side = sorted(alive_ids, key=lambda j: -r[j].item())[: config.n_show]
    reference_side = [j for j in sorted(alive_ids, key=lambda j: r[j].item())[: config.n_show] if j not in policy_side]
    frequent = [j for j in sorted(by_class["shared"], key=lambda j: -(f[:, j] > 0).sum().item())
                if j not in policy_side + reference_side][: config.n_show]
    shown = policy_side + reference_side + frequent
    groups = {"policy-leaning": policy_side, "reference-leaning": reference_side, "frequent shared": frequent}
    effects = [logit_effects(bridge, decoder_directions(model, m)) for m, bridge in enumerate((reference, policy))]
    decode = policy.tokenizer.decode
    latents = latent_rows(model, paired, shown, effects, decode, config.top_k)
    for row in latents:
        row["group"] = next(name for name, js in groups.items() if row["latent"] in js)
    summary = {"reference": config.reference, "policy": config.policy, "anatomy": facts.describe(), "hook": hook,
               "n_positions": n, "n_eval_positions": n_eval, "n_texts": sources.count("text"),
               "n_samples": sources.count("sample"), "n_latents": model.n_latents, "k": model.k,
               "threshold": model.threshold.item(), "scales": model.scale.tolist(),
               "explained_variance": ev, "dead_fraction": dead,
               "class_counts": {name: len(js) for name, js in by_class.items()},
               "seconds_collect": collected, "seconds_train": trained, "latents": latents,
               "relative_norms_alive": [r[j].item() for j in range(model.n_latents) if alive[j]]}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    torch.save({**state(model), "hook": hook}, out / "crosscoder.pt")
    plot_relative_norms(summary, out / "relative_norms.png")
    write_crosscode_report(out, config, summary)
    write_feature_page(out / "features.html", f"Crosscoder latents at {hook}",
                       f"{config.policy} vs {config.reference}: the listed latents, their logit effects and top "
                       "contexts (shade: the latent's activation at each token).", [html_feature(row) for row in latents])
    write_json(out / "summary.json", summary)
    console.print(f"explained variance {ev['both']:.3f} (reference {ev['reference']:.3f}, policy {ev['policy']:.3f}); "
                  f"dead {dead:.1%}; classes {summary['class_counts']}; train {trained:.0f} s")
    console.print(f"outputs in {out} (report.md, relative_norms.png, summary.json, crosscoder.pt)")
    return summary


def html_feature(row: dict) -> dict:
    """One latent as a card of ``feature_html``."""
    return {"title": f"Latent {row['latent']} ({row['group']}, {row['class']})",
            "facts": {"r": f"{row['relative_norm']:.3f}", "frequency": f"{row['frequency']:.4f}",
                      "ν^ε": number_cell(row["nu_error"], 2), "ν^r": number_cell(row["nu_recon"], 2)},
            "tokens": {f"{name} logit effect": row[f"logit_tokens_{name}"] for name in MODELS},
            "contexts": [{"label": f"{c['source']} {c['activation']:.2f}", "tokens": c["tokens"]} for c in row["contexts"]]}


def write_crosscode_report(out: Path, config: CrosscodeConfig, summary: dict) -> Path:
    """report.md: the data, EV and dead fraction, class counts, one table per class, contexts of the listed latents."""
    ev = summary["explained_variance"]
    headers = ["latent", "r", "freq", "ν^ε", "ν^r", "policy logit effect (top)", "reference logit effect (top)"]
    text = [
        f"# Crosscoder: `{config.policy}` vs `{config.reference}` at `{summary['hook']}`", "",
        f"A BatchTopK crosscoder (F = {summary['n_latents']}, k = {summary['k']}) trained on {summary['n_positions']} "
        f"paired positions ({summary['n_texts']} held-out texts, {summary['n_samples']} policy samples; BOS excluded) "
        f"for {config.steps} steps ({summary['seconds_train']:.0f} s; collecting the activations took "
        f"{summary['seconds_collect']:.0f} s). Model: {summary['anatomy']}.", "",
        f"- explained variance on {summary['n_eval_positions']} held-out positions: {ev['both']:.3f} "
        f"(reference {ev['reference']:.3f}, policy {ev['policy']:.3f})",
        f"- dead latents (never fire on any position): {summary['dead_fraction']:.1%}",
        "- alive latents by relative decoder norm r = ‖d_pol‖ / (‖d_ref‖ + ‖d_pol‖): " + ", ".join(
            f"{name} {count}" for name, count in summary["class_counts"].items()) +
        " (Minder, Dumas et al.'s classes on Δ = ½((‖d_pol‖ − ‖d_ref‖) / max + 1): policy-only Δ ≥ 0.9, i.e. r ≥ 5/6; "
        "reference-only Δ ≤ 0.1, r ≤ 1/6; shared 0.4 ≤ Δ < 0.6, 4/9 ≤ r < 5/9)", "",
        "ν^ε and ν^r are the Latent Scaling ratios (other model / home model; near 0 for a latent that is really "
        "specific to its home model, near 1 when the other model carries it in its error (complete shrinkage) or "
        "reconstruction (latent decoupling)). Logit effect: the decoder row through each model's own final norm "
        "(linear part) and unembedding. freq: share of positions where it fires.", "",
        "![relative decoder norms](relative_norms.png)", "",
        "The listed latents with their contexts shaded by activation: [features.html](features.html) (offline, no "
        "scripts).", "",
    ]
    titles = {"policy-leaning": "The most policy-leaning latents (highest r)",
              "reference-leaning": "The most reference-leaning latents (lowest r)",
              "frequent shared": "The most frequent shared latents"}
    for name, title in titles.items():
        rows = [row for row in summary["latents"] if row["group"] == name]
        text += [f"## {title}", ""]
        if not rows:
            text += ["None.", ""]
            continue
        text += [markdown_table(headers, [[str(row["latent"]), f"{row['relative_norm']:.3f} ({row['class']})", f"{row['frequency']:.4f}",
                                           number_cell(row["nu_error"], 2), number_cell(row["nu_recon"], 2),
                                           " ".join(code_cell(t) for t in row["logit_tokens_policy"][:6]),
                                           " ".join(code_cell(t) for t in row["logit_tokens_reference"][:6])] for row in rows]), ""]
    text += ["## Top contexts", "", "The read token is in [[ ]]; pol share: the policy half's share of the encoder "
             "pre-activation at that token; source: held-out text or policy sample.", ""]
    for row in summary["latents"]:
        text += [f"**Latent {row['latent']}** ({row['class']}, r = {row['relative_norm']:.3f})", "",
                 markdown_table(["activation", "pol share", "source", "context"],
                                [[f"{c['activation']:.2f}", number_cell(c["policy_share"], 2), c["source"], code_cell(c["context"])]
                                 for c in row["contexts"]]) if row["contexts"] else "Never fires.", ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def plot_relative_norms(summary: dict, path: Path) -> Path:
    """Histogram of r over alive latents (log count) and ν^ε against ν^r for the listed latents."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist(summary["relative_norms_alive"], bins=40, range=(0, 1), color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("relative decoder norm r (0 reference-only, 1 policy-only)")
    axes[0].set_ylabel("alive latents")
    colours = {"policy-only": "tab:red", "reference-only": "tab:blue", "shared": "tab:gray", "mixed": "tab:orange"}
    for name, colour in colours.items():
        rows = [row for row in summary["latents"] if row["class"] == name]
        axes[1].scatter([row["nu_error"] for row in rows], [row["nu_recon"] for row in rows], color=colour, label=name, s=14)
    axes[1].set_xlabel("ν^ε (other / home, error)")
    axes[1].set_ylabel("ν^r (other / home, reconstruction)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Crosscoder at {summary['hook']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
