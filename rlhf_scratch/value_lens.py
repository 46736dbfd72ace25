"""Inspect one sample of a PPO policy: the value head at every generated token, its advantages, and the value lens.

For a prompt and a response (sampled from the policy, or given) with P prompt tokens and G
generated tokens, generated token t sits at column P + t and is chosen in the state whose
value the head reads at column P − 1 + t (the position whose logits predict token t, as in
training). Per generated token the table shows:

    V_t      value head output at column P − 1 + t (the state before token t is chosen)
    r_t      per-token reward: the task reward on the last token, 0 elsewhere
             (minus kl_coef·KL_t when a reference is given and the run used kl_mode="reward")
    A_t, R_t GAE(γ, λ) advantage and return, ``advantages.gae_advantages``, with γ, λ (and
             kl_coef, kl_estimator) from the training config saved with the checkpoint
             (``resume_state.json``, or the run's config.json beside it), else ``PPOConfig``'s defaults

**Value lens** (like the logit lens): the value head was trained on the final residual stream
after the final LayerNorm (``ln_final.hook_out``). Apply the same map to earlier residual
streams: for the embeddings (``blocks.0.hook_resid_pre``) and after each block
(``blocks.L.hook_resid_post``),

    lens_L = value_head(N(resid_L)),   N = the model's own final norm (``anatomy.final_norm``):
    LayerNorm γ ⊙ (x − mean(x)) / sqrt(var(x) + ε) + β, or RMSNorm γ ⊙ x / sqrt(mean(x²) + ε)
    (γ = 1 + w for Gemma)

with the model's own γ, β, ε and the statistics of resid_L itself (not those of the final
residual). That gives values [L + 1, G]; the last row is exactly the value head's output. Early
layers are out of distribution for the head (it never saw them in training), so read their
values as "how much of the final value estimate is already linearly present", not as calibrated
estimates.

``rlhf-scratch inspect --checkpoint runs/ppo/checkpoint --prompt "The acting" [--out DIR]``
prints the tables and, with ``--out``, writes ``value_lens.png``, ``tokens.csv``, ``summary.json``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from jaxtyping import Float, jaxtyped
from rich.console import Console
from rich.table import Table
from torch import Tensor

from rlhf_scratch.advantages import gae_advantages, terminal_rewards
from rlhf_scratch.anatomy import FinalNorm, final_norm_parameters, require_supported
from rlhf_scratch.checkpoint import RESUME_STATE_JSON
from rlhf_scratch.evaluation import pyplot
from rlhf_scratch.model_diff import check_same_architecture
from rlhf_scratch.models import (
    BUILTIN_NAMES,
    CHECKPOINT_META_FILE,
    VALUE_HEAD_FILE,
    WEIGHT_FILES,
    complete_checkpoint_dir,
    load_bridge,
    load_policy,
    read_checkpoint_meta,
    residual_hooks,
)
from rlhf_scratch.objectives import generated_logits, kl_exact, kl_k1, kl_k3, taken_logprobs
from rlhf_scratch.outputs import write_json
from rlhf_scratch.ppo import PPOConfig
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import SamplingConfig, encode, generate
from rlhf_scratch.typecheck import typechecker


@jaxtyped(typechecker=typechecker)
def value_lens(
    resids: Float[Tensor, "layer batch seq d_model"], value_head: torch.nn.Module, norm: FinalNorm
) -> Float[Tensor, "layer batch seq"]:
    """value_head(N(resid_L)) for every residual stream L, N the model's final norm (``anatomy.FinalNorm``):
    [L+1, B, S, D] -> [L+1, B, S]."""
    return value_head(norm(resids).flatten(0, 1)).unflatten(0, resids.shape[:2])


@torch.no_grad()
def lens_values(policy, tokens: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One sequence batch through the policy: (values [B, S], logits [B, S, V], lens [L+1, B, S]).

    ``values`` and ``logits`` come from ``PolicyWithValueHead.forward`` (the head on
    ``ln_final.hook_out``), the lens from the cached residual streams.
    """
    bridge = policy.bridge
    output = policy(tokens, attention_mask)
    names = [hook for _, hook in residual_hooks(bridge.cfg.n_layers)]
    _, cache = bridge.run_with_cache(tokens, attention_mask=attention_mask, names_filter=names)
    resids = torch.stack([cache[name].float() for name in names])
    lens = value_lens(resids, policy.value_head, final_norm_parameters(bridge))
    return output.values, output.logits, lens


