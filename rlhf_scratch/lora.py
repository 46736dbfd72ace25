"""LoRA: low-rank adapters on the policy's attention and MLP matrices, written by hand (no PEFT).

For each adapted matrix ``W [d_out, d_in]`` (a q/k/v/o projection, the MLP's in/out/gate matrix) the layer computes

    y = W x + b + s · B (A x),      A [r, d_in], B [d_out, r], s = alpha / r

so the weight the model uses is ``W + ΔW`` with ``ΔW = s · B A`` of rank ≤ r. ``A`` starts random (Kaiming-uniform,
as in PEFT and the LoRA paper), ``B`` at zero: ΔW = 0 until the first optimiser step, so the adapted model starts
as the base model exactly. Only A and B (and the value head) train; every base weight is frozen.

    n_trainable = apply_lora(policy, rank=8, alpha=16, targets=("attn.q", "attn.v"))
    with adapters_disabled(policy):       # the base model: the reference, without a second copy of any weight
        ...
    reference = adapter_free_view(policy.bridge)   # a bridge over the same weight tensors, without the adapters

How it is wired (and why by hand rather than PEFT: see docs/lora.md):

* The adapter runs as a forward hook on the matrix's own module inside the bridge (the ``nn.Linear`` / ``Conv1D``
  the bridge's ``LinearBridge`` wraps), so the bridge's hook points downstream (``hook_q``, ``hook_resid_post``,
  ...), KV-cached generation and every ``run_with_hooks`` see the adapted activations.
* The plain forward (``plain_forward.py``) attaches the same adapters to its own copy of the module (``attach_plain``;
  GPT-2's fused ``c_attn`` gets the q/k/v deltas concatenated), so the fast path computes the same function.
* ``adapters_disabled`` switches every hook off at once (one flag). ``adapter_free_view`` is a second module tree
  whose parameters and buffers *are* the bridge's (``copy.deepcopy`` with every tensor in the memo), minus the
  hooks: the trainers use it as the reference, so nothing else needs to know about LoRA.
* This is correct only while the base weights are frozen (they are: ``requires_grad=False``) and B starts at zero.
"""

from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_scratch.config import LORA_GROUPS, LORA_TARGETS, parse_lora_targets

ADAPTER_FILE = "lora_adapters.safetensors"
"""Where a LoRA checkpoint keeps its adapters (beside the base weights; the metadata holds rank, alpha, targets)."""

_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""bridge -> its LoRAAdapters (kept outside the bridge, as ``plain_forward`` keeps its cache)."""


class LoRAError(ValueError):
    """LoRA was asked for in a way that cannot work (bad rank, unknown or absent target); the message says why."""


class LowRankDelta(nn.Module):
    """``x [..., d_in] → s · B (A x) [..., d_out]`` with ``A [r, d_in]`` (Kaiming-uniform) and ``B [d_out, r]`` (zeros)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        return self.scale * ((x.to(self.A.dtype) @ self.A.T) @ self.B.T)

    def delta_weight(self) -> Float[Tensor, "d_out d_in"]:
        """ΔW = s · B A (rank ≤ r), in the ``nn.Linear`` layout [d_out, d_in]."""
        return self.scale * (self.B @ self.A)


