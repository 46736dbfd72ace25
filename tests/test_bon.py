"""Best-of-n: its exact distribution against brute-force enumeration, its expectation and KL
against hand values and the analytic bound, and the sampler on a tiny model."""

import itertools
import math

import pytest
import torch

from rlhf_scratch.bon import (
    BestOfNSampler,
    best_of_n_distribution,
    best_of_n_kl,
    best_of_n_kl_bound,
    plugin_best_of_n_kl,
    select_best,
)
from rlhf_scratch.evaluation import evaluate
from rlhf_scratch.sampling import SamplingConfig, encode


def brute_force_best_of_n(rewards: list[float], probs: list[float], n: int) -> list[float]:
    """Enumerate every n-tuple of outcomes; the kept one is a uniformly random one of the tied best."""
    result = [0.0] * len(rewards)
    for draw in itertools.product(range(len(rewards)), repeat=n):
        weight = math.prod(probs[i] for i in draw)
        best = max(rewards[i] for i in draw)
        winners = [i for i in draw if rewards[i] == best]
        for i in winners:
            result[i] += weight / len(winners)
    return result


def test_bound_values():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)  # 0.636 nats
    assert best_of_n_kl_bound(4) == pytest.approx(0.6363, abs=1e-4)


def test_best_of_two_of_a_coin_by_hand():
    dist = best_of_n_distribution(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), 2)
    torch.testing.assert_close(dist, torch.tensor([0.25, 0.75]))
    kl = best_of_n_kl(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), 2)
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_distribution_with_ties_matches_enumeration(n):
    rewards = [1.0, 0.0, 1.0, 2.0, 0.0, 2.0]  # three tied pairs
    probs = [0.1, 0.3, 0.2, 0.05, 0.25, 0.1]
    exact = best_of_n_distribution(torch.tensor(rewards, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64), n)
    assert exact.tolist() == pytest.approx(brute_force_best_of_n(rewards, probs, n), abs=1e-12)


def test_expected_reward_of_best_of_three_by_hand():
    # P(max <= 0) = 0.5^3 = 0.125, P(max <= 1) = 0.8^3 = 0.512
    # E = 1·(0.512 − 0.125) + 2·(1 − 0.512) = 1.363
    rewards, probs = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, 0.3, 0.2])
    dist = best_of_n_distribution(rewards, probs, 3)
    assert (dist * rewards).sum().item() == pytest.approx(1.363)
    # Sampled best-of-3 (select_best over i.i.d. draws) has that expectation too.
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs.expand(40000 * 3, 3), 1, generator=generator).view(40000, 3)
    best = rewards[draws].gather(1, select_best(rewards[draws])[:, None])[:, 0]
    assert best.mean().item() == pytest.approx(1.363, abs=4 * best.std().item() / 200)


def test_select_best_takes_the_first_of_tied_candidates():
    assert select_best(torch.tensor([[0.1, 0.5, 0.5], [2.0, -1.0, 2.0]])).tolist() == [1, 0]


def test_kl_is_the_bound_without_ties_and_below_it_with_ties():
    # Many equally likely outcomes with distinct rewards: close to log n − (n−1)/n.
    k = 2000
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    distinct = best_of_n_kl(torch.arange(k, dtype=torch.float64), uniform, 4).item()
    assert distinct == pytest.approx(best_of_n_kl_bound(4), abs=2e-3)
    assert distinct <= best_of_n_kl_bound(4)
    # Heavy ties (two reward levels, a fair coin): P(best = 1) = 15/16, far below the bound.
    tied = best_of_n_kl(torch.arange(k, dtype=torch.float64) // 1000, uniform, 4).item()
    assert tied == pytest.approx(15 / 16 * math.log(15 / 8) + 1 / 16 * math.log(1 / 8))
    assert tied < best_of_n_kl_bound(4) - 0.15
    # Any toy distribution stays within the bound.
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.rand(7, generator=generator, dtype=torch.float64)
        rewards = torch.randint(0, 4, (7,), generator=generator).double()
        for n in (2, 4, 8):
            assert best_of_n_kl(rewards, probs / probs.sum(), n).item() <= best_of_n_kl_bound(n) + 1e-12


def test_plugin_kl_of_distinct_rewards_by_hand():
    # M distinct rewards: the k-th smallest is kept with p_k = (k/M)^n − ((k−1)/M)^n,
    # KL = Σ_k p_k log(M p_k): 0.6334 at n = 4, M = 16 (bound 0.6363).
    m, n = 16, 4
    p = [(k / m) ** n - ((k - 1) / m) ** n for k in range(1, m + 1)]
    by_hand = sum(pk * math.log(m * pk) for pk in p)
    pool = torch.randperm(m).double() * 0.1
    assert plugin_best_of_n_kl(pool, n).item() == pytest.approx(by_hand, abs=1e-10)
    assert by_hand == pytest.approx(0.6334, abs=1e-4)


def test_measured_kl_on_a_toy_case_is_close_to_exact_and_within_the_bound():
    """Pools of 16 draws from a toy reward distribution with ties: plug-in estimates ≈ the exact KL, ≤ bound."""
    rewards = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0], dtype=torch.float64)
    probs = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    n, m = 4, 64
    exact = best_of_n_kl(rewards, probs, n).item()
    generator = torch.Generator().manual_seed(0)
    estimates = torch.stack([
        plugin_best_of_n_kl(rewards[torch.multinomial(probs, m, replacement=True, generator=generator)], n)
        for _ in range(400)
    ])
    assert (estimates <= best_of_n_kl_bound(n) + 1e-12).all()
    assert estimates.mean().item() == pytest.approx(exact, abs=0.02), (estimates.mean().item(), exact)
    assert exact < best_of_n_kl_bound(n)


