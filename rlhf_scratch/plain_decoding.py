"""KV-cached decoding steps without TransformerLens hook points: the plain module on the bridge's weights.

``sampling.generate`` runs a decoding step through the bridge when a hook watches it; when none does (no
``fwd_hooks``, nothing attached to the bridge, the bridge in eval mode) it runs the step here, as
``plain_forward.PlainForward`` runs full passes: the bridge's architecture as a plain Hugging Face module through
``torch.func.functional_call`` on the bridge's **own live parameters**. Each step through the bridge pays its hook
points and its Python LayerNorm and attention (on the built-in model at batch 16, ~60 % of a step); the plain step
pays the module's own kernels only.

    decoder = PlainDecoder(plain, batch, max_len)           # one per generation
    logits, final_resid = decoder(step_input, attention_mask, want_resid=True)   # [B, new, V], [B, D]

* The weights (GPT-2's fused ``c_attn`` rebuilt from the split q/k/v) are built **once per generation**, not per
  step; the parameters do not change during a generation. Inside ``with decoder:`` (as ``generate`` runs it) they
  are also swapped into the module once (``torch.nn.utils.stateless._reparametrize_module``, what
  ``functional_call`` enters and leaves on every call): the swap walks every submodule, ~0.5 ms per step on the
  built-in model, ~10 % of a step at batch 16. Outside it each step is a ``functional_call``.
* Position ids come from the attention mask (``cumsum − 1``, as the bridge derives them), so left padding is skipped.
* ``final_resid`` is the last hidden state at the newest position (after the final LayerNorm): the bridge's
  ``ln_final.hook_out``, the value head's input.

**Compiled** (``compiled=True``, ``SamplingConfig.compiled_decoding``, opt-in): the keys and values go to a
``transformers.StaticCache`` of a fixed length (the next power of two ≥ prompt + new tokens, at most ``n_ctx``),
so every single-token step has the same shapes, and that step is compiled once by ``torch.compile``
(``dynamic=False``); the prompt step runs eagerly. A new (batch, cache length) pair compiles again (seconds to a
minute: see benchmarks/README.md, "Issue 24: generation"); past torch's recompile limit (8) the step runs
eagerly. The weights are inputs of the compiled graph, not constants: an optimiser step in place is seen.

Both compute the bridge's function with different kernels, so they agree with it to float rounding
(``sampling.check_cached_generation`` proves it for the eager path the first time a bridge samples; ``--debug``
compares every phase's decoding steps with a forward pass).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import functional_call
from transformers import DynamicCache, StaticCache

from rlhf_scratch.compat import cache_kwarg_name
from rlhf_scratch.plain_forward import PlainForward, any_hook_attached, plain_forward_for

try:  # what torch.func.functional_call enters and leaves on every call; here once per generation
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # a torch without it: every step is a functional_call (the same function, slower)
    _reparametrize_module = None


def static_cache_length(needed: int, n_ctx: int) -> int:
    """The static cache's length for ``needed`` positions: the next power of two ≥ ``needed`` (at least 16), at most
    ``n_ctx``: prompts of nearby lengths share one compiled step."""
    length = 16
    while length < needed:
        length *= 2
    return max(needed, min(length, n_ctx))


def _step(module, weights: dict | None, step_input, attention_mask, position_ids, kv_cache, cache_position,
          want_resid: bool, cache_name: str = "past_key_values"):
    """One plain decoding step: ``(logits [B, new, V], final hidden state [B, new, D] or None)``; ``weights`` None:
    the module holds them already (``PlainDecoder.__enter__``)."""
    # cache_name: the name this transformers takes (``compat.cache_kwarg_name``, read once per decoder outside the
    # compiled step; 5.24: ``cache``, where ``past_key_values`` warns on every step)
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, cache_name: kv_cache,
              "use_cache": True, "output_hidden_states": want_resid, "cache_position": cache_position}
    output = module(step_input, **kwargs) if weights is None else functional_call(module, weights, (step_input,), kwargs)
    return output.logits, (output.hidden_states[-1] if want_resid else None)


def _compiled_step(plain: PlainForward):
    """The plain module's single-token step compiled once per ``PlainForward`` (kept on it)."""
    compiled = getattr(plain, "_compiled_decoding_step", None)
    if compiled is None:
        compiled = torch.compile(_step, dynamic=False)
        plain._compiled_decoding_step = compiled
    return compiled