class LoRAAdapters(nn.Module):
    """The adapters of one policy: ``deltas[key]`` for each adapted matrix (``key`` = ``blocks_L_attn_q``), where
    each sits (``paths[key]``: the module's names in ``bridge.original_model``, ``._original_component`` stripped;
    the bridge reaches one module by several: GPT-2's ``attn.o`` is also ``attn.c_proj``),
    and the on/off switch ``enabled`` that every hook reads."""

    def __init__(self, rank: int, alpha: float, targets: tuple[str, ...]):
        super().__init__()
        self.rank, self.alpha, self.targets = rank, alpha, targets
        self.deltas = nn.ModuleDict()
        self.paths: dict[str, tuple[str, ...]] = {}
        self.enabled = True
        self.handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def config(self) -> dict[str, str]:
        """rank, alpha, targets as strings (safetensors metadata)."""
        return {"rank": str(self.rank), "alpha": repr(float(self.alpha)), "targets": ",".join(self.targets)}


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` (weight [out, in]) or a GPT-2 ``Conv1D`` (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    raise LoRAError(f"LoRA adapts nn.Linear and Conv1D matrices, not {type(module).__name__}.")


def target_modules(bridge, targets: tuple[str, ...]) -> dict[str, tuple[str, nn.Module]]:
    """``key -> (target, module)`` for each block and target: the matrix module the bridge calls
    (``bridge.blocks[L].attn.q.original_component``). A target the family lacks is a ``LoRAError``."""
    found = {}
    for layer, block in enumerate(bridge.blocks):
        for target in targets:
            part, name = target.split(".")
            component = getattr(getattr(block, part, None), name, None)
            module = getattr(component, "original_component", None)
            if module is None:
                family = type(bridge.original_model).__name__
                present = [t for t in LORA_TARGETS if getattr(getattr(block, t.split(".")[0], None), t.split(".")[1], None)
                           is not None]
                raise LoRAError(f"--lora-targets {target}: {family} has no such matrix in block {layer}; it has "
                                f"{', '.join(present)} (or use a group: attn, mlp, all).")
            found[f"blocks_{layer}_{part}_{name}"] = (target, module)
    return found


def _hook(adapters: LoRAAdapters, key: str):
    def add_delta(module, inputs, output):
        if not adapters.enabled:
            return None
        return output + adapters.deltas[key](inputs[0]).to(output.dtype)

    return add_delta


def lora_of(model) -> LoRAAdapters | None:
    """The adapters applied to a policy or its bridge, or None."""
    bridge = getattr(model, "bridge", model)
    return _ADAPTERS.get(bridge)


def apply_lora(policy, rank: int, alpha: float | None = None, targets: str | tuple[str, ...] = "all") -> int:
    """Freeze ``policy.bridge`` and adapt its ``targets`` with rank-``rank`` adapters (scale ``alpha / rank``;
    ``alpha`` None: ``rank``, scale 1); the adapters become ``policy.lora``. Returns the number of trainable
    parameters left in ``policy`` (adapters and value head).

    ``targets``: a comma-separated string or names from ``attn.q attn.k attn.v attn.o mlp.in mlp.out mlp.gate``
    (short: ``q k v o in out gate``; groups ``attn``, ``mlp``, ``all``: what the family has)."""
    adapters = attach_lora(policy.bridge, rank, alpha, targets)
    for param in policy.bridge.parameters():
        param.requires_grad_(False)
    policy.lora = adapters
    return sum(p.numel() for p in policy.parameters() if p.requires_grad)


def attach_lora(bridge, rank: int, alpha: float | None = None, targets: str | tuple[str, ...] = "all") -> LoRAAdapters:
    """New adapters hooked onto ``bridge``'s target matrices (B = 0: the model is unchanged until they train), in
    the bridge's mode (``bridge.training``)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}: pass --lora-rank 8 (or leave it out).")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"--lora-alpha must be a positive number, got {alpha}.")
    if lora_of(bridge) is not None:
        raise LoRAError("This model already has LoRA adapters; apply them once.")
    if isinstance(targets, tuple):
        names = targets
    else:  # a name given on its own must exist; a group (attn, mlp, all) takes what this family has
        items = [item.strip() for item in targets.split(",")]
        named = set(parse_lora_targets(",".join(i for i in items if i not in LORA_GROUPS))) if any(
            i not in LORA_GROUPS for i in items) else set()
        names = tuple(t for t in parse_lora_targets(targets) if t in named or _has_target(bridge, t))
    modules = target_modules(bridge, names)
    adapters = LoRAAdapters(rank, alpha, names)
    device = next(bridge.parameters()).device
    for key, (_, module) in modules.items():
        d_in, d_out = _matrix_shape(module)
        adapters.deltas[key] = LowRankDelta(d_in, d_out, rank, adapters.scale).to(device)
        adapters.paths[key] = _path_in(bridge.original_model, module)
        adapters.handles.append(module.register_forward_hook(_hook(adapters, key)))
    # In the bridge's mode, not nn.Module's default (training): the adapters have no dropout, but a module in
    # training mode anywhere in the policy turns off the rollout's exact shortcut (``reads_from_generation``), and
    # a fresh LoRA run (adapters attached after ``policy.eval()``) and its resumed run (attached to a bridge loaded
    # in eval mode) must take the same path.
    adapters.train(bridge.training)
    _ADAPTERS[bridge] = adapters
    return adapters


def detach_lora(bridge) -> LoRAAdapters | None:
    """Remove the adapters' hooks from ``bridge`` (the bridge computes its base weights again); returns them."""
    adapters = _ADAPTERS.pop(bridge, None)
    if adapters is not None:
        for handle in adapters.handles:
            handle.remove()
        adapters.handles = []
    return adapters


def save_adapters(adapters: LoRAAdapters, directory) -> Path:
    """``directory/lora_adapters.safetensors``: every A and B (``deltas.KEY.A``), rank/alpha/targets as metadata."""
    path = Path(directory) / ADAPTER_FILE
    save_file({k: v.detach().contiguous() for k, v in adapters.state_dict().items()}, path, metadata=adapters.config())
    return path


def load_adapters(bridge, directory) -> LoRAAdapters:
    """Hook the adapters saved in ``directory`` onto ``bridge`` (``attach_lora`` with the saved rank, alpha, targets,
    then their A and B)."""
    path = Path(directory) / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        rank, alpha, targets = int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"].split(","))
    except (KeyError, ValueError) as error:
        raise LoRAError(f"{path} has no valid LoRA metadata (rank, alpha, targets): {error}. Save it again.") from error
    adapters = attach_lora(bridge, rank, alpha, targets)
    device = next(bridge.parameters()).device
    adapters.load_state_dict(load_file(path, device=str(device)))
    return adapters


def _has_target(bridge, target: str) -> bool:
    part, name = target.split(".")
    return getattr(getattr(bridge.blocks[0], part, None), name, None) is not None


def _path_in(root: nn.Module, module: nn.Module) -> tuple[str, ...]:
    paths = [name.replace("._original_component", "") for name, m in root.named_modules(remove_duplicate=False) if m is module]
    return tuple(dict.fromkeys(paths))


@contextmanager
def adapters_disabled(model):
    """Within, the policy (or bridge) ``model`` computes its base model: every adapter hook is off. No-op without
    LoRA. Safe to nest."""
    adapters = lora_of(model)
    if adapters is None:
        yield
        return
    previous, adapters.enabled = adapters.enabled, False
    try:
        yield
    finally:
        adapters.enabled = previous


def _handle_ids(adapters: LoRAAdapters) -> set[int]:
    return {handle.id for handle in adapters.handles}


def _strip_hooks(root: nn.Module, ids: set[int]) -> None:
    for module in root.modules():
        for hook_id in ids & set(module._forward_hooks):
            del module._forward_hooks[hook_id]


def adapter_free_view(bridge):
    """A second bridge over the very same parameter and buffer tensors as ``bridge`` (no weight is copied), without
    the adapters: the base model, frozen. The trainers' reference with LoRA. Without LoRA: a frozen deep copy is
    what ``models.make_reference`` gives instead."""
    adapters = lora_of(bridge)
    memo = {id(t): t for t in (*bridge.parameters(), *bridge.buffers())}
    view = copy.deepcopy(bridge, memo)
    if adapters is not None:
        _strip_hooks(view, _handle_ids(adapters))
    view.eval()
    return view


def attach_plain(module: nn.Module, adapters: LoRAAdapters) -> list[str]:
    """Hook ``adapters`` onto the plain module ``module`` (``plain_forward.PlainForward``'s copy of the model) at
    the same matrices; GPT-2's fused ``c_attn`` (``[q | k | v]`` outputs) gets the deltas of its adapted q, k, v
    concatenated (zeros for one not adapted). Returns the adapter paths it could not place (then the plain path
    must not run)."""
    named = dict(module.named_modules())
    fused: dict[str, dict[str, str]] = {}
    missing = []
    for key, paths in adapters.paths.items():
        path = next((p for p in paths if p in named), None)
        if path is not None:
            named[path].register_forward_hook(_hook(adapters, key))
            continue
        parent, _, last = paths[0].rpartition(".")
        if last in ("q", "k", "v") and f"{parent}.c_attn" in named:
            fused.setdefault(parent, {})[last] = key
        else:
            missing.append(paths[0])
    for parent, keys in fused.items():
        named[f"{parent}.c_attn"].register_forward_hook(_fused_hook(adapters, keys))
    return missing


def _fused_hook(adapters: LoRAAdapters, keys: dict[str, str]):
    def add_deltas(module, inputs, output):
        if not adapters.enabled:
            return None
        x, width = inputs[0], output.shape[-1] // 3
        parts = [adapters.deltas[keys[n]](x).to(output.dtype) if n in keys else output.new_zeros((*x.shape[:-1], width))
                 for n in "qkv"]
        return output + torch.cat(parts, dim=-1)

    return add_deltas


@torch.no_grad()
def merge_into(bridge, adapters: LoRAAdapters) -> None:
    """``W ← W + s·B A`` in place for every adapted matrix of ``bridge`` (a copy: the base must stay frozen while
    training), in each module's own layout (``nn.Linear`` [out, in]; ``Conv1D`` [in, out])."""
    for key, (_, module) in target_modules(bridge, adapters.targets).items():
        delta = adapters.deltas[key].delta_weight()
        module.weight.add_((delta if isinstance(module, nn.Linear) else delta.T).to(module.weight.dtype))


def merged_copy(bridge):
    """A deep copy of ``bridge`` with its adapters merged into the weights and no hooks: the trained policy as a
    plain model (for ``--export-merged``, ``diff``, ``inspect``). Costs one copy of the model."""
    adapters = lora_of(bridge)
    copied = copy.deepcopy(bridge)
    if adapters is not None:
        _strip_hooks(copied, _handle_ids(adapters))
        merge_into(copied, adapters)
    return copied
