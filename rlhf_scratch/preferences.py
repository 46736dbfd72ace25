"""Preference pairs ``(prompt, chosen, rejected)``: loading, validation, and building them from scored samples."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``prompt + chosen`` is preferred to ``prompt + rejected``.

    ``margin`` (how much better, ≥ 0) or ``chosen_score``/``rejected_score`` are optional;
    ``margin_value`` gives the margin a Bradley–Terry-with-margin loss uses.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None

    @property
    def margin_value(self) -> float | None:
        """``margin`` if given, else ``chosen_score − rejected_score`` if both scores are given, else None."""
        if self.margin is not None:
            return self.margin
        if self.chosen_score is not None and self.rejected_score is not None:
            return self.chosen_score - self.rejected_score
        return None