class CompiledDecodingError(RuntimeError):
    """``torch.compile`` could not build the decoding step (no C++ compiler, an unsupported op)."""


class PlainDecoder:
    """One generation's decoding steps through the plain module, with their own KV cache (module docstring)."""

    def __init__(self, plain: PlainForward, batch: int, max_len: int, compiled: bool = False):
        self.module = plain.module
        self.weights = {name: tensor.detach() for name, tensor in plain.weights().items()}
        self.compiled = _compiled_step(plain) if compiled else None
        self.cache_name = cache_kwarg_name(self.module)
        self.seen = 0  # positions in the cache
        self._swapped = None  # the module's weights swapped in for the whole generation (``with decoder:``)
        if compiled:
            length = static_cache_length(max_len, plain.bridge.cfg.n_ctx)
            device = next(iter(self.weights.values())).device
            self.kv_cache = StaticCache(self.module.config, max_cache_len=length)
            self.mask = torch.zeros((batch, length), dtype=torch.long, device=device)  # the static width, 0 ahead
        else:
            self.kv_cache, self.mask = DynamicCache(config=self.module.config), None

    def __enter__(self) -> PlainDecoder:
        """Swap the weights into the module until ``__exit__`` (the eager steps then skip ``functional_call``'s swap;
        the compiled step keeps its own)."""
        if self.compiled is None and _reparametrize_module is not None:
            self._swapped = _reparametrize_module(self.module, self.weights, tie_weights=True)
            self._swapped.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        swapped, self._swapped = self._swapped, None
        if swapped is not None:
            swapped.__exit__(*exc_info)

    def __call__(self, step_input: Int[Tensor, "batch new"], attention_mask: Int[Tensor, "batch seen"],
                 want_resid: bool = False) -> tuple[Float[Tensor, "batch new vocab"], Float[Tensor, "batch d_model"] | None]:
        """Logits for ``step_input`` given every earlier position (in this decoder's cache, extended by ``new``) and
        the final residual at the newest position when ``want_resid``. ``attention_mask`` covers every position
        seen so far, cached and new (1 = real)."""
        new = step_input.shape[1]
        seen = attention_mask.shape[1] - new
        if seen != self.seen:
            raise ValueError(f"the attention mask covers {seen} earlier positions but the cache holds {self.seen}: "
                             "pass the mask of every position seen so far, cached and new")
        if new == 1:  # the count of real positions before the newest one (1 where it is padding), as below
            position_ids = (attention_mask.sum(-1, keepdim=True) - 1).masked_fill_(attention_mask[:, -1:] == 0, 1)
        else:
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -new:].contiguous()
        cache_position = torch.arange(seen, seen + new, device=step_input.device)
        mask, step = attention_mask, _step
        if self.compiled is not None:
            self.mask[:, : seen + new] = attention_mask
            mask = self.mask
            if new == 1:  # the prompt step (other shapes) runs eagerly
                step, want_resid = self.compiled, True  # one graph for both uses
        try:
            weights = None if self._swapped is not None and step is _step else self.weights
            logits, hidden = step(self.module, weights, step_input, mask, position_ids, self.kv_cache, cache_position,
                                  want_resid, self.cache_name)
        except Exception as error:  # torch._dynamo's failures carry many types; name the flag that caused them
            if step is _step:
                raise
            raise CompiledDecodingError(f"compiling the decoding step failed ({type(error).__name__}: "
                                        f"{str(error).splitlines()[0] if str(error) else ''}); turn "
                                        "--compiled-decoding off (the eager step is the default)") from error
        self.seen += new
        return logits, (hidden[:, -1] if hidden is not None else None)


def plain_decoder_for(bridge, batch: int, max_len: int, fwd_hooks=(), compiled: bool = False) -> PlainDecoder | None:
    """A ``PlainDecoder`` for one generation on ``bridge``, or None when the steps must go through the bridge:
    hooks asked for or attached, the bridge in training mode (dropout), or no plain module for it
    (``plain_forward_for``)."""
    if fwd_hooks or bridge.training:
        return None
    plain = plain_forward_for(bridge)
    if plain is None or any_hook_attached(plain.hook_points):
        return None
    return PlainDecoder(plain, batch, max_len, compiled)
