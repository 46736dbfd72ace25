"""Language models on TransformerLens: loading, the value head, the policy, the reference.

TransformerLens 4 wraps a Hugging Face module in a ``TransformerBridge``: hook names
(``blocks.0.hook_resid_post``, ``ln_final.hook_out``, ...), ``run_with_hooks``,
``run_with_cache`` and KV-cached forward passes all work on it.

Where a model can come from (``load_bridge(source)``):

* ``"builtin"`` -- the project's own tiny GPT-2 trained on its review corpus
  (built on first use by ``rlhf_scratch.pretrain`` and cached);
* a local directory in ``save_pretrained`` layout (config, weights, tokenizer), which
  includes checkpoints written by this project (they add ``value_head.safetensors``);
* a hub name such as ``"gpt2"`` -- ``TransformerBridge.boot_transformers(name)``; this
  needs network access to the Hugging Face hub (or a warm local HF cache).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int, jaxtyped
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from rlhf_scratch import pretrain
from rlhf_scratch.anatomy import (  # noqa: F401 (re-exported: hook names and their check live there)
    EMBED_HOOK,
    FINAL_RESIDUAL_HOOK,
    check_fwd_hooks,
    family_name,
    hooks_that_do_not_run,
)
from rlhf_scratch.model_loading import (  # noqa: F401 (re-exported: the loaders live there, below pretrain)
    BUILTIN_NAMES,
    CHECKPOINT_META_FILE,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    brief,
    ModelLoadError,
    check_device,
    check_model_source,
    complete_checkpoint_dir,
    corrupted_model_message,
    load_bridge_from,
    looks_like_path,
    read_checkpoint_meta,
)
from rlhf_scratch.lora import ADAPTER_FILE, detach_lora, load_adapters, lora_of, merge_into, save_adapters
from rlhf_scratch.plain_forward import plain_forward_if_unhooked
from rlhf_scratch.typecheck import typechecker

VALUE_HEAD_FILE = "value_head.safetensors"


def residual_hooks(n_layers: int) -> list[tuple[str, str]]:
    """``(label, hook name)`` of the residual stream at the embeddings and after each block:
    ``("embed", "blocks.0.hook_resid_pre"), ("L0", "blocks.0.hook_resid_post"), ...``."""
    return [("embed", EMBED_HOOK)] + [(f"L{layer}", f"blocks.{layer}.hook_resid_post") for layer in range(n_layers)]


def load_bridge(source: str | os.PathLike, device: str = "cpu", merge_adapters: bool = True):
    """Load a ``TransformerBridge`` from ``"builtin"``, a local directory, or a hub name.

    ``"builtin"`` is built on first use (``pretrain.ensure_builtin_model``, minutes once, then cached); the rest is
    ``model_loading.load_bridge_from``. The model is returned in eval mode (dropout off): RLHF compares log-probs of
    the same tokens across forward passes, and dropout noise would make the PPO ratio differ from 1 even before any
    update.

    A LoRA checkpoint (base weights plus ``lora_adapters.safetensors``) loads as the trained policy: ΔW = s·B A merged
    into the weights, so ``diff``, ``inspect`` and ``--model`` see what the run trained. ``merge_adapters=False``:
    the base weights only (resuming re-attaches the adapters instead).
    """
    if str(source) in BUILTIN_NAMES:
        check_device(device)
        source = pretrain.ensure_builtin_model()
    bridge = load_bridge_from(source, device)
    directory = complete_checkpoint_dir(source)
    if merge_adapters and (directory / ADAPTER_FILE).is_file():
        merge_into(bridge, load_adapters(bridge, directory))
        detach_lora(bridge)
    return bridge


class ValueHead(nn.Module):
    """Scalar value estimate from the final residual stream.

    ``V(x) = w2 · relu(W1 x + b1) + b2`` with ``W1: d_model → 4·d_model`` (the shape used
    in the ARENA RLHF exercise and the seed setups). The output layer starts at zero
    weight and zero bias so the first value estimates are exactly 0: a random head
    would start with values of arbitrary scale and make the first phases' advantages
    mostly noise from the head rather than signal from the reward.
    """

    def __init__(self, d_model: int, hidden_mult: int = 4):
        super().__init__()
        self.hidden = nn.Linear(d_model, hidden_mult * d_model)
        self.out = nn.Linear(hidden_mult * d_model, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @jaxtyped(typechecker=typechecker)
    def forward(self, resid: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq"]:
        return self.out(torch.relu(self.hidden(resid))).squeeze(-1)


@dataclass
class PolicyOutput:
    """One forward pass of the policy: next-token logits and state values."""

    logits: Float[Tensor, "batch seq vocab"]
    values: Float[Tensor, "batch seq"]


class PolicyWithValueHead(nn.Module):
    """A TransformerBridge plus a value head hooked onto ``ln_final.hook_out``.

    One forward pass gives both heads: the hook captures the final residual stream
    (after the final LayerNorm, the exact input to the unembedding), the value head
    reads it, and the logits come out of the bridge as usual. Because the hook runs
    inside ``run_with_hooks`` (not ``run_with_cache``) gradients flow from the value
    loss into the trunk as well as into the head.
    """

    def __init__(self, bridge, value_head: ValueHead | None = None):
        super().__init__()
        self.bridge = bridge
        self.value_head = value_head if value_head is not None else ValueHead(bridge.cfg.d_model)
        self.plain_forward = True
        """Run a pass that no hook watches as the plain module on the bridge's weights (``rlhf_scratch.plain_forward``)."""
        self.gradient_checkpointing = False
        """Checkpoint the blocks of the plain module's passes with gradients (``rlhf_scratch.checkpointing``): a pass
        through the bridge (hooks attached, or ``plain_forward`` off) keeps every activation, with a warning."""
        self.lora = None
        """The LoRA adapters (``rlhf_scratch.lora.apply_lora``), or None: full-parameter training."""

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def cfg(self):
        return self.bridge.cfg

    @jaxtyped(typechecker=typechecker)
    def forward(
        self,
        tokens: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        fwd_hooks: list | tuple = (),
    ) -> PolicyOutput:
        """``tokens [B, S]`` → ``PolicyOutput(logits [B, S, V], values [B, S])``.

        ``attention_mask`` (1 = real token) is needed for left-padded batches: the bridge
        then masks padding in attention and derives position ids from the mask.
        ``fwd_hooks`` are extra TransformerLens hooks ``(name, fn)`` applied to this pass
        only (e.g. an ablation during training). Without any hook (none given, none attached to the bridge)
        the pass runs as the plain Hugging Face module on the bridge's weights (``plain_forward``): the same
        logits and values to float rounding, faster on small models.
        """

        plain = plain_forward_if_unhooked(self.bridge, fwd_hooks) if self.plain_forward else None
        if plain is not None:  # nothing is hooked: the same function without the hook points' overhead
            logits, final_resid = plain(tokens, attention_mask, gradient_checkpointing=self.gradient_checkpointing)
            return PolicyOutput(logits=logits, values=self.value_head(final_resid))
        if self.gradient_checkpointing and torch.is_grad_enabled():
            warn_once(self, "Gradient checkpointing applies to the plain forward only: this pass runs through the "
                            "TransformerLens bridge (hooks attached, or plain_forward off) and keeps every activation.")
        captured: dict[str, Tensor] = {}

        def capture_final_resid(resid, hook):
            captured["resid"] = resid
            return resid

        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        logits = self.bridge.run_with_hooks(
            tokens,
            fwd_hooks=[*fwd_hooks, (FINAL_RESIDUAL_HOOK, capture_final_resid)],
            **kwargs,
        )
        values = self.value_head(captured["resid"])
        return PolicyOutput(logits=logits, values=values)

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The trunk's trainable parameters: the LoRA adapters if any (the bridge is frozen then), else the bridge's
        parameters, each storage once (``bridge_parameters``)."""
        if self.lora is not None:
            return list(self.lora.parameters())
        return bridge_parameters(self.bridge)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters())


_WARNED: "weakref.WeakSet" = weakref.WeakSet()


def warn_once(owner, message: str) -> None:
    """``warnings.warn(message)`` the first time only for ``owner``."""
    if owner not in _WARNED:
        _WARNED.add(owner)
        warnings.warn(message, stacklevel=3)


def bridge_parameters(bridge) -> list[nn.Parameter]:
    """The parameters of a bridge to optimise, each storage once.

    The GPT-2 bridge exposes the fused ``c_attn`` weight (as ``attn.qkv``) *and* the
    split q/k/v views of it; only the split views are used in the forward pass, so
    the fused alias is dropped here to keep weight decay and the optimizer's state
    from touching the same memory twice.
    """
    return [p for name, p in bridge.named_parameters() if ".qkv." not in name]


def drop_cached_activations(module: nn.Module) -> None:
    """Forget activations a module kept from its last forward pass.

    TransformerLens 4.3's attention bridge stores the last attention pattern
    (``_pattern``); after a training pass it is part of an autograd graph, and
    ``copy.deepcopy`` refuses to copy such tensors.
    """
    for submodule in module.modules():
        for name, value in list(vars(submodule).items()):
            if isinstance(value, Tensor) and value.grad_fn is not None:
                setattr(submodule, name, None)


REFERENCE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a frozen reference's weights may be kept in (``--reference-dtype``)."""


