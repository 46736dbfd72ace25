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
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int, jaxtyped
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM

from rlhf_scratch import data
from rlhf_scratch.anatomy import family_name, hooks_that_do_not_run
from rlhf_scratch.outputs import backup_dir
from rlhf_scratch.typecheck import typechecker

VALUE_HEAD_FILE = "value_head.safetensors"
CHECKPOINT_META_FILE = "rlhf_scratch.json"
BUILTIN_NAMES = ("builtin", "tiny", "tiny-reviews")

# The hook whose output is exactly the input to the unembedding in TransformerLens 4.3:
# the final residual stream *after* the final LayerNorm, weight and bias included.
# (``ln_final.hook_normalized`` is taken before the LayerNorm's affine part.)
FINAL_RESIDUAL_HOOK = "ln_final.hook_out"
EMBED_HOOK = "blocks.0.hook_resid_pre"
"""The residual stream before block 0: token plus position embeddings."""


def residual_hooks(n_layers: int) -> list[tuple[str, str]]:
    """``(label, hook name)`` of the residual stream at the embeddings and after each block:
    ``("embed", "blocks.0.hook_resid_pre"), ("L0", "blocks.0.hook_resid_post"), ...``."""
    return [("embed", EMBED_HOOK)] + [(f"L{layer}", f"blocks.{layer}.hook_resid_post") for layer in range(n_layers)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A local model directory holds at least one of these (fast tokenizer, sentencepiece, BPE vocabulary, WordPiece)."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def complete_checkpoint_dir(source: str | os.PathLike) -> Path:
    """The model directory ``source`` names: ``source`` itself; a run directory (a trainer's ``--out``, which holds
    no weights of its own) as its ``checkpoint/``; or the ``.old`` sibling when a run was killed between the two
    renames that swap a new checkpoint in (``outputs.swap_in_dir``) and only the previous one is complete."""

    path = Path(str(source)).expanduser()
    if not path.exists() and backup_dir(path).is_dir():
        return backup_dir(path)
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        run_checkpoint = complete_checkpoint_dir(path / "checkpoint")
        if run_checkpoint.is_dir():
            return run_checkpoint
    return path


def looks_like_path(source: str) -> bool:
    """Whether a model name that is not an existing directory was meant as a path rather than a hub name:
    it starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first part is a local directory
    (``runs/ppo`` when ``runs/`` exists; a hub name is ``owner/name``)."""
    first = source.split("/", 1)[0]
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or ("/" in source and Path(first).is_dir())


def check_model_source(source: str | os.PathLike, flag: str = "--model") -> None:
    """Fail before anything loads when ``source`` names a local directory that does not exist (ModelLoadError).
    ``"builtin"``, existing directories and hub names pass (a hub name is checked when it loads)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        raise ModelLoadError(f"{flag} {source} is a file; pass the folder that holds it ({path.parent}): a model is a "
                             "directory with config.json, the weights and the tokenizer files.")
    if source in BUILTIN_NAMES or complete_checkpoint_dir(source).exists():
        return
    if looks_like_path(source):
        raise ModelLoadError(f"No such model directory: {source} (given as {flag}; resolved to "
                             f"{Path(source).expanduser().resolve()}). Check the path: pass a run's --out folder, its "
                             "checkpoint/ folder or a saved model directory.")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


def check_device(device: str | torch.device) -> None:
    """Raise ValueError unless ``device`` names a device this machine has (before any model loads)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown --device {device!r}: use cpu, cuda, cuda:N or mps.") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")


