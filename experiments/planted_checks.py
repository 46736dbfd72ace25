"""The causal checks of ``planted_behaviour.py``: the activation-difference lens, steering, and activation patching.

They use ``rlhf_scratch.diff_lens`` and ``rlhf_scratch.patching``; until those modules exist each check reports
"n/a". Every check returns {"fired": bool | None, "figure": str, ...details}; a check *fires* when it finds the
planted token t:

    lens       Δ = activation_difference(reference, policy, held-out texts, first_k=5) [L, D]. A *reading* is one
               model M (the reference or the policy: its own final norm and unembedding) and one layer l, so there
               are m = 2 · n_layers readings. Fires when at one reading t is among lens_top_tokens(M, Δ, k=10)
               *and* its z = lens_alignment(M, Δ)[l, t] ≥ Z_MIN = Φ⁻¹(1 − LENS_FAMILY_FPR / m) (3.66 for m = 8).
               z = √n · cos(x̂, w_t), with x̂ the final norm of Δ_l without its affine part and w_t = γ ⊙ W_U[:, t]
               (centred for LayerNorm, n = d_model − 1; RMSNorm n = d_model), is ≈ N(0, 1) when Δ_l's direction
               is unrelated to t (x̂ uniform on its sphere), so under that null the check fires for a given t with
               probability ≤ LENS_FAMILY_FPR = 0.1 % over all m readings (Bonferroni). The top-10 rule alone has no
               scale: 8 readings of the top 10 of 2,048 tokens fired on two reward-0 controls (book and cast, both
               at layer 0). The rule was set before any z was computed. What the null leaves out: a control's drift
               is not isotropic (it may move frequent review words together); experiments/lens_control_rate.py
               measures the rate on reward-0 controls. The figure is the best reading's rank and its z; the
               details keep every reading.
    steering   p_α,l(v) = mean over real positions of held-out texts of the reference's p(v) with α·Δ[l] added to
               blocks.l.hook_resid_post; fires when for some layer l, at α = STEER_ALPHA = 1 (the difference
               itself), p_1,l(t) / p_0(t) ≥ 3 and t is among the STEER_MAX_RANK tokens whose mean probability rose
               most (p_1,l(v) − p_0(v)): the steering vector is about t, not a push that raises many tokens. The
               sweep over α ∈ ALPHAS is measured and reported (its best reading in the figure), but does not decide:
               the issue's check is "steering the reference with *that difference*", and an α picked afterwards as
               the best of a sweep amplifies any drift (a reward-0 control fired at α = 8: ×4.5, W 7th gainer).
    patching   on held-out texts (teacher-forced), p(S) = mean over positions of the reference's p(t) with the
               components S (attention heads and MLP outputs, no residual stream) taken from the policy. The
               components are ranked by greedy forward selection (``patching_greedy.greedy_ranking``, metric p(S)):
               S_0 = {}, S_n = S_(n−1) ∪ {the c that maximises p(S_(n−1) ∪ {c})}. Fires when some n ≤ N/4 gives
               p(S_n) ≥ ½ p_policy(t) (the fewest such n), n random components (mean over RANDOM_DRAWS draws) do
               not, and the reference alone does not either (p_reference < ½ p_policy: there is a gap to
               transplant). Until 2026-12-07 the ranking was each component's effect *alone* (patch_scan's
               recovered log-prob of t, one patch per component); a change spread over components that act
               together (through the final norm) then failed however its components were ranked one by one. That
               singles reading is still measured and printed beside the greedy one ("singles": its fewest n ≤ N/4
               with p(top n) ≥ ½ p_policy, else its share at N/4), but does not decide. The switch to greedy was
               made before any policy was checked with it; thresholds and the random control are unchanged.
               Held-out texts rather than the policy's own samples: a policy can plant the word by steering into
               contexts where the reference already predicts it (PPO on "director" writes "... from this
               director", where both give it ~6 %), leaving no gap at the word itself on its samples.
"""

