"""The Activation Difference Lens and steering (Minder, Dumas et al., ICLR 2026, arXiv 2510.13900).

Fine-tuning leaves a trace in the residual stream even on text that has nothing to do with the objective. On
held-out text x (N sequences, first k real positions of each; L layers, D d_model):

    Δ_l = mean over sequences n and the first k real positions i of  h_pol,l(x_n)_i − h_ref,l(x_n)_i     [L, D]

with h_l = ``blocks.l.hook_resid_post``. Its *lens reading* is the model's own final norm and unembedding applied
to Δ_l as if it were a residual stream (``anatomy.logit_lens``: LayerNorm or RMSNorm with the family's γ, β, ε,
then W_U, b_U and Gemma's soft-cap): the top tokens of logit_lens(Δ_l) [V] name what the fine-tuning pushed
towards. *Steering* adds α·Δ_l to the reference's residual stream after block l at every position and asks
whether the reference now behaves like the policy: the change in reward of its samples and in the log-prob of
the lens's top tokens, over a sweep of α (α = 0 is the plain forward pass).

The lens reading is a ranking without a scale; ``lens_alignment`` gives each token's reading a null distribution.
With x̂ = the final norm of Δ_l without its affine part and w_t = γ ⊙ W_U[:, t] (centred for LayerNorm), the part
of the lens logit that depends on Δ is a_t = w_t · x̂ (the rest, β·W_U + b_U, is a per-token prior that Δ does not
move), and z_t = √n · cos(x̂, w_t) is ≈ N(0, 1) when Δ's direction is unrelated to t (below).

    activation_difference(reference, policy, tokens, attention_mask, first_k=5) -> Δ [L, D]
    lens_top_tokens(bridge, delta [L, D], k=10) -> [[token id, ...] per layer]
    lens_alignment(bridge, delta [L, D]) -> z [L, V]
    steered_logits(bridge, tokens, attention_mask, layer, vector [D], alpha) -> logits [N, S, V]
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.anatomy import final_norm_parameters, logit_lens, unembedding
from rlhf_scratch.typecheck import typechecker


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@jaxtyped(typechecker=typechecker)
def first_positions(attention_mask: Int[Tensor, "batch seq"], first_k: int) -> Int[Tensor, "batch seq"]:
    """1 at the first ``first_k`` real positions of each row (left or right padding), else 0. [N, S] -> [N, S]"""
    if first_k < 1:
        raise ValueError(f"first_k must be >= 1, got {first_k}.")
    real = attention_mask.long()
    return (real * (real.cumsum(dim=1) <= first_k)).long()


@torch.no_grad()
def activation_difference(reference, policy, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
                          first_k: int = 5, batch_size: int = 32) -> Float[Tensor, "layer d_model"]:
    """Δ [L, D]: mean over the first ``first_k`` real positions of every sequence of the policy's resid_post minus the
    reference's, per layer (both models read the same tokens [N, S]). Use text the policy never trained on."""
    if tokens.shape != attention_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape.")
    if reference.cfg.n_layers != policy.cfg.n_layers or reference.cfg.d_model != policy.cfg.d_model:
        raise ValueError("reference and policy have different shapes (layers or d_model); pass the model the policy "
                         "was trained from as the reference.")
    keep = first_positions(attention_mask, first_k).bool()
    if not keep.any():
        raise ValueError("attention_mask has no real position; pass non-empty sequences.")
    names = [resid_hook(layer) for layer in range(reference.cfg.n_layers)]
    total = torch.zeros(len(names), reference.cfg.d_model, dtype=torch.float64)
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        caches = []
        for bridge in (reference, policy):
            device = next(bridge.parameters()).device
            _, cache = bridge.run_with_cache(tokens[rows].to(device), attention_mask=attention_mask[rows].to(device),
                                             names_filter=lambda name: name in names)
            caches.append(torch.stack([cache[name].double().cpu() for name in names]))  # [L, n, S, D]
        total += (caches[1] - caches[0])[:, keep[rows]].sum(dim=1)
    return (total / keep.sum()).float()


@torch.no_grad()
def lens_logits(bridge, delta: Float[Tensor, "layer d_model"]) -> Float[Tensor, "layer vocab"]:
    """logit_lens(Δ_l) per layer, through the bridge's own final norm and unembedding (``anatomy.logit_lens``)."""
    device = bridge.W_U.device
    return logit_lens(bridge, delta.to(device)).float().cpu()


