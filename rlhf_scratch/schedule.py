"""Learning-rate schedule: linear warmup, then linear decay, as a LambdaLR multiplier."""

from collections.abc import Callable

from rlhf_scratch.typecheck import typechecker


@typechecker
def warmup_decay_lambda(total_steps: int, warmup_steps: int, final_scale: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimiser step, for ``LambdaLR``.

    step < W (warmup):        m = (step + 1) / W              1/W at step 0, 1.0 at step W − 1
    W <= step <= N − 1:       m = 1 − (1 − f)·(step − W)/(N − 1 − W)   1.0 at step W, f at step N − 1
    step >= N (beyond):       m = f
    with N = total_steps, W = warmup_steps, f = final_scale.

    Step 0 gets 1/W, not 0: a zero multiplier would make the first optimiser step
    (often a whole PPO phase's first minibatch) a no-op. W = 0 means no warmup.
    If the decay part is a single step (W = N − 1) that step gets 1.0: it is the
    start of the decay, and a lone step at f = 0 would be wasted.
    Note: with f = 0 the last step (N − 1) has learning rate 0.

    Use: ``LambdaLR(optimizer, warmup_decay_lambda(N, W, f))`` and call
    ``scheduler.step()`` after each ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1 (the number of optimiser steps in the whole run).")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must satisfy 0 <= warmup_steps < total_steps={total_steps}; "
            "use 0 for no warmup, or a small fraction of total_steps."
        )
    if not 0.0 <= final_scale <= 1.0:
        raise ValueError(
            f"final_scale={final_scale} must lie in [0, 1]: the multiplier at the last step (1 = no decay)."
        )
    decay_steps = total_steps - 1 - warmup_steps  # steps from the decay's start to its end

    def lr_multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return final_scale
        if decay_steps == 0:
            return 1.0
        progress = (step - warmup_steps) / decay_steps  # 0 at the decay's first step, 1 at the last
        return 1.0 - (1.0 - final_scale) * progress

    return lr_multiplier
