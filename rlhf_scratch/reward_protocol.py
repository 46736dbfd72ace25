"""What a reward is (the ``Reward`` protocol) and the error every reward raises (``RewardError``): the leaf that
``rewards.py`` and ``python_rewards.py`` both build on."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor


class RewardError(ValueError):
    """A reward could not be built, or returned an unusable score; the message says why."""


@runtime_checkable
class Reward(Protocol):
    """What a reward is: a name for logs and errors, and texts → scores [batch]."""

    name: str

    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]: ...