@torch.no_grad()
def lens_top_tokens(bridge, delta: Float[Tensor, "layer d_model"], k: int = 10) -> list[list[int]]:
    """The ``k`` tokens with the largest lens logit of each layer's Δ_l, largest first: [[id, ...] per layer]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    logits = lens_logits(bridge, delta)
    return torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices.tolist()


@jaxtyped(typechecker=typechecker)
def alignment_z(delta: Float[Tensor, "layer d_model"], gamma: Float[Tensor, "d_model"],
                W_U: Float[Tensor, "d_model vocab"], center: bool) -> Float[Tensor, "layer vocab"]:
    """z_t = √n · cos(x̂_l, w_t) per layer l and token t: [L, D], γ [D], W_U [D, V] -> [L, V].

    x̂_l = Δ_l − mean(Δ_l) (``center``, LayerNorm) or Δ_l (RMSNorm): the final norm without its affine part, up to
    the positive factor 1/sqrt(var + ε), which the cosine ignores. w_t = γ ⊙ W_U[:, t], minus its mean over d_model
    when ``center`` (w_t · x̂ is the same: x̂ ⊥ 1). n = D − 1 (centred: x̂ lives in the D − 1 dimensional subspace ⊥ 1)
    or D. If x̂ is uniform on the unit sphere of that subspace, cos² ~ Beta(½, (n − 1)/2), so E[z²] = 1 exactly and
    z ≈ N(0, 1) (its tails are a little lighter: |z| ≤ √n). A zero Δ_l or w_t gives z = 0.
    """
    x = delta.double()
    w = gamma.double()[:, None] * W_U.double()  # [D, V]
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
        w = w - w.mean(dim=0, keepdim=True)
    n = delta.shape[-1] - 1 if center else delta.shape[-1]
    if n < 2:
        raise ValueError(f"d_model {delta.shape[-1]} is too small for a direction statistic (n = {n}); it needs n >= 2.")
    cos = (x @ w) / (x.norm(dim=-1, keepdim=True) * w.norm(dim=0, keepdim=True)).clamp_min(1e-300)
    return (math.sqrt(n) * cos).float()


@torch.no_grad()
def lens_alignment(bridge, delta: Float[Tensor, "layer d_model"]) -> Float[Tensor, "layer vocab"]:
    """z [L, V] of each token's lens reading of each Δ_l (``alignment_z``) through the bridge's own final norm (its γ,
    1 + w for Gemma, and centring for LayerNorm) and W_U. β, b_U and ε do not enter: they add the same amount to
    a token's lens logit whatever Δ is. Gemma's soft-cap is monotone, so it leaves the ranking and z alone."""
    norm = final_norm_parameters(bridge)
    W_U, _ = unembedding(bridge)
    if delta.shape[-1] != W_U.shape[0]:
        raise ValueError(f"delta has d_model {delta.shape[-1]}; the model's is {W_U.shape[0]} (pass Δ [layer, d_model] "
                         "from activation_difference of this model).")
    return alignment_z(delta.float().cpu(), norm.weight.float().cpu(), W_U.cpu(), norm.center)


def steering_hook(layer: int, vector: Tensor, alpha: float):
    """(hook name, hook) that adds alpha·vector to ``blocks.{layer}.hook_resid_post`` at every position."""

    def add(resid, hook):
        return resid + (alpha * vector).to(resid.device, resid.dtype)

    return resid_hook(layer), add


@torch.no_grad()
def steered_logits(bridge, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], layer: int,
                   vector: Float[Tensor, "d_model"], alpha: float) -> Float[Tensor, "batch seq vocab"]:
    """The bridge's logits [N, S, V] with α·vector [D] added at every position of ``blocks.{layer}.hook_resid_post``."""
    if not 0 <= layer < bridge.cfg.n_layers:
        raise ValueError(f"layer {layer}: the model has {bridge.cfg.n_layers} layers (0..{bridge.cfg.n_layers - 1}).")
    if vector.shape != (bridge.cfg.d_model,):
        raise ValueError(f"the steering vector has shape {tuple(vector.shape)}; expected [d_model] = [{bridge.cfg.d_model}] "
                         "(one row of activation_difference's [layer, d_model]).")
    device = next(bridge.parameters()).device
    return bridge.run_with_hooks(tokens.to(device), attention_mask=attention_mask.to(device),
                                 fwd_hooks=[steering_hook(layer, vector, alpha)])
