"""``rlhf-scratch sae``: one sparse autoencoder spliced into the reference and the policy; which features changed?

``run_sae(SAEConfig)`` loads an SAE in sae-lens's layout (``sae.load_sae``; ``--sae DIR``) — or, without one,
trains a BatchTopK SAE on the reference's activations at ``--hook`` (a one-model ``crosscoder``) and saves it in
that layout under ``OUT/sae`` — splices it with the error term into the same hook of both models (their logits are
unchanged: the check is reported), reads the feature activations f_ref, f_pol [N, F] on the same held-out tokens,
and ranks the features by the change of their mean activation

    Δ_j = mean_n (f_pol,n,j − f_ref,n,j)       (N real positions but the BOS; largest |Δ_j| first)

with the top contexts of each in the model where it is larger. The SAE's own quality on each model is reported
as the fraction of variance it explains and the rise in next-token loss when x̂ replaces x (no error term).
Writes report.md, feature_changes.png, features.html, summary.json, config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from rlhf_scratch.crosscoder import CrosscoderSettings, train_crosscoder
from rlhf_scratch.crosscoder_report import PairedActivations, context_of, context_tokens, paired_activations
from rlhf_scratch.data import load_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, code_cell, markdown_table, pyplot
from rlhf_scratch.feature_html import write_feature_page
from rlhf_scratch.model_diff import load_pair
from rlhf_scratch.outputs import write_json
from rlhf_scratch.sae import SAE, load_sae, sae_hook, save_sae
from rlhf_scratch.sampling import encode, left_pad, padding_id
from rlhf_scratch.research_configs import SAEConfig  # noqa: F401 (defined there: importable without torch)


def train_sae(activations: Tensor, hook_name: str, settings: CrosscoderSettings, metadata: dict | None = None) -> SAE:
    """A BatchTopK SAE on one model's activations [N, D], as a jumprelu SAE in sae-lens's terms.

    It is a crosscoder with one model (x̃ = s·x, a = ReLU(x̃ W_enc + b_enc), f = a·1[a·‖d_j‖ > θ],
    x̂ = (f W_dec + b_dec)/s); folding s into the weights gives W_enc' = s·W_enc, W_dec' = W_dec/s,
    b_dec' = b_dec/s, apply_b_dec_to_input = False, and the per-feature threshold θ/‖d_j‖ on h."""
    model = train_crosscoder(activations[:, None, :], settings)
    s = model.scale[0].item()
    norms = model.W_dec[:, 0].detach().norm(dim=-1)
    threshold = torch.where(norms > 0, model.threshold / norms.clamp_min(1e-12), torch.full_like(norms, float("inf")))
    return SAE(W_enc=model.W_enc[0].detach() * s, b_enc=model.b_enc.detach().clone(), W_dec=model.W_dec[:, 0].detach() / s,
               b_dec=model.b_dec[0].detach() / s, hook_name=hook_name, architecture="jumprelu",
               threshold=threshold.clamp_max(1e30), apply_b_dec_to_input=False, metadata=dict(metadata or {}))


@torch.no_grad()
def spliced_features(bridge, sae: SAE, tokens: Tensor, mask: Tensor, keep: Tensor, batch_size: int = 32) -> dict:
    """Run ``bridge`` with ``sae`` spliced in (error term kept, then dropped): f at the ``keep`` positions [N, F],
    max |logits − plain logits| with the error term, the explained variance and the next-token loss rise without it."""
    device = next(bridge.parameters()).device
    fs, drift, residual, total, loss_plain, loss_sae, n_loss = [], 0.0, 0.0, 0.0, 0.0, 0.0, 0
    mean = None
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        t, m = tokens[rows].to(device), mask[rows].to(device)
        record: list = []
        plain, cache = bridge.run_with_cache(t, attention_mask=m, names_filter=lambda name: name == sae.hook_name)
        spliced = bridge.run_with_hooks(t, attention_mask=m, fwd_hooks=[sae_hook(sae, record)])
        drift = max(drift, (spliced.float() - plain.float()).abs().max().item())
        replaced = bridge.run_with_hooks(t, attention_mask=m, fwd_hooks=[sae_hook(sae, None, keep_error=False)])
        k = keep[rows]
        fs.append(record[0][k])
        x = cache[sae.hook_name].float().cpu()[k]
        x_hat = sae.reconstruct(x.to(sae.W_enc.device))[1].cpu()
        mean = x.mean(dim=0) if mean is None else mean
        residual += (x - x_hat).double().pow(2).sum().item()
        total += (x - mean).double().pow(2).sum().item()
        target = t[:, 1:]
        real = (m[:, 1:] * m[:, :-1]).bool()
        for logits, acc in ((plain, "plain"), (replaced, "sae")):
            nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target[..., None])[..., 0][real].sum().item()
            if acc == "plain":
                loss_plain += nll
            else:
                loss_sae += nll
        n_loss += int(real.sum())
    return {"f": torch.cat(fs), "max_logit_drift": drift, "explained_variance": 1 - residual / max(total, 1e-12),
            "loss_plain": loss_plain / max(n_loss, 1), "loss_spliced": loss_sae / max(n_loss, 1)}


