"""One optimiser step as every trainer here takes it (PPO, REINFORCE, DPO, reward models).

    zero grads ─► loss.backward() ─► clip the global gradient norm to max_grad_norm ─► check it is finite ─► step

A NaN or inf stops training with ``NonFiniteLossError`` naming the term, before it reaches the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term."""


DEFAULT_HINT = "Lower the learning rate or check the inputs for extreme values."


def check_finite(name: str, value: Tensor, hint: str = DEFAULT_HINT) -> Tensor:
    """Raise ``NonFiniteLossError`` naming ``name`` if ``value`` has a NaN or inf; ``hint`` says what to try
    (each trainer passes one that names its own flags)."""
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(f"The {name} is {value.detach().flatten()[:4].tolist()} (not finite). {hint}")
    return value


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