class RecordingReward:
    """Counts the letter e and remembers every batch of texts it scored."""

    name = "count-e"

    def __init__(self):
        self.batches = []

    def __call__(self, texts):
        self.batches.append(list(texts))
        return torch.tensor([float(t.count("e")) for t in texts])


def test_sampler_keeps_the_best_of_its_n_candidates(tiny_bridge):
    prompts = [encode(tiny_bridge.tokenizer, "The movie"), encode(tiny_bridge.tokenizer, "What a")] * 3
    sampler = BestOfNSampler(tiny_bridge, n=3, sampling=SamplingConfig(max_new_tokens=6), pool_size=5)
    reward = RecordingReward()
    samples = sampler.sample(prompts, reward, torch.Generator().manual_seed(0))
    (pool_texts,) = reward.batches
    assert len(pool_texts) == 6 * 5 and len(samples) == 6
    for i in range(6):
        candidates = pool_texts[i * 5 : i * 5 + 3]
        assert samples.rewards[i].item() == max(t.count("e") for t in candidates)
        assert samples.texts[i] in candidates
    assert samples.kl_terms.shape == (6,)
    assert ((samples.kl_terms >= 0) & (samples.kl_terms <= best_of_n_kl_bound(3) + 1e-6)).all()
    result = evaluate(sampler, prompts, RecordingReward(), seed=0, batch_size=10)  # 2 prompts per chunk
    assert result.metrics["n_samples"] == 6 and result.metrics["kl_bound"] == pytest.approx(best_of_n_kl_bound(3))
    assert result.system == "best-of-3"


def test_sampler_validation(tiny_bridge):
    with pytest.raises(ValueError, match="pool_size"):
        BestOfNSampler(tiny_bridge, n=4, pool_size=2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        BestOfNSampler(tiny_bridge, n=0)


def test_rewards_within_rounding_are_ties_for_the_choice_and_the_kl():
    """Two samples with the same text can get rewards that differ by rounding (another batch position, CPU or thread
    count). Merged, the first of them is chosen on every machine and the plug-in KL counts them as one reward."""
    from rlhf_scratch.ties import merge_near_ties

    pool = torch.tensor([[0.5 - 3e-8, 0.2, 0.5, 0.5 + 2e-8], [3.0, 1.0, 2.0, 2.0 + 1e-3]], dtype=torch.float64)
    merged = merge_near_ties(pool)
    assert merged.tolist() == [[0.5 - 3e-8, 0.2, 0.5 - 3e-8, 0.5 - 3e-8], [3.0, 1.0, 2.0, 2.0 + 1e-3]]
    assert select_best(merged).tolist() == [0, 0]  # the first of the tied best; a real margin (1e-3) stays one
    exact_ties = torch.tensor([0.5, 0.2, 0.5, 0.5], dtype=torch.float64)
    assert plugin_best_of_n_kl(merged[0], 2).item() == pytest.approx(plugin_best_of_n_kl(exact_ties, 2).item(), abs=1e-12)
    assert plugin_best_of_n_kl(pool[0], 2).item() > plugin_best_of_n_kl(exact_ties, 2).item() + 0.05  # unmerged: wrong
