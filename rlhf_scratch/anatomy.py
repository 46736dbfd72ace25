"""The family-specific facts the research tools need: final norm, unembedding, soft-cap, heads, embeddings.

Every research tool reads a model through the same few maps; the families differ only in the facts below,
which ``anatomy(bridge)`` reads once from the model itself (its Hugging Face modules and config, and one
probe of its final norm) rather than from a table of family names:

* **Final norm** (the exact input to the unembedding is ``ln_final.hook_out``):

      LayerNorm  (GPT-2, GPT-NeoX):  N(x) = γ ⊙ (x − mean x) / sqrt(mean((x − mean x)²) + ε) + β
      RMSNorm    (the other eight):   N(x) = γ ⊙ x / sqrt(mean(x²) + ε)          (no β, no centering)

  with γ = w for every family except Gemma, whose norm multiplies by (1 + w) (``Gemma2RMSNorm``,
  ``Gemma3RMSNorm``: ``output * (1.0 + weight)``): ``Anatomy.norm_weight_offset`` is 1.0 there, 0.0
  elsewhere. The form is not looked up by class name: the model's own norm module is run on a probe and
  the one formula that reproduces it is kept (a model whose norm matches none is refused). ε is the
  module's own (``variance_epsilon`` or ``eps``), not ``cfg.eps``.
* **Unembedding**: z = N(x) · W_U + b_U [..., V] (b_U is zero when the model has none), then the final soft-cap
  where the family has one (Gemma 2 and 3): logits = c · tanh(z / c). The cap is not linear, so direct logit
  attribution works on z (the *pre-cap* logits); log-prob measures use the capped logits the model outputs.
* **Embeddings**: ``blocks.0.hook_resid_pre`` is what block 0 reads, Gemma's embedding scale √D included
  (``Anatomy.embed_scale`` = hook_embed / W_E[token]; W_E itself is unscaled). Rotary families have no W_pos.
* **Heads**: grouped-query attention has ``n_kv_heads`` < ``n_heads`` K/V heads; query head h reads K/V head
  h // (n_heads / n_kv_heads) (Hugging Face's ``repeat_kv``), and W_K, W_V are [n_kv_heads, D, d_head].

``final_norm``, ``unembed`` and ``logit_lens`` work on any leading shape [..., D]. ``require_supported(bridge, tool)``
refuses, with one line naming the family and what is missing, a model the tools cannot read.

    anatomy(bridge) -> Anatomy;   logit_lens(bridge, resid [..., D]) -> logits [..., V]
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker

RESIDUAL_PRE = "blocks.0.hook_resid_pre"
FINAL_NORM_OUT = "ln_final.hook_out"


class UnsupportedModel(ValueError):
    """A research tool cannot read this model; the one-line message names the family and what is missing."""


@dataclass(frozen=True)
class Anatomy:
    """What differs between families, read from one model (``anatomy(bridge)``)."""

    family: str
    """Hugging Face model_type, e.g. "llama", "gemma2"."""
    architecture: str
    """The Hugging Face class, e.g. "LlamaForCausalLM"."""
    norm: str
    """Final norm: "LayerNorm" (centred, with β) or "RMSNorm"."""
    norm_class: str
    """The Hugging Face class of the final norm, e.g. "Gemma2RMSNorm"."""
    norm_weight_offset: float
    """γ = offset + w: 1.0 for Gemma's (1 + w) norms, else 0.0."""
    eps: float
    """The final norm's own ε."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    """K/V heads (< n_heads with grouped-query attention)."""
    positional_embedding: bool
    """Whether the model has a learned position matrix W_pos (False: rotary positions)."""
    tied_unembed: bool
    """Whether W_U is W_Eᵀ."""
    unembed_bias: bool
    """Whether b_U has a non-zero entry."""
    embed_scale: float
    """hook_embed = embed_scale · W_E[token] (√D for Gemma, 1 elsewhere)."""
    logit_soft_cap: float | None
    """c of logits = c·tanh(z/c), or None."""

    @property
    def kv_group(self) -> int:
        """Query heads per K/V head."""
        return self.n_heads // self.n_kv_heads

    def describe(self) -> str:
        heads = f"{self.n_heads} heads" + (f" over {self.n_kv_heads} K/V heads" if self.n_kv_heads != self.n_heads else "")
        gamma = "(1 + w)" if self.norm_weight_offset else "w"
        return (f"{self.family}: {self.norm} final norm (γ = {gamma}, ε = {self.eps:g}), {heads}, "
                f"{'learned' if self.positional_embedding else 'rotary'} positions, "
                f"{'tied' if self.tied_unembed else 'untied'} unembedding{' with bias' if self.unembed_bias else ''}, "
                f"embedding scale {self.embed_scale:.4g}"
                + (f", final logit soft-cap {self.logit_soft_cap:g}" if self.logit_soft_cap else ""))


_ANATOMIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def family_name(bridge) -> str:
    """"llama (LlamaForCausalLM)": how refusals name a model."""
    original = getattr(bridge, "original_model", None)
    model_type = getattr(getattr(original, "config", None), "model_type", None) or "unknown family"
    return f"{model_type} ({type(original).__name__})"


# --------------------------------------------------------------------------- the pure maths


@jaxtyped(typechecker=typechecker)
def norm_scale(resid: Float[Tensor, "*batch d_model"], eps: float, center: bool) -> Float[Tensor, "*batch 1"]:
    """s = sqrt(mean((x − m)²) + ε) per vector, m = mean(x) if ``center`` (LayerNorm) else 0 (RMSNorm). [..., D] -> [..., 1]"""
    if center:
        resid = resid - resid.mean(dim=-1, keepdim=True)
    return (resid.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()


@jaxtyped(typechecker=typechecker)
def apply_norm(
    resid: Float[Tensor, "*batch d_model"],
    weight: Float[Tensor, "d_model"],
    bias: Float[Tensor, "d_model"] | None,
    eps: float,
    center: bool,
) -> Float[Tensor, "*batch d_model"]:
    """γ ⊙ (x − m) / s + β with s = ``norm_scale`` (m = mean x when ``center``, else 0; β omitted when None).

    LayerNorm is center=True with β; RMSNorm is center=False without β. ``weight`` is γ as applied (for Gemma,
    1 + w). Computed in float32 at least, as the Hugging Face norms do. resid [..., D] -> [..., D]
    """
    dtype = torch.promote_types(resid.dtype, torch.float32)
    x = resid.to(dtype)
    centred = x - x.mean(dim=-1, keepdim=True) if center else x
    normed = centred / norm_scale(x, eps, center) * weight.to(dtype)
    return normed if bias is None else normed + bias.to(dtype)


@jaxtyped(typechecker=typechecker)
def soft_cap(logits: Float[Tensor, "*batch vocab"], cap: float | None) -> Float[Tensor, "*batch vocab"]:
    """c·tanh(z/c) (Gemma's final logit soft-cap), or z unchanged when ``cap`` is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


# --------------------------------------------------------------------------- reading a model


@dataclass
class FinalNorm:
    """The final norm's live parameters: N(x) = weight ⊙ (x − m)/s + bias (``apply_norm``)."""

    weight: Tensor
    """γ as applied [D] (offset + w)."""
    bias: Tensor | None
    eps: float
    center: bool

    def __call__(self, resid: Tensor) -> Tensor:
        return apply_norm(resid, self.weight.to(resid.device), None if self.bias is None else self.bias.to(resid.device),
                          self.eps, self.center)

    def scale(self, resid: Tensor) -> Tensor:
        return norm_scale(resid, self.eps, self.center)


def _norm_module(bridge):
    module = getattr(getattr(bridge, "ln_final", None), "original_component", None)
    if module is None or getattr(module, "weight", None) is None:
        raise UnsupportedModel(f"{family_name(bridge)} has no final norm with a weight (ln_final) that the research "
                               "tools can read; they support LayerNorm and RMSNorm final norms.")
    return module


def _norm_eps(module) -> float | None:
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _read_norm(bridge, cfg_eps: float | None) -> tuple[str, float, float, bool]:
    """(kind, weight offset, ε, has β) of the final norm: the one formula that reproduces the module on a probe."""
    module = _norm_module(bridge)
    eps = _norm_eps(module)
    eps = eps if eps is not None else cfg_eps
    if eps is None:
        raise UnsupportedModel(f"{family_name(bridge)}: its final norm ({type(module).__name__}) has no ε the tools can read.")
    weight = module.weight.detach().float()
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float()
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    with torch.no_grad():
        real = module(probe.to(module.weight.device, module.weight.dtype)).float().cpu()
    candidates = [("LayerNorm", 0.0, True), ("RMSNorm", 0.0, False), ("RMSNorm", 1.0, False)]
    errors = {}
    for kind, offset, center in candidates:
        guess = apply_norm(probe, (offset + weight).cpu(), None if bias is None else bias.cpu(), eps, center)
        errors[(kind, offset, center)] = (guess - real).abs().max().item() / real.abs().max().clamp_min(1e-6).item()
    (kind, offset, _), error = min(errors.items(), key=lambda item: item[1])
    if error > 1e-4:
        raise UnsupportedModel(f"{family_name(bridge)}: its final norm ({type(module).__name__}) is neither LayerNorm nor "
                               f"RMSNorm with γ = w or 1 + w (closest differs by {error:.1e}); the research tools cannot "
                               "read it.")
    return kind, offset, eps, bias is not None


@torch.no_grad()
def _embed_scale(bridge) -> float:
    W_E = bridge.W_E.detach().float()
    index = int(W_E.norm(dim=1).argmax())  # a row that is surely not an all-zero padding embedding
    _, cache = bridge.run_with_cache(torch.tensor([[index]], device=W_E.device), names_filter=[RESIDUAL_PRE])
    row = W_E[index]
    embedded = cache[RESIDUAL_PRE][0, 0].float()
    if getattr(bridge.cfg, "positional_embedding_type", None) == "standard":
        embedded = embedded - bridge.W_pos[0].detach().float()
    return (embedded @ row / row.pow(2).sum().clamp_min(1e-12)).item()


def anatomy(bridge) -> Anatomy:
    """The family facts of ``bridge`` (read once per bridge and kept; the live weights are read by the maps below)."""
    if bridge in _ANATOMIES:
        return _ANATOMIES[bridge]
    cfg, original = bridge.cfg, getattr(bridge, "original_model", None)
    hf_config = getattr(original, "config", None)
    kind, offset, eps, _ = _read_norm(bridge, getattr(cfg, "eps", None))
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    cap = getattr(hf_config, "final_logit_softcapping", None)
    if cap is None and getattr(cfg, "output_logits_soft_cap", -1.0) > 0:
        cap = float(cfg.output_logits_soft_cap)
    b_U = getattr(bridge, "b_U", None)
    tied = getattr(hf_config, "tie_word_embeddings", None)
    if tied is None:
        tied = bool(torch.equal(bridge.W_E.detach(), bridge.W_U.detach().T))
    facts = Anatomy(
        family=getattr(hf_config, "model_type", None) or "unknown", architecture=type(original).__name__,
        norm=kind, norm_class=type(_norm_module(bridge)).__name__, norm_weight_offset=offset, eps=eps,
        n_layers=int(cfg.n_layers), n_heads=n_heads, n_kv_heads=n_kv,
        positional_embedding=getattr(cfg, "positional_embedding_type", None) == "standard",
        tied_unembed=bool(tied), unembed_bias=b_U is not None and bool((b_U != 0).any()),
        embed_scale=_embed_scale(bridge), logit_soft_cap=float(cap) if cap else None,
    )
    _ANATOMIES[bridge] = facts
    return facts


def final_norm_parameters(bridge) -> FinalNorm:
    """The live final-norm parameters of ``bridge``: γ = offset + w [D], β [D] or None, ε, centering."""
    facts = anatomy(bridge)
    module = _norm_module(bridge)
    bias = getattr(module, "bias", None)
    return FinalNorm(weight=facts.norm_weight_offset + module.weight.detach().float(),
                     bias=None if bias is None else bias.detach().float(), eps=facts.eps, center=facts.norm == "LayerNorm")


def final_norm(bridge, resid: Tensor) -> Tensor:
    """The model's own final norm on any residual stream [..., D] -> [..., D] (equals ``ln_final.hook_out`` on the
    final residual; on earlier layers it uses their own statistics)."""
    return final_norm_parameters(bridge)(resid)


def unembedding(bridge) -> tuple[Tensor, Tensor]:
    """(W_U [D, V], b_U [V], zeros when the model has no bias), detached float32."""
    W_U = bridge.W_U.detach().float()
    b_U = getattr(bridge, "b_U", None)
    return W_U, torch.zeros(W_U.shape[1], device=W_U.device) if b_U is None else b_U.detach().float()


def unembed(bridge, normed: Tensor, capped: bool = True) -> Tensor:
    """logits = soft_cap(normed · W_U + b_U, c) [..., D] -> [..., V]; ``capped=False`` gives the pre-cap z (the
    quantity direct logit attribution decomposes). Without a soft-cap both are the same."""
    W_U, b_U = unembedding(bridge)
    z = normed.to(W_U.dtype) @ W_U.to(normed.device) + b_U.to(normed.device)
    return soft_cap(z, anatomy(bridge).logit_soft_cap) if capped else z


def logit_lens(bridge, resid: Tensor, capped: bool = True) -> Tensor:
    """unembed(final_norm(resid)): [..., D] -> [..., V]; at the last layer, the model's own logits."""
    return unembed(bridge, final_norm(bridge, resid), capped=capped)


def kv_head_of(query_head: int, facts: Anatomy) -> int:
    """The K/V head that query head h reads: h // (n_heads / n_kv_heads)."""
    return query_head // facts.kv_group


# --------------------------------------------------------------------------- hooks


def hooks_that_do_not_run(bridge, names: list[str]) -> dict[str, str]:
    """{name: why} for each hook name that exists on ``bridge`` but does nothing on a forward pass, found by one
    2-token forward pass with recorders on ``names``. The reasons, each in words that name the hook:

    - TransformerLens refuses it when added (e.g. ``hook_result`` while ``use_attn_result`` is off);
    - the model's forward pass never calls it: the bridge lists the hook for every model of its kind, but this
      architecture computes that step elsewhere (GPT-2's fused ``attn.qkv``, split into q, k and v; Llama's
      ``attn.hook_hidden_states``; ``rotary_emb.hook_out`` where the rotary angles are computed outside the
      hooked module);
    - it is an alias (``hook_pos_embed`` for ``rotary_emb.hook_out``, ``blocks.L.hook_q_input`` for
      ``blocks.L.attn.hook_q_input``) of a hook point that does one of the above; the reason names both.

    Results are remembered per bridge and name (a check in a loop costs one probe per new name).
    """
    flags = tuple(sorted((k, v) for k, v in vars(bridge.cfg).items() if k.startswith("use_") and isinstance(v, bool)))
    memo = _probe_memo.setdefault(bridge, {}).setdefault(flags, {})  # use_attn_result etc. change what is refused
    candidates = [name for name in dict.fromkeys(names) if name in bridge.hook_dict and name not in memo]
    if candidates:
        memo.update(_probe(bridge, candidates))
    return {name: memo[name] for name in dict.fromkeys(names) if memo.get(name)}


_probe_memo: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""bridge -> {its cfg's use_* flags -> {hook name: why it does not run, or "" when it runs}}."""


def _probe(bridge, candidates: list[str]) -> dict[str, str]:
    """{name: why, or "" when it fires} for each of ``candidates`` (names in ``bridge.hook_dict``)."""
    fired: set[str] = set()
    why: dict[str, str] = {}

    def recorder(name):
        def record(x, hook):
            fired.add(name)
            return x
        return record

    device = next(bridge.parameters()).device
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    while True:
        hooks = [(name, recorder(name)) for name in candidates if name not in why]
        try:
            with torch.no_grad():
                bridge.run_with_hooks(tokens, attention_mask=torch.ones_like(tokens), fwd_hooks=hooks)
            break
        except ValueError as error:  # TransformerLens refuses some hooks when they are added; name it and go on
            refused = next((name for name, _ in hooks if f"hook {name} " in str(error)), None)
            if refused is None:
                raise
            why[refused] = _alias_note(bridge, refused) + "TransformerLens refuses it: " + str(error).split("\n")[0]
    family = family_name(bridge)
    for name in candidates:
        if name not in why and name not in fired:
            why[name] = (_alias_note(bridge, name) + "its forward pass never calls it (the bridge lists the hook for "
                         f"every model it wraps, but {family} computes that step elsewhere), so a hook there would "
                         "silently do nothing")
    return {name: why.get(name, "") for name in candidates}


def _alias_note(bridge, name: str) -> str:
    """"it is an alias of X, and " when ``name`` is another name for hook point X, else ""."""
    target = getattr(bridge.hook_dict[name], "name", name)
    return f"it is an alias of {target}, and " if isinstance(target, str) and target != name else ""


def research_hooks(n_layers: int) -> list[str]:
    """Every hook the research tools read: the residual stream, each block's attention and MLP outputs, ln_final.hook_out."""
    names = [RESIDUAL_PRE, FINAL_NORM_OUT]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


def require_supported(bridge, tool: str) -> Anatomy:
    """The model's anatomy, after checking that ``tool`` can read it; else UnsupportedModel with one line that names
    the family and what is missing (an unknown final norm, or a hook the tools read that does not run)."""
    try:
        facts = anatomy(bridge)
    except UnsupportedModel as error:
        raise UnsupportedModel(f"{tool} cannot read this model: {error}") from None
    missing = [name for name in research_hooks(facts.n_layers) if name not in bridge.hook_dict]
    silent = hooks_that_do_not_run(bridge, [n for n in research_hooks(facts.n_layers) if n in bridge.hook_dict])
    if missing or silent:
        names = ", ".join(missing + list(silent))
        raise UnsupportedModel(f"{tool} cannot read {family_name(bridge)}: the hooks {names} are missing or never run "
                               "on it, so its residual stream cannot be decomposed.")
    return facts
