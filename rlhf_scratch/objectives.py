"""The PPO loss terms, as pure functions of named, shaped tensors.

Shapes: B batch, P prompt length, G generated length, S = P + G, V vocab.
``gen_mask: Bool[Tensor, "batch gen"]`` is True on real generated tokens (up to
and including the first EOS) and False on the padding after it. Only real
generated positions carry loss; every mean below is over those positions only.

Signs: ``calc_clipped_surrogate`` returns an objective to *maximise*;
``calc_value_loss`` returns a loss to *minimise*; ``calc_entropy_bonus`` is added
to the objective and ``calc_kl_penalty`` subtracted from it. The trainer's loss is

    loss = −surrogate + value_loss − entropy_bonus + kl_penalty

Log-probabilities always come from ``log_softmax``, never ``log(softmax(...))``:
softmax underflows to 0 for logits far below the maximum and log(0) = −inf then
turns every sum it enters into inf or nan.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker


@jaxtyped(typechecker=typechecker)
def masked_sequence_sum(x: Float[Tensor, "batch gen"], mask: Bool[Tensor, "batch gen"]) -> Float[Tensor, "batch"]:
    """Σ_t x[b, t] over the positions where ``mask[b, t]`` is True, per row.      [B, G] -> [B]

    E.g. the log-prob of a whole response, log π(y) = Σ_t log π(y_t) over its real tokens.
    """
    # torch.where, not x * mask: a −inf log-prob at a padded position would give 0·inf = nan.
    return torch.where(mask, x, torch.zeros_like(x)).sum(dim=1)


@jaxtyped(typechecker=typechecker)
def masked_mean(x: Float[Tensor, "*shape"], mask: Bool[Tensor, "*shape"]) -> Float[Tensor, ""]:
    """Mean of ``x`` over the positions where ``mask`` is True.

    masked_mean = Σ x·mask / max(Σ mask, 1)     x, mask: any shape (the same); returns []

    Returns 0 when the mask is all False (rather than 0/0 = nan).
    """
    # torch.where, not x * mask: a nan or inf at a masked position would give 0·inf = nan.
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    count = mask.sum().clamp(min=1)
    return total / count


@jaxtyped(typechecker=typechecker)
def masked_whiten(
    x: Float[Tensor, "*shape"], mask: Bool[Tensor, "*shape"], shift_mean: bool = True,
    moments_of: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "*shape"]:
    """Normalise ``x`` to mean 0, std 1 over the positions where ``mask`` is True.

    whiten(x) = (x − μ) / sqrt(σ² + 1e-8),  μ, σ² the mean and variance of x[mask]
    x, mask: any shape (the same); returns the shape of x, with 0 at masked positions.

    σ² is the *unbiased* variance, Σ(x − μ)² / (n − 1), to match ``torch.std`` (and
    TRL's ``masked_whiten``), so the result's real positions have ``.std() == 1``.
    With a single real position (n = 1) the variance is taken as 0, so the result is 0.

    ``shift_mean=False`` (TRL convention) rescales without centring: the mean is
    added back, whiten(x) + μ, so only the spread is normalised.

    ``moments_of=(x_all, mask_all)`` takes μ and σ² over ``x_all[mask_all]`` instead: a piece of a
    minibatch (one rank's slice, or one micro-batch) is then whitened exactly as inside the whole one.
    """
    if moments_of is not None:
        x_all, mask_all = moments_of
        mean = masked_mean(x_all, mask_all)
        var = (torch.where(mask_all, x_all - mean, torch.zeros_like(x_all)) ** 2).sum() / (mask_all.sum() - 1).clamp(min=1)
        centred = torch.where(mask, x - mean, torch.zeros_like(x))
    else:
        mean = masked_mean(x, mask)
        centred = torch.where(mask, x - mean, torch.zeros_like(x))
        n = mask.sum()
        var = (centred**2).sum() / (n - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


@jaxtyped(typechecker=typechecker)
def generated_logits(logits: Float[Tensor, "batch seq vocab"], prompt_len: int) -> Float[Tensor, "batch gen vocab"]:
    """The logits that predict the generated tokens.

    generated_logits = logits[:, P−1 : S−1]      [B, S, V] -> [B, G, V], G = S − P

    Position t's logits predict token t+1, so generated token i (at sequence index
    P + i) is predicted by the logits at index P − 1 + i; the last position's
    logits predict a token that was never generated and are dropped.
    """
    seq = logits.shape[1]
    if not 1 <= prompt_len < seq:
        raise ValueError(
            f"prompt_len={prompt_len} must satisfy 1 <= prompt_len < seq={seq}: pass the (left-padded) "
            "prompt length P of sequences that hold P prompt tokens followed by at least one generated token."
        )
    return logits[:, prompt_len - 1 : -1]


@jaxtyped(typechecker=typechecker)
def taken_logprobs(
    logits: Float[Tensor, "batch seq vocab"], sequences: Int[Tensor, "batch seq"], prompt_len: int
) -> Float[Tensor, "batch gen"]:
    """Log-probability of each generated token under ``logits``.

    taken_logprobs[b, i] = log_softmax(logits[b, P−1+i])[sequences[b, P+i]]
    logits [B, S, V], sequences [B, S] -> [B, G]
    """
    return gather_taken(F.log_softmax(generated_logits(logits, prompt_len), dim=-1), sequences[:, prompt_len:])


@jaxtyped(typechecker=typechecker)
def gather_taken(logp_gen: Float[Tensor, "batch gen vocab"], tokens: Int[Tensor, "batch gen"]) -> Float[Tensor, "batch gen"]:
    """The log-prob of each generated token from the log-distributions that predict them.

    gather_taken[b, i] = logp_gen[b, i, tokens[b, i]]      [B, G, V], [B, G] -> [B, G]

    With ``kl_exact_from_logprobs`` and ``entropy_from_logprobs``, one log-softmax per forward pass gives every
    full-vocabulary quantity of a rollout (the same values, bit for bit, as computing each from the logits).
    """
    return torch.gather(logp_gen, dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)


_BLOCK_ELEMENTS = 1 << 20
"""Elements per block of ``_p_times`` (4 MiB of float32): its temporaries stay in the CPU's cache."""


def generated_logprobs(logits: Float[Tensor, "batch seq vocab"], sequences: Int[Tensor, "batch seq"], prompt_len: int,
                       temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """A pass's logits [B, S, V] over ``sequences`` [B, S] → ``(logits_gen, logp_gen, logprobs)``: the logits that
    predict the generated tokens at the sampling temperature [B, G, V], their log-softmax [B, G, V] and the taken
    tokens' log-probs [B, G]. One vocabulary-wide log-softmax per pass serves the taken log-probs, the entropy and
    the exact KL; only the generated positions are scaled, and nothing is copied at T = 1. The rollout's policy
    and reference passes and every learning pass read their logits through it."""
    logits_gen = generated_logits(logits, prompt_len)
    if temperature != 1:
        logits_gen = logits_gen / temperature
    logp_gen = F.log_softmax(logits_gen, dim=-1)
    return logits_gen, logp_gen, gather_taken(logp_gen, sequences[:, prompt_len:])


def _p_times(logp: Tensor, y: Tensor | Callable[[Tensor, slice], Tensor]) -> Tensor:
    """Σ_v p(v)·y(v) with p = exp(logp), taking 0·y = 0 where p = 0.          [..., V] -> [...]

    A logit of −inf (a filtered token) gives p = 0 and log p = −inf, and 0·(−inf)
    is nan; the limit p·log p → 0 is the right value. The second torch.where keeps
    the gradient finite too (the gradient of the unused branch would be 0·inf).

    Computed by blocks of whole rows of about ``_BLOCK_ELEMENTS`` elements: the same values, bit for bit,
    as one pass over the whole tensor (each row's sum is computed alone either way), about 2.5× faster on a
    CPU at a 50k vocabulary, where the five full-size temporaries of one pass do not fit in the cache.
    ``y`` may be a function of (logp block, row slice) so that a difference such as logp − ref_logp is never
    built whole either.

    The blocks are ``split`` views, not slices: the backward of a split is one ``cat`` of the blocks' gradients,
    where each slice's backward fills a zero tensor the size of the whole [rows, V] (n_blocks of them: quadratic in
    the rows, 16 fills of [B·G, V] per learning step at B·G = 4096, V = 2048; found by ``cost_curves.py``).
    """
    vocab = logp.shape[-1]
    flat = logp.reshape(-1, vocab)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    y_blocks = None if callable(y) else y.reshape(-1, vocab).split(rows_per_block)
    blocks = []
    for k, logp_block in enumerate(flat.split(rows_per_block) if flat.shape[0] else ()):
        rows = slice(k * rows_per_block, k * rows_per_block + logp_block.shape[0])
        y_block = y(logp_block, rows) if callable(y) else y_blocks[k]
        p = logp_block.exp()
        blocks.append((p * torch.where(p > 0, y_block, torch.zeros_like(y_block))).sum(-1))
    return (torch.cat(blocks) if blocks else flat.sum(-1)).reshape(logp.shape[:-1])


@jaxtyped(typechecker=typechecker)
def kl_exact(
    logits_gen: Float[Tensor, "batch gen vocab"], ref_logits_gen: Float[Tensor, "batch gen vocab"]
) -> Float[Tensor, "batch gen"]:
    """Exact KL(π ‖ π_ref) at each position, summed over the whole vocabulary.

    kl[b, t] = Σ_v π(v)·(log π(v) − log π_ref(v)),  π = softmax(logits_gen[b, t])
    logits_gen, ref_logits_gen [B, G, V] -> [B, G]
    """
    return kl_exact_from_logprobs(F.log_softmax(logits_gen, dim=-1), F.log_softmax(ref_logits_gen, dim=-1))


@jaxtyped(typechecker=typechecker)
def kl_exact_from_logprobs(
    logp_gen: Float[Tensor, "batch gen vocab"], ref_logp_gen: Float[Tensor, "batch gen vocab"]
) -> Float[Tensor, "batch gen"]:
    """``kl_exact`` from log-distributions already computed:  Σ_v exp(logp)·(logp − ref_logp)   [B, G, V] x 2 -> [B, G]"""
    ref_flat = ref_logp_gen.reshape(-1, ref_logp_gen.shape[-1])
    return _p_times(logp_gen, lambda logp_block, rows: logp_block - ref_flat[rows])


@jaxtyped(typechecker=typechecker)
def kl_k1(logprobs: Float[Tensor, "batch gen"], ref_logprobs: Float[Tensor, "batch gen"]) -> Float[Tensor, "batch gen"]:
    """k1 estimator of KL(π ‖ π_ref) from the sampled token's log-probs.

    k1 = log π(y) − log π_ref(y)      [B, G] -> [B, G]

    Unbiased when y ~ π, but can be negative on a single sample.
    """
    return logprobs - ref_logprobs


@jaxtyped(typechecker=typechecker)
def kl_k3(logprobs: Float[Tensor, "batch gen"], ref_logprobs: Float[Tensor, "batch gen"]) -> Float[Tensor, "batch gen"]:
    """k3 estimator of KL(π ‖ π_ref) from the sampled token's log-probs (Schulman 2020).

    k3 = (r − 1) − log r,  r = π_ref(y)/π(y),  log r = log π_ref(y) − log π(y)    [B, G] -> [B, G]

    Unbiased when y ~ π and never negative (e^x − 1 ≥ x), with lower variance than k1.
    """
    log_r = ref_logprobs - logprobs
    # expm1(x) − x, not exp(x) − 1 − x: for small x, exp(x) rounds to 1 and the
    # answer (≈ x²/2) is lost. A rounded expm1(x) stays >= x, so k3 stays >= 0.
    return torch.expm1(log_r) - log_r


@jaxtyped(typechecker=typechecker)
def calc_kl_penalty(
    kl_per_token: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"], kl_coef: float
) -> Float[Tensor, ""]:
    """KL penalty, to be *subtracted* from the objective (added to the loss).

    penalty = kl_coef · masked_mean(kl_per_token, gen_mask)     [B, G] -> []

    ``kl_per_token`` is any per-token estimate: ``kl_exact``, ``kl_k1`` or ``kl_k3``.
    """
    return kl_coef * masked_mean(kl_per_token, gen_mask)


@jaxtyped(typechecker=typechecker)
def entropy_per_token(logits_gen: Float[Tensor, "batch gen vocab"]) -> Float[Tensor, "batch gen"]:
    """Entropy of the next-token distribution at each position.

    H[b, t] = −Σ_v p(v)·log p(v),  p = softmax(logits_gen[b, t])     [B, G, V] -> [B, G]
    """
    return entropy_from_logprobs(F.log_softmax(logits_gen, dim=-1))


@jaxtyped(typechecker=typechecker)
def entropy_from_logprobs(logp_gen: Float[Tensor, "batch gen vocab"]) -> Float[Tensor, "batch gen"]:
    """``entropy_per_token`` from a log-distribution already computed:  −Σ_v exp(logp)·logp      [B, G, V] -> [B, G]"""
    return -_p_times(logp_gen, logp_gen)


@jaxtyped(typechecker=typechecker)
def calc_entropy_bonus(
    logits_gen: Float[Tensor, "batch gen vocab"], gen_mask: Bool[Tensor, "batch gen"], ent_coef: float
) -> Float[Tensor, ""]:
    """Entropy bonus, to be *added* to the objective (subtracted from the loss).

    bonus = ent_coef · masked_mean(H, gen_mask),  H = entropy_per_token(logits_gen)
    logits_gen [B, G, V], gen_mask [B, G] -> []
    """
    return calc_entropy_bonus_from_logprobs(F.log_softmax(logits_gen, dim=-1), gen_mask, ent_coef)


@jaxtyped(typechecker=typechecker)
def calc_entropy_bonus_from_logprobs(
    logp_gen: Float[Tensor, "batch gen vocab"], gen_mask: Bool[Tensor, "batch gen"], ent_coef: float
) -> Float[Tensor, ""]:
    """``calc_entropy_bonus`` from a log-distribution already computed (the learning pass's one log-softmax):
    ent_coef · masked_mean(−Σ_v exp(logp)·logp, gen_mask)      [B, G, V], [B, G] -> []"""
    return ent_coef * masked_mean(entropy_from_logprobs(logp_gen), gen_mask)


@jaxtyped(typechecker=typechecker)
def calc_value_loss(
    values: Float[Tensor, "batch gen"],
    returns: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"],
    vf_coef: float,
    old_values: Float[Tensor, "batch gen"] | None = None,
    clip_range_value: float | None = None,
) -> Float[Tensor, ""]:
    """Value-head loss, to be *minimised*.

    unclipped:  loss = ½ · vf_coef · masked_mean((V − R)²)
    clipped:    V_clip = V_old + clamp(V − V_old, −c, c)
                loss = ½ · vf_coef · masked_mean(max((V − R)², (V_clip − R)²))
    values, returns, old_values, gen_mask [B, G] -> []

    Clipping (PPO2 convention) takes the *larger* error, so it never rewards moving
    the value more than c away from the rollout's value ``old_values``. It is used
    when ``clip_range_value`` is given, which then needs ``old_values``.
    """
    if clip_range_value is not None:
        if old_values is None:
            raise ValueError(
                "clip_range_value needs old_values (the values recorded at rollout time); pass both or neither."
            )
        if clip_range_value <= 0:
            raise ValueError(f"clip_range_value={clip_range_value} must be > 0, or None to turn value clipping off.")
    # Zero the padding first: junk there (even nan) then reaches neither the value nor the gradient.
    zero = torch.zeros_like(values)
    values = torch.where(gen_mask, values, zero)
    returns = torch.where(gen_mask, returns, zero)
    sq_err = (values - returns) ** 2
    if clip_range_value is not None:
        old_values = torch.where(gen_mask, old_values, zero)
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        sq_err = torch.maximum(sq_err, (values_clipped - returns) ** 2)
    return 0.5 * vf_coef * masked_mean(sq_err, gen_mask)


@jaxtyped(typechecker=typechecker)
def clipped_surrogate_per_token(
    logprobs: Float[Tensor, "batch gen"],
    old_logprobs: Float[Tensor, "batch gen"],
    advantages: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"],
    clip_coef: float,
) -> Float[Tensor, "batch gen"]:
    """The clipped surrogate of each token, 0 on padding (to be aggregated, then *maximised*).

    ratio_t = exp(log π(y_t) − log π_old(y_t))
    s_t = min(ratio_t·A_t, clip(ratio_t, 1 − ε, 1 + ε)·A_t)          [B, G] -> [B, G]

    The min makes it a pessimistic bound: once the ratio has moved past 1 ± ε in the
    direction the advantage favours, the clipped term wins and its gradient is 0.
    """
    if clip_coef <= 0:
        raise ValueError(f"clip_coef={clip_coef} must be > 0 (typical: 0.2).")
    # Zero the padding before exp: a junk logprob there could otherwise give ratio = inf
    # and a nan gradient even though the aggregation hides its value.
    zero = torch.zeros_like(logprobs)
    ratio = torch.exp(torch.where(gen_mask, logprobs - old_logprobs, zero))
    advantages = torch.where(gen_mask, advantages, zero)
    clipped = torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * advantages
    return torch.where(gen_mask, torch.minimum(ratio * advantages, clipped), zero)


@jaxtyped(typechecker=typechecker)
def calc_clipped_surrogate(
    logprobs: Float[Tensor, "batch gen"],
    old_logprobs: Float[Tensor, "batch gen"],
    advantages: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"],
    clip_coef: float,
    normalize_advantages: bool = True,
) -> Float[Tensor, ""]:
    """PPO clipped surrogate objective, to be *maximised* (the loss is its negative).

    ratio = exp(log π(y) − log π_old(y))
    Â = masked_whiten(A, gen_mask)  (mean 0, std 1 over this minibatch's real positions)
    objective = masked_mean(min(ratio·Â, clip(ratio, 1 − ε, 1 + ε)·Â))   (``clipped_surrogate_per_token``)
    logprobs, old_logprobs, advantages, gen_mask [B, G] -> []
    """
    if normalize_advantages:
        advantages = masked_whiten(advantages, gen_mask)
    return masked_mean(clipped_surrogate_per_token(logprobs, old_logprobs, advantages, gen_mask, clip_coef), gen_mask)


@jaxtyped(typechecker=typechecker)
def aggregate_tokens(
    x: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"], mode: str, max_tokens: int | None = None
) -> Float[Tensor, ""]:
    """One number from per-token values, as the policy-gradient families weigh tokens.     [B, G] -> []

    "token-mean"     Σ_b Σ_t x·m / Σ_b Σ_t m          every token alike (PPO here, DAPO)
    "sequence-mean"  (1/B) Σ_b (Σ_t x·m / |y_b|)       every response alike (GRPO): a token of a short
                                                       response weighs more than one of a long response
    "constant"       (1/B) Σ_b Σ_t x·m / L             Dr. GRPO: L = ``max_tokens`` (the generation budget),
                                                       so no length bias from the per-response division
    """
    if mode == "token-mean":
        return masked_mean(x, gen_mask)
    sums = masked_sequence_sum(x, gen_mask)
    if mode == "sequence-mean":
        return (sums / gen_mask.sum(1).clamp(min=1)).mean()
    if mode == "constant":
        if not max_tokens or max_tokens < 1:
            raise ValueError(f'mode "constant" needs max_tokens >= 1 (the generation budget), got {max_tokens}.')
        return sums.mean() / max_tokens
    raise ValueError(f'Unknown aggregation {mode!r}: use "token-mean", "sequence-mean" or "constant".')


@jaxtyped(typechecker=typechecker)
def approx_kl(
    logprobs: Float[Tensor, "batch gen"], old_logprobs: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"]
) -> Float[Tensor, ""]:
    """k3 estimate of KL(π_old ‖ π) over real positions (no grad), as CleanRL logs it:

    approx_kl = masked_mean((r − 1) − log r),  r = exp(log π − log π_old)     [B, G] -> []
    """
    with torch.no_grad():
        log_ratio = torch.where(gen_mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
        return masked_mean(torch.expm1(log_ratio) - log_ratio, gen_mask)


@jaxtyped(typechecker=typechecker)
def ppo_diagnostics(
    logprobs: Float[Tensor, "batch gen"],
    old_logprobs: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"],
    clip_coef: float,
) -> dict[str, Tensor]:
    """How far the policy has moved from the rollout policy, over real positions (no grad).

    ratio = exp(log π − log π_old)                                          [B, G]
    "approx_kl":  ``approx_kl``: masked_mean((ratio − 1) − log ratio), k3 estimate of KL(π_old ‖ π)
    "clipfrac":   masked_mean(|ratio − 1| > ε)           fraction of tokens outside the clip range
    "ratio_mean": masked_mean(ratio)
    "ratio_max":  max of ratio over real positions (0 if there are none)
    Each value is a 0-d tensor.
    """
    with torch.no_grad():
        log_ratio = torch.where(gen_mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
        ratio = torch.exp(log_ratio)
        return {
            "approx_kl": approx_kl(logprobs, old_logprobs, gen_mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).to(ratio.dtype), gen_mask),
            "ratio_mean": masked_mean(ratio, gen_mask),
            # ratio > 0, so filling the padding with 0 leaves the max over real positions.
            "ratio_max": torch.where(gen_mask, ratio, torch.zeros_like(ratio)).max(),
        }


def per_token_kl(estimator: str, logprobs: Tensor, ref_logprobs: Tensor, logits_gen: Tensor | None = None,
                 ref_logits_gen: Tensor | None = None) -> Tensor:
    """KL_t [B, G] with ``estimator``: "exact" (full vocabulary, from the logits), "k3" or "k1" (sampled token)."""
    if estimator == "exact":
        return kl_exact(logits_gen, ref_logits_gen)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    return kl_k1(logprobs, ref_logprobs)
