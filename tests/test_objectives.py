"""Tests for rlhf_scratch.objectives: every loss against numbers worked out by hand."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError

from rlhf_scratch.objectives import (
    calc_clipped_surrogate,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_loss,
    entropy_per_token,
    generated_logits,
    kl_exact,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_whiten,
    ppo_diagnostics,
    taken_logprobs,
)

LOG2 = math.log(2.0)


def approx(value, rel=1e-5, abs=1e-6):
    return pytest.approx(value, rel=rel, abs=abs)


def dist_logits(*probs) -> torch.Tensor:
    """Logits [1, 1, V] whose softmax is exactly the given distribution."""
    return torch.tensor(probs, dtype=torch.float32).log().view(1, 1, -1)


# ---------------------------------------------------------------- masked_mean / masked_whiten


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == approx(7.0 / 3.0)  # (1 + 2 + 4) / 3


def test_masked_mean_ignores_nan_and_inf_at_masked_positions():
    """x * mask would give 0 * inf = nan; torch.where must keep them out."""
    x = torch.tensor([1.0, 3.0, float("inf"), float("nan")])
    mask = torch.tensor([True, True, False, False])
    assert masked_mean(x, mask).item() == approx(2.0)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_masked_whiten_by_hand_uses_unbiased_variance():
    # real values 1, 2, 3: mean 2, unbiased var ((−1)² + 0 + 1²)/(3 − 1) = 1, so whiten = −1, 0, 1.
    # (Biased var 2/3 would give ±1.2247.)
    x = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([True, True, True, False])
    assert masked_whiten(x, mask).tolist() == approx([-1.0, 0.0, 1.0, 0.0])
    # shift_mean=False: scale only, the mean 2 is added back.
    assert masked_whiten(x, mask, shift_mean=False).tolist() == approx([1.0, 2.0, 3.0, 0.0])


def test_masked_whiten_matches_torch_std_over_real_positions():
    x = torch.randn(4, 7) * 3 + 5
    mask = torch.rand(4, 7) > 0.3
    w = masked_whiten(x, mask)
    assert w[mask].mean().item() == approx(0.0, abs=1e-5)
    assert w[mask].std().item() == approx(1.0, rel=1e-4)
    assert (w[~mask] == 0).all()


def test_masked_whiten_single_real_value_gives_zero_not_nan():
    x = torch.tensor([5.0, 7.0])
    mask = torch.tensor([True, False])
    assert masked_whiten(x, mask).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- generated_logits / taken_logprobs


def test_generated_logits_picks_positions_p_minus_1_to_s_minus_2():
    batch, seq, vocab, prompt_len = 2, 7, 3, 4
    # logits[b, t, :] = t, so each slice says which position it came from.
    logits = torch.arange(seq, dtype=torch.float32).view(1, seq, 1).expand(batch, seq, vocab)
    gen = generated_logits(logits, prompt_len)
    assert gen.shape == (batch, seq - prompt_len, vocab)
    # generated token i sits at index P + i and is predicted by the logits at P − 1 + i.
    assert gen[0, :, 0].tolist() == [3.0, 4.0, 5.0]


@pytest.mark.parametrize("prompt_len", [0, 7, 9])
def test_generated_logits_rejects_prompt_len_out_of_range(prompt_len):
    with pytest.raises(ValueError, match="1 <= prompt_len < seq=7"):
        generated_logits(torch.zeros(1, 7, 3), prompt_len)


def test_taken_logprobs_matches_a_python_loop():
    batch, seq, vocab, prompt_len = 3, 8, 5, 3
    logits = torch.randn(batch, seq, vocab) * 2
    sequences = torch.randint(0, vocab, (batch, seq))
    expected = torch.empty(batch, seq - prompt_len)
    for b in range(batch):
        for i in range(seq - prompt_len):
            row = logits[b, prompt_len - 1 + i]
            token = sequences[b, prompt_len + i]
            expected[b, i] = row[token] - torch.log(torch.exp(row).sum())
    assert torch.allclose(taken_logprobs(logits, sequences, prompt_len), expected, atol=1e-5)


def test_taken_logprobs_is_stable_for_logits_around_1e4():
    """log(softmax) underflows: softmax gives exactly 0 for the token with logit −1e4, and log 0 = −inf."""
    logits = torch.tensor([[[0.0, 0.0], [1e4, -1e4], [0.0, 0.0]]])  # position 1 predicts token 2, the generated one
    sequences = torch.tensor([[0, 0, 1]])
    got = taken_logprobs(logits, sequences, prompt_len=2)
    assert got.item() == approx(-2e4)
    naive = torch.log(torch.softmax(logits[0, 1], dim=-1))[1]
    assert naive.item() == -math.inf  # the mistake this guards against


# ---------------------------------------------------------------- KL


def test_kl_exact_by_hand():
    # π = (1/2, 1/4, 1/4), π_ref = (1/4, 1/4, 1/2):
    # KL = ½·log(½ / ¼) + ¼·log(¼ / ¼) + ¼·log(¼ / ½) = ½·log 2 − ¼·log 2 = ¼·log 2.
    kl = kl_exact(dist_logits(0.5, 0.25, 0.25), dist_logits(0.25, 0.25, 0.5))
    assert kl.shape == (1, 1)
    assert kl.item() == approx(0.25 * LOG2)


def test_kl_exact_is_zero_for_equal_logits_and_ignores_a_logit_shift():
    logits = torch.randn(2, 3, 11)
    assert torch.equal(kl_exact(logits, logits), torch.zeros(2, 3))
    # Logits are defined up to a constant per position; the KL must not see it.
    assert torch.allclose(kl_exact(logits, logits + 5.0), torch.zeros(2, 3), atol=1e-5)


def test_kl_exact_is_stable_for_logits_around_1e4():
    # π puts all its mass on token 0; π_ref gives token 0 log-prob −2e4. KL = 0 − (−2e4) = 2e4.
    logits = torch.tensor([[[1e4, -1e4]]])
    ref_logits = torch.tensor([[[-1e4, 1e4]]])
    assert kl_exact(logits, ref_logits).item() == approx(2e4)
    # The mistake: log(softmax(ref)) is log 0 = −inf at token 0, so the KL is inf.
    p = torch.softmax(logits, -1)
    naive = (p * (torch.log(p) - torch.log(torch.softmax(ref_logits, -1)))).sum(-1)
    assert not torch.isfinite(naive).all()


def test_kl_exact_and_entropy_handle_minus_inf_logits():
    """A filtered token (logit −inf) has p = 0; 0·log 0 must count as 0, value and gradient."""
    logits = torch.tensor([[[0.0, -math.inf, 0.0]]], requires_grad=True)  # π = (½, 0, ½)
    ref_logits = dist_logits(0.25, 0.25, 0.5)
    # KL = ½·log(½/¼) + ½·log(½/½) = ½·log 2 ; H = log 2
    kl = kl_exact(logits, ref_logits)
    ent = entropy_per_token(logits)
    assert kl.item() == approx(0.5 * LOG2)
    assert ent.item() == approx(LOG2)
    (kl + ent).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_k1_and_k3_by_hand():
    logprobs = torch.tensor([[math.log(0.5)]])
    ref_logprobs = torch.tensor([[math.log(0.25)]])
    # k1 = log(½/¼) = log 2 ; r = ¼/½ = ½, k3 = (½ − 1) − log ½ = log 2 − ½
    assert kl_k1(logprobs, ref_logprobs).item() == approx(LOG2)
    assert kl_k3(logprobs, ref_logprobs).item() == approx(LOG2 - 0.5)


def test_k3_is_never_negative():
    logprobs = torch.randn(50, 40) * 5
    ref_logprobs = torch.randn(50, 40) * 5
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()
    # including log r = 0 exactly and tiny |log r|
    tiny = torch.tensor([[0.0, 1e-7, -1e-7, 1e-4, -1e-4]])
    assert (kl_k3(torch.zeros_like(tiny), tiny) >= 0).all()


def test_k3_keeps_precision_for_nearly_equal_logprobs():
    """exp(x) − 1 − x loses everything in float32 for x ~ 1e-4; expm1(x) − x ≈ x²/2 does not."""
    x = torch.tensor([[1e-4]])  # log r
    exact = math.expm1(x.double().item()) - x.double().item()  # ≈ 5.0002e-9
    got = kl_k3(torch.zeros_like(x), x).item()
    assert got == pytest.approx(exact, rel=1e-2)
    naive = (torch.exp(x) - 1 - x).item()
    assert naive != pytest.approx(exact, rel=1e-2)  # the mistake this guards against


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    probs = torch.tensor([0.5, 0.25, 0.25])
    ref_probs = torch.tensor([0.25, 0.25, 0.5])
    true_kl = 0.25 * LOG2
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(probs, 200_000, replacement=True, generator=generator)  # y ~ π
    logprobs = probs.log()[tokens].view(1, -1)
    ref_logprobs = ref_probs.log()[tokens].view(1, -1)
    # standard errors: k1 ≈ 0.0014, k3 ≈ 0.0005 at 200k samples
    assert kl_k1(logprobs, ref_logprobs).mean().item() == pytest.approx(true_kl, abs=0.007)
    assert kl_k3(logprobs, ref_logprobs).mean().item() == pytest.approx(true_kl, abs=0.003)


def test_calc_kl_penalty_by_hand():
    kl = torch.tensor([[0.1, 0.2], [0.3, 99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert calc_kl_penalty(kl, mask, kl_coef=0.5).item() == approx(0.5 * 0.2)  # 0.5 · (0.1+0.2+0.3)/3


# ---------------------------------------------------------------- entropy


def test_entropy_of_uniform_logits_is_log_vocab():
    for vocab in (2, 7, 50257):
        assert entropy_per_token(torch.zeros(1, 2, vocab)).tolist() == [[approx(math.log(vocab))] * 2]


def test_entropy_by_hand_and_stable_for_logits_around_1e4():
    # p = (½, ¼, ¼): H = ½·log 2 + ½·log 4 = 1.5·log 2
    assert entropy_per_token(dist_logits(0.5, 0.25, 0.25)).item() == approx(1.5 * LOG2)
    # two tokens at 1e4 share the mass, the −1e4 one has p = e^−2e4 = 0: H = log 2, not nan
    assert entropy_per_token(torch.tensor([[[1e4, 1e4, -1e4]]])).item() == approx(LOG2)


def test_calc_entropy_bonus_by_hand():
    logits = torch.cat([torch.zeros(1, 1, 4), dist_logits(0.5, 0.25, 0.125, 0.125)], dim=1)  # [1, 2, 4]
    mask = torch.tensor([[True, True]])
    # H(uniform over 4) = 2·log 2 ; H(½, ¼, ⅛, ⅛) = ½·1 + ¼·2 + 2·⅛·3 = 1.75 bits = 1.75·log 2
    expected = 0.01 * (2.0 + 1.75) / 2 * LOG2
    assert calc_entropy_bonus(logits, mask, ent_coef=0.01).item() == approx(expected)
    # with the second position masked only the uniform one counts
    assert calc_entropy_bonus(logits, torch.tensor([[True, False]]), ent_coef=0.01).item() == approx(0.02 * LOG2)


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    returns = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    # ½ · 0.5 · (1² + 2²)/2 = 0.625
    assert calc_value_loss(values, returns, mask, vf_coef=0.5).item() == approx(0.625)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.1]])
    old_values = torch.tensor([[0.5, 2.5, 0.0]])
    returns = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # c = 0.2: V_clip = 0.5 + 0.2 = 0.7, 2.5 − 0.2 = 2.3, 0.0 + 0.1 = 0.1 (inside the range)
    # unclipped² = 1, 4, 0.01 ; clipped² = 0.49, 5.29, 0.01 ; max = 1, 5.29, 0.01
    expected = 0.5 * 0.5 * (1.0 + 5.29 + 0.01) / 3
    got = calc_value_loss(values, returns, mask, vf_coef=0.5, old_values=old_values, clip_range_value=0.2)
    assert got.item() == approx(expected)


def test_value_loss_clipping_needs_old_values():
    v = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs old_values"):
        calc_value_loss(v, v, torch.ones(1, 2, dtype=torch.bool), vf_coef=1.0, clip_range_value=0.2)


# ---------------------------------------------------------------- clipped surrogate


def ratios_as_logprobs(*ratios):
    """(logprobs, old_logprobs) [1, n] whose ratio exp(logp − old_logp) is the given one."""
    logprobs = torch.tensor([ratios], dtype=torch.float64).log().float()
    return logprobs, torch.zeros_like(logprobs)


def test_surrogate_at_ratio_one_is_mean_advantage():
    advantages = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    logprobs = torch.randn(1, 4)
    # normalised advantages have mean 0 over real positions
    assert calc_clipped_surrogate(logprobs, logprobs, advantages, mask, clip_coef=0.2).item() == approx(0.0)
    # unnormalised: (1 + 2 + 6)/3 = 3
    got = calc_clipped_surrogate(logprobs, logprobs, advantages, mask, clip_coef=0.2, normalize_advantages=False)
    assert got.item() == approx(3.0)


def test_surrogate_normalises_with_unbiased_std_by_hand():
    logprobs, old = ratios_as_logprobs(1.1, 1.0, 1.0)
    advantages = torch.tensor([[1.0, 2.0, 3.0]])  # → Â = −1, 0, 1
    mask = torch.ones(1, 3, dtype=torch.bool)
    # terms: min(1.1·−1, 1.1·−1) = −1.1 (1.1 is inside 1 ± 0.2), 0, 1 → (−1.1 + 0 + 1)/3
    got = calc_clipped_surrogate(logprobs, old, advantages, mask, clip_coef=0.2)
    assert got.item() == approx(-0.1 / 3)


@pytest.mark.parametrize(
    "advantage, expected_terms, expected_grads",
    [
        # A > 0: ratio 0.7 stays (pessimistic min), 1.3 is cut to 1.2 (gradient 0)
        (2.0, [0.7 * 2, 1.0 * 2, 1.2 * 2], [0.7 * 2, 1.0 * 2, 0.0]),
        # A < 0: ratio 0.7 is cut to 0.8 (gradient 0), 1.3 stays
        (-1.0, [-0.8, -1.0, -1.3], [0.0, -1.0, -1.3]),
    ],
)
def test_surrogate_clipping_by_hand(advantage, expected_terms, expected_grads):
    logprobs, old = ratios_as_logprobs(0.7, 1.0, 1.3)
    logprobs.requires_grad_(True)
    advantages = torch.full((1, 3), advantage)
    mask = torch.ones(1, 3, dtype=torch.bool)
    objective = calc_clipped_surrogate(logprobs, old, advantages, mask, clip_coef=0.2, normalize_advantages=False)
    assert objective.item() == approx(sum(expected_terms) / 3)
    objective.backward()
    # d(ratio·A)/d logp = ratio·A where unclipped, 0 where the clipped term is chosen
    assert logprobs.grad.tolist() == [approx([g / 3 for g in expected_grads])]


def test_surrogate_clipping_engages_exactly_beyond_one_plus_minus_eps():
    logprobs, old = ratios_as_logprobs(1.19, 1.21, 0.81, 0.79)
    logprobs.requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    calc_clipped_surrogate(logprobs, old, advantages, mask, clip_coef=0.2, normalize_advantages=False).backward()
    grad = logprobs.grad[0]
    assert grad[0] != 0 and grad[2] != 0  # just inside: still pushed
    assert grad[1] == 0 and grad[3] == 0  # just outside, in the advantage's direction: no push


def test_surrogate_rejects_nonpositive_clip_coef():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_coef"):
        calc_clipped_surrogate(x, x, x, torch.ones(1, 2, dtype=torch.bool), clip_coef=0.0)


def test_ppo_diagnostics_by_hand():
    logprobs, old = ratios_as_logprobs(0.7, 1.0, 1.3, 5.0)
    mask = torch.tensor([[True, True, True, False]])  # the 5.0 is padding and must not show
    d = ppo_diagnostics(logprobs, old, mask, clip_coef=0.2)
    assert set(d) == {"approx_kl", "clipfrac", "ratio_mean", "ratio_max"}
    k3 = [(r - 1) - math.log(r) for r in (0.7, 1.0, 1.3)]
    assert d["approx_kl"].item() == approx(sum(k3) / 3)  # ≈ 0.03144
    assert d["clipfrac"].item() == approx(2 / 3)
    assert d["ratio_mean"].item() == approx(1.0)
    assert d["ratio_max"].item() == approx(1.3)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("junk", [123.0, float("inf"), float("-inf"), float("nan")])
def test_no_loss_sees_masked_positions(junk):
    """Forgetting the mask (or masking by multiplication) lets padding change the loss."""
    batch, gen, vocab = 3, 5, 7
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logits, ref_logits = torch.randn(batch, gen, vocab), torch.randn(batch, gen, vocab)
    lp, old_lp, ref_lp = torch.randn(batch, gen), torch.randn(batch, gen), torch.randn(batch, gen)
    values, old_values, returns, adv = (torch.randn(batch, gen) for _ in range(4))

    def all_losses(logits, ref_logits, lp, old_lp, ref_lp, values, old_values, returns, adv):
        out = {
            "kl_exact": calc_kl_penalty(kl_exact(logits, ref_logits), mask, 0.1),
            "kl_k1": calc_kl_penalty(kl_k1(lp, ref_lp), mask, 0.1),
            "kl_k3": calc_kl_penalty(kl_k3(lp, ref_lp), mask, 0.1),
            "entropy": calc_entropy_bonus(logits, mask, 0.01),
            "value": calc_value_loss(values, returns, mask, 0.5),
            "value_clipped": calc_value_loss(values, returns, mask, 0.5, old_values, 0.2),
            "surrogate": calc_clipped_surrogate(lp, old_lp, adv, mask, 0.2),
            "surrogate_raw": calc_clipped_surrogate(lp, old_lp, adv, mask, 0.2, normalize_advantages=False),
        }
        out.update(ppo_diagnostics(lp, old_lp, mask, 0.2))
        return out

    clean = all_losses(logits, ref_logits, lp, old_lp, ref_lp, values, old_values, returns, adv)

    def spoil(x):
        x = x.clone()
        x[~mask] = junk
        return x

    dirty = all_losses(*(spoil(t) for t in (logits, ref_logits, lp, old_lp, ref_lp, values, old_values, returns, adv)))
    for name in clean:
        assert torch.equal(clean[name], dirty[name]), name


def test_padding_gets_zero_gradient_even_when_it_holds_nan():
    mask = torch.tensor([[True, True, False]])
    lp = torch.tensor([[-1.0, -2.0, float("nan")]], requires_grad=True)
    values = torch.tensor([[0.5, 1.0, float("nan")]], requires_grad=True)
    old_lp = torch.tensor([[-1.1, -1.9, -1.0]])
    old_values = torch.tensor([[0.4, 1.1, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    surrogate = calc_clipped_surrogate(lp, old_lp, adv, mask, 0.2)
    loss = -surrogate + calc_value_loss(values, adv, mask, 0.5, old_values, 0.2)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (lp.grad, values.grad):
        assert torch.isfinite(grad).all() and grad[0, 2] == 0 and (grad[0, :2] != 0).all()


# ---------------------------------------------------------------- shapes and dtypes


def test_wrong_shapes_are_caught_by_jaxtyping():
    batch, gen = 2, 4
    mask = torch.ones(batch, gen, dtype=torch.bool)
    with pytest.raises(TypeCheckError):
        calc_value_loss(torch.zeros(batch, gen + 1), torch.zeros(batch, gen), mask, vf_coef=0.5)
    with pytest.raises(TypeCheckError):
        calc_clipped_surrogate(torch.zeros(batch, gen), torch.zeros(batch + 1, gen), torch.zeros(batch, gen), mask, 0.2)
    with pytest.raises(TypeCheckError):  # sequences [B, S'] with S' ≠ S
        taken_logprobs(torch.zeros(batch, 6, 3), torch.zeros(batch, 7, dtype=torch.long), prompt_len=2)
    with pytest.raises(TypeCheckError):  # a float mask
        masked_mean(torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeCheckError):  # vocab differs between policy and reference
        kl_exact(torch.zeros(batch, gen, 5), torch.zeros(batch, gen, 6))


def test_int_coefficients_are_accepted():
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert calc_value_loss(torch.ones(1, 2), torch.zeros(1, 2), mask, vf_coef=1).item() == approx(0.5)


def test_one_log_softmax_gives_the_rollout_quantities_bit_for_bit():
    """The rollout computes one log-softmax per forward pass and derives the rest from it; the logged values must be
    exactly those of the logits-based functions (and so of earlier releases)."""
    import torch.nn.functional as F

    from rlhf_scratch.objectives import entropy_from_logprobs, gather_taken, kl_exact_from_logprobs

    generator = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(3, 7, 50, generator=generator), torch.randn(3, 7, 50, generator=generator)
    logits[0, 2, :10] = float("-inf")  # a filtered token: p = 0, p·log p must stay 0
    sequences = torch.randint(10, 50, (3, 7), generator=generator)
    P = 3
    logp, ref_logp = F.log_softmax(generated_logits(logits, P), -1), F.log_softmax(generated_logits(ref_logits, P), -1)
    assert torch.equal(gather_taken(logp, sequences[:, P:]), taken_logprobs(logits, sequences, P))
    assert torch.equal(kl_exact_from_logprobs(logp, ref_logp), kl_exact(generated_logits(logits, P), generated_logits(ref_logits, P)))
    assert torch.equal(entropy_from_logprobs(logp), entropy_per_token(generated_logits(logits, P)))
    assert torch.isfinite(entropy_from_logprobs(logp)).all()


def test_blockwise_p_times_gives_the_one_pass_values(monkeypatch):
    """``_p_times`` (entropy, exact KL) runs over blocks of rows to keep its temporaries in the cache; the values and
    gradients must be those of one pass over the whole tensor (to rounding: another CPU may round a block layout
    differently), and both must equal torch.distributions' closed forms."""
    import torch.nn.functional as F

    from rlhf_scratch import objectives

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 64, generator=generator) * 3).requires_grad_(True)
    ref_logits = torch.randn(3, 5, 64, generator=generator) * 3
    logits.data[0, 1, :7] = float("-inf")  # filtered tokens: p = 0 must contribute exactly 0

    def entropy_and_kl_with_grad():
        logits.grad = None
        entropy, kl = entropy_per_token(logits), kl_exact(logits, ref_logits)
        (entropy.sum() + kl.sum()).backward()
        return entropy.detach(), kl.detach(), logits.grad.clone()

    monkeypatch.setattr(objectives, "_BLOCK_ELEMENTS", 10**9)  # one block: the plain one-pass computation
    one_pass = entropy_and_kl_with_grad()
    for block_elements in (64, 3 * 64, 1):  # one row per block, 3 rows, and fewer elements than a row
        monkeypatch.setattr(objectives, "_BLOCK_ELEMENTS", block_elements)
        for got, expected in zip(entropy_and_kl_with_grad(), one_pass):  # the same maths; a block layout may round
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # differently on another CPU
    policy = torch.distributions.Categorical(logits=logits.detach())
    reference = torch.distributions.Categorical(logits=ref_logits)
    torch.testing.assert_close(one_pass[0], policy.entropy(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_pass[1], torch.distributions.kl_divergence(policy, reference), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(one_pass[2]).all()
    assert F.log_softmax(logits, -1).shape == logits.shape  # (the shapes the rollout passes in)


def test_blockwise_p_times_backward_is_linear_in_the_blocks(monkeypatch):
    """The backward of the blocked ``_p_times`` gathers the blocks' gradients in one ``cat`` (split views): slices
    would fill a zero tensor the size of the whole input once per block, n_blocks × rows × V (quadratic in the rows;
    a learning step at B·G = 4096, V = 2048 spent ~0.5 s in those fills). Counted on the autograd graph: no slice
    node, whatever the number of blocks; the gradient is the closed form d/dlogp Σ p·logp = p·(logp + 1)."""
    from rlhf_scratch import objectives

    monkeypatch.setattr(objectives, "_BLOCK_ELEMENTS", 8)  # 2 rows of 4 per block: 6 blocks of 12 rows
    logp = torch.log_softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), -1).requires_grad_(True)
    total = objectives._p_times(logp, logp).sum()

    def node_names(fn, seen):
        if fn is None or fn in seen:
            return []
        seen.add(fn)
        return [type(fn).__name__] + [n for nxt, _ in fn.next_functions for n in node_names(nxt, seen)]

    names = node_names(total.grad_fn, set())
    assert not [n for n in names if n.startswith("Slice")], names
    total.backward()
    p = logp.detach().exp()
    torch.testing.assert_close(logp.grad, p * (logp.detach() + 1), rtol=1e-6, atol=1e-7)
