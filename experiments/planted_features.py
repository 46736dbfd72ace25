#!/usr/bin/env python
"""The planted behaviour, read as features: does a crosscoder find the planted word as a policy-only latent?

    python experiments/planted_features.py --runs runs/planted --mode early --word director story --algorithms ppo grpo

Reads the policies ``experiments/planted_behaviour.py`` cached in RUNS/WORD/ALGORITHM_seedS/checkpoint (RUNS/WORD_MODE/
for ``--mode`` other than presence, as that script names them) and the reward-0 controls in
RUNS/control/ppo_seedC/checkpoint (``--control-seeds``); train them with that script first. For each policy and word W
(token id t):

1. Both models read the same tokens: ``--n-texts`` held-out texts (32 tokens each) and, for ``--n-samples``
   held-out prompts, the policy's *and the reference's* samples (a mixed sample: responses with and without W).
   A BatchTopK crosscoder (``rlhf_scratch.crosscoder``) is trained on their paired activations at
   ``blocks.{layer}.hook_resid_post`` (default: the last layer), BOS excluded. None of this depends on W, so a
   control's crosscoder is trained once and read for every word (the same numbers as one run per word).
2. Per alive latent j: the relative decoder norm r_j and Minder, Dumas et al.'s norm difference Δ_j (policy-only:
   Δ ≥ 0.9, i.e. ‖d^pol‖ ≥ 5 ‖d^ref‖, r ≥ 5/6; ``crosscoder.latent_class``); the rank of t in its logit effect
   through the policy's final norm and unembedding (1 = largest); Latent Scaling ν^ε, ν^r (specific: ν^ε < 0.2
   and ν^r < 0.5, ``crosscoder.is_specific``); and, with R_s the reward ``word:W:MODE`` of response s (the reward the
   policy was trained on) and a_j,p the latent's activation at position p:

       ρ_tok_j = Spearman(a_j,p, R_p) over every position p that predicts a response token of the 2n pooled
                 responses, where R_p = the reward paid for the token at p + 1: 1/(1 + i) (``early``; 1 for
                 ``first``/``presence``, the response's reward for ``share``/``count``) when that token starts W's
                 first occurrence in its response (i its index among the response's words, case-insensitive, as
                 ``word_reward`` counts them), else 0. Summed over a response, R_p gives the response's reward.
       D_j     = Somers' D of a_j,p with respect to R_p over the same positions: over the pairs of positions
                 whose R differ, P(the one with the larger R has the larger activation) − P(the smaller); ties in
                 the activation count 0 (``somers_d``). R is 0 at ~97 % of positions; Spearman's ρ_tok against
                 so tied a variable stays near 0.3 even for an activation that orders the positions as R does
                 (√(3p(1 − p)) ≈ 0.30 at a base rate p of 3 %), while D is then 1.               THIS ONE DECIDES.
       AUROC_j = P(a_j,p > a_j,q) + ½ P(a_j,p = a_j,q) for p with R_p > 0 and q with R_q = 0, over the same
                 positions (Mann–Whitney U / (n₊ n₋), ties at half): how well the latent's activation picks out
                 the positions that are followed by a rewarded W (0.5 = chance).
       ρ_resp_j = Spearman(A_j,s, R_s) over the 2n pooled responses s (n the policy's, n the reference's),
                 A_j,s = max a_j,p over the positions p that predict a token of s (its last prompt token through
                 its second-to-last response token: where the distribution that chose each response token is read,
                 ``patching.scored_positions``), R_s the reward ``word:W:MODE`` of response s.
       ρ_pol_j = the same Spearman over the policy's n responses only (with ``early`` the reward still varies there
                 with W's word index i: 1, ½, ⅓, ...; nan if it is constant).

   Why a per-token correlation decides (a choice made on 2026-12-07, after the runs in experiments/README.md had shown
   ρ_resp negative for every latent that writes W): a latent whose logit effect is W fires *before* W, as the
   policy's pull towards it. Both models read the same tokens, so on a reference response, which lacks W, the
   pull stays on for longer, and on the policy's own response it stops once W is out: its largest activation per
   response is highest where the reward is 0, whatever the latent's quality. The ``early`` reward is a sum of
   payments for single tokens, and the token a latent's activation at p bears on is the one at p + 1, so that
   payment is the reward it can correlate with; D measures that correlation on the scale the 0.3 threshold
   was set for (Spearman's ρ_tok, capped near 0.3 here, is stated beside it). ρ_tok, AUROC, ρ_resp and ρ_pol decide
   nothing.
   Per latent the table also gives the "activation shift": its mean activation at the positions predicting the
   policy's response tokens, the reference's, and at held-out text positions, and the policy's share of its encoder
   pre-activation where it fires, mean of ⟨x̃_pol, W_enc[pol]_j⟩ / (|⟨x̃_ref, W_enc[ref]_j⟩| + |⟨x̃_pol, W_enc[pol]_j⟩|);
   and the latent's reference half: ‖d^ref‖ / ‖d^pol‖ and cos(d^ref, d^pol) in raw units, and the three tokens it
   writes most through the reference's final norm and unembedding (what a near-policy-only latent shares with the
   reference: for the planted words, a slot other review nouns fill).
3. The check *fires* when some latent is policy-only, specific, ranks t in its top 10 and has D ≥ 0.3. A trained
   policy passes when it fires, the control when it does not. Writes OUT/table.md, OUT/latents.md (every latent
   that is policy-only or ranks W in its top 10, with all the figures above, and the most policy-leaning latents),
   OUT/results.json and OUT/crosscoders/POLICY.pt (each crosscoder, for ``crosscoder.from_state``). Without the
   policy-only requirement, the table also gives the most policy-leaning latent with t in its top 10.

This file is separate from planted_behaviour.py / planted_checks.py; ``feature_check(reference, policy, word)`` is the
function a later version of those can call (``collect`` + ``train`` + ``analyse``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhf_scratch.crosscoder import (
    CrosscoderSettings,
    Crosscoder,
    decoder_directions,
    encode_all,
    explained_variance,
    is_specific,
    latent_class,
    latent_scaling,
    norm_difference,
    state,
    train_crosscoder,
)
from rlhf_scratch.crosscoder_report import PairedActivations, logit_effects, paired_activations
from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table
from rlhf_scratch.models import load_bridge
from rlhf_scratch.patching import scored_positions
from rlhf_scratch.patching_report import policy_samples
from rlhf_scratch.sampling import encode, left_pad, padding_id
from rlhf_scratch.word_reward import WordReward

MAX_RANK, MIN_D = 10, 0.3
SETTINGS = dict(n_latents=512, k=8, steps=3000, batch_size=512)
N_TEXTS, N_SAMPLES = 1024, 256
"""Held-out texts and prompts (each answered by both models): about 35,000 paired positions. Twice the 512 / 128 of
the first runs, at the same training cost (3000 steps of 512): with 512 / 128 GRPO's W latent on story fell just
short of policy-only for both crosscoder seeds (Δ 0.899, 0.853), with these it is policy-only for both (0.901,
0.907); experiments/README.md, "Item 3 per token"."""
_WORD = re.compile(r"[A-Za-z0-9']+")  # word_reward's notion of a word


def average_ranks(x: Tensor) -> Tensor:
    """[N] -> [N] float64 ranks from 0 (ties share their mean rank)."""
    x = x.double()
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(x)
    ranks[order] = (starts.double() + (counts.double() - 1) / 2)[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks (ties share their mean rank); nan if one is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float("nan") if denominator == 0 else (ra * rb).sum().item() / denominator.item()


def auroc(scores: Tensor, positive: Tensor) -> float:
    """P(score of a positive > score of a negative) + ½ P(equal) = (Σ ranks of the positives − n₊(n₊ − 1)/2) / (n₊ n₋)
    with ranks from 0 (scores [N], positive [N] bool); nan without positives or without negatives."""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return (average_ranks(scores)[positive].sum().item() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg)


def somers_d(scores: Tensor, y: Tensor) -> float:
    """Somers' D of ``scores`` with respect to ``y`` (both [N]): over the pairs of positions whose y differ, P(the
    one with the larger y has the larger score) − P(it has the smaller score); ties in the score count 0. A rank
    correlation in [−1, 1] that, unlike Spearman's, does not shrink when y is tied at most positions (for a binary y
    it is 2 AUROC − 1). Computed as Σ_{a<b} n_a n_b (2 AUROC(group b vs group a) − 1) / Σ_{a<b} n_a n_b over y's
    distinct values a < b; nan if y is constant."""
    values = torch.unique(y)
    pairs = concordance = 0.0
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            low, high = y == values[a], y == values[b]
            n_pairs = float(low.sum()) * float(high.sum())
            both = low | high
            concordance += n_pairs * (2 * auroc(scores[both], high[both]) - 1)
            pairs += n_pairs
    return concordance / pairs if pairs else float("nan")


def per_response_max(f: Tensor, response_of: Tensor, n_responses: int) -> Tensor:
    """[R, F]: for each response, the largest activation of each latent over its positions (f [N, F], response_of [N]
    the response index of each position or −1); 0 for a response with no position."""
    on = response_of >= 0
    out = torch.zeros(n_responses, f.shape[1])
    return out.scatter_reduce(0, response_of[on][:, None].expand(-1, f.shape[1]), f[on], reduce="amax", include_self=True)


def rewarded_token(reward: WordReward, decode, response_ids: list[int]) -> tuple[int | None, float]:
    """(index k in ``response_ids`` of the token where W's first occurrence starts, or None; the reward paid there):
    the response's reward for ``reward`` (word_reward's score of the decoded response) when W occurs, else 0.
    Token k is the one whose decoded span [len(decode(ids[:k])), len(decode(ids[:k+1]))) holds W's first letter."""
    text = decode(response_ids)
    match = next((m for m in _WORD.finditer(text) if m.group().lower() == reward.word.lower()), None)
    if match is None:
        return None, 0.0
    for k in range(len(response_ids)):
        if len(decode(response_ids[: k + 1])) > match.start():
            return k, reward.score_one(text)
    raise ValueError(f"could not place {reward.word!r} at character {match.start()} in {text!r}")


