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
  fused ``c_attn``/``c_proj``), of every MLP's W_in, W_gate (gated MLPs) and W_out, of the
  embeddings W_E, W_pos (learned positions only; rotary families have none), the unembedding W_U
  and every norm scale γ (block norms, Gemma's post-norms, Qwen 3's q/k norms, the final norm; as
  the model applies it: 1 + w for Gemma). With grouped-query attention W_K and W_V have one matrix
  per *K/V head* (``L0.KV1 W_K``; query heads 2h and 2h+1 read K/V head h when 4 query heads share 2):
  they are reported per K/V head, W_Q and W_O per query head. Biases (and LayerNorm β) are left out:
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
  that N(x)·d + (mean_T b_U − mean b_U) = mean_{t∈T} z_t − mean_v z_v: how far T's logits stand
  above the average logit. The final residual x = embed + Σ_l (attn_out_l + mlp_out_l) (``embed`` =
  ``blocks.0.hook_resid_pre``, Gemma's √D scale included) and the final norm (``anatomy.py``) is

      LayerNorm  N(x) = γ ⊙ (x − mean(x))/s + β,   RMSNorm  N(x) = γ ⊙ x/s   (γ = 1 + w for Gemma)

  with s the per-position scale of the full x (its own ε). Centering is linear, so with s held fixed

      N(x)·d = Σ_c [(c − m(c))/s]·(γ ⊙ d) + β·d        (m(c) = mean(c) for LayerNorm, 0 for RMSNorm)

  and component c's contribution at a position is [(c − m(c))/s]·(γ ⊙ d). The contributions plus the
  bias term (β·d + mean_T b_U − mean b_U) sum exactly to the logit difference along d. Gemma's final
  soft-cap c·tanh(z/c) is not linear: DLA decomposes the *pre-cap* logits z (the log-prob measures
  above use the capped logits the model outputs). Each model uses its own W_U, γ, β, s: each model's
  rows sum to its own logit difference, and the policy − reference column is where the change came from.

The command (``rlhf-scratch diff``: ``run_diff``, its report, tables and plots) is in ``model_diff_report.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from rlhf_scratch.anatomy import Anatomy, FinalNorm, anatomy, final_norm_parameters, require_supported, unembedding
from rlhf_scratch.models import EMBED_HOOK, FINAL_RESIDUAL_HOOK, load_bridge, residual_hooks
from rlhf_scratch.typecheck import typechecker


def component_hooks(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of every term of the residual stream: the embeddings, then each layer's attention and MLP outputs."""
    hooks = [("embed", EMBED_HOOK)]
    for layer in range(n_layers):
        hooks += [(f"L{layer} attn", f"blocks.{layer}.hook_attn_out"), (f"L{layer} mlp", f"blocks.{layer}.hook_mlp_out")]
    return hooks


def cached_hook_names(n_layers: int) -> list[str]:
    """Every activation the diff needs from a forward pass."""
    names = {name for _, name in residual_hooks(n_layers) + component_hooks(n_layers)}
    return sorted(names | {FINAL_RESIDUAL_HOOK})


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
    keys = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx", "normalization_type")
    differ = [f"{key} {getattr(ref_bridge.cfg, key, None)} vs {getattr(policy_bridge.cfg, key, None)}"
              for key in keys if getattr(ref_bridge.cfg, key, None) != getattr(policy_bridge.cfg, key, None)]
    if differ:
        raise ValueError(
            f"{ref_name} and {policy_name} have different architectures ({'; '.join(differ)}), so they cannot be "
            "compared layer by layer. Pass as --reference the model the policy was trained from "
            "(its checkpoint's rlhf_scratch.json names it as base_model)."
        )


def load_pair(reference_source: str, policy_source: str, device: str, tool: str):
    """Load the reference and the policy a research tool compares: ``(reference, policy, facts)``.

    Refuses (ValueError, one line each) two models of different shapes, a family ``tool`` cannot read
    (``anatomy.require_supported``) and two different tokenizers; ``facts`` is the reference's ``Anatomy``.
    """
    policy = load_bridge(policy_source, device=device)
    reference = load_bridge(reference_source, device=device)
    check_same_architecture(reference, policy, f"reference {reference_source!r}", f"policy {policy_source!r}")
    facts: Anatomy = require_supported(reference, tool)
    require_supported(policy, tool)
    if reference.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ValueError(f"reference {reference_source!r} and policy {policy_source!r} use different tokenizers; "
                         "pass as --reference the model the policy was trained from.")
    return reference, policy, facts


def load_pair_at_layer(config, tool: str):
    """Seed torch with ``config.seed``, ``load_pair`` ``config.reference`` and ``config.policy`` on ``config.device``,
    and pick the layer a tool reads: ``config.layer``, or the middle one (n_layers // 2) when it is None; a layer the
    model lacks is refused in one line. -> ``(reference, policy, facts, layer)``"""
    torch.manual_seed(config.seed)
    reference, policy, facts = load_pair(config.reference, config.policy, config.device, tool)
    n_layers = reference.cfg.n_layers
    layer = n_layers // 2 if config.layer is None else config.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer}: the model has {n_layers} layers (0..{n_layers - 1}).")
    return reference, policy, facts, layer


def weight_change(ref_bridge, policy_bridge) -> list[dict]:
    """Relative Frobenius change of every head's Q/K/V/O, every MLP matrix, embeddings, unembedding and norm scales.

    Rows {"component": "L0.H2 W_V", "layer": 0 | None, "head": 2 | None, "matrix": "W_V", "rel_change": float,
    "abs_change": ‖ΔW‖_F, "rms_change": ‖ΔW‖_F / sqrt(#entries)}, in model order (sort them to rank).
    Per-head matrices come from the TransformerLens views W_Q, W_O [H, ...] and W_K, W_V [H_kv, ...] of each
    block; with grouped-query attention (H_kv < H) the W_K/W_V rows are per K/V head ("L0.KV1 W_K", head = the
    K/V head's index). Norm scales are γ as applied (1 + w for Gemma): every 1-D weight of a block
    (ln1, ln2, ln1_post, attn.q_norm, ...) and the final norm's.
    """
    check_same_architecture(ref_bridge, policy_bridge)
    facts = anatomy(ref_bridge)
    grouped = facts.n_kv_heads != facts.n_heads
    rows = []

    def add(component: str, w_ref: Tensor, w_pol: Tensor, layer=None, head=None, matrix=None):
        change = (w_pol.detach().double() - w_ref.detach().double()).norm().item()
        rows.append({"component": component, "layer": layer, "head": head, "matrix": matrix or component,
                     "rel_change": relative_frobenius(w_ref, w_pol), "abs_change": change,
                     "rms_change": change / w_ref.numel() ** 0.5})

    def gamma(weight: Tensor) -> Tensor:
        return facts.norm_weight_offset + weight.detach().double()

    add("embed W_E", ref_bridge.W_E, policy_bridge.W_E, matrix="W_E")
    if facts.positional_embedding:
        add("pos_embed W_pos", ref_bridge.W_pos, policy_bridge.W_pos, matrix="W_pos")
    ref_state, pol_state = ref_bridge.state_dict(), policy_bridge.state_dict()
    for layer, (ref_block, pol_block) in enumerate(zip(ref_bridge.blocks, policy_bridge.blocks)):
        for matrix in ("W_Q", "W_K", "W_V", "W_O"):
            w_ref, w_pol = getattr(ref_block.attn, matrix), getattr(pol_block.attn, matrix)
            label = "KV" if grouped and matrix in ("W_K", "W_V") else "H"
            for head in range(w_ref.shape[0]):
                add(f"L{layer}.{label}{head} {matrix}", w_ref[head], w_pol[head], layer, head, matrix)
        for matrix in ("W_in", "W_gate", "W_out"):
            w_ref = getattr(ref_block.mlp, matrix, None)
            if w_ref is not None:
                add(f"L{layer} mlp {matrix}", w_ref, getattr(pol_block.mlp, matrix), layer, None, matrix)
        prefix = f"blocks.{layer}."
        for key in ref_state:
            if key.startswith(prefix) and key.endswith(".weight") and ref_state[key].ndim == 1:
                norm = key[len(prefix) : -len(".weight")]
                add(f"L{layer} {norm} γ", gamma(ref_state[key]), gamma(pol_state[key]), layer, None, f"{norm} γ")
    if "ln_final.weight" in ref_state:
        add("ln_final γ", gamma(ref_state["ln_final.weight"]), gamma(pol_state["ln_final.weight"]), matrix="ln_final γ")
    add("unembed W_U", ref_bridge.W_U, policy_bridge.W_U, matrix="W_U")
    return rows


def head_change_grid(rows: list[dict], matrix: str, n_layers: int, n_heads: int) -> Tensor:
    """The per-head rows of one matrix (W_Q, W_K, W_V or W_O) as a grid [L, H] of relative changes
    (pass n_heads = the number of K/V heads for W_K and W_V of a grouped-query model)."""
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
    norm: FinalNorm,
    bias_offset: float = 0.0,
) -> list[dict]:
    """Each residual-stream component's mean contribution to the (pre-cap) logit difference along ``direction``.

    contribution_c,i = [(c_i − m(c_i)) / s_i] · (γ ⊙ d)        c ∈ {embed, L0 attn, L0 mlp, ...}
    bias term         = β · d + bias_offset                    (bias_offset = mean_T b_U − mean_v b_U; β = 0 for RMSNorm)
    m = mean over d_model for LayerNorm (``norm.center``), 0 for RMSNorm; s_i = ``norm.scale`` of the full final
    residual x_i (``blocks.{L-1}.hook_resid_post``, the final norm's input): sqrt(mean((x_i − m(x_i))²) + ε).
    Means over the positions with mask True. Σ_c contribution_c + bias = mean_i (N(x_i)·d) + bias_offset.
    cache: hook name -> [B, S, D]; returns [{"component", "contribution"}, ..., {"component": "bias"}].
    """
    n_layers = _count_layers(cache)
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][mask].double()  # [M, D]
    scale = norm.scale(final)  # [M, 1]
    read_out = (norm.weight.to(direction.device) * direction).double()  # γ ⊙ d
    rows = []
    for label, hook in component_hooks(n_layers):
        component = cache[hook][mask].double()  # [M, D]
        centered = component - component.mean(dim=-1, keepdim=True) if norm.center else component
        rows.append({"component": label, "contribution": ((centered / scale) @ read_out).mean().item()})
    beta = 0.0 if norm.bias is None else (norm.bias.double() @ direction.double()).item()
    rows.append({"component": "bias", "contribution": beta + bias_offset})
    return rows


