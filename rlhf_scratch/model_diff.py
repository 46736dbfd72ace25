"""What did RLHF change? Compare a trained policy with its reference on the same token sequences.

Both models read exactly the same left-padded sequences; every statistic below is a mean over
the real (attention-mask 1) positions of all sequences. Shapes: N sequences, S positions,
D d_model, V vocab, L layers, H heads.

* **Residual stream** (``residual_stream_change``): at the embeddings (``blocks.0.hook_resid_pre``)
  and after every block (``blocks.L.hook_resid_post``), for each real position i

      cos_i = ⟨h_pol,i, h_ref,i⟩ / (‖h_pol,i‖·‖h_ref,i‖),   rel_i = ‖h_pol,i − h_ref,i‖ / ‖h_ref,i‖

  and the table reports mean_i cos_i and mean_i rel_i. The relative norm is the mean of
  per-position ratios (not the ratio of norms summed over positions), so that it is an average
  of the same per-position quantity as the cosine and one large-norm position (GPT-2's first
  token) does not dominate it.
* **Weights** (``weight_change``): relative Frobenius norm ‖W_pol − W_ref‖_F / ‖W_ref‖_F of
  every attention head's W_Q, W_K, W_V [D, d_head] and W_O [d_head, D], read per head from
  the bridge's TransformerLens views (``bridge.blocks[l].attn.W_Q[h]``, which split GPT-2's
  fused ``c_attn``/``c_proj``), of every MLP's W_in and W_out, of the embeddings W_E, W_pos,
  the unembedding W_U and the LayerNorm scales γ. Biases (and LayerNorm β) are left out:
  they start near 0, so a relative change of them is dominated by the tiny denominator.
* **Log-probs** (``logprob_change_by_token``): for every vocabulary token v,
  Δ(v) = mean_i [log π_pol(v | x_<i) − log π_ref(v | x_<i)] over the full next-token
  distribution (``log_softmax``) at each real position; the tables list the k tokens with the
  largest and the smallest Δ. Δ is a ratio of probabilities, so a rare token can move a lot of
  log-prob while barely changing what is sampled, so the report also ranks tokens by the change of
  their mean probability, mean_i π_pol(v | x_<i) − mean_i π_ref(v | x_<i) (where the probability
  mass moved).
* **Direct logit attribution** (``direct_logit_attribution``): for a token set T (default: the
  top-k risen tokens), the direction d = mean_{t∈T} W_U[:, t] − mean_{v} W_U[:, v] [D], so
  that ln_out·d + (mean_T b_U − mean b_U) = mean_{t∈T} logit_t − mean_v logit_v: how far
  T's logits stand above the average logit. The final residual x = embed + Σ_l (attn_out_l +
  mlp_out_l) and the final LayerNorm is LN(x) = γ ⊙ (x − mean(x))/σ + β with σ the per-position
  scale of the full x (``ln_final.hook_scale``). Centering is linear, so with σ held fixed

      LN(x)·d = Σ_c [(c − mean(c))/σ]·(γ ⊙ d) + β·d

  and component c's contribution at a position is [(c − mean(c))/σ]·(γ ⊙ d). The
  contributions plus the bias term (β·d + mean_T b_U − mean b_U) sum exactly to the logit
  difference along d. Each model uses its own W_U, γ, β, σ: each model's rows sum to its own
  logit difference, and the policy − reference column is where the change came from.

``run_diff(DiffConfig)`` runs both models, writes ``report.md``, ``residual.png``,
``weight_change.png``, ``dla.png``, ``summary.json`` and ``config.json``
(``rlhf-scratch diff --reference builtin --policy runs/ppo/checkpoint --out runs/diff``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, jaxtyped
from rich.console import Console
from rich.table import Table
from torch import Tensor

from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table, pyplot
from rlhf_scratch.models import CHECKPOINT_META_FILE, load_bridge
from rlhf_scratch.outputs import write_json
from rlhf_scratch.sampling import SamplingConfig, encode, generate, left_pad, padding_id
from rlhf_scratch.typecheck import typechecker

# is_pep484_tower: accept an int where a float is annotated, as PEP 484 does.

EMBED_HOOK = "blocks.0.hook_resid_pre"
FINAL_SCALE_HOOK = "ln_final.hook_scale"
FINAL_OUT_HOOK = "ln_final.hook_out"


def residual_hooks(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of the residual stream at the embeddings and after each block."""
    return [("embed", EMBED_HOOK)] + [(f"L{layer}", f"blocks.{layer}.hook_resid_post") for layer in range(n_layers)]


