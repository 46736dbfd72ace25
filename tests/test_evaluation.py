"""Evaluation metrics against hand-computed values, the KL estimator on known distributions,
and a model sampler's KL terms against a row-by-row recomputation."""

import math

import pytest
import torch

from rlhf_scratch.evaluation import (
    EvalConfig,
    ModelSampler,
    code_cell,
    distinct_n,
    evaluate,
    evaluation_prompts,
    mean_and_stderr,
    reward_stats,
    sampling_logprobs,
    sequence_log_ratio,
    token_entropy,
)
from rlhf_scratch.models import make_reference
from rlhf_scratch.rewards import CharCountReward
from rlhf_scratch.sampling import SamplingConfig, encode


def words(*texts: str) -> list[list[str]]:
    return [text.split() for text in texts]


# ---------------------------------------------------------------- reward statistics


def test_reward_stats_by_hand():
    stats = reward_stats(torch.tensor([1.0, 2.0, 3.0, 10.0]), threshold=2.5)
    assert stats["mean"] == pytest.approx(4.0)
    assert stats["median"] == pytest.approx(2.5)  # even N: mean of the two middle values
    assert stats["std"] == pytest.approx(math.sqrt((9 + 4 + 1 + 36) / 3))
    assert stats["frac_above"] == pytest.approx(0.5)
    odd = reward_stats(torch.tensor([3.0, -1.0, 2.0]), threshold=5.0)
    assert odd["median"] == pytest.approx(2.0) and odd["frac_above"] == 0.0
    assert reward_stats(torch.tensor([0.7]), threshold=0.5) == pytest.approx(
        {"mean": 0.7, "median": 0.7, "std": 0.0, "frac_above": 1.0})


def test_mean_and_stderr_by_hand():
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0]))
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    assert mean_and_stderr(torch.tensor([4.0])) == (4.0, 0.0)


# ---------------------------------------------------------------- diversity


def test_token_entropy_on_hand_made_texts():
    # a:2, b:1, c:1 of N=4 -> H = -(1/2 ln 1/2 + 2 · 1/4 ln 1/4) = 1.5 ln 2
    assert token_entropy(words("a b", "a c")) == pytest.approx(1.5 * math.log(2))
    assert token_entropy(words("w x y z")) == pytest.approx(math.log(4))
    assert token_entropy(words("same same", "same")) == pytest.approx(0.0)
    assert token_entropy([[], []]) == 0.0
    assert token_entropy([[7, 7, 8, 9]]) == token_entropy(words("a a b c"))  # ids or words alike