# --------------------------------------------------------------------------- runner


@dataclass
class InspectConfig:
    """One sample of a PPO policy: value, reward, advantage and return per token, and the value lens."""

    checkpoint: str
    """A PPO checkpoint directory (with value_head.safetensors), e.g. runs/ppo/checkpoint."""
    prompt: str = ""
    """Prompt text (empty: BOS alone)."""
    response: str | None = None
    """Inspect this response instead of sampling one."""
    reward: str | None = None
    """Reward spec (default: the run's reward, from the checkpoint's resume_state.json or the run's config.json; else vader)."""
    reference: str | None = None
    """Reference model for the per-token KL term (e.g. builtin); default: none, rewards without KL."""
    max_new_tokens: int = 24
    """Length of a sampled response."""
    prepend_bos: bool = True
    """Put BOS in front of the prompt (as the built-in model was trained)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = None
    """If given: value_lens.png, tokens.csv, summary.json, config.json."""

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("--checkpoint is required: a PPO checkpoint directory, e.g. runs/ppo/checkpoint.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.response is not None and not self.response:
            raise ValueError("--response must not be empty; omit it to sample a response.")


def run_settings(checkpoint: str | Path) -> dict:
    """The PPO settings inspect needs, from the first of: the training config saved in the checkpoint's
    resume_state.json, the run's config.json next to the checkpoint, PPOConfig's defaults."""


    settings = {f.name: f.default for f in fields(PPOConfig) if f.name in ("reward", "gamma", "lam", "kl_coef", "kl_mode", "kl_estimator")}
    settings["temperature"] = 1.0
    settings["source"] = "PPOConfig defaults"
    checkpoint = Path(checkpoint)
    for source, pick in ((checkpoint / RESUME_STATE_JSON, lambda saved: saved.get("config")),
                         (checkpoint.parent / "config.json", lambda saved: saved)):
        try:
            saved = pick(json.loads(source.read_text())) if source.is_file() else None
        except (json.JSONDecodeError, AttributeError):
            saved = None
        if isinstance(saved, dict) and "reward" in saved:
            settings.update({k: saved[k] for k in settings if k in saved})
            settings["temperature"] = (saved.get("sampling") or {}).get("temperature", 1.0)
            settings["source"] = str(source)
            break
    return settings


def check_ppo_checkpoint(checkpoint: str) -> Path:
    """The checkpoint directory, after checking that it holds a value head (only PPO checkpoints do)."""

    if checkpoint in BUILTIN_NAMES:
        raise ValueError(f"--checkpoint {checkpoint} is the built-in base model, which has no value head: inspect needs "
                         "a PPO checkpoint, e.g. runs/ppo/checkpoint after `rlhf-scratch ppo --out runs/ppo`.")
    path = complete_checkpoint_dir(checkpoint)  # a run's --out folder stands for its checkpoint/
    if not path.is_dir():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: no such directory. Pass the checkpoint/ folder of a PPO run "
            "(`rlhf-scratch ppo --out runs/ppo` writes runs/ppo/checkpoint)."
        )
    if not (path / VALUE_HEAD_FILE).is_file():
        raise ValueError(f"{checkpoint} {_why_no_value_head(path)}")
    return path


def _why_no_value_head(path: Path) -> str:
    """The rest of the sentence "CHECKPOINT ...", for a directory without a value head: what it is, and what to pass."""
    has_weights = any((path / name).is_file() for name in WEIGHT_FILES)
    meta = path / CHECKPOINT_META_FILE
    kind = read_checkpoint_meta(meta).get("kind") if meta.is_file() else None
    ppo_run = "pass the checkpoint/ folder (or the --out folder) of an `rlhf-scratch ppo` run"
    if not has_weights and (path / "config.json").is_file() and not (path / "checkpoint").exists() and kind is None:
        return (f"is a run directory without a checkpoint/: that run stopped before writing one (a trainer writes it at "
                f"the end, and every --checkpoint-every phases). There is nothing to inspect in it; {ppo_run} that "
                "finished or wrote a checkpoint.")
    if kind == "ppo":
        missing = VALUE_HEAD_FILE if has_weights else f"{VALUE_HEAD_FILE} and the model weights"
        return (f"is an incomplete PPO checkpoint: {missing} missing (an interrupted save or copy?). Use an intact "
                "copy (the run's checkpoint.old, if there is one) or train again.")
    if kind is not None:
        return (f"is a {kind} checkpoint, which has no value head: inspect needs a PPO checkpoint, whose value head "
                f"it reads; {ppo_run}.")
    if not has_weights:
        return f"holds no model (no {WEIGHT_FILES[0]}) and no value head; {ppo_run}."
    return f"is a model without a value head ({VALUE_HEAD_FILE}), not a PPO checkpoint; {ppo_run}."


def run_inspect(config: InspectConfig) -> dict:
    """Sample (or take) a response, print the per-token table and the value lens; write files if --out."""


    console = Console()
    path = check_ppo_checkpoint(config.checkpoint)
    settings = run_settings(path)
    reward_spec = config.reward or settings["reward"] or "vader"
    reward = make_reward(reward_spec)
    torch.manual_seed(config.seed)
    policy = load_policy(path, device=config.device)
    policy.eval()
    bridge, tokenizer = policy.bridge, policy.tokenizer
    require_supported(bridge, "inspect")

    prompt_ids = encode(tokenizer, config.prompt, prepend_bos=config.prepend_bos)
    if not prompt_ids:
        raise ValueError("the prompt is empty and --prepend-bos is False: give a prompt or keep BOS.")
    if config.response is None:
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=settings["temperature"])
        generation = generate(bridge, [prompt_ids], sampling, generator=torch.Generator().manual_seed(config.seed))
        length = int(generation.gen_mask[0].sum())
        sequences = generation.sequences[:, : generation.prompt_len + length]
        prompt_text, response_text = generation.prompts[0], generation.responses[0]
    else:
        response_ids = encode(tokenizer, config.response, prepend_bos=False)
        if not response_ids:
            raise ValueError(f"--response {config.response!r} encodes to no token.")
        sequences = torch.tensor([prompt_ids + response_ids])
        prompt_text, response_text = config.prompt, config.response
    if sequences.shape[1] > bridge.cfg.n_ctx:
        raise ValueError(f"prompt + response is {sequences.shape[1]} tokens, more than the model's context of "
                         f"{bridge.cfg.n_ctx}; shorten them.")
    P = len(prompt_ids)
    G = sequences.shape[1] - P
    device = next(bridge.parameters()).device
    sequences = sequences.to(device)
    attention_mask = torch.ones_like(sequences)
    gen_mask = torch.ones(1, G, dtype=torch.bool, device=device)

    values_all, logits, lens_all = lens_values(policy, sequences, attention_mask)
    # Column P − 1 + t holds the state in which generated token t is chosen.
    values = values_all[:, P - 1 : -1].float()
    lens = lens_all[:, 0, P - 1 : -1].float()  # [L+1, G]
    score = score_texts(reward, [prompt_text + response_text], [prompt_text]).to(device).float()
    token_rewards = terminal_rewards(score, gen_mask)
    scaled = logits.float() / settings["temperature"]
    logprobs = taken_logprobs(scaled, sequences, P)
    kl = None
    if config.reference is not None:
        reference = load_bridge(config.reference, device=config.device)
        check_same_architecture(reference, bridge, "--reference", "the checkpoint")
        with torch.no_grad():
            ref_scaled = reference(sequences, attention_mask=attention_mask).float() / settings["temperature"]
        ref_logprobs = taken_logprobs(ref_scaled, sequences, P)
        estimator = settings["kl_estimator"]
        kl = (kl_exact(generated_logits(scaled, P), generated_logits(ref_scaled, P)) if estimator == "exact"
              else kl_k3(logprobs, ref_logprobs) if estimator == "k3" else kl_k1(logprobs, ref_logprobs))
        if settings["kl_mode"] == "reward":
            token_rewards = token_rewards - settings["kl_coef"] * kl
    advantages, returns = gae_advantages(token_rewards, values, gen_mask, float(settings["gamma"]), float(settings["lam"]))

    layer_labels = [label for label, _ in residual_hooks(bridge.cfg.n_layers)]
    response_tokens = sequences[0, P:].tolist()
    rows = []
    for t, token_id in enumerate(response_tokens):
        row = {"t": t, "token": tokenizer.decode([token_id]), "token_id": token_id, "logprob": logprobs[0, t].item(),
               "value": values[0, t].item(), "reward": token_rewards[0, t].item()}
        if kl is not None:
            row["kl"] = kl[0, t].item()
        row.update(advantage=advantages[0, t].item(), ret=returns[0, t].item())
        row.update({f"lens_{label}": lens[i, t].item() for i, label in enumerate(layer_labels)})
        rows.append(row)
    summary = {
        "checkpoint": str(path), "prompt": prompt_text, "response": response_text, "reward_spec": reward_spec,
        "reward": score.item(), "settings": settings, "layers": layer_labels, "tokens": rows,
        "lens": lens.tolist(), "lens_last_equals_value_head": (lens[-1] - values[0]).abs().max().item(),
    }
    print_inspect_tables(console, summary)
    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)
        write_tokens_csv(rows, out / "tokens.csv")
        plot_value_lens(summary, out / "value_lens.png")
        write_json(out / "summary.json", summary)
        console.print(f"outputs in {out} (value_lens.png, tokens.csv, summary.json)")
    return summary


def print_inspect_tables(console, summary: dict) -> None:
    """The per-token table (value, reward, advantage, return) and the value lens (token × layer)."""

    rows = summary["tokens"]
    has_kl = bool(rows) and "kl" in rows[0]
    console.print(f"[cyan]{summary['prompt']}[/][bold]{summary['response']}[/]   "
                  f"{summary['reward_spec']} reward {summary['reward']:+.3f}")
    settings = summary["settings"]
    table = Table(title=f"Per generated token (GAE γ={settings['gamma']}, λ={settings['lam']}; V_t = value before token t)")
    headers = ["t", "token", "log π", "V_t", "r_t", *(["KL_t"] if has_kl else []), "A_t", "return"]
    for header in headers:
        table.add_column(header, justify="left" if header == "token" else "right")
    for row in rows:
        cells = [str(row["t"]), repr(row["token"]), f"{row['logprob']:.2f}", f"{row['value']:+.3f}", f"{row['reward']:+.3f}",
                 *([f"{row['kl']:+.3f}"] if has_kl else []), f"{row['advantage']:+.3f}", f"{row['ret']:+.3f}"]
        table.add_row(*cells)
    console.print(table)
    table = Table(title="Value lens: value_head(ln_final(resid)) per layer (last column = the value head itself)")
    table.add_column("t", justify="right")
    table.add_column("token")
    for label in summary["layers"]:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(str(row["t"]), repr(row["token"]), *(f"{row[f'lens_{label}']:+.3f}" for label in summary["layers"]))
    console.print(table)


def write_tokens_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_value_lens(summary: dict, path: Path) -> Path:
    """Top: V_t, A_t and the return per generated token; bottom: the value lens heatmap, layer × token."""

    plt = pyplot()
    rows = summary["tokens"]
    lens = torch.tensor(summary["lens"])
    labels = [repr(r["token"])[1:-1] for r in rows]
    width = max(6.0, 0.45 * len(rows) + 2)
    # Constrained layout with one colorbar for both axes keeps the token columns of the two panels aligned.
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 2.6 + 0.45 * lens.shape[0] + 2.4), sharex=True,
                                      gridspec_kw={"height_ratios": [2.4, 0.45 * lens.shape[0] + 0.6]}, layout="constrained")
    x = range(len(rows))
    top.plot(x, [r["value"] for r in rows], "o-", label="V_t (value head)")
    top.plot(x, [r["advantage"] for r in rows], "s--", label="A_t (GAE)")
    top.plot(x, [r["ret"] for r in rows], "^:", label="return")
    top.axhline(0, color="gray", lw=0.8)
    top.legend(fontsize=8)
    top.set_title(f"{summary['prompt']!r} → reward {summary['reward']:+.3f} ({summary['reward_spec']})", fontsize=9)
    bound = max(lens.abs().max().item(), 1e-6)
    image = bottom.imshow(lens.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    bottom.set_yticks(range(lens.shape[0]), summary["layers"])
    bottom.set_ylabel("residual stream")
    bottom.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=8)
    bottom.set_xlabel("generated token (value read before it is chosen)")
    if lens.numel() <= 400:
        for i in range(lens.shape[0]):
            for j in range(lens.shape[1]):
                bottom.text(j, i, f"{lens[i, j].item():.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=[top, bottom], label="value lens: value_head(ln_final(resid))", shrink=0.6, location="right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
