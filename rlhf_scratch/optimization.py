"""One optimiser step as every trainer here takes it (PPO, REINFORCE, DPO, reward models).

    zero grads ─► loss.backward() ─► clip the global gradient norm to max_grad_norm ─► check it is finite ─► step

A NaN or inf stops training with ``NonFiniteLossError`` naming the term, before it reaches the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term."""


DEFAULT_HINT = "Lower the learning rate or check the inputs for extreme values."

_STRIDED_VIEWS = WeakIdKeyDictionary()
"""Parameter -> the strided view it had before ``fuse_strided_groups`` gave it its own storage (kept for the
parameter's life): a later optimizer over the same model (a second trainer on one bridge) must still see it as
strided and keep its alias in step, though the parameter itself is contiguous by then."""


def _strided(param: Tensor) -> bool:
    """A strided parameter, or one that ``fuse_strided_groups`` made contiguous (its alias still needs the copy)."""
    return not param.is_contiguous() or param in _STRIDED_VIEWS


def check_finite(name: str, value: Tensor, hint: str = DEFAULT_HINT) -> Tensor:
    """Raise ``NonFiniteLossError`` naming ``name`` if ``value`` has a NaN or inf; ``hint`` says what to try
    (each trainer passes one that names its own flags)."""
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(f"The {name} is {value.detach().flatten()[:4].tolist()} (not finite). {hint}")
    return value


def check_finite_terms(terms: dict[str, Tensor], hint: str = DEFAULT_HINT, total: str = "loss") -> None:
    """``check_finite`` on every term, reading one flag: a NaN or inf in any term reaches ``terms[total]`` (their
    weighted sum; inf − inf is NaN, 0·inf is NaN), so only that is read back, and when it is not finite the error
    names the first non-finite term in order (the total itself if every term is finite)."""
    if bool(torch.isfinite(terms[total]).all()):
        return
    for name, value in terms.items():
        if name != total:
            check_finite(name, value, hint)
    check_finite(total, terms[total], hint)


def clipped_step(optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float, hint: str = DEFAULT_HINT) -> Tensor:
    """Backward, clip the global gradient norm of every parameter ``optimizer`` holds, step.

    Returns the gradient norm before clipping (a 0-d tensor). A non-finite norm raises before the step,
    with ``hint`` in the message.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return clip_and_step(optimizer, max_grad_norm, hint)


def clip_and_step(optimizer: torch.optim.Optimizer, max_grad_norm: float, hint: str = DEFAULT_HINT) -> Tensor:
    """The second half of ``clipped_step``, once the gradients are in place (one backward, or several
    accumulated): clip the global gradient norm, check it is finite, step. Returns the norm before clipping.

    In a data-parallel run the gradients are already averaged over the ranks (DDP), so the norm, the
    clipping and the step are the same on every rank, and a non-finite norm raises on every rank.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    check_finite("gradient norm", grad_norm, hint)
    optimizer.step()
    return grad_norm


def fused_where_contiguous(groups: list[dict], device: str) -> list[dict]:
    """AdamW parameter groups that run the fused kernel wherever it is right: each group split in two, its contiguous
    parameters (``fused=True``) then its other ones (the for-loop AdamW), in the same order otherwise.

    The fused AdamW is one kernel over all tensors instead of a Python loop of small ops: ~5x faster steps at GPT-2
    size on a CPU (1.0 s -> 0.2 s on one thread), the same update to float rounding (~1e-7). torch 2.13's fused
    kernel updates a non-contiguous parameter wrongly (0.3 off after 3 steps of lr 0.1 in a direct test), and the GPT-2
    bridge trains q/k/v as transposed slices of the fused ``c_attn``: those keep the plain AdamW, bit for bit as
    before. On devices without a fused kernel (mps) every group keeps the plain AdamW. Each group carries
    ``origin``, the index of the group it came from (``regroup_optimizer_state`` reads it).
    """
    fused = torch.device(device).type in ("cpu", "cuda")
    split = []
    for origin, group in enumerate(groups):
        contiguous = [p for p in group["params"] if not _strided(p)]
        strided = [p for p in group["params"] if _strided(p)]
        for params, use_fused in ((contiguous, fused), (strided, False)):
            if params:
                split.append({**group, "params": params, "fused": use_fused or None, "origin": origin})
    return split


def fuse_strided_groups(groups: list[dict], device: str) -> tuple[list[dict], list[tuple[Tensor, Tensor]]]:
    """``fused_where_contiguous``'s groups with their strided parameters made contiguous, in place, so that every
    group runs the fused AdamW: the same groups in the same order (a checkpoint's optimizer state still fits).
    Returns the groups and the ``(parameter, strided view it had)`` pairs that ``copy_to_views`` keeps in step.

    The GPT-2 bridge's q/k/v weights are transposed slices of the fused ``c_attn``, an alias its forward pass never
    reads (the forward pass, ``state_dict``, ``plain_forward`` and ``models.hf_module_from_bridge`` all use the split
    weights). Giving each its own contiguous storage (``param.data``: the same ``Parameter`` object) takes them off
    the for-loop AdamW, which was about as slow on their 17 % of GPT-2's weights as the fused kernel on all the
    others; ``copy_to_views`` after each step writes them back into ``c_attn``, so that the alias still holds the
    trained weights. No-op where there is no fused kernel (mps).

    Each pair is remembered for the parameter's life (``_STRIDED_VIEWS``): a second optimizer over the same model
    (another trainer on the same bridge) puts the parameter in the same group and keeps the same alias in step. Were it
    classed by its now-contiguous storage, that trainer would never write ``c_attn`` back, and a ``state_dict`` of its
    model (both keys) loaded into a fresh bridge (where q/k/v alias ``c_attn``, loaded after them) would restore the
    stale alias over the trained q/k/v.
    """
    views: list[tuple[Tensor, Tensor]] = []
    if torch.device(device).type not in ("cpu", "cuda"):
        return groups, views
    for group in groups:
        if "fused" in group and not group["fused"]:  # a group of fused_where_contiguous that kept the for-loop
            for param in group["params"]:
                if param not in _STRIDED_VIEWS:
                    _STRIDED_VIEWS[param] = param.data
                    param.data = param.data.contiguous()
                views.append((param, _STRIDED_VIEWS[param]))
            group["fused"] = True
    return groups, views


@torch.no_grad()
def copy_to_views(views: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each parameter made contiguous by ``fuse_strided_groups`` into the strided view it had (the storage it
    shares with an alias such as GPT-2's ``c_attn``)."""
    for param, view in views:
        view.copy_(param)


def regroup_optimizer_state(saved: dict, original_groups: list[dict], optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict saved with ``original_groups`` (before ``fused_where_contiguous``: a checkpoint
    written before 2026-11-29) rearranged for ``optimizer``, whose groups split them. The moments of each
    parameter move to its new index; each new group takes its original group's saved hyperparameters (lr, ...)."""
    if len(saved["param_groups"]) != len(original_groups):
        raise ValueError(f"The checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this trainer "
                         f"{len(original_groups)}; resume with the same trainer and model the run used.")
    old_index = {id(p): i for i, p in enumerate(p for group in original_groups for p in group["params"])}
    state, param_groups, new_index = {}, [], 0
    for group in optimizer.param_groups:
        indices = []
        for param in group["params"]:
            if old_index[id(param)] in saved["state"]:
                state[new_index] = saved["state"][old_index[id(param)]]
            indices.append(new_index)
            new_index += 1
        param_groups.append({**saved["param_groups"][group["origin"]], "params": indices, "fused": group["fused"],
                             "origin": group["origin"]})
    return {"state": state, "param_groups": param_groups}