def make_reference(bridge, dtype: str = "float32"):
    """A frozen deep copy of ``bridge`` for the KL penalty (no grads, eval mode), its weights in ``dtype``.

    ``bfloat16`` / ``float16`` keep the reference in 2 bytes per parameter instead of 4; its passes then run in
    that dtype (their logits are cast to float32 before the log-softmax). Non-persistent buffers (rotary
    ``inv_freq``, Gemma's ``embed_scale``) stay as they were, as Hugging Face loads them in a bf16 model: rounding
    the rotary frequencies would change every position's angle, not just the weights. The reference's log-probs
    then differ from the float32 ones by rounding (``docs/memory.md`` measures how much, and the KL it adds).
    """
    if dtype not in REFERENCE_DTYPES:
        raise ValueError(f"Unknown reference dtype {dtype!r}: use one of {', '.join(REFERENCE_DTYPES)}.")
    drop_cached_activations(bridge)
    reference = copy.deepcopy(bridge)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    if dtype != "float32":
        kept = [(module._buffers, key, module._buffers[key]) for module in reference.modules()
                for key in module._non_persistent_buffers_set if module._buffers.get(key) is not None]
        reference.to(dtype=getattr(torch, dtype), print_details=False)
        for table, key, buffer in kept:
            table[key] = buffer
    return reference


