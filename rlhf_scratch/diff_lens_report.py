"""``rlhf-scratch lens``: the Activation Difference Lens of a policy against its reference, and steering with it.

``run_lens(LensConfig)`` measures Δ_l (``diff_lens.activation_difference``: policy − reference resid_post, mean over
the first k positions of held-out text), reads each Δ_l through the model's own final norm and unembedding (top
tokens per layer), then steers the reference by α·Δ_l at one layer for a sweep of α and reports the mean reward of
its samples and the log-prob of the lens's top tokens against α = 0. Writes ``report.md``, ``steering.png``,
``summary.json`` and ``config.json`` (``rlhf-scratch lens --policy runs/ppo/checkpoint --out runs/lens``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.diff_lens import (
    activation_difference,
    lens_alignment,
    lens_logits,
    resid_hook,
    steered_logits,
    steering_hook,
)
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, code_cell, markdown_table, number_cell, pyplot
from rlhf_scratch.model_diff import load_pair_at_layer, parse_token_set
from rlhf_scratch.outputs import write_json
from rlhf_scratch.patching import token_set_logprob
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import SamplingConfig, encode, generate, left_pad, padding_id
from rlhf_scratch.command_configs import LensConfig  # noqa: F401 (defined there: importable without torch)


@torch.no_grad()
def steering_sweep(reference, vector, layer: int, alphas: list[float], texts, text_mask, token_ids: list[int],
                   prompts, reward, config: LensConfig) -> list[dict]:
    """Per α: mean log Σ_T p and mean Σ_T p over the texts' real positions (teacher-forced) under steering, and the mean
    reward (± SE) of samples from the steered reference on ``prompts`` (the same random numbers for every α)."""
    rows = []
    keep = text_mask.bool()
    for alpha in alphas:
        logp_sum, p_sum = 0.0, 0.0
        for start in range(0, texts.shape[0], config.batch_size):
            rows_ = slice(start, start + config.batch_size)
            logits = steered_logits(reference, texts[rows_], text_mask[rows_], layer, vector, alpha)
            logp = token_set_logprob(torch.log_softmax(logits.double().cpu(), -1), token_ids)[keep[rows_]]
            logp_sum += logp.sum().item()
            p_sum += logp.exp().sum().item()
        row = {"alpha": alpha, "token_logprob": logp_sum / keep.sum().item(), "token_prob": p_sum / keep.sum().item()}
        if reward is not None:
            generation = generate(reference, prompts, SamplingConfig(max_new_tokens=config.max_new_tokens),
                                  generator=torch.Generator().manual_seed(config.seed),
                                  fwd_hooks=[steering_hook(layer, vector, alpha)])
            scores = score_texts(reward, generation.texts, generation.prompts)
            row.update(reward=scores.mean().item(),
                       reward_se=scores.std().item() / math.sqrt(len(scores)) if len(scores) > 1 else float("nan"),
                       sample=generation.responses[0])
        rows.append(row)
    base = next((r for r in rows if r["alpha"] == 0), None)
    for row in rows:
        row["delta_token_logprob"] = None if base is None else row["token_logprob"] - base["token_logprob"]
        row["token_prob_ratio"] = None if base is None or base["token_prob"] == 0 else row["token_prob"] / base["token_prob"]
        row["delta_reward"] = None if base is None or "reward" not in row else row["reward"] - base["reward"]
    return rows


def run_lens(config: LensConfig) -> dict:
    """Δ per layer, its lens reading, the steering sweep; write report.md, steering.png, summary.json."""
    console = Console()
    reference, policy, facts, layer = load_pair_at_layer(config, "lens")
    n_layers = reference.cfg.n_layers
    given = parse_token_set(config.tokens, policy.tokenizer) if config.tokens else None
    reward = make_reward(config.reward) if config.reward else None

    def encode_text(text: str) -> list[int]:
        return encode(policy.tokenizer, text, prepend_bos=config.prepend_bos)

    heldout = load_texts(config.texts, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)
    width = min(config.max_tokens, reference.cfg.n_ctx)
    texts, text_mask = left_pad([encode_text(t)[:width] for t in heldout[: config.n_texts]], padding_id(policy.tokenizer))
    prompts = prompts_from_texts(heldout, encode_text, config.n_prompts, seed=config.seed + HELDOUT_SEED_OFFSET + 1,
                                 decode=policy.tokenizer.decode)

    delta = activation_difference(reference, policy, texts, text_mask, config.first_k, config.batch_size)
    with torch.no_grad():
        _, cache = reference.run_with_cache(texts[: config.batch_size].to(config.device),
                                            attention_mask=text_mask[: config.batch_size].to(config.device),
                                            names_filter=lambda name: name.endswith("hook_resid_post"))
    keep = text_mask[: config.batch_size].bool()
    ref_norms = [cache[resid_hook(l)].float().cpu()[keep].norm(dim=-1).mean().item() for l in range(n_layers)]
    logits = lens_logits(reference, delta)  # [L, V]
    top = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1)
    z = lens_alignment(reference, delta)  # [L, V]: each lens reading's z (≈ N(0, 1) for a direction unrelated to t)
    decode = lambda t: policy.tokenizer.decode([t])  # noqa: E731
    lens_rows = [{"layer": l, "delta_norm": delta[l].norm().item(), "relative_norm": delta[l].norm().item() / max(ref_norms[l], 1e-12),
                  "top_token_ids": top.indices[l].tolist(), "top_tokens": [decode(t) for t in top.indices[l].tolist()],
                  "top_logits": top.values[l].tolist(), "top_z": z[l, top.indices[l]].tolist()} for l in range(n_layers)]
    token_ids = given or lens_rows[layer]["top_token_ids"]
    console.print(f"lens: Δ over the first {config.first_k} positions of {texts.shape[0]} held-out texts; steering at "
                  f"layer {layer} with α in {config.alpha_values}")
    sweep = steering_sweep(reference, delta[layer], layer, config.alpha_values, texts, text_mask, token_ids, prompts,
                           reward, config)
    policy_reward = None
    if reward is not None:
        generation = generate(policy, prompts, SamplingConfig(max_new_tokens=config.max_new_tokens),
                              generator=torch.Generator().manual_seed(config.seed))
        policy_reward = score_texts(reward, generation.texts, generation.prompts).mean().item()
    summary = {"reference": config.reference, "policy": config.policy, "anatomy": facts.describe(), "layer": layer,
               "first_k": config.first_k, "n_texts": int(texts.shape[0]), "lens": lens_rows,
               "steer_tokens": [decode(t) for t in token_ids], "steer_token_ids": token_ids,
               "token_source": "--tokens" if given else "lens", "reward": config.reward, "policy_reward": policy_reward,
               "sweep": sweep}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    plot_steering(sweep, summary, out / "steering.png")
    write_lens_report(out, config, summary)
    write_json(out / "summary.json", summary)
    print_lens_tables(console, summary)
    console.print(f"outputs in {out} (report.md, steering.png, summary.json)")
    return summary


def _tokens_cell(tokens: list[str], n: int = 10) -> str:
    return " ".join(code_cell(t) for t in tokens[:n])


def write_lens_report(out: Path, config: LensConfig, summary: dict) -> Path:
    """report.md: definitions, the lens's top tokens per layer, the steering sweep."""
    has_reward = summary["reward"] is not None
    text = [
        f"# Activation Difference Lens: `{config.policy}` − `{config.reference}`", "",
        f"Δ_l = mean over the first {config.first_k} real positions of {summary['n_texts']} held-out texts "
        f"({config.texts}) of h_pol,l − h_ref,l (``blocks.l.hook_resid_post``). Its lens reading is the reference's "
        f"own final norm and unembedding applied to Δ_l (logit_lens). Model: {summary['anatomy']}.", "",
        "## Top tokens of the lens per layer", "",
        "z of a token = √n · cos(x̂, γ ⊙ W_U[:, t]) (x̂: the final norm of Δ_l without its affine part; n = d_model − 1 "
        "for LayerNorm, d_model for RMSNorm): ≈ N(0, 1) when Δ_l's direction is unrelated to the token, so a top token "
        "with a small z is there by its constant prior (β·W_U + b_U), not by Δ.", "",
        markdown_table(["layer", "‖Δ_l‖", "‖Δ_l‖ / mean ‖h_ref,l‖", "top tokens (largest lens logit first)", "their z"],
                       [[f"L{r['layer']}", f"{r['delta_norm']:.4f}", f"{r['relative_norm']:.4f}",
                         _tokens_cell(r["top_tokens"], config.top_k),
                         " ".join(f"{v:.1f}" for v in r["top_z"][: config.top_k])] for r in summary["lens"]]), "",
        f"## Steering the reference with α·Δ_{summary['layer']}", "",
        f"α·Δ_{summary['layer']} is added at every position of blocks.{summary['layer']}.hook_resid_post. Token set "
        f"T = {_tokens_cell(summary['steer_tokens'])} ({'from --tokens' if summary['token_source'] == '--tokens' else 'the lens top tokens at that layer'}); "
        "log Σ_T p and Σ_T p are means over the held-out texts' real positions (teacher-forced); the ratio is Σ_T p "
        "against α = 0." + (f" Reward: {summary['reward']} of {config.n_prompts} samples ({config.max_new_tokens} new "
                             f"tokens) per α, the same random numbers for every α; the policy itself scores "
                             f"{number_cell(summary['policy_reward'], 3)} on the same prompts." if has_reward else ""), "",
        markdown_table(["α", "log Σ_T p", "Δ vs α=0", "Σ_T p ratio", *(["reward ± SE", "Δ reward", "first sample"] if has_reward else [])],
                       [[f"{r['alpha']:g}", number_cell(r["token_logprob"], 3), number_cell(r["delta_token_logprob"], 3, "+"),
                         number_cell(r["token_prob_ratio"], 2),
                         *([f"{number_cell(r['reward'], 3)} ± {number_cell(r['reward_se'], 3)}", number_cell(r["delta_reward"], 3, "+"),
                            code_cell(r["sample"], 60)] if has_reward else [])]
                        for r in summary["sweep"]]), "",
        "![steering sweep](steering.png)", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def print_lens_tables(console, summary: dict) -> None:
    table = Table(title="Activation Difference Lens: top tokens per layer")
    table.add_column("layer")
    table.add_column("‖Δ‖/‖h‖", justify="right")
    table.add_column("top tokens")
    for r in summary["lens"]:
        table.add_row(f"L{r['layer']}", f"{r['relative_norm']:.4f}", " ".join(repr(t) for t in r["top_tokens"][:8]))
    console.print(table)
    table = Table(title=f"Steering the reference at layer {summary['layer']}")
    for header in ("α", "Δ log Σ_T p", "Σ_T p ratio", "reward"):
        table.add_column(header, justify="right")
    for r in summary["sweep"]:
        table.add_row(f"{r['alpha']:g}", number_cell(r["delta_token_logprob"], 3, "+"), number_cell(r["token_prob_ratio"], 2),
                      number_cell(r.get("reward"), 3))
    console.print(table)


def plot_steering(sweep: list[dict], summary: dict, path: Path) -> Path:
    """Two panels over α: the change in log Σ_T p, and the mean reward of the steered samples (± SE)."""
    plt = pyplot()
    alphas = [r["alpha"] for r in sweep]
    panels = 2 if summary["reward"] is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5), squeeze=False)
    axes[0][0].plot(alphas, [r["token_logprob"] for r in sweep], "o-")
    axes[0][0].set_ylabel("mean log Σ_T p (lens tokens)")
    if panels == 2:
        axes[0][1].errorbar(alphas, [r["reward"] for r in sweep], yerr=[r["reward_se"] for r in sweep], fmt="o-",
                            color="tab:green", label="steered reference")
        if summary["policy_reward"] is not None:
            axes[0][1].axhline(summary["policy_reward"], color="tab:red", ls="--", label="policy")
        axes[0][1].set_ylabel(f"mean reward ({summary['reward']})")
        axes[0][1].legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Steering the reference with α·Δ at layer {summary['layer']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
