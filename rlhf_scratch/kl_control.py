"""KL coefficient controllers: a fixed coefficient, or one adapted towards a target KL.

The coefficient multiplies the KL penalty (see ``objectives.calc_kl_penalty``). The
adaptive controller is Ziegler et al. (2019), "Fine-Tuning Language Models from
Human Preferences", section 2.2, as in TRL's ``AdaptiveKLController``.
"""

import math

from rlhf_scratch.typecheck import typechecker


@typechecker
class FixedKLController:
    """A KL coefficient that never changes. ``.value`` is the coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef={kl_coef} must be >= 0 (0 turns the KL penalty off).")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the same interface as AdaptiveKLController.update."""

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume exactly."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()``."""
        self.value = float(state["value"])


@typechecker
class AdaptiveKLController:
    """A KL coefficient that moves the measured KL towards ``target`` (Ziegler et al. 2019).

    After each phase, ``update(current_kl, n_steps)`` applies
        e = clip(current_kl / target − 1, −0.2, 0.2)
        kl_coef ← kl_coef · (1 + e · n_steps / horizon)
    so a KL above target raises the coefficient (more penalty) and one below lowers
    it, by at most 20 % per ``horizon`` steps. ``n_steps`` is counted in the same unit
    as ``horizon``: TRL passes the number of samples in the phase (the batch size),
    with horizon = 10000. ``.value`` is the current coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef={init_kl_coef} must be > 0: a multiplicative update cannot leave 0.")
        if target <= 0:
            raise ValueError(f"target={target} must be > 0 (the KL, in nats, to steer towards; typical: 6).")
        if horizon <= 0:
            raise ValueError(f"horizon={horizon} must be > 0 (steps over which to correct the error; typical: 10000).")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale ``value`` by 1 + clip(current_kl/target − 1, ±0.2)·n_steps/horizon."""
        if not math.isfinite(current_kl):
            raise ValueError(
                f"current_kl={current_kl} is not finite; the measured KL is broken, check the rollout's logprobs."
            )
        if n_steps < 0:
            raise ValueError(f"n_steps={n_steps} must be >= 0 (how many steps or samples the phase covered).")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume exactly."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()``."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