@dataclass
class Collected:
    """What both models read for one policy (independent of the word): paired activations and the response map."""

    paired: PairedActivations
    response_of: Tensor
    """[N] index of the response (0..2n−1: the policy's n, then the reference's n) whose token position n predicts,
    or −1 (held-out text, prompt positions before the last, the last response token)."""
    next_index: Tensor
    """[N] index within that response of the token position n predicts, or −1."""
    response_ids: list[list[int]]
    """[2n] each response's token ids."""
    n: int
    n_texts: int
    layer: int
    seconds: float


def collect(reference, policy, seed: int = 0, layer: int | None = None, n_texts: int = N_TEXTS,
            n_samples: int = N_SAMPLES, max_new_tokens: int = 24) -> Collected:
    """Held-out texts and both models' responses to the same prompts, read by both models at the hook (docstring)."""
    start = time.time()
    layer = reference.cfg.n_layers - 1 if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_post"
    tokenizer = policy.tokenizer
    texts = load_texts("builtin", seed=seed + HELDOUT_SEED_OFFSET)
    encode_text = lambda text: encode(tokenizer, text, prepend_bos=True)  # noqa: E731
    rows = [encode_text(t)[:32] for t in texts[:n_texts]]
    prompts = prompts_from_texts(texts[n_texts:], encode_text, n_samples, seed=seed + HELDOUT_SEED_OFFSET + 2,
                                 decode=tokenizer.decode)
    response_ids, next_rows = [], []
    for model in (policy, reference):  # the mixed sample: each model's responses to the same prompts
        sample_tokens, sample_mask, response = policy_samples(model, prompts, max_new_tokens, 32, seed)
        within = response.long().cumsum(dim=1) - 1  # [n, S] index within the response at response tokens
        predicts = scored_positions(response)  # [n, S]: positions whose next token is a response token
        next_index = torch.where(predicts, torch.cat([within[:, 1:], within[:, :1]], dim=1), torch.full_like(within, -1))
        for r in range(len(prompts)):
            real = sample_mask[r].bool()
            response_ids.append(sample_tokens[r][response[r]].tolist())
            rows.append(sample_tokens[r][real].tolist())
            next_rows.append(next_index[r][real])
    tokens, mask = left_pad(rows, padding_id(tokenizer))
    width = tokens.shape[1]
    next_in_row = torch.full_like(tokens, -1)  # left_pad keeps each row's tail aligned
    for i, row in enumerate(next_rows):
        next_in_row[n_texts + i, width - len(row):] = row
    sources = ["text"] * n_texts + ["policy sample"] * len(prompts) + ["reference sample"] * len(prompts)
    paired = paired_activations(reference, policy, hook, tokens, mask, sources, skip_first=True)
    next_index = next_in_row[paired.row, paired.position]
    response_of = torch.where(next_index >= 0, paired.row - n_texts, torch.full_like(paired.row, -1))
    return Collected(paired, response_of, next_index, response_ids, len(prompts), n_texts, layer, time.time() - start)