def load_bridge(source: str | os.PathLike, device: str = "cpu"):
    """Load a ``TransformerBridge`` from ``"builtin"``, a local directory, or a hub name.

    The model is returned in eval mode (dropout off): RLHF compares log-probs of the
    same tokens across forward passes, and dropout noise would make the PPO ratio
    differ from 1 even before any update.
    """

    check_device(device)
    source = str(source)
    if source in BUILTIN_NAMES:
        # The one deliberate import cycle: pretrain builds the built-in model with this module's
        # loaders, and "builtin" builds it on first use. Importing here keeps either importable first.
        from rlhf_scratch.pretrain import ensure_builtin_model

        source = str(ensure_builtin_model())
    check_model_source(source)
    path = complete_checkpoint_dir(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} exists but has no config.json, so it is not a model directory. "
                "Pass a directory written by `save_pretrained` (config.json, weights, "
                "tokenizer files) or by `rlhf-scratch` (a run's checkpoint/ folder)."
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}): the model was saved without it. "
                "Save it next to the weights (`tokenizer.save_pretrained(DIR)`), or copy tokenizer.json and "
                "tokenizer_config.json from the model it came from."
            )
        try:
            bridge = TransformerBridge.boot_transformers(str(path), device=device)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ModelLoadError(corrupted_model_message(path, error)) from error
    else:
        # Without this check an unreachable hub costs ~25 s of retries before failing.
        offline_var = data.hub_offline_var()
        if offline_var or not data.hub_is_reachable():
            reason = f"{offline_var} is set" if offline_var else "the hub is unreachable from this machine"
            raise ModelLoadError(
                f"No such model directory: {source} (resolved to {Path(source).expanduser().resolve()}); check the path. "
                f"If you meant the Hugging Face hub model {source!r}, it cannot be loaded here: {reason}. "
                "On a machine with network, download it once "
                f"(`huggingface-cli download {source} --local-dir DIR`, or "
                "`AutoModelForCausalLM.from_pretrained(name).save_pretrained(DIR)` plus the "
                "tokenizer) and pass --model DIR; or use --model builtin for the offline model."
            )
        try:
            bridge = TransformerBridge.boot_transformers(source, device=device)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"Could not load {source!r} from the Hugging Face hub ({type(error).__name__}: "
                f"{brief(error)}). If the hub is unreachable, download the model on a "
                "machine with network, save it to a directory and pass --model DIR; "
                "or use --model builtin for the offline model."
            ) from error
    bridge.eval()
    damaged = [name for name, value in bridge.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        raise ModelLoadError(
            f"The model from {source} has NaN or inf weights ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): "
            "a damaged file, or a checkpoint of a run that diverged. Load an intact copy (a run's checkpoint.old, or "
            "the model it started from)."
        )
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
        from rlhf_scratch.plain_forward import plain_forward_if_unhooked  # (that module builds on this one)

        plain = plain_forward_if_unhooked(self.bridge, fwd_hooks) if self.plain_forward else None
        if plain is not None:  # nothing is hooked: the same function without the hook points' overhead
            logits, final_resid = plain(tokens, attention_mask)
            return PolicyOutput(logits=logits, values=self.value_head(final_resid))
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
        """The bridge's trainable parameters, each storage once (``bridge_parameters``)."""
        return bridge_parameters(self.bridge)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters())


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


