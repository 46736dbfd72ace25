"""Workarounds for bugs in the libraries under us, each in one place with the versions it covers.

KV cache under its new name (transformer-lens 4.3.0 with transformers >= 5.24)
-------------------------------------------------------------------------------
transformers 5.24 renamed the KV cache argument from ``past_key_values`` to ``cache``:
the old name is still accepted by ``GPT2LMHeadModel.forward`` (with a FutureWarning)
and renamed there, and every decoder block then hands the cache to its attention module
as ``cache=...``. TransformerLens 4.3 replaces each attention module with an
``AttentionBridge`` whose ``_update_kv_cache`` looks for the cache only under
``past_key_values`` or ``layer_past``. With 5.24 it finds neither, so the cache is never
written or read: every decoding step attends to itself alone, the prompt is ignored, and
step logits differ from a full forward pass by up to 12.6 nats on the built-in model
(6.7e-06 on 5.23.0). Nothing raises; only the samples are wrong.

``install()`` wraps ``AttentionBridge._update_kv_cache`` so that a cache passed as
``cache`` is used as ``past_key_values``. On versions that still pass
``past_key_values`` (transformers < 5.24) the wrapper changes nothing.
``sampling.check_cached_generation`` proves on every stack, at run time, that cached
decoding equals a full forward pass, so a future rename fails loudly instead.
Remove this module when TransformerLens reads ``cache`` itself.
"""

from __future__ import annotations

import functools
import inspect

from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

_MARKER = "_rlhf_scratch_reads_cache_kwarg"


def install() -> None:
    """Make every ``AttentionBridge`` read the KV cache under its transformers-5.24 name ``cache``.
    Idempotent: calling it twice wraps once."""
    original = AttentionBridge._update_kv_cache
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            if kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs.pop("cache")
        return original(self, k, v, **kwargs)

    setattr(update_kv_cache, _MARKER, True)
    AttentionBridge._update_kv_cache = update_kv_cache


def cache_kwarg_name(hf_model) -> str:
    """The name under which ``hf_model.forward`` takes its KV cache: ``"cache"`` from
    transformers 5.24 on, ``"past_key_values"`` before. Passing the current name avoids a
    deprecation warning on every decoding step."""
    return _cache_kwarg_name(type(hf_model))


@functools.cache
def _cache_kwarg_name(model_class: type) -> str:
    # Read once per model class: decode_step asks on every generated token.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