@dataclass
class Trained:
    """A crosscoder on one ``Collected`` and what does not depend on the word."""

    model: Crosscoder
    f: Tensor
    """[N, F] activations (inference rule)."""
    policy_share: Tensor
    """[F] mean policy share of the encoder pre-activation where the latent fires (nan if it never fires)."""
    effect: Tensor
    """[F, V] logit effect of the policy half d^pol through the policy."""
    reference_effect: Tensor
    """[F, V] logit effect of the reference half d^ref through the reference."""
    explained_variance: dict
    seconds: float


def train(collected: Collected, reference, policy, settings: CrosscoderSettings) -> Trained:
    start = time.time()
    model = train_crosscoder(collected.paired.x, settings)
    seconds = time.time() - start
    f, _ = encode_all(model, collected.paired.x)
    with torch.no_grad():
        x_norm = model.normalise(collected.paired.x)
        ref_half, pol_half = (x_norm[:, m] @ model.W_enc[m] for m in range(2))  # [N, F] each
        share = pol_half / (ref_half.abs() + pol_half.abs()).clamp_min(1e-12)
        on = (f > 0).float()
        policy_share = (share * on).sum(dim=0) / on.sum(dim=0)
    effect = logit_effects(policy, decoder_directions(model, 1))
    reference_effect = logit_effects(reference, decoder_directions(model, 0))
    return Trained(model, f, policy_share, effect, reference_effect, explained_variance(model, collected.paired.x),
                   seconds)


