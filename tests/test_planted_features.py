"""experiments/planted_features.py's pieces with a known answer: Spearman's ρ with ties, by hand."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import planted_features  # noqa: E402


def test_spearman_by_hand_with_ties():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert planted_features.spearman(a, a) == pytest.approx(1.0)
    assert planted_features.spearman(a, -a) == pytest.approx(-1.0)
    # ranks of [0, 0, 1, 1] are [0.5, 0.5, 2.5, 2.5]: centred [-1, -1, 1, 1] against [-1.5, -0.5, 0.5, 1.5]
    assert planted_features.spearman(torch.tensor([0.0, 0.0, 1.0, 1.0]), a) == pytest.approx(4 / 20 ** 0.5)
    assert planted_features.spearman(torch.zeros(4), a) != planted_features.spearman(torch.zeros(4), a)  # nan: constant


def test_per_response_max_by_hand():
    """Positions 0-1 belong to response 0, 2 to response 1, 3 to none; response 2 has no position (stays 0)."""
    f = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.5, 4.0], [9.0, 9.0]])
    response_of = torch.tensor([0, 0, 1, -1])
    assert planted_features.per_response_max(f, response_of, 3).tolist() == [[3.0, 2.0], [0.5, 4.0], [0.0, 0.0]]