def component_hooks(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of every term of the residual stream: the embeddings, then each layer's attention and MLP outputs."""
    hooks = [("embed", EMBED_HOOK)]
    for layer in range(n_layers):
        hooks += [(f"L{layer} attn", f"blocks.{layer}.hook_attn_out"), (f"L{layer} mlp", f"blocks.{layer}.hook_mlp_out")]
    return hooks


def cached_hook_names(n_layers: int) -> list[str]:
    """Every activation the diff needs from a forward pass."""
    names = {name for _, name in residual_hooks(n_layers) + component_hooks(n_layers)}
    return sorted(names | {FINAL_SCALE_HOOK, FINAL_OUT_HOOK})


# --------------------------------------------------------------------------- residual stream


@jaxtyped(typechecker=typechecker)
def position_change(
    h_ref: Float[Tensor, "batch seq d_model"], h_pol: Float[Tensor, "batch seq d_model"], mask: Bool[Tensor, "batch seq"]
) -> tuple[float, float]:
    """(mean cosine, mean relative norm) of the policy's vectors against the reference's over real positions.

    cos_i = ⟨h_pol,i, h_ref,i⟩ / (‖h_pol,i‖·‖h_ref,i‖),  rel_i = ‖h_pol,i − h_ref,i‖ / ‖h_ref,i‖
    returns (mean_i cos_i, mean_i rel_i) over the positions i with mask True.
    h_ref, h_pol [B, S, D], mask [B, S] -> (float, float)
    """
    if not mask.any():
        raise ValueError("mask has no real position; pass the attention mask of non-empty sequences.")
    ref, pol = h_ref[mask].double(), h_pol[mask].double()
    cosine = F.cosine_similarity(pol, ref, dim=-1, eps=1e-12)
    relative = (pol - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return cosine.mean().item(), relative.mean().item()


def residual_stream_change(ref_cache: Mapping[str, Tensor], policy_cache: Mapping[str, Tensor], mask: Tensor) -> list[dict]:
    """One row per residual-stream point (embeddings, then after each block): mean cosine and relative norm.

    Caches map hook names to activations [B, S, D] of the *same* sequences; mask [B, S] (bool or 0/1).
    Returns [{"layer": "embed" | "L0" | ..., "hook": name, "cosine": float, "rel_norm": float}, ...].
    """
    n_layers = _count_layers(ref_cache)
    rows = []
    for label, hook in residual_hooks(n_layers):
        cosine, relative = position_change(ref_cache[hook], policy_cache[hook], mask.bool())
        rows.append({"layer": label, "hook": hook, "cosine": cosine, "rel_norm": relative})
    return rows


def _count_layers(cache: Mapping[str, Tensor]) -> int:
    n_layers = 0
    while f"blocks.{n_layers}.hook_resid_post" in cache:
        n_layers += 1
    if n_layers == 0:
        raise ValueError("the cache holds no blocks.L.hook_resid_post; run the model with run_with_cache first.")
    return n_layers


# --------------------------------------------------------------------------- weights


def relative_frobenius(w_ref: Tensor, w_pol: Tensor) -> float:
    """‖W_pol − W_ref‖_F / ‖W_ref‖_F (0 when they are equal; computed in float64)."""
    ref, pol = w_ref.detach().double(), w_pol.detach().double()
    return ((pol - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_same_architecture(ref_bridge, policy_bridge, ref_name: str = "reference", policy_name: str = "policy") -> None:
    """Raise ValueError unless both models have the same shapes (layers, heads, widths, vocabulary)."""
    keys = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx", "normalization_type")
    differ = [f"{key} {getattr(ref_bridge.cfg, key, None)} vs {getattr(policy_bridge.cfg, key, None)}"
              for key in keys if getattr(ref_bridge.cfg, key, None) != getattr(policy_bridge.cfg, key, None)]
    if differ:
        raise ValueError(
            f"{ref_name} and {policy_name} have different architectures ({'; '.join(differ)}), so they cannot be "
            "compared layer by layer. Pass as --reference the model the policy was trained from "
            "(its checkpoint's rlhf_scratch.json names it as base_model)."
        )


def weight_change(ref_bridge, policy_bridge) -> list[dict]:
    """Relative Frobenius change of every head's Q/K/V/O, every MLP's in/out, embeddings, unembedding and LN scales.

    Rows {"component": "L0.H2 W_V", "layer": 0 | None, "head": 2 | None, "matrix": "W_V", "rel_change": float,
    "abs_change": ‖ΔW‖_F, "rms_change": ‖ΔW‖_F / sqrt(#entries)}, in model order (sort them to rank).
    Per-head matrices come from the TransformerLens views W_Q, W_K, W_V [H, D, d_head] and W_O [H, d_head, D] of each block.
    """
    check_same_architecture(ref_bridge, policy_bridge)
    rows = []

    def add(component: str, w_ref: Tensor, w_pol: Tensor, layer=None, head=None, matrix=None):
        change = (w_pol.detach().double() - w_ref.detach().double()).norm().item()
        rows.append({"component": component, "layer": layer, "head": head, "matrix": matrix or component,
                     "rel_change": relative_frobenius(w_ref, w_pol), "abs_change": change,
                     "rms_change": change / w_ref.numel() ** 0.5})

    add("embed W_E", ref_bridge.W_E, policy_bridge.W_E, matrix="W_E")
    if hasattr(ref_bridge.cfg, "positional_embedding_type") and ref_bridge.cfg.positional_embedding_type == "standard":
        add("pos_embed W_pos", ref_bridge.W_pos, policy_bridge.W_pos, matrix="W_pos")
    ref_state, pol_state = ref_bridge.state_dict(), policy_bridge.state_dict()
    for layer, (ref_block, pol_block) in enumerate(zip(ref_bridge.blocks, policy_bridge.blocks)):
        for matrix in ("W_Q", "W_K", "W_V", "W_O"):
            w_ref, w_pol = getattr(ref_block.attn, matrix), getattr(pol_block.attn, matrix)
            for head in range(w_ref.shape[0]):
                add(f"L{layer}.H{head} {matrix}", w_ref[head], w_pol[head], layer, head, matrix)
        add(f"L{layer} mlp W_in", ref_block.mlp.W_in, pol_block.mlp.W_in, layer, None, "W_in")
        add(f"L{layer} mlp W_out", ref_block.mlp.W_out, pol_block.mlp.W_out, layer, None, "W_out")
        for norm in ("ln1", "ln2"):
            key = f"blocks.{layer}.{norm}.weight"
            if key in ref_state:
                add(f"L{layer} {norm} γ", ref_state[key], pol_state[key], layer, None, f"{norm} γ")
    if "ln_final.weight" in ref_state:
        add("ln_final γ", ref_state["ln_final.weight"], pol_state["ln_final.weight"], matrix="ln_final γ")
    add("unembed W_U", ref_bridge.W_U, policy_bridge.W_U, matrix="W_U")
    return rows


def head_change_grid(rows: list[dict], matrix: str, n_layers: int, n_heads: int) -> Tensor:
    """The per-head rows of one matrix (W_Q, W_K, W_V or W_O) as a grid [L, H] of relative changes."""
    grid = torch.zeros(n_layers, n_heads)
    for row in rows:
        if row["matrix"] == matrix and row["head"] is not None:
            grid[row["layer"], row["head"]] = row["rel_change"]
    return grid


# --------------------------------------------------------------------------- log-probs


@jaxtyped(typechecker=typechecker)
def logprob_change_by_token(
    ref_logits: Float[Tensor, "batch seq vocab"], pol_logits: Float[Tensor, "batch seq vocab"], mask: Bool[Tensor, "batch seq"]
) -> Float[Tensor, "vocab"]:
    """Mean change of every token's log-probability over real positions.

    Δ(v) = (1/|M|) Σ_{(b,i)∈M} [log_softmax(pol_logits[b, i])(v) − log_softmax(ref_logits[b, i])(v)]
    ref_logits, pol_logits [B, S, V], mask [B, S] (M = positions with mask True) -> Δ [V]
    Rank it with ``rose_and_fell``.
    """
    if not mask.any():
        raise ValueError("mask has no real position; pass the attention mask of non-empty sequences.")
    difference = F.log_softmax(pol_logits.double(), dim=-1) - F.log_softmax(ref_logits.double(), dim=-1)
    return difference[mask].mean(dim=0).float()


@jaxtyped(typechecker=typechecker)
def mean_probs(logits: Float[Tensor, "batch seq vocab"], mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "vocab"]:
    """Mean next-token probability of every token over real positions: (1/|M|) Σ_M softmax(logits)  [B, S, V] -> [V]."""
    return torch.softmax(logits.double(), dim=-1)[mask].mean(dim=0).float()


def rose_and_fell(score: Tensor, k: int, decode: Callable[[int], str] = str,
                  columns: Mapping[str, Tensor] | None = None) -> tuple[list[dict], list[dict]]:
    """The k tokens with the largest ``score`` [V] (largest first) and the k with the smallest (smallest first).

    Rows {"token_id", "token", "score", **{name: column[token_id]}}; ``decode`` turns an id into text,
    ``columns`` are other per-token values [V] to show beside the score.
    """
    k = min(k, score.numel())

    def row(token_id: int) -> dict:
        entry = {"token_id": token_id, "token": decode(token_id), "score": score[token_id].item()}
        entry.update({name: column[token_id].item() for name, column in (columns or {}).items()})
        return entry

    rose = [row(i) for i in torch.topk(score, k).indices.tolist()]
    fell = [row(i) for i in torch.topk(-score, k).indices.tolist()]
    return rose, fell


# --------------------------------------------------------------------------- direct logit attribution


@jaxtyped(typechecker=typechecker)
def logit_direction(W_U: Float[Tensor, "d_model vocab"], token_ids: list[int]) -> Float[Tensor, "d_model"]:
    """d = mean_{t∈T} W_U[:, t] − mean_v W_U[:, v]: the residual direction that raises T's logits above the average logit.

    For a final residual r (after ln_final), r·d = mean_T logit_t − mean_v logit_v (ignoring b_U).
    W_U [D, V], token_ids T -> d [D]
    """
    if not token_ids:
        raise ValueError("the token set is empty; pass at least one token id.")
    vocab = W_U.shape[1]
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab}).")
    return W_U[:, token_ids].mean(dim=1) - W_U.mean(dim=1)


@jaxtyped(typechecker=typechecker)
def direct_logit_attribution(
    cache: Mapping[str, Tensor],
    mask: Bool[Tensor, "batch seq"],
    direction: Float[Tensor, "d_model"],
    ln_weight: Float[Tensor, "d_model"],
    ln_bias: Float[Tensor, "d_model"],
    bias_offset: float = 0.0,
) -> list[dict]:
    """Each residual-stream component's mean contribution to the logit difference along ``direction``.

    contribution_c,i = [(c_i − mean(c_i)) / σ_i] · (γ ⊙ d)       c ∈ {embed, L0 attn, L0 mlp, ...}
    bias term         = β · d + bias_offset                     (bias_offset = mean_T b_U − mean_v b_U)
    σ_i = ``ln_final.hook_scale`` of the full residual at position i (the LayerNorm's own scale);
    means over the positions with mask True. Σ_c contribution_c + bias = mean_i (ln_final(x_i)·d + bias_offset).
    cache: hook name -> [B, S, D] (and σ [B, S, 1]); returns [{"component", "contribution"}, ..., {"component": "bias"}].
    """
    n_layers = _count_layers(cache)
    scale = cache[FINAL_SCALE_HOOK][mask].double()  # [M, 1]
    read_out = (ln_weight * direction).double()  # γ ⊙ d
    rows = []
    for label, hook in component_hooks(n_layers):
        component = cache[hook][mask].double()  # [M, D]
        centered = component - component.mean(dim=-1, keepdim=True)
        rows.append({"component": label, "contribution": ((centered / scale) @ read_out).mean().item()})
    rows.append({"component": "bias", "contribution": (ln_bias.double() @ direction.double()).item() + bias_offset})
    return rows


def final_logit_difference(cache: Mapping[str, Tensor], mask: Tensor, direction: Tensor, bias_offset: float = 0.0) -> float:
    """mean_i ln_final.hook_out_i · d + bias_offset: the quantity the DLA rows sum to (a consistency check)."""
    final = cache[FINAL_OUT_HOOK][mask.bool()].double()
    return (final @ direction.double()).mean().item() + bias_offset


def parse_token_set(text: str, tokenizer) -> list[int]:
    """Token ids of comma-separated words, each as a single token: " word" (a word inside a sentence) or else "word".

    A word that is not one token in this vocabulary is an error that shows how it splits.
    """
    ids = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        candidates = [tokenizer(f" {word}", add_special_tokens=False)["input_ids"], tokenizer(word, add_special_tokens=False)["input_ids"]]
        single = next((c for c in candidates if len(c) == 1), None)
        if single is None:
            pieces = [tokenizer.decode([i]) for i in candidates[0]]
            raise ValueError(f"--tokens: {word!r} is not a single token in this vocabulary (it splits into {pieces}); "
                             "pass words that are single tokens, or one of their pieces.")
        ids.append(single[0])
    if not ids:
        raise ValueError(f"--tokens {text!r} names no token; pass comma-separated words such as \"great,loved,wonderful\".")
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------- runner


@dataclass
class DiffConfig:
    """Compare a trained policy with its reference on the same texts: residual stream, weights, log-probs, DLA."""

    policy: str
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    reference: str = "builtin"
    """The model the policy was trained from: "builtin", a model directory, or a hub name."""
    prompts: str = "builtin"
    """Texts: "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 64
    """Number of token sequences both models read."""
    from_samples: bool = True
    """True: each sequence is a held-out prompt (first 2–8 tokens of a text) plus the policy's own sampled response,
    so the diff is measured where the policy's behaviour is; False: the texts themselves (teacher-forced)."""
    max_new_tokens: int = 24
    """Response length with --from-samples."""
    max_tokens: int = 64
    """Texts are cut to this many tokens with --no-from-samples."""
    tokens: str | None = None
    """DLA token set, comma-separated words (e.g. "great,loved,wonderful"); default: the top-k tokens whose log-prob rose most."""
    top_k: int = 15
    """Rows of the rose/fell tables and size of the default DLA token set."""
    prepend_bos: bool = True
    """Put BOS in front of each text (as the built-in model was trained)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    seed: int = 0
    device: str = "cpu"
    out: Path = Path("runs/diff")
    """Output directory: report.md, residual.png, weight_change.png, dla.png, summary.json, config.json."""

    def __post_init__(self):
        checks = [
            (bool(self.policy), "--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint."),
            (self.n_texts >= 1, f"n_texts must be >= 1, got {self.n_texts}."),
            (self.max_new_tokens >= 1 and self.max_tokens >= 2, "max_new_tokens must be >= 1 and max_tokens >= 2."),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _check_policy_source(policy: str) -> None:
    path = Path(policy).expanduser()
    # "owner/name" may be a hub id; "runs/ppo/checkpoint", "./x", or "runs/x" with runs/ on disk is a path.
    looks_like_path = policy.startswith((".", "/", "~")) or policy.count("/") > 1 or (
        "/" in policy and Path(policy.split("/")[0]).is_dir())
    if looks_like_path and not path.is_dir():
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
        prompts = prompts_from_texts(texts, encode_text, config.n_texts, seed=config.seed + HELDOUT_SEED_OFFSET)
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


@torch.no_grad()
def collect(bridge, tokens: Tensor, mask: Tensor, names: list[str], batch_size: int, on_logits=None) -> dict[str, Tensor]:
    """Activations ``names`` of ``bridge`` on all sequences, concatenated over batches: name -> [N, S, ...].

    ``on_logits(start, logits)`` is called with each batch's logits [b, S, V] (they are not kept:
    a vocabulary-sized tensor per position is the one thing that does not fit for large models).
    """
    device = next(bridge.parameters()).device
    gathered: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, tokens.shape[0], batch_size):
        batch, batch_mask = tokens[start : start + batch_size].to(device), mask[start : start + batch_size].to(device)
        logits, cache = bridge.run_with_cache(batch, attention_mask=batch_mask, names_filter=names)
        for name in names:
            gathered[name].append(cache[name].detach().float().cpu())
        if on_logits is not None:
            on_logits(start, logits.detach().float().cpu())
    return {name: torch.cat(parts) for name, parts in gathered.items()}


def run_diff(config: DiffConfig) -> dict:
    """Run reference and policy on the same sequences; write report.md, plots, summary.json; return the summary."""


    console = Console()
    _check_policy_source(config.policy)
    torch.manual_seed(config.seed)
    policy = load_bridge(config.policy, device=config.device)
    reference = load_bridge(config.reference, device=config.device)
    check_same_architecture(reference, policy, f"reference {config.reference!r}", f"policy {config.policy!r}")
    if reference.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ValueError(f"reference {config.reference!r} and policy {config.policy!r} use different tokenizers; "
                         "pass as --reference the model the policy was trained from.")
    given_tokens = parse_token_set(config.tokens, policy.tokenizer) if config.tokens else None  # fail before the work
    notes = []
    meta_file = Path(config.policy) / CHECKPOINT_META_FILE
    if meta_file.is_file():
        base = json.loads(meta_file.read_text()).get("base_model")
        if base is not None and str(base) != config.reference:
            notes.append(f"Note: the checkpoint says it was trained from {base!r}, but the reference here is {config.reference!r}.")

    tokens, mask, prompt_len = diff_sequences(config, policy)
    bool_mask = mask.bool()
    n_layers = policy.cfg.n_layers
    names = cached_hook_names(n_layers)
    vocab = policy.cfg.d_vocab
    sums = {key: torch.zeros(vocab, dtype=torch.float64) for key in ("delta", "ref_prob", "pol_prob")}
    console.print(f"diff: {tokens.shape[0]} sequences of up to {tokens.shape[1]} tokens "
                  f"({'policy samples' if config.from_samples else 'texts'}), {int(bool_mask.sum())} positions")
    ref_parts, pol_parts = [], []
    for start in range(0, tokens.shape[0], config.batch_size):
        # Both models on the same batch, so only one batch of vocabulary-sized logits per model is alive at a time.
        rows, logits = slice(start, start + config.batch_size), {}
        ref_parts.append(collect(reference, tokens[rows], mask[rows], names, config.batch_size,
                                 on_logits=lambda _, value: logits.__setitem__("ref", value)))
        pol_parts.append(collect(policy, tokens[rows], mask[rows], names, config.batch_size,
                                 on_logits=lambda _, value: logits.__setitem__("pol", value)))
        # Batch means weighted by their number of real positions give the mean over all positions.
        batch_mask = bool_mask[rows]
        count = batch_mask.sum().double()
        sums["delta"] += logprob_change_by_token(logits["ref"], logits["pol"], batch_mask).double() * count
        sums["ref_prob"] += mean_probs(logits["ref"], batch_mask).double() * count
        sums["pol_prob"] += mean_probs(logits["pol"], batch_mask).double() * count
    ref_cache = {name: torch.cat([part[name] for part in ref_parts]) for name in names}
    pol_cache = {name: torch.cat([part[name] for part in pol_parts]) for name in names}
    n_positions = bool_mask.sum().double()
    delta, ref_prob, pol_prob = (sums[k] / n_positions for k in ("delta", "ref_prob", "pol_prob"))

    def decode(token_id: int) -> str:
        return policy.tokenizer.decode([token_id])

    residual = residual_stream_change(ref_cache, pol_cache, bool_mask)
    weights = weight_change(reference, policy)
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
    }
    summary["interpretation"] = interpretation(summary)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    plot_residual(residual, out / "residual.png")
    plot_weight_change(weights, n_layers, policy.cfg.n_heads, out / "weight_change.png")
    plot_dla(dla_rows, summary["dla_tokens"], out / "dla.png")
    write_diff_report(out, config, summary, notes)
    write_json(out / "summary.json", summary)
    print_diff_tables(console, summary)
    console.print(summary["interpretation"])
    console.print(f"outputs in {out} (report.md, residual.png, weight_change.png, dla.png, summary.json)")
    return summary


def model_dla(bridge, cache: Mapping[str, Tensor], mask: Tensor, token_ids: list[int]) -> dict:
    """DLA rows of one model with its own W_U, ln_final γ/β and b_U, plus the exact logit difference they sum to."""
    state = bridge.state_dict()
    W_U = bridge.W_U.detach().float().cpu()
    direction = logit_direction(W_U, token_ids)
    b_U = bridge.b_U.detach().float().cpu() if getattr(bridge, "b_U", None) is not None else torch.zeros(W_U.shape[1])
    bias_offset = (b_U[token_ids].mean() - b_U.mean()).item()
    gamma, beta = state["ln_final.weight"].float().cpu(), state["ln_final.bias"].float().cpu()
    rows = direct_logit_attribution(cache, mask, direction, gamma, beta, bias_offset)
    total = final_logit_difference(cache, mask, direction, bias_offset)
    return {"rows": rows, "logit_difference": total, "check_error": abs(sum(r["contribution"] for r in rows) - total)}


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


def _token_cell(token: str) -> str:
    return "`" + repr(token)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def _prob(p: float, sign: str = "") -> str:
    return f"{p:{sign}.4f}" if abs(p) >= 1e-3 or p == 0 else f"{p:{sign}.1e}"


def _token_rows(rows: list[dict]) -> list[list[str]]:
    return [[_token_cell(r["token"]), f"{r['delta_logprob']:+.3f}", _prob(r["delta_prob"], "+"), _prob(r["ref_prob"]),
             _prob(r["pol_prob"])] for r in rows]


def write_diff_report(out: Path, config: DiffConfig, summary: dict, notes: list[str]) -> Path:
    """report.md: the four tables, the plots, and the one-line interpretation."""

    source = "the policy's own samples on held-out prompts" if config.from_samples else f"texts from {config.prompts}"
    token_headers = ["token", "Δ mean log-prob", "Δ mean p", "mean p (reference)", "mean p (policy)"]
    text = [
        f"# What did RLHF change? `{config.policy}` vs `{config.reference}`", "",
        f"Both models read the same {summary['n_sequences']} sequences ({source}); every number is a mean over "
        f"their {summary['n_positions']} real token positions.", "",
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
        f"Token set T = {', '.join(_token_cell(t) for t in summary['dla_tokens'])}"
        f"{' (from --tokens)' if config.tokens else ' (the tokens that rose most)'}. Direction d = mean_T W_U[:, t] − "
        "mean_v W_U[:, v]; contribution of component c = mean over positions of ((c − mean c)/σ)·(γ ⊙ d), with σ the "
        "final LayerNorm's scale of the full residual; 'bias' = β·d + mean_T b_U − mean b_U. Each column sums to that "
        "model's mean logit difference mean_T logit_t − mean_v logit_v "
        f"(reference {summary['dla_logit_difference']['reference']:+.3f}, policy "
        f"{summary['dla_logit_difference']['policy']:+.3f}; largest check error {summary['dla_check_max_error']:.1e}).", "",
        markdown_table(["component", "reference", "policy", "change"],
                  [[r["component"], f"{r['reference']:+.3f}", f"{r['policy']:+.3f}", f"{r['change']:+.3f}"] for r in summary["dla"]]), "",
        "![direct logit attribution](dla.png)", "",
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


def plot_weight_change(rows: list[dict], n_layers: int, n_heads: int, path: Path) -> Path:
    """Heatmaps layer × head of the relative change of W_Q, W_K, W_V, W_O, and the MLPs' W_in/W_out per layer."""

    plt = pyplot()
    grids = {m: head_change_grid(rows, m, n_layers, n_heads) for m in ("W_Q", "W_K", "W_V", "W_O")}
    mlp = torch.zeros(n_layers, 2)
    for row in rows:
        if row["matrix"] in ("W_in", "W_out") and row["layer"] is not None:
            mlp[row["layer"], 0 if row["matrix"] == "W_in" else 1] = row["rel_change"]
    vmax = max(max(g.max().item() for g in grids.values()), mlp.max().item(), 1e-12)
    fig, axes = plt.subplots(1, 5, figsize=(3.0 * 5, 0.55 * n_layers + 2.2),
                             gridspec_kw={"width_ratios": [n_heads] * 4 + [max(2, n_heads // 2)]})
    image = None
    for ax, (matrix, grid) in zip(axes, [*grids.items(), ("MLP", mlp)]):
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(matrix)
        ax.set_yticks(range(n_layers), [f"L{l}" for l in range(n_layers)])
        if matrix == "MLP":
            ax.set_xticks([0, 1], ["W_in", "W_out"])
        else:
            ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
            ax.set_xlabel("head")
        if n_layers * grid.shape[1] <= 64:
            for (i, j), value in zip(((i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])), grid.flatten().tolist()):
                ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label="‖ΔW‖_F / ‖W_ref‖_F (cells: %)")
    fig.suptitle("Relative weight change per attention head and per MLP")
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