def analyse(collected: Collected, trained: Trained, word: str, mode: str, tokenizer) -> dict:
    """Per word: the candidate latents (policy-only, or W in the logit-effect top 10) with every figure, and the
    check's verdict (module docstring)."""
    reward = WordReward(word, mode=mode, tokenizer=tokenizer)
    model, f, n = trained.model, trained.f, collected.n
    responses = [tokenizer.decode(ids) for ids in collected.response_ids]
    rewards = reward(responses)  # [2n]: the policy's responses, then the reference's
    placed = [rewarded_token(reward, tokenizer.decode, ids) for ids in collected.response_ids]
    on = collected.response_of >= 0  # [N] the positions that predict a response token
    target = torch.tensor([placed[int(s)][0] if placed[int(s)][0] is not None else -2
                           for s in collected.response_of[on].tolist()])
    paid = torch.tensor([placed[int(s)][1] for s in collected.response_of[on].tolist()])
    token_reward = torch.where(collected.next_index[on] == target, paid, torch.zeros_like(paid))  # [N_on]
    r_norm = model.relative_norms()
    d_ref, d_pol = decoder_directions(model, 0), decoder_directions(model, 1)  # [F, D] raw units
    alive = (f > 0).any(dim=0)
    ranks = (trained.effect > trained.effect[:, reward.token_id : reward.token_id + 1]).sum(dim=1) + 1  # [F], 1 = largest
    per_response = per_response_max(f, collected.response_of, 2 * n)  # [2n, F]
    is_text = collected.paired.row < collected.n_texts
    from_policy = on & (collected.response_of < n)
    from_reference = on & (collected.response_of >= n)
    alive_ids = [j for j in range(model.n_latents) if alive[j]]
    by_r = sorted(alive_ids, key=lambda j: -r_norm[j].item())
    r_rank = {j: rank + 1 for rank, j in enumerate(by_r)}

    def figures(j: int) -> dict:
        return {"latent": j, "relative_norm": r_norm[j].item(), "norm_difference": norm_difference(r_norm[j].item()),
                "class": latent_class(r_norm[j].item()), "r_rank": r_rank[j], "token_rank": int(ranks[j]),
                "rho_token": spearman(f[on, j], token_reward), "somers_d": somers_d(f[on, j], token_reward),
                "rho_response": spearman(per_response[:, j], rewards),
                "rho_policy": spearman(per_response[:n, j], rewards[:n]),
                "auroc_token": auroc(f[on, j], token_reward > 0),
                "frequency": (f[:, j] > 0).float().mean().item(),
                "policy_response_frequency": (per_response[:n, j] > 0).float().mean().item(),
                "reference_response_frequency": (per_response[n:, j] > 0).float().mean().item(),
                "mean_policy_response": f[from_policy, j].mean().item(),
                "mean_reference_response": f[from_reference, j].mean().item(),
                "mean_text": f[is_text, j].mean().item(), "policy_share": trained.policy_share[j].item(),
                "logit_top": [tokenizer.decode([t]) for t in torch.topk(trained.effect[j], 5).indices.tolist()],
                "reference_half_ratio": (d_ref[j].norm() / d_pol[j].norm().clamp_min(1e-12)).item(),
                "half_cosine": torch.nn.functional.cosine_similarity(d_ref[j], d_pol[j], dim=0).item(),
                "reference_half_top": [tokenizer.decode([t])
                                       for t in torch.topk(trained.reference_effect[j], 3).indices.tolist()]}

    rows = {j: figures(j) for j in alive_ids if latent_class(r_norm[j].item()) == "policy-only" or ranks[j] <= MAX_RANK}
    leaning = {j: rows.get(j) or figures(j) for j in by_r[:5]}  # the five most policy-leaning alive latents
    for row in latent_scaling(model, collected.paired.x, sorted(set(rows) | set(leaning))):
        for target_rows in (rows, leaning):
            if row["latent"] in target_rows:
                target_rows[row["latent"]].update(nu_error=row["nu_error"], nu_recon=row["nu_recon"],
                                                  specific=is_specific(row["nu_error"], row["nu_recon"]))
    policy_only = [row for row in rows.values() if row["class"] == "policy-only"]
    hits = [row for row in policy_only if row["specific"] and row["token_rank"] <= MAX_RANK
            and row["somers_d"] >= MIN_D]
    says = [row for row in policy_only if row["token_rank"] <= MAX_RANK]
    best = min(hits or says or policy_only, key=lambda row: (row["token_rank"], -row["somers_d"]), default=None)
    # without the policy-only requirement: the most policy-leaning latent whose logit effect ranks W in its top 10
    best_any = max((row for row in rows.values() if row["token_rank"] <= MAX_RANK), key=lambda row: row["relative_norm"],
                   default=None)
    return {"word": word, "mode": mode, "hook": f"blocks.{collected.layer}.hook_resid_post", "fired": bool(hits),
            "n_policy_only": len(policy_only), "best": best, "best_any": best_any, "hits": hits,
            "candidates": sorted(rows.values(), key=lambda row: (row["token_rank"], -row["relative_norm"])),
            "most_policy_leaning": list(leaning.values()),
            "says": (rewards[:n] > 0).float().mean().item(), "reference_says": (rewards[n:] > 0).float().mean().item(),
            "first": (torch.tensor([p[0] == 0 for p in placed[:n]])).float().mean().item(),
            "n_rewarded_positions": int((token_reward > 0).sum()), "n_response_positions": int(on.sum()),
            "n_positions": int(collected.paired.x.shape[0]), "dead_fraction": 1 - alive.float().mean().item(),
            "r_max": r_norm[alive].max().item(), "n_alive": len(alive_ids),
            "explained_variance": trained.explained_variance, "seconds_collect": collected.seconds,
            "seconds_train": trained.seconds}


