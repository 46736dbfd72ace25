"""The forward pass without TransformerLens hook points, for the passes no hook watches.

TransformerLens 4's bridge wraps every component of the Hugging Face model in hook points and recomputes
LayerNorm and attention in Python so that a hook can see (and edit) every intermediate. With no hook attached
that machinery still runs: on the built-in 4-layer model a forward pass of 2 sequences takes ~13 ms through the
bridge against ~7 ms for the plain module (one CPU thread), and the training step's forward and backward pay it
on every minibatch. When nothing is hooked, the trainers run the same model as a plain Hugging Face module
instead:

    logits, final_resid = PlainForward(bridge)(tokens, attention_mask)

* The module is a parameter-less copy of the bridge's architecture (built on the ``meta`` device) run with
  ``torch.func.functional_call`` on the bridge's **own live parameters**: gradients land on the bridge's
  parameters, so the optimiser, DDP and checkpoints see no difference.
* GPT-2 fuses q, k and v into one ``c_attn`` weight; the bridge trains them as three split weights, so
  ``c_attn`` is rebuilt from them (``torch.cat``, differentiable) on every call.
* Non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are in no state dict: they are taken from
  the wrapped module, so rotary and RMSNorm families (Llama, Mistral, Qwen, Gemma, OLMo 2, Phi-3, GPT-NeoX) run
  plain too.
* LoRA adapters (``rlhf_scratch.lora``) are hooked onto the plain module's matrices too, so both paths compute the
  adapted model (and, with ``adapters_disabled``, both the base model).
* Position ids come from the attention mask, as the bridge derives them (left padding is skipped).
* ``final_resid`` is the last hidden state, after the final LayerNorm: the bridge's ``ln_final.hook_out``,
  where the value head reads.

The two paths compute the same function with different kernels (the bridge's Python LayerNorm and attention
against the module's own), so they agree to float rounding, not bit for bit. ``PlainForward`` checks this when
it is built, on a fixed left-padded batch: logits and final residual within ``TOLERANCE`` of the bridge's (in
float32; a few units of rounding for a bfloat16 / float16 reference, ``tolerance``), or
``plain_forward_for`` returns None and every pass goes through the bridge (with a warning saying why). A hook
attached to any of the bridge's hook points (``run_with_hooks``, ``bridge.hooks()``, ``add_hook``) sends the
pass through the bridge, so hooks never miss a pass.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from rlhf_scratch.anatomy import FINAL_RESIDUAL_HOOK
from rlhf_scratch.checkpointing import BlockCheckpointing
from rlhf_scratch.lora import attach_plain, lora_of

TOLERANCE = 1e-4
"""Largest |difference| allowed between the plain and the bridge's logits or final residual (float32) at build time."""
HALF_TOLERANCE_ULPS = 4
"""For a model in bfloat16 / float16 (``--reference-dtype``): the difference allowed is this many units of the
dtype's rounding (``finfo.eps``) times 1 + the largest |value| — both paths round every op, differently."""


def tolerance(reference: Tensor, dtype: torch.dtype) -> float:
    """The largest difference allowed from ``reference`` (the bridge's output) for a model whose weights are ``dtype``."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return TOLERANCE
    return HALF_TOLERANCE_ULPS * torch.finfo(dtype).eps * (1 + reference.abs().max().item())


class PlainForwardUnavailable(RuntimeError):
    """The bridge's model cannot run as a plain module here (an unknown layout of its weights, or a mismatch)."""


def _live_tensors(bridge) -> dict[str, Tensor]:
    """The bridge's parameters and buffers under the plain module's names (``._original_component`` stripped).

    Non-persistent buffers (rotary ``inv_freq`` / ``original_inv_freq``, Gemma's ``embed_scale``) are in no state
    dict: they come from the wrapped module itself, where the bridge keeps them (and moves them with ``.to``).
    """
    wrapped = bridge.original_model
    state = dict(wrapped.state_dict(keep_vars=True))
    for key, buffer in wrapped.named_buffers(remove_duplicate=False):
        state.setdefault(key, buffer)
    return {key.replace("._original_component", ""): value for key, value in state.items()}


