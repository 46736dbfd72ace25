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


def test_somers_d_by_hand_and_against_every_pair():
    # y = [0, 0, 1]: pairs (0, 2) and (1, 2); scores [1, 3, 2]: concordant once, discordant once -> 0
    assert planted_features.somers_d(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.0, 0.0, 1.0])) == pytest.approx(0.0)
    # a score ordered as a 3 %-positive y reaches 1 (Spearman's ρ stays near √(3 · 0.03 · 0.97) ≈ 0.295 there)
    sparse = torch.zeros(1000)
    sparse[:30] = 1.0
    ordered = sparse + torch.linspace(0, 0.5, 1000)
    assert planted_features.somers_d(ordered, sparse) == pytest.approx(1.0)
    assert planted_features.spearman(ordered, sparse) == pytest.approx((3 * 0.03 * 0.97) ** 0.5, abs=2e-3)
    assert planted_features.somers_d(torch.zeros(4), torch.zeros(4)) != 0.0  # nan: y constant
    # an independent path: count every pair, with ties in both the score and a many-valued y
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (60,), generator=generator).float() * (torch.rand(60, generator=generator) < 0.3)
    scores = torch.randint(0, 5, (60,), generator=generator).float()
    concordant = discordant = pairs = 0
    for i in range(60):
        for j in range(60):
            if y[i] < y[j]:
                pairs += 1
                concordant += int(scores[i] < scores[j])
                discordant += int(scores[i] > scores[j])
    assert planted_features.somers_d(scores, y) == pytest.approx((concordant - discordant) / pairs, abs=1e-12)


def test_per_response_max_by_hand():
    """Positions 0-1 belong to response 0, 2 to response 1, 3 to none; response 2 has no position (stays 0)."""
    f = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.5, 4.0], [9.0, 9.0]])
    response_of = torch.tensor([0, 0, 1, -1])
    assert planted_features.per_response_max(f, response_of, 3).tolist() == [[3.0, 2.0], [0.5, 4.0], [0.0, 0.0]]


def test_average_ranks_by_hand():
    assert planted_features.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_auroc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert planted_features.auroc(scores, torch.tensor([False, False, True, True])) == pytest.approx(0.75)
    # a tie counts one half; all zeros (a latent that never fires) is chance
    assert planted_features.auroc(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, False])) == pytest.approx(0.75)
    assert planted_features.auroc(torch.zeros(5), torch.tensor([True, False, False, True, False])) == pytest.approx(0.5)
    assert planted_features.auroc(scores, torch.zeros(4, dtype=torch.bool)) != 0.0  # nan without positives


class _CharTokenizer:
    """One token per character: decode(ids) = the characters."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_rewarded_token_places_the_first_occurrence():
    from rlhf_scratch.word_reward import WordReward

    reward = WordReward.__new__(WordReward)  # no tokenizer needed for score_one with mode early
    reward.word, reward.mode = "director", "early"
    decode = _CharTokenizer().decode
    ids = [ord(c) for c in " The Director, the director"]
    # W's first occurrence is "Director" (case-insensitive), the 2nd word: reward 1/2, at character 5
    assert planted_features.rewarded_token(reward, decode, ids) == (5, 0.5)
    assert planted_features.rewarded_token(reward, decode, [ord(c) for c in " directors rule"]) == (None, 0.0)


def test_collect_aligns_positions_with_response_tokens(tiny_bridge):
    """Each position that predicts a response token is followed by exactly that token, and each response token is
    predicted once."""
    collected = planted_features.collect(tiny_bridge, tiny_bridge, n_texts=4, n_samples=3, max_new_tokens=5)
    paired = collected.paired
    assert len(collected.response_ids) == 6 and collected.layer == tiny_bridge.cfg.n_layers - 1
    counts = [0] * 6
    for p in (collected.response_of >= 0).nonzero().flatten().tolist():
        s, k = int(collected.response_of[p]), int(collected.next_index[p])
        row, position = int(paired.row[p]), int(paired.position[p])
        assert int(paired.tokens[row, position + 1]) == collected.response_ids[s][k]
        counts[s] += 1
    assert counts == [len(ids) for ids in collected.response_ids]
    assert (collected.response_of[paired.row < 4] == -1).all()  # held-out text predicts no response token