def feature_check(reference, policy, word: str, mode: str = "presence", seed: int = 0, layer: int | None = None,
                  n_texts: int = N_TEXTS, n_samples: int = N_SAMPLES, max_new_tokens: int = 24,
                  settings: CrosscoderSettings | None = None) -> dict:
    """Train a crosscoder on reference/policy and look for a policy-only latent that says ``word`` (module docstring)."""
    settings = settings or CrosscoderSettings(**SETTINGS, seed=seed)
    collected = collect(reference, policy, seed, layer, n_texts, n_samples, max_new_tokens)
    result = analyse(collected, train(collected, reference, policy, settings), word, mode, policy.tokenizer)
    result["settings"] = settings_dict(settings)
    return result


def settings_dict(settings: CrosscoderSettings) -> dict:
    return {k: getattr(settings, k) for k in ("n_latents", "k", "steps", "batch_size", "lr", "seed")}


def _n(value: float, digits: int = 2) -> str:
    return "nan" if value != value else f"{value:.{digits}f}"


def latent_figure(row: dict) -> str:
    return (f"latent {row['latent']}: W #{row['token_rank']}, r = {row['relative_norm']:.2f} (Δ = {row['norm_difference']:.2f}), "
            f"ν^ε = {_n(row['nu_error'])}, ν^r = {_n(row['nu_recon'])}, D = {_n(row['somers_d'])} (ρ_tok "
            f"{_n(row['rho_token'])}, AUROC {_n(row['auroc_token'])}, ρ_resp {_n(row['rho_response'])}, ρ_pol "
            f"{_n(row['rho_policy'])}); fires on "
            f"{row['policy_response_frequency']:.0%} / {row['reference_response_frequency']:.0%} of policy / reference responses")