def make_reference(bridge):
    """A frozen deep copy of ``bridge`` for the KL penalty (no grads, eval mode)."""
    drop_cached_activations(bridge)
    reference = copy.deepcopy(bridge)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
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
    safetensors; nothing is pickled.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_module_from_bridge(bridge).save_pretrained(directory)
    bridge.tokenizer.save_pretrained(directory)
    if value_head is not None:
        save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, directory / VALUE_HEAD_FILE)
    if meta is not None:
        (directory / CHECKPOINT_META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_policy(source: str | os.PathLike, device: str = "cpu") -> PolicyWithValueHead:
    """A policy from any model source; a checkpoint's value head is restored if present."""
    bridge = load_bridge(source, device=device)
    value_head = ValueHead(bridge.cfg.d_model)
    head_file = complete_checkpoint_dir(source) / VALUE_HEAD_FILE
    if head_file.is_file():
        try:
            value_head.load_state_dict(load_file(head_file))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise ModelLoadError(corrupted_model_message(head_file.parent, error, VALUE_HEAD_FILE)) from error
    return PolicyWithValueHead(bridge, value_head.to(device))


def read_checkpoint_meta(meta_file: Path) -> dict:
    """The JSON of a checkpoint's ``rlhf_scratch.json``, or a ModelLoadError that names the damaged file."""
    try:
        return dict(json.loads(Path(meta_file).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{meta_file} is missing or not readable JSON ({type(error).__name__}: {error}): the model "
                             "was not saved completely or is damaged. Save or train it again, or use an intact copy "
                             "(a run's checkpoint.old).") from error


def brief(error: Exception, limit: int = 200) -> str:
    """A library's error message on one line, cut at a word (with "…") when longer than ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def corrupted_model_message(path: Path, error: Exception, file: str | None = None) -> str:
    """What to say when a model directory exists but cannot be read (a truncated or garbled file, named if known)."""
    which = f"{file} in it is" if file else "A file in it is"
    return (
        f"Could not load the model in {path} ({type(error).__name__}: {brief(error)}). {which} missing, "
        "truncated or not what its name says (an interrupted copy or download?). Copy or save the model again; for "
        "a run's checkpoint, the previous complete one may be at checkpoint.old."
    )


def check_fwd_hooks(bridge, fwd_hooks) -> list:
    """``fwd_hooks`` as a list, after checking each is a ``(name, fn)`` pair whose name exists on ``bridge``.

    TransformerLens would raise a bare KeyError for a misspelt name, and only at the first forward
    pass; this says so at once and lists the closest names. A name may also be a filter function
    ``name -> bool`` (TransformerLens convention). Some names exist in ``bridge.hook_dict`` but do nothing on
    this model (``hook_pos_embed`` on a rotary model, ``blocks.L.attn.hook_hidden_states`` on Llama, GPT-2's
    ``attn.qkv.hook_in``; ``hook_result`` is refused while ``use_attn_result`` is off): one probe forward pass
    (``anatomy.hooks_that_do_not_run``) finds them, and they are refused too, since a hook there would silently
    do nothing.
    """
    hooks = list(fwd_hooks)
    known = bridge.hook_dict
    for item in hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise ValueError(f"Each forward hook must be a (name, function) pair, got {item!r}.")
        name = item[0]
        if isinstance(name, str) and name not in known:
            close = difflib.get_close_matches(name, list(known), n=6, cutoff=0.6)
            suggestion = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"No hook named {name!r} on this model.{suggestion} "
                "See every name with sorted(bridge.hook_dict), e.g. blocks.0.attn.hook_z [batch, pos, head, d_head] "
                "or blocks.0.hook_mlp_out [batch, pos, d_model]."
            )
        if not isinstance(name, str) and not callable(name):
            raise ValueError(f"A hook's name must be a string or a filter function name -> bool, got {name!r}.")
    runs = "Hook a point that runs, e.g. blocks.0.attn.hook_z [batch, pos, head, d_head] or blocks.0.hook_resid_post "
    runs += "[batch, pos, d_model]."
    silent = hooks_that_do_not_run(bridge, [name for name, _ in hooks if isinstance(name, str)])
    if silent:
        name, why = next(iter(silent.items()))
        raise ValueError(f"The hook {name!r} exists on this {family_name(bridge)} model but {why.rstrip('.')}. {runs}")
    for name, _ in hooks:
        if callable(name):  # a filter: it must select at least one hook point that runs
            chosen = [point for point in known if name(point)]
            silent = hooks_that_do_not_run(bridge, chosen)
            if len(silent) == len(chosen):
                what = (f"selects only hooks that never run ({', '.join(list(silent)[:4])}: "
                        f"{next(iter(silent.values())).rstrip('.')})" if chosen else "selects no hook on this model")
                raise ValueError(f"The hook filter {getattr(name, '__name__', name)!r} {what}. {runs}")
    return hooks