def any_hook_attached(hook_points: list[torch.nn.Module]) -> bool:
    """Whether a hook (forward or backward: ``run_with_hooks``, ``bridge.hooks()``, ``add_hook``, or a plain
    ``register_forward_hook`` on a hook point) is attached to any of ``hook_points`` right now, or a global
    module hook is.

    Only hook points are checked: the bridge itself keeps hooks of its own on the wrapped Hugging Face modules
    (transformers' output capture), so a hook registered directly on such a module is not seen. To hook those,
    turn the plain path off (``plain_forward=False``).
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks:
        return True
    return any(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks or point._backward_pre_hooks
               for point in hook_points)


class PlainForward:
    """``bridge``'s model as a plain Hugging Face module on the bridge's live parameters (module docstring)."""

    def __init__(self, bridge):
        self.bridge = bridge
        config = bridge.original_model.config
        with torch.device("meta"):
            self.module = AutoModelForCausalLM.from_config(config)
        self.module.eval()
        self.checkpointing: BlockCheckpointing | None = None
        """The blocks' checkpointing (``rlhf_scratch.checkpointing``), built on the first checkpointed call."""
        self.parameter_ids = self._parameter_ids()
        self.hook_points = list(bridge.hook_dict.values())  # where a user's hook is attached (checked every pass)
        live = _live_tensors(bridge)
        names = [name for name, _ in self.module.named_parameters()] + [name for name, _ in self.module.named_buffers()]
        # GPT-2's fused q/k/v: rebuilt from the split weights the bridge trains (Linear [out, in] -> Conv1D [in, out]).
        self.fused_qkv = [name[: -len("c_attn.weight")] for name in names
                          if name.endswith("c_attn.weight") and name[: -len("c_attn.weight")] + "q.weight" in live]
        fused_names = {prefix + f"c_attn.{kind}" for prefix in self.fused_qkv for kind in ("weight", "bias")}
        missing = [name for name in names if name not in live and name not in fused_names]
        if missing:
            raise PlainForwardUnavailable(f"no bridge tensor for {missing[:3]} ({len(missing)} in all)")
        self.sources = {name: live[name] for name in names if name not in fused_names}
        self.split_qkv = {prefix: {kind: [live[prefix + f"{n}.{kind}"] for n in "qkv"] for kind in ("weight", "bias")}
                          for prefix in self.fused_qkv}
        adapters = lora_of(bridge)  # LoRA: the same adapters on the same matrices (GPT-2's c_attn: q|k|v deltas)
        if adapters is not None and (unplaced := attach_plain(self.module, adapters)):
            raise PlainForwardUnavailable(f"no plain-module matrix for the LoRA adapter at {unplaced[0]}")

    def _parameter_ids(self) -> tuple[int, ...]:
        # Buffers too: ``.to(device)`` / ``.to(dtype)`` moves parameters in place but replaces buffers (inv_freq).
        # And LoRA adapters: applied (or replaced) after this was built, they need hooks on a new plain module.
        adapters = lora_of(self.bridge)
        lora = () if adapters is None else tuple(adapters.parameters())
        return tuple(id(t) for t in (*self.bridge.parameters(), *self.bridge.original_model.buffers(), *lora))

    def still_current(self) -> bool:
        """False once the bridge's parameters or buffers were replaced (``load_state_dict(assign=True)``,
        ``.to(device)`` for buffers): rebuild then."""
        return self._parameter_ids() == self.parameter_ids

    def weights(self) -> dict[str, Tensor]:
        """Every tensor of the plain module, from the bridge (the fused q/k/v rebuilt, with grad)."""
        weights = dict(self.sources)
        for prefix, split in self.split_qkv.items():
            weights[prefix + "c_attn.weight"] = torch.cat([weight.T for weight in split["weight"]], dim=1)
            weights[prefix + "c_attn.bias"] = torch.cat(split["bias"])
        return weights

    def __call__(self, tokens: Tensor, attention_mask: Tensor | None = None,
                 gradient_checkpointing: bool = False) -> tuple[Tensor, Tensor]:
        """``tokens [B, S]`` (``attention_mask [B, S]``, 1 = real) → ``(logits [B, S, V], final_resid [B, S, D])``.

        ``gradient_checkpointing``: with gradients enabled, keep only each block's inputs for the backward pass
        and recompute the rest then (``rlhf_scratch.checkpointing``); the same values and gradients."""
        kwargs = {"output_hidden_states": True, "use_cache": False}
        if attention_mask is not None:
            # As the bridge derives them: each real token's position counts only real tokens; padding gets 1.
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        if gradient_checkpointing and torch.is_grad_enabled():
            if self.checkpointing is None:
                self.checkpointing = BlockCheckpointing(self.module)
            with self.checkpointing.active():
                output = functional_call(self.module, self.weights(), (tokens,), kwargs)
        else:
            output = functional_call(self.module, self.weights(), (tokens,), kwargs)
        return output.logits, output.hidden_states[-1]

    @torch.no_grad()
    def check_against_bridge(self) -> float:
        """The largest difference between this path's and the bridge's logits and final residual on a fixed
        left-padded batch (real positions only); raises ``PlainForwardUnavailable`` above ``tolerance``."""
        bridge, captured = self.bridge, {}
        vocab, n_ctx = bridge.cfg.d_vocab, bridge.cfg.n_ctx
        length = max(1, min(6, n_ctx))
        device = next(bridge.parameters()).device
        tokens = torch.tensor([[(7 * i + 3) % vocab for i in range(length)],
                               [(11 * i + 5) % vocab for i in range(length)]], device=device)
        mask = torch.ones_like(tokens)
        mask[1, : length // 2] = 0  # left padding

        def capture(resid, hook):
            captured["resid"] = resid

        # In float32 whatever autocast a caller runs under (--dtype bfloat16): the check compares functions, not dtypes.
        with torch.autocast(device_type=device.type, enabled=False):
            hooked_logits = bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(FINAL_RESIDUAL_HOOK, capture)])
            logits, resid = self(tokens, mask)
        real = mask.bool()
        dtype = next(bridge.parameters()).dtype
        worst = 0.0  # the largest difference as a share of what is allowed
        for mine, theirs in ((logits, hooked_logits), (resid, captured["resid"])):
            difference = (mine - theirs)[real].abs().max().item()
            allowed = tolerance(theirs[real].float(), dtype)
            if not difference <= allowed:
                raise PlainForwardUnavailable(f"its logits or final residual differ from the bridge's by {difference:.3g} "
                                              f"(allowed in {str(dtype).removeprefix('torch.')}: {allowed:.3g})")
            worst = max(worst, difference)
        return worst


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""bridge -> its PlainForward, or the reason it has none (kept outside the bridge: ``copy.deepcopy`` of a bridge
must not carry references to the original's parameters)."""


def plain_forward_for(bridge) -> PlainForward | None:
    """The bridge's checked ``PlainForward`` (built and checked once per bridge), or None where it cannot run: then
    a warning, once per bridge, says why and every pass goes through the bridge."""
    plain = _PLAIN.get(bridge)
    if isinstance(plain, PlainForward) and plain.still_current():
        return plain
    if isinstance(plain, str):
        return None
    try:
        plain = PlainForward(bridge)
        plain.check_against_bridge()
    except PlainForwardUnavailable as error:
        _PLAIN[bridge] = str(error)
        warnings.warn(f"Forward passes go through the TransformerLens bridge (slower on small models): the plain "
                      f"module cannot stand in for it ({error}).", stacklevel=2)
        return None
    _PLAIN[bridge] = plain
    return plain


def plain_forward_if_unhooked(bridge, fwd_hooks=()) -> PlainForward | None:
    """The ``PlainForward`` to run a pass with, or None when the pass must go through the bridge: hooks were asked
    for, a hook is attached to the bridge, or the plain module cannot stand in for it."""
    if fwd_hooks:
        return None
    plain = plain_forward_for(bridge)
    return None if plain is None or any_hook_attached(plain.hook_points) else plain


def reference_logits(bridge, tokens: Tensor, attention_mask: Tensor | None = None, plain: bool = True) -> Tensor:
    """Logits [B, S, V] of a bridge with no hooks of its own (the reference): the plain module when ``plain`` and
    nothing is attached to the bridge, else the bridge."""
    runner = plain_forward_if_unhooked(bridge) if plain else None
    if runner is None:
        return bridge(tokens, attention_mask=attention_mask)
    return runner(tokens, attention_mask)[0]