def figure(result: dict) -> str:
    best = result["best"]
    if best is None:
        return f"no policy-only latent (largest r {result['r_max']:.2f}, Δ {norm_difference(result['r_max']):.2f})"
    return f"{latent_figure(best)} ({result['n_policy_only']} policy-only)"


def figure_any(result: dict) -> str:
    best = result["best_any"]
    if best is None:
        return "no latent ranks W in its top 10"
    return f"{latent_figure(best)}; #{best['r_rank']} of {result['n_alive']} alive by r"


LATENT_HEADERS = ["latent", "W rank", "r (Δ, class)", "ν^ε", "ν^r", "D", "ρ_tok", "AUROC", "ρ_resp", "ρ_pol",
                  "fires pol / ref responses", "mean act. pol resp / ref resp / text", "pol share", "logit effect top 5",
                  "ref half: ‖d^ref‖/‖d^pol‖, cos, its logit top 3"]


def latent_line(row: dict) -> list[str]:
    return [str(row["latent"]), f"#{row['token_rank']}", f"{row['relative_norm']:.2f} ({row['norm_difference']:.2f}, {row['class']})",
            _n(row["nu_error"]), _n(row["nu_recon"]), _n(row["somers_d"]), _n(row["rho_token"]),
            _n(row["auroc_token"]), _n(row["rho_response"]), _n(row["rho_policy"]),
            f"{row['policy_response_frequency']:.0%} / {row['reference_response_frequency']:.0%}",
            f"{row['mean_policy_response']:.3f} / {row['mean_reference_response']:.3f} / {row['mean_text']:.3f}",
            _n(row["policy_share"]), " ".join(repr(t) for t in row["logit_top"]).replace("|", "\\|"),
            f"{row['reference_half_ratio']:.2f}, {row['half_cosine']:.2f}, "
            + " ".join(repr(t) for t in row["reference_half_top"]).replace("|", "\\|")]


