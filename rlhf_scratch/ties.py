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


@jaxtyped(typechecker=typechecker)
def merge_near_ties(values: Float[Tensor, "*rows m"]) -> Float[Tensor, "*rows m"]:
    """Each row's values with every run of near-equal ones set to the run's smallest: sorted, a value joins the run
    of the one before it when their gap is <= TIE_RTOL · max(1, |value|).                        [..., M] -> [..., M]

    For selections among rewards (best-of-n's argmax, its tie-aware KL): two samples with the same text, scored in
    different batch positions, can get rewards that differ by rounding; merged, they are the tie they are (the
    argmax then takes the first of them on every machine, and the KL counts them as one reward)."""
    ordered, order = values.sort(dim=-1)
    gaps = ordered.diff(dim=-1)
    tolerance = TIE_RTOL * ordered[..., 1:].abs().clamp(min=1.0)
    starts = torch.cat([torch.ones_like(gaps[..., :1], dtype=torch.bool), gaps > tolerance], dim=-1)
    run = starts.long().cumsum(dim=-1) - 1  # run index of each sorted value
    first_of_run = torch.zeros_like(ordered).scatter_reduce(-1, run, ordered, reduce="amin", include_self=False)
    merged_sorted = first_of_run.gather(-1, run)
    return torch.empty_like(values).scatter(-1, order, merged_sorted)