def feature_changes(f_ref: Tensor, f_pol: Tensor) -> list[dict]:
    """Per feature j: mean activation in each model, Δ_j = mean(f_pol − f_ref), firing frequency in each; sorted by
    |Δ_j| (largest first). f_ref, f_pol [N, F] on the same positions."""
    delta = (f_pol - f_ref).double().mean(dim=0)
    rows = [{"feature": j, "delta": delta[j].item(), "mean_reference": f_ref[:, j].double().mean().item(),
             "mean_policy": f_pol[:, j].double().mean().item(), "freq_reference": (f_ref[:, j] > 0).float().mean().item(),
             "freq_policy": (f_pol[:, j] > 0).float().mean().item()} for j in range(f_ref.shape[1])]
    return sorted(rows, key=lambda row: -abs(row["delta"]))


def run_sae(config: SAEConfig) -> dict:
    console = Console()
    torch.manual_seed(config.seed)
    reference, policy, _ = load_pair(config.reference, config.policy, config.device, "sae")
    sae = load_sae(config.sae) if config.sae else None
    hook = sae.hook_name if sae else (config.hook or f"blocks.{reference.cfg.n_layers // 2}.hook_resid_post")
    if hook not in reference.hook_dict:
        raise ValueError(f"the SAE's hook {hook!r} is not a hook of this model (e.g. blocks.0.hook_resid_post); "
                         "pass an SAE trained on this model.")
    heldout = load_texts(config.texts, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)
    width = min(config.max_tokens, reference.cfg.n_ctx)
    tokens, mask = left_pad([encode(policy.tokenizer, t, prepend_bos=config.prepend_bos)[:width]
                             for t in heldout[: config.n_texts]], padding_id(policy.tokenizer))
    keep = mask.bool() & ~((mask.long().cumsum(dim=1) == 1) & config.prepend_bos)
    out = Path(config.out)
    if sae is None:
        # train on the reference's activations at other texts than the ones compared
        fit_texts = heldout[config.n_texts : 2 * config.n_texts] or heldout
        fit_tokens, fit_mask = left_pad([encode(policy.tokenizer, t, prepend_bos=config.prepend_bos)[:width]
                                         for t in fit_texts], padding_id(policy.tokenizer))
        paired = paired_activations(reference, reference, hook, fit_tokens, fit_mask, ["text"] * len(fit_texts),
                                    config.prepend_bos, config.batch_size)
        settings = CrosscoderSettings(n_latents=config.n_features, k=config.k, steps=config.steps, seed=config.seed)
        console.print(f"sae: training a BatchTopK SAE (F = {config.n_features}) on {paired.x.shape[0]} reference positions at {hook}")
        sae = train_sae(paired.x[:, 0], hook, settings, {"model_name": config.reference, "prepend_bos": config.prepend_bos,
                                                          "context_size": width})
        save_sae(sae, out / "sae")
        sae = load_sae(out / "sae")  # read back what was written, as a user would
    if sae.d_in != reference.cfg.d_model:
        raise ValueError(f"the SAE reads d_in = {sae.d_in}, but the model's d_model is {reference.cfg.d_model}.")
    sae.to(config.device)
    results = {name: spliced_features(bridge, sae, tokens, mask, keep, config.batch_size)
               for name, bridge in (("reference", reference), ("policy", policy))}
    changes = feature_changes(results["reference"]["f"], results["policy"]["f"])
    where = keep.nonzero()
    view = PairedActivations(x=torch.empty(0), tokens=tokens, row=where[:, 0], position=where[:, 1],
                             source=["text"] * tokens.shape[0], mask=mask)
    decode = policy.tokenizer.decode
    risen = [row for row in changes if row["delta"] > 0][: config.top_n]
    fallen = [row for row in changes if row["delta"] < 0][: config.top_n]
    for row in risen + fallen:
        f = results["policy" if row["delta"] > 0 else "reference"]["f"][:, row["feature"]]
        other = results["reference" if row["delta"] > 0 else "policy"]["f"][:, row["feature"]]
        top = torch.topk(f, min(config.top_k, int((f > 0).sum()))).indices.tolist() if (f > 0).any() else []
        row["contexts"] = [{"context": context_of(view, i, decode), "activation": f[i].item(), "other": other[i].item(),
                            "tokens": context_tokens(view, i, f, decode)} for i in top]
    quality = {name: {k: v for k, v in result.items() if k != "f"} for name, result in results.items()}
    summary = {"reference": config.reference, "policy": config.policy, "sae": config.sae or str(out / "sae"),
               "hook": hook, "architecture": sae.architecture, "d_sae": sae.d_sae, "n_positions": int(keep.sum()),
               "quality": quality, "risen": risen, "fallen": fallen,
               "n_changed": sum(1 for row in changes if row["delta"] != 0),
               "deltas": [row["delta"] for row in changes]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    plot_feature_changes(summary, out / "feature_changes.png")
    write_sae_report(out, summary)
    write_feature_page(out / "features.html", f"SAE features that changed at {hook}",
                       f"{config.policy} vs {config.reference}; shade: the feature's activation in the model where it "
                       "is larger.", [{"title": f"Feature {r['feature']} (Δ = {r['delta']:+.4f})",
                                       "facts": {"mean ref": f"{r['mean_reference']:.4f}", "mean pol": f"{r['mean_policy']:.4f}",
                                                 "freq ref": f"{r['freq_reference']:.3f}", "freq pol": f"{r['freq_policy']:.3f}"},
                                       "contexts": [{"label": f"{c['activation']:.2f} / {c['other']:.2f}", "tokens": c["tokens"]}
                                                    for c in r["contexts"]]} for r in risen + fallen])
    write_json(out / "summary.json", summary)
    drift = max(q["max_logit_drift"] for q in quality.values())
    console.print(f"sae at {hook}: logits with the error term differ from the plain model's by at most {drift:.1e}; "
                  f"explained variance reference {quality['reference']['explained_variance']:.3f}, policy "
                  f"{quality['policy']['explained_variance']:.3f}; top change Δ = {changes[0]['delta']:+.4f} (feature "
                  f"{changes[0]['feature']}). Outputs in {out}")
    return summary


def write_sae_report(out: Path, summary: dict) -> Path:
    q = summary["quality"]
    text = [f"# SAE features: `{summary['policy']}` vs `{summary['reference']}` at `{summary['hook']}`", "",
            f"SAE: `{summary['sae']}` ({summary['architecture']}, {summary['d_sae']} features), spliced into both models "
            f"with the error term on {summary['n_positions']} held-out positions (BOS excluded).", "",
            markdown_table(["model", "max |logits − plain| (error term)", "explained variance", "loss plain",
                            "loss with x̂ (no error term)"],
                           [[name, f"{v['max_logit_drift']:.1e}", f"{v['explained_variance']:.3f}",
                             f"{v['loss_plain']:.4f}", f"{v['loss_spliced']:.4f}"] for name, v in q.items()]), "",
            "Δ = mean over positions of f_pol − f_ref (the same tokens in both models).", "",
            "![feature changes](feature_changes.png)", "",
            "The listed features with their contexts shaded by activation: [features.html](features.html).", ""]
    for title, rows, where in (("Features the policy uses more", summary["risen"], "policy"),
                               ("Features the policy uses less", summary["fallen"], "reference")):
        text += [f"## {title}", ""]
        if not rows:
            text += ["None.", ""]
            continue
        text += [markdown_table(["feature", "Δ", "mean ref", "mean pol", "freq ref", "freq pol"],
                                [[str(r["feature"]), f"{r['delta']:+.4f}", f"{r['mean_reference']:.4f}",
                                  f"{r['mean_policy']:.4f}", f"{r['freq_reference']:.3f}", f"{r['freq_policy']:.3f}"]
                                 for r in rows]), "", f"Top contexts in the {where} (activation there / in the other model):", ""]
        for r in rows:
            text.append(f"- **{r['feature']}**: " + "; ".join(f"{code_cell(c['context'])} {c['activation']:.2f}/{c['other']:.2f}"
                                                             for c in r["contexts"][:4]))
        text.append("")
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def plot_feature_changes(summary: dict, path: Path) -> Path:
    """Δ_j of every feature, sorted from the largest rise to the largest fall."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    deltas = sorted(summary["deltas"], reverse=True)
    ax.bar(range(len(deltas)), deltas, width=1.0, color=["tab:red" if d > 0 else "tab:blue" for d in deltas])
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("features, sorted by Δ")
    ax.set_ylabel("Δ mean activation (policy − reference)")
    ax.grid(alpha=0.3)
    ax.set_title(f"SAE at {summary['hook']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
