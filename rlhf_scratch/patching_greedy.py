"""Greedy forward selection of components to patch: the best *set* of n, not the n best singles.

``patching.patch_scan`` ranks each component by its effect *alone*. When a change is spread over components that
act together (through the final norm, or one component cancelling part of another), the best set of n components
is not the n best singles. Greedy forward selection, the usual remedy in circuit work, builds the set one
component at a time (receiver r, donor d, candidates C, metric m of the patched logits, higher is better):

    S_0 = {}
    S_k = S_{k−1} ∪ {c_k},   c_k = argmax_{c ∈ C \\ S_{k−1}} m(logits of r with S_{k−1} ∪ {c} patched from d)

The order c_1, c_2, ... is the ranking and m(S_k) the metric of each prefix. Ties go to the first candidate in
``candidates`` order. Cost: |C| + (|C| − 1) + ... + (|C| − n + 1) patched forward passes of the receiver for the
first n, and one forward of the donor per step (its logits and the activations to patch in).

The metric is a function of the patched logits and the donor's, summed over row batches:

    score_fn(logits [B, S, V], rows: slice, donor_logits [B, S, V]) -> float,
    m(S) = Σ over batches of score_fn(batch logits, rows, the donor's batch logits)

where ``rows`` says which sequences of ``tokens`` the batch holds. Each step runs batch by batch (every candidate on
one batch, then the next), so at most one batch of logits [B, S, V] is held, never one of all N sequences.
``kl_score``, ``token_prob_score`` and ``token_set_score`` build the usual ones (the negated sequence KL to the
donor; the mean probability of a token, or log-probability of a token set, at chosen positions).

    greedy_ranking(receiver, donor, tokens, attention_mask, candidates, score_fn, max_n) -> GreedyRanking
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from rlhf_scratch.patching import _parsed, donor_activations, run_patched, sequence_kl, token_set_logprob

ScoreFn = Callable[[Tensor, slice, Tensor], float]
"""score_fn(logits [B, S, V], rows, donor_logits [B, S, V]) -> float; the metric of a patched model is its sum over
batches."""


@dataclass
class GreedyRanking:
    """The greedy order and what each prefix scored.

    order: [c_1, ..., c_n];  scores: [m(S_1), ..., m(S_n)] with S_k = {c_1, ..., c_k};  empty: m({}) (the receiver);
    steps: per step k, {candidate: m(S_{k−1} ∪ {candidate})} for every candidate tried (step 1 is the singles scan).
    """

    order: list[str]
    scores: list[float]
    empty: float
    steps: list[dict[str, float]]

    def prefix(self, n: int) -> list[str]:
        """S_n: the first n components of the greedy order."""
        return self.order[:n]

    def singles(self) -> list[str]:
        """The candidates by their score alone (step 1), best first: the ranking greedy selection replaces."""
        first = self.steps[0] if self.steps else {}
        return sorted(first, key=lambda name: -first[name])


def _scores(receiver, donor, tokens, attention_mask, candidates, sets: list[list[str]], score_fn: ScoreFn,
            batch_size: int) -> list[float]:
    """m(S) for each S in ``sets``, batch by batch: one donor forward per batch, then every set on that batch."""
    totals = [0.0] * len(sets)
    device = next(receiver.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        donor_logits, acts = donor_activations(donor, tokens[rows], attention_mask[rows], candidates)
        for i, names in enumerate(sets):
            if names:
                logits = run_patched(receiver, tokens[rows], attention_mask[rows], acts, names)
            else:
                logits = receiver(tokens[rows].to(device), attention_mask=attention_mask[rows].to(device))
            totals[i] += float(score_fn(logits, rows, donor_logits))
    return totals


@torch.no_grad()
def greedy_ranking(receiver, donor, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
                   candidates: Sequence[str], score_fn: ScoreFn, max_n: int, batch_size: int = 16) -> GreedyRanking:
    """Greedy forward selection (module docstring) of up to ``max_n`` of ``candidates`` (component names as
    ``patching.components`` gives them), patched from ``donor`` into ``receiver`` on ``tokens``, ``attention_mask``
    [N, S]; ``score_fn`` (logits [B, S, V], rows, donor_logits [B, S, V]) -> float, higher is better, summed over
    batches of ``batch_size`` sequences."""
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise ValueError("candidates is empty; pass component names, e.g. patching.components(reference).")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1 (how many components to select), got {max_n}.")
    if tokens.shape != attention_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and attention_mask {tuple(attention_mask.shape)} must have the same shape [N, S].")
    _parsed(receiver, candidates)
    empty = None
    order, scores, steps = [], [], []
    for _ in range(min(max_n, len(candidates))):
        tried_names = [c for c in candidates if c not in order]
        sets = [order + [c] for c in tried_names] + ([[]] if empty is None else [])  # step 1 also scores S_0 = {}
        totals = _scores(receiver, donor, tokens, attention_mask, candidates, sets, score_fn, batch_size)
        if empty is None:
            empty = totals.pop()
        tried = dict(zip(tried_names, totals))
        best = max(tried, key=lambda c: (tried[c], -candidates.index(c)))
        order.append(best)
        scores.append(tried[best])
        steps.append(tried)
    return GreedyRanking(order=order, scores=scores, empty=empty, steps=steps)


def kl_score(scored: Bool[Tensor, "batch seq"], donor_is_policy: bool = True) -> ScoreFn:
    """m(S) = −mean over the N sequences of KL_seq (``patching.sequence_kl``) between the donor and the patched model
    P: KL(π_donor ‖ π_P) when the donor is the policy (policy → reference), else KL(π_P ‖ π_donor) (the mirror), so
    that the recovered fraction is 1 + m(S) / KL_seq(π_pol ‖ π_ref). scored [N, S] (the positions that predict
    response tokens); both log-softmaxes are taken in float64, one batch [B, S, V] at a time."""
    n = scored.shape[0]

    def score(logits: Tensor, rows: slice, donor_logits: Tensor) -> float:
        logp = F.log_softmax(logits.double().cpu(), -1)
        target, keep = F.log_softmax(donor_logits.double().cpu(), -1), scored[rows]
        kl = sequence_kl(target, logp, keep) if donor_is_policy else sequence_kl(logp, target, keep)
        return -kl.sum().item() / n

    return score


def token_prob_score(token_id: int, positions: Bool[Tensor, "batch seq"]) -> ScoreFn:
    """m(S) = mean over ``positions`` [N, S] of the patched model's p(token_id) (softmax of the logits)."""
    count = max(int(positions.sum()), 1)

    def score(logits: Tensor, rows: slice, donor_logits: Tensor | None = None) -> float:
        probs = logits.float().softmax(-1)[..., token_id].cpu()
        return (probs * positions[rows]).sum().item() / count

    return score


def token_set_score(token_ids: list[int], positions: Bool[Tensor, "batch seq"]) -> ScoreFn:
    """m(S) = mean over ``positions`` [N, S] of log Σ_{t∈T} π_P(t) (``patching.token_set_logprob``, T = token_ids)."""
    count = max(int(positions.sum()), 1)

    def score(logits: Tensor, rows: slice, donor_logits: Tensor | None = None) -> float:
        logp = F.log_softmax(logits.double().cpu(), -1)
        return (token_set_logprob(logp, token_ids) * positions[rows]).sum().item() / count

    return score