def hf_module_from_bridge(bridge):
    """A fresh Hugging Face module holding the bridge's current weights.

    ``save_pretrained`` on a module after bridging fails (the bridge leaves
    non-contiguous q/k/v views in it), so weights are exported into a fresh module of
    the same config. Keys of the bridged module carry ``._original_component``; the
    stripped keys match the fresh module's, and the bridge's extra alias entries
    (split q/k/v, ``ln1``/``mlp.in`` views) are ignored. No key may be missing.
    """

    original = bridge.original_model
    fresh = AutoModelForCausalLM.from_config(original.config)
    weights = {
        key.replace("._original_component", ""): value.detach().clone().contiguous()
        for key, value in original.state_dict().items()
    }
    # The bridge runs (and trains) split q/k/v views of GPT-2's fused c_attn; after
    # copy.deepcopy they no longer share storage with it, so c_attn may be stale.
    # Rebuild it from the live split weights (Linear [out, in] -> Conv1D [in, out]).
    for key in [k for k in weights if k.endswith("c_attn.weight")]:
        prefix = key[: -len("c_attn.weight")]
        if prefix + "q.weight" in weights:
            weights[key] = torch.cat([weights[prefix + f"{n}.weight"].T for n in "qkv"], dim=1).contiguous()
            weights[prefix + "c_attn.bias"] = torch.cat([weights[prefix + f"{n}.bias"] for n in "qkv"]).contiguous()
    result = fresh.load_state_dict(weights, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"Exporting the bridge lost weights: {result.missing_keys[:5]}")
    return fresh.eval()


def save_model_dir(bridge, directory: str | os.PathLike, value_head: ValueHead | None = None, meta: dict | None = None) -> Path:
    """Write ``bridge`` (and optionally a value head) in ``save_pretrained`` layout.

    The result loads with ``load_bridge(directory)`` here and with plain
    ``AutoModelForCausalLM.from_pretrained(directory)`` elsewhere. Weights are
    safetensors; nothing is pickled. A bridge with LoRA adapters writes its base
    weights and ``lora_adapters.safetensors`` (``load_bridge`` merges them;
    ``rlhf-scratch export`` writes the merged weights for other tools).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_module_from_bridge(bridge).save_pretrained(directory)
    bridge.tokenizer.save_pretrained(directory)
    if lora_of(bridge) is not None:  # the base weights above (frozen), the adapters beside them
        save_adapters(lora_of(bridge), directory)
    if value_head is not None:
        save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, directory / VALUE_HEAD_FILE)
    if meta is not None:
        (directory / CHECKPOINT_META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_policy(source: str | os.PathLike, device: str = "cpu", keep_adapters: bool = False) -> PolicyWithValueHead:
    """A policy from any model source; a checkpoint's value head is restored if present. A LoRA checkpoint's
    adapters are merged into the weights, or with ``keep_adapters`` re-attached as ``policy.lora`` over the frozen
    base (how a LoRA run resumes)."""
    directory = complete_checkpoint_dir(source)
    keep = keep_adapters and (directory / ADAPTER_FILE).is_file()
    bridge = load_bridge(source, device=device, merge_adapters=not keep)
    value_head = ValueHead(bridge.cfg.d_model)
    head_file = complete_checkpoint_dir(source) / VALUE_HEAD_FILE
    if head_file.is_file():
        try:
            value_head.load_state_dict(load_file(head_file))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise ModelLoadError(corrupted_model_message(head_file.parent, error, VALUE_HEAD_FILE)) from error
    policy = PolicyWithValueHead(bridge, value_head.to(device))
    if keep:
        policy.lora = load_adapters(bridge, directory)
        for param in bridge.parameters():
            param.requires_grad_(False)
    return policy
