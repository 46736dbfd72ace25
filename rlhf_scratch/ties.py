"""Pair comparisons that are the same on every CPU: a difference within float rounding of a tie is a tie.

``a > b`` on two numbers computed the same way (the implicit rewards of DPO's chosen and rejected answers while the
policy still equals the reference; two rewards of a reward model that has not yet learned to tell them apart) is
decided by rounding, and rounding differs between CPUs (Intel and AMD kernels), thread counts and batch layouts
(one process or a slice per rank). A metric built on it (pair accuracy) then differs between machines, and so does
any test that compares it exactly. Here a pair is won only by a margin larger than rounding:

    win_b  =  chosen_b − rejected_b  >  TIE_RTOL · max(1, max_i |scale_{i,b}|)          [B], [B], [..., B] -> [B]

``scale`` holds the numbers each pair's two sides were computed from (their rounding error is relative to those);
the tolerance is per pair, so a pair's verdict does not depend on which other pairs share its batch.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker

TIE_RTOL = 1e-5
"""float32 rounding of a sum of ~100 token log-probs is ~1e-6 of its size: a tenfold margin."""


@jaxtyped(typechecker=typechecker)
def decided_wins(chosen: Float[Tensor, "batch"], rejected: Float[Tensor, "batch"],
                 scale: Float[Tensor, "*rest batch"] | None = None) -> Bool[Tensor, "batch"]:
    """Which pairs chosen wins by more than rounding (a tie, exact or rounding-level, is not a win). Detached.

    ``scale`` defaults to the two sides themselves: tolerance TIE_RTOL · max(1, |chosen_b|, |rejected_b|)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    sides = torch.stack([chosen, rejected]) if scale is None else scale.detach().reshape(-1, chosen.shape[0])
    tolerance = TIE_RTOL * sides.abs().amax(dim=0).clamp(min=1.0)
    return (chosen - rejected) > tolerance