def test_distinct_n_on_hand_made_texts():
    texts = words("the cat sat", "the cat ran")
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    # n-grams never cross texts: "a" + "b" has no bigram; one-word texts contribute none.
    assert distinct_n(words("a", "b"), 2) == 0.0
    assert distinct_n(words("a b a b"), 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(texts, 0)


# ---------------------------------------------------------------- KL estimator


def test_sequence_log_ratio_sums_real_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(sequence_log_ratio(logprobs, ref, mask), torch.tensor([0.5 - 1.0, 1.5]))


def test_kl_estimator_is_unbiased_on_two_known_distributions():
    """Responses of 1–3 i.i.d. tokens from p, padded; the estimate of E[L]·KL(p‖q) within 4 s.e."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))  # 0.2737... nats per token
    n, g = 20000, 3
    tokens = torch.multinomial(p.expand(n * g, 3), 1, generator=generator).view(n, g)
    lengths = torch.randint(1, g + 1, (n,), generator=generator)
    mask = torch.arange(g)[None, :] < lengths[:, None]
    padded = torch.where(mask, tokens, 0)
    log_ratio = sequence_log_ratio(p.log()[padded], q.log()[padded], mask)
    mean, se = mean_and_stderr(log_ratio)
    expected = 2.0 * kl_pq  # E[L] = 2
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    # Single terms can be negative (token 2 is likelier under q); their mean is not.
    assert (log_ratio < 0).any()


def test_sampling_logprobs_match_the_sampling_distribution():
    logits = torch.tensor([[[math.log(0.25), math.log(0.75)], [0.0, 0.0]]])  # [1, 2, 2]
    tokens = torch.tensor([[0, 1]])
    plain = sampling_logprobs(logits, tokens, SamplingConfig())
    torch.testing.assert_close(plain, torch.tensor([[math.log(0.25), math.log(0.5)]]))
    # Temperature 2 halves the logits: (0.25, 0.75) becomes (1, sqrt 3) / (1 + sqrt 3).
    hot = sampling_logprobs(logits, tokens, SamplingConfig(temperature=2.0))
    assert hot[0, 0].item() == pytest.approx(math.log(1 / (1 + math.sqrt(3))), rel=1e-5)
    # top-k = 1 keeps only the most likely token: it has log-prob 0, every other −inf.
    top1 = sampling_logprobs(logits, torch.tensor([[1, 0]]), SamplingConfig(top_k=1))
    assert top1[0, 0].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- model sampler


def perturbed_copy(bridge, scale: float = 0.3):
    other = make_reference(bridge)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    return other


def test_model_sampler_kl_terms_match_each_row_alone(tiny_bridge):
    """kl_terms[b] = Σ over the real generated tokens of log π − log π_ref, recomputed without padding."""
    policy = perturbed_copy(tiny_bridge)
    tokenizer = tiny_bridge.tokenizer
    prompts = [encode(tokenizer, "The movie"), encode(tokenizer, "What a waste of two hours")] * 3
    sampler = ModelSampler("perturbed", policy, tiny_bridge, SamplingConfig(max_new_tokens=5, temperature=1.5))
    samples = sampler.sample(prompts, CharCountReward("e"), torch.Generator().manual_seed(0))
    generation_lengths = samples.lengths.tolist()
    for row, prompt in enumerate(prompts):
        response = samples.response_tokens[row] + ([tokenizer.eos_token_id] if samples.ended_with_eos[row] else [])
        assert len(response) == generation_lengths[row]
        tokens = torch.tensor([prompt + response])
        def logp(model):
            logits = model(tokens)[0, :-1] / 1.5
            return torch.log_softmax(logits, -1).gather(-1, tokens[0, 1:, None])[:, 0][len(prompt) - 1 :]
        expected = (logp(policy) - logp(tiny_bridge)).sum()
        assert samples.kl_terms[row].item() == pytest.approx(expected.item(), abs=1e-4)
        assert samples.rewards[row].item() == samples.texts[row].count("e")


def test_reference_sampler_has_zero_kl_and_evaluation_is_seeded(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    prompts = [encode(tokenizer, "The movie")] * 10
    sampler = ModelSampler("reference", tiny_bridge, tiny_bridge, SamplingConfig(max_new_tokens=6))
    first = evaluate(sampler, prompts, CharCountReward("e"), seed=3, batch_size=4)
    again = evaluate(sampler, prompts, CharCountReward("e"), seed=3, batch_size=4)
    assert first.metrics["kl"] == 0.0 and first.metrics["kl_se"] == 0.0 and first.metrics["kl_bound"] is None
    assert first.samples.responses == again.samples.responses
    assert {k: v for k, v in first.metrics.items() if k != "seconds"} == {
        k: v for k, v in again.metrics.items() if k != "seconds"}
    assert first.metrics["n_samples"] == 10
    assert first.metrics["length"] == pytest.approx(first.samples.lengths.double().mean().item())
    assert 0 <= first.metrics["eos_rate"] <= 1 and 0 < first.metrics["distinct_1"] <= 1


def test_evaluation_prompts_are_held_out_and_fixed(tiny_bridge):
    from rlhf_scratch.data import load_texts

    config = EvalConfig(n_prompts=20)
    prompts = evaluation_prompts(config, tiny_bridge.tokenizer)
    assert prompts == evaluation_prompts(config, tiny_bridge.tokenizer)
    assert len(prompts) == 20 and all(2 <= len(p) <= 8 for p in prompts)
    assert tiny_bridge.tokenizer.bos_token_id == prompts[0][0]
    # Drawn from other reviews than a trainer's prompt pool (load_texts with seed = config seed).
    assert load_texts("builtin", seed=1000)[:50] != load_texts("builtin", seed=0)[:50]
    fixed = evaluation_prompts(EvalConfig(n_prompts=3, prompt="The movie"), tiny_bridge.tokenizer)
    assert fixed == [encode(tiny_bridge.tokenizer, "The movie")] * 3


@pytest.mark.parametrize("overrides, message", [({"n_prompts": 0}, "n_prompts"), ({"prompt": ""}, "--prompt"),
                                                ({"min_prompt_tokens": 9}, "min_prompt_tokens")])
def test_eval_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**overrides)


def test_code_cell_escapes_by_hand_and_cuts_after_escaping():
    assert code_cell("a|b`c\n") == "`a\\|b'c\\n`"  # | escaped, ` as ', the newline shown as \n
    assert code_cell("a|bcdef", 3) == "`a\\|`"  # the first 3 characters of the escaped text
    assert code_cell("ab", 60) == "`ab`"