def final_logit_difference(cache: Mapping[str, Tensor], mask: Tensor, direction: Tensor, bias_offset: float = 0.0) -> float:
    """mean_i ln_final.hook_out_i · d + bias_offset: the quantity the DLA rows sum to (a consistency check: the model's
    own final norm output against the decomposition's formula)."""
    final = cache[FINAL_RESIDUAL_HOOK][mask.bool()].double()
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


def model_dla(bridge, cache: Mapping[str, Tensor], mask: Tensor, token_ids: list[int]) -> dict:
    """DLA rows of one model with its own W_U, b_U and final norm (``anatomy.final_norm_parameters``), plus the exact
    (pre-cap) logit difference they sum to, the check error, and whether the model soft-caps its logits afterwards."""
    W_U, b_U = (tensor.cpu() for tensor in unembedding(bridge))
    direction = logit_direction(W_U, token_ids)
    bias_offset = (b_U[token_ids].mean() - b_U.mean()).item()
    norm = final_norm_parameters(bridge)
    norm = FinalNorm(norm.weight.cpu(), None if norm.bias is None else norm.bias.cpu(), norm.eps, norm.center)
    rows = direct_logit_attribution(cache, mask, direction, norm, bias_offset)
    total = final_logit_difference(cache, mask, direction, bias_offset)
    return {"rows": rows, "logit_difference": total, "check_error": abs(sum(r["contribution"] for r in rows) - total),
            "soft_cap": anatomy(bridge).logit_soft_cap}