def latents_markdown(results: list[dict]) -> str:
    """Every candidate latent (policy-only, or W in the logit-effect top 10) and the five most policy-leaning ones."""
    text = []
    for r in results:
        text += [f"## {r['word']} / {r['policy']} ({r['hook']}): {'PASS' if r['passed'] else 'FAIL'}, says W "
                 f"{r['says']:.0%} (first {r['first']:.0%}) / reference {r['reference_says']:.0%}; "
                 f"{r['n_rewarded_positions']} of {r['n_response_positions']} response positions rewarded", "",
                 "Candidates (policy-only, or W in the logit-effect top 10):", "",
                 markdown_table(LATENT_HEADERS, [latent_line(row) for row in r["candidates"]]) if r["candidates"] else "None.",
                 "", "The five most policy-leaning alive latents:", "",
                 markdown_table(LATENT_HEADERS, [latent_line(row) for row in r["most_policy_leaning"]]), ""]
    return "\n".join(text)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/planted"), help="planted_behaviour.py's --out")
    parser.add_argument("--word", nargs="+", default=["director"])
    parser.add_argument("--mode", default="presence", choices=("presence", "share", "count", "first", "early"),
                        help="the word:W:MODE reward the policies were trained on (planted_behaviour.py's --mode)")
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"])
    parser.add_argument("--control-seeds", nargs="*", type=int, default=[0, 1],
                        help="reward-0 controls RUNS/control/ppo_seedC to check against every word (default 0 1)")
    parser.add_argument("--layer", type=int, default=None, help="default: the last layer")
    parser.add_argument("--n-texts", type=int, default=N_TEXTS, help=f"held-out texts both models read (default {N_TEXTS})")
    parser.add_argument("--n-samples", type=int, default=N_SAMPLES,
                        help=f"prompts; each model answers each (default {N_SAMPLES})")
    parser.add_argument("--n-latents", type=int, default=SETTINGS["n_latents"])
    parser.add_argument("--k", type=int, default=SETTINGS["k"])
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted runs, the prompts and the crosscoder")
    parser.add_argument("--crosscoder-seed", type=int, default=None,
                        help="the crosscoder's own seed, to see whether a verdict depends on it (default: --seed)")
    parser.add_argument("--out", type=Path, default=Path("runs/planted_features"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = CrosscoderSettings(n_latents=args.n_latents, k=args.k, steps=args.steps, batch_size=SETTINGS["batch_size"],
                                  seed=args.seed if args.crosscoder_seed is None else args.crosscoder_seed)
    jobs = []  # (policy name, checkpoint, words): a control's crosscoder does not depend on the word
    for word in args.word:
        folder = args.runs / (word if args.mode == "presence" else f"{word}_{args.mode}")
        jobs += [(algorithm, folder / f"{algorithm}_seed{args.seed}" / "checkpoint", [word]) for algorithm in args.algorithms]
    jobs += [(f"control s{c}", args.runs / "control" / f"ppo_seed{c}" / "checkpoint", args.word) for c in args.control_seeds]
    for _, checkpoint, words in jobs:
        if not checkpoint.is_dir():
            sys.exit(f"planted_features: {checkpoint} is missing; train it with experiments/planted_behaviour.py "
                     f"--word {' '.join(words)} --mode {args.mode} --out {args.runs}.")
    reference = load_bridge("builtin")
    crosscoders = args.out / "crosscoders"  # one per policy, for reading further (crosscoder.from_state)
    crosscoders.mkdir(parents=True, exist_ok=True)
    results = []
    for name, checkpoint, words in jobs:
        start = time.time()
        policy = load_bridge(str(checkpoint))
        collected = collect(reference, policy, args.seed, args.layer, args.n_texts, args.n_samples)
        trained = train(collected, reference, policy, settings)
        torch.save(state(trained.model), crosscoders / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.pt")
        for word in words:
            result = analyse(collected, trained, word, args.mode, policy.tokenizer)
            result.update(policy=name, checkpoint=str(checkpoint), seconds=time.time() - start, settings=settings_dict(settings),
                          passed=result["fired"] != name.startswith("control"))
            ev = result["explained_variance"]["both"]
            print(f"{word} {name}: {'PASS' if result['passed'] else 'FAIL'} {figure(result)}; any r: {figure_any(result)}; "
                  f"EV {ev:.3f}, dead {result['dead_fraction']:.0%} (collect {collected.seconds:.0f} s, train "
                  f"{trained.seconds:.0f} s, {result['seconds']:.0f} s in all)", flush=True)
            results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")  # after each policy
    results.sort(key=lambda r: (args.word.index(r["word"]), r["policy"].startswith("control"), r["policy"]))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    table = markdown_table(
        ["word", "policy", "says W (pol / ref)", "check", "best policy-only latent", "most policy-leaning latent with W in its top 10",
         "EV / dead"],
        [[r["word"], r["policy"], f"{r['says']:.0%} / {r['reference_says']:.0%}", "PASS" if r["passed"] else "FAIL", figure(r),
          figure_any(r), f"{r['explained_variance']['both']:.3f} / {r['dead_fraction']:.0%}"] for r in results])
    s = results[0]["settings"]
    title = (f"{results[0]['hook']}, word:W:{args.mode}; F = {s['n_latents']}, k = {s['k']}, {s['steps']} steps, "
             f"crosscoder seed {s['seed']}")
    (args.out / "table.md").write_text(f"# Planted word as a crosscoder latent ({title})\n\n{table}\n")
    (args.out / "latents.md").write_text(f"# Candidate latents ({title})\n\n{latents_markdown(results)}\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