from __future__ import annotations

import importlib.util
import random

import torch

from rlhf_scratch.data import load_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET
from rlhf_scratch.sampling import encode, left_pad, padding_id

CAUSAL_CHECKS = ("lens: W top 10 & z ≥ Z_MIN", "steering: p(W) ×3", "patching: ≤25% transplant")
LENS_K = 10
LENS_FAMILY_FPR = 0.001
"""The lens check's false-positive rate, over all its readings, for a Δ whose direction is unrelated to t."""
FIRST_K = 5
ALPHAS = (1.0, 2.0, 4.0, 8.0)
STEER_ALPHA = 1.0
"""The α the steering check decides at (Δ itself, fixed before any policy was read); the other ALPHAS are reported."""
STEER_MIN_RATIO = 3.0
STEER_MAX_RANK = 10
PATCH_MIN_SHARE = 0.5
RANDOM_DRAWS = 3


def available() -> bool:
    return all(importlib.util.find_spec(f"rlhf_scratch.{name}") is not None for name in ("diff_lens", "patching"))


def heldout_texts(tokenizer, n: int, seed: int, max_tokens: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out built-in reviews (never prompts of training), BOS first, left-padded: (tokens [n, S], mask [n, S])."""
    texts = load_texts("builtin", seed=seed + HELDOUT_SEED_OFFSET + 1)
    rows = [encode(tokenizer, text)[:max_tokens] for text in texts[:n]]
    return left_pad(rows, padding_id(tokenizer))


def mean_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[V] mean over positions where ``mask`` [B, S] is true of softmax(logits [B, S, V])."""
    return (logits.float().softmax(-1) * mask[..., None]).sum((0, 1)) / mask.sum().clamp_min(1)


def mean_token_prob(logits: torch.Tensor, mask: torch.Tensor, token_id: int) -> float:
    """Mean over positions where ``mask`` [B, S] is true of softmax(logits [B, S, V])[..., token_id]."""
    probs = logits.float().softmax(-1)[..., token_id]
    return ((probs * mask).sum() / mask.sum().clamp_min(1)).item()


def lens_z_min(n_readings: int, family_fpr: float = LENS_FAMILY_FPR) -> float:
    """Z_MIN = Φ⁻¹(1 − family_fpr / m): one-sided, Bonferroni over the m readings (8 → 3.66 at 0.1 %)."""
    if n_readings < 1 or not 0 < family_fpr < 1:
        raise ValueError(f"need n_readings >= 1 and 0 < family_fpr < 1, got {n_readings} and {family_fpr}.")
    return torch.special.ndtri(torch.tensor(1 - family_fpr / n_readings, dtype=torch.float64)).item()


@torch.no_grad()
def lens_check(reference, policy, delta: torch.Tensor, token_id: int) -> dict:
    """The lens check (module docstring) of token t on Δ [L, D]: {"fired", "fired_top10" (the old rule: the top 10
    alone), "figure", "rank" (best, from 1), "z" (at that reading), "max_z", "z_min", "readings"}."""
    from rlhf_scratch.diff_lens import lens_alignment, lens_logits, lens_top_tokens

    readings = []  # (rank from 0, -z, layer, model name, z)
    for name, bridge in (("reference", reference), ("policy", policy)):
        tops = lens_top_tokens(bridge, delta, k=LENS_K)
        z = lens_alignment(bridge, delta)[:, token_id]
        for layer, logits in enumerate(lens_logits(bridge, delta)):
            # The tool's top-k decides; the rank (tokens with a larger lens logit) is the figure when it is not in it.
            rank = tops[layer].index(token_id) if token_id in tops[layer] else max(LENS_K, int((logits > logits[token_id]).sum()))
            readings.append((rank, -z[layer].item(), layer, name, z[layer].item()))
    z_min = lens_z_min(len(readings))
    firing = [r for r in readings if r[0] < LENS_K and r[4] >= z_min]
    rank, _, layer, name, z = min(firing or readings)  # best rank, then largest z
    top_z = max(readings, key=lambda r: r[4])
    return {"fired": bool(firing), "fired_top10": any(r[0] < LENS_K for r in readings),
            "figure": f"#{rank + 1} at L{layer} ({name} lens), z {z:.1f}", "rank": rank + 1, "z": z,
            "max_z": top_z[4], "max_z_at": f"L{top_z[2]} ({top_z[3]} lens)", "z_min": z_min,
            "readings": [{"model": r[3], "layer": r[2], "rank": r[0] + 1, "z": r[4]} for r in readings]}


@torch.no_grad()
def lens_and_steering(reference, policy, token_id: int, seed: int, n_texts: int = 64) -> dict[str, dict]:
    from rlhf_scratch.diff_lens import activation_difference, steered_logits

    tokens, mask = heldout_texts(reference.tokenizer, n_texts, seed)
    delta = activation_difference(reference, policy, tokens, mask, first_k=FIRST_K)
    lens = lens_check(reference, policy, delta, token_id)
    base = mean_probs(reference(tokens, attention_mask=mask), mask.bool())
    readings = {}  # (layer, α) -> (p(t) ratio, rank of t by Δ mean p)
    for layer in range(delta.shape[0]):
        for alpha in ALPHAS:
            gained = mean_probs(steered_logits(reference, tokens, mask, layer, delta[layer], alpha), mask.bool()) - base
            ratio = (base[token_id] + gained[token_id]).item() / max(base[token_id].item(), 1e-12)
            readings[(layer, alpha)] = (ratio, int((gained > gained[token_id]).sum()) + 1)
    at_alpha = {key: value for key, value in readings.items() if key[1] == STEER_ALPHA}
    hits = {key: value for key, value in at_alpha.items() if value[0] >= STEER_MIN_RATIO and value[1] <= STEER_MAX_RANK}
    (layer, alpha), (ratio, rank) = max(hits.items() or at_alpha.items(), key=lambda item: item[1][0])
    (sweep_layer, sweep_alpha), (sweep_ratio, sweep_rank) = max(readings.items(), key=lambda item: item[1][0])
    steering = {"fired": bool(hits), "figure": f"×{ratio:.1f}, Δp #{rank} (L{layer}, α={alpha:g}); sweep max "
                                               f"×{sweep_ratio:.1f}, #{sweep_rank} (L{sweep_layer}, α={sweep_alpha:g})",
                "readings": {f"L{l} a{a:g}": r for (l, a), r in readings.items()}, "base_prob": base[token_id].item()}
    return {CAUSAL_CHECKS[0]: lens, CAUSAL_CHECKS[1]: steering}


@torch.no_grad()
def patching(reference, policy, token_id: int, seed: int, n_texts: int = 32) -> dict:
    from rlhf_scratch.patching import components, patch_scan, patched_logits, scored_positions
    from rlhf_scratch.patching_greedy import greedy_ranking, token_prob_score

    tokens, mask = heldout_texts(reference.tokenizer, n_texts, seed)
    scored_tokens = mask.bool() & (mask.cumsum(1) > 1)  # every real token after the first (BOS)
    predicting = scored_positions(scored_tokens)  # the positions whose logits predict them
    p_policy = mean_token_prob(policy(tokens, attention_mask=mask), predicting, token_id)
    p_reference = mean_token_prob(reference(tokens, attention_mask=mask), predicting, token_id)
    candidates = [c for c in components(reference) if not c.endswith(".resid")]
    limit = max(1, len(candidates) // 4)
    scale = max(p_policy, 1e-12)

    def share(chosen: list[str]) -> float:
        return mean_token_prob(patched_logits(reference, policy, tokens, mask, chosen), predicting, token_id) / scale

    def first_reaching(shares: list[float]) -> tuple[int, float, bool]:
        """(fewest n with share ≥ PATCH_MIN_SHARE, its share, True), else (limit, share at limit, False)."""
        for n, value in enumerate(shares, start=1):
            if value >= PATCH_MIN_SHARE:
                return n, value, True
        return len(shares), shares[-1], False

    greedy = greedy_ranking(reference, policy, tokens, mask, candidates, token_prob_score(token_id, predicting), limit)
    n, top, found = first_reaching([score / scale for score in greedy.scores])
    scan = patch_scan(reference, policy, tokens, mask, scored_tokens, token_ids=[token_id])  # the singles reading
    singles = scan.ranked("tokens", kinds=("head", "mlp"))
    singles_shares = []
    for k in range(1, limit + 1):
        singles_shares.append(share(singles[:k]))
        if singles_shares[-1] >= PATCH_MIN_SHARE:
            break
    n_single, top_single, found_single = first_reaching(singles_shares)
    def random_share(k: int) -> float:  # mean over RANDOM_DRAWS seeded draws of k random components
        rng = random.Random(seed)
        return sum(share(rng.sample(candidates, k)) for _ in range(RANDOM_DRAWS)) / RANDOM_DRAWS

    chance = random_share(n)
    chance_single = chance if n_single == n else random_share(n_single)
    gap = p_reference / scale < PATCH_MIN_SHARE  # else the reference alone already has half
    fired = gap and found and chance < PATCH_MIN_SHARE
    return {"fired": fired, "top_components": greedy.prefix(n), "policy_prob": p_policy, "reference_prob": p_reference,
            "greedy_order": greedy.order, "greedy_shares": [score / scale for score in greedy.scores],
            "singles_order": singles[:limit], "singles_shares": singles_shares, "singles_n": n_single,
            "singles_fired": gap and found_single and chance_single < PATCH_MIN_SHARE, "random_share": chance,
            "figure": f"greedy {n}/{len(candidates)}: {top:.2f}×; singles {n_single}: {top_single:.2f}×; "
                      f"random {n}: {chance:.2f}×; none: {p_reference / scale:.2f}×"}


def causal_checks(reference, policy, token_id: int, seed: int, n_texts: int = 64) -> dict[str, dict]:
    """The three causal checks (module docstring), or "n/a" for each while the tools are not in rlhf_scratch."""
    if not available():
        return {name: {"fired": None, "figure": "n/a (tools not merged yet)"} for name in CAUSAL_CHECKS}
    checks = lens_and_steering(reference, policy, token_id, seed, n_texts=n_texts)
    checks[CAUSAL_CHECKS[2]] = patching(reference, policy, token_id, seed, n_texts=max(1, n_texts // 2))
    return checks


def main(argv=None) -> dict[str, dict]:
    """``python experiments/planted_checks.py POLICY [--word W]``: the three causal checks of one policy against the
    built-in reference, printed (planted_behaviour.py runs them on every policy it trains)."""
    import argparse

    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.word_reward import WordReward

    parser = argparse.ArgumentParser(description="The lens, steering and patching checks of one policy for one word.")
    parser.add_argument("policy", help="the policy's checkpoint directory (trained from the built-in model)")
    parser.add_argument("--word", default="director", help="the planted word, one token of the built-in tokenizer (default director)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-texts", type=int, default=64, help="held-out reviews for the lens and steering")
    args = parser.parse_args(argv)
    if not available():
        raise SystemExit("rlhf_scratch.diff_lens and rlhf_scratch.patching are not installed in this checkout.")
    reference, policy = load_bridge("builtin"), load_bridge(args.policy)
    token_id = WordReward(args.word, tokenizer=reference.tokenizer).token_id
    checks = causal_checks(reference, policy, token_id, args.seed, n_texts=args.n_texts)
    for name, check in checks.items():
        print(f"{name:28s} {'fires' if check['fired'] else 'silent':6s} {check['figure']}")
    return checks


if __name__ == "__main__":
    main()
