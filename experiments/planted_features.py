#!/usr/bin/env python
"""The planted behaviour, read as features: does a crosscoder find the planted word as a policy-only latent?

    python experiments/planted_features.py --runs runs/planted --word dialogue director --algorithms ppo grpo

Reads the policies ``experiments/planted_behaviour.py`` cached in RUNS/WORD/ALGORITHM_seed0/checkpoint (and the
reward-0 control in RUNS/control/ppo_seed0/checkpoint; train them with that script first). For each policy and
word W (token id t):

1. Both models read the same tokens: ``--n-texts`` held-out texts and the policy's samples for ``--n-samples``
   held-out prompts; a BatchTopK crosscoder (``rlhf_scratch.crosscoder``) is trained on their paired activations at
   ``blocks.{layer}.hook_resid_post`` (default: the last layer), BOS excluded.
2. For each policy-only latent (relative decoder norm r > 0.9, alive):
   - rank of t in its logit effect through the policy's final norm and unembedding (1 = largest);
   - ρ = Spearman correlation, over the policy's samples, between the latent's largest activation on the
     sample's response positions and the sample's reward (word:W, 1 if the response says W);
   - its Latent Scaling ratios ν^ε, ν^r (other model / policy).
   The table also gives, without the policy-only requirement, the latent with W in its top 10 whose ρ is largest:
   RL may turn up a feature both models have rather than add one.
3. The check *fires* when some policy-only latent ranks t in its top 10 and has ρ ≥ 0.3. A trained policy passes
   when it fires, the control when it does not. Writes OUT/table.md and OUT/results.json.

This file is separate from planted_behaviour.py / planted_checks.py; ``feature_check(reference, policy, word)`` is the
function a later version of those can call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rlhf_scratch.crosscoder import CrosscoderSettings, decoder_directions, encode_all, latent_scaling, train_crosscoder
from rlhf_scratch.crosscoder_report import logit_effects, paired_activations
from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table
from rlhf_scratch.models import load_bridge
from rlhf_scratch.patching_report import policy_samples
from rlhf_scratch.sampling import encode, left_pad, padding_id
from rlhf_scratch.word_reward import WordReward

MAX_RANK, MIN_RHO, POLICY_ONLY = 10, 0.3, 0.9


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks (ties share their mean rank); nan if one is constant."""
    def ranks(x):
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # average ranks over ties
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float("nan") if denominator == 0 else (ra * rb).sum().item() / denominator.item()


def feature_check(reference, policy, word: str, seed: int = 0, layer: int | None = None, n_texts: int = 128,
                  n_samples: int = 128, max_new_tokens: int = 24, settings: CrosscoderSettings | None = None) -> dict:
    """Train a crosscoder on reference/policy and look for a policy-only latent that says ``word`` (module docstring)."""
    reward = WordReward(word, tokenizer=policy.tokenizer)
    layer = reference.cfg.n_layers - 1 if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_post"
    settings = settings or CrosscoderSettings(n_latents=512, k=8, steps=1500, batch_size=512, seed=seed)
    tokenizer = policy.tokenizer
    texts = load_texts("builtin", seed=seed + HELDOUT_SEED_OFFSET)
    encode_text = lambda text: encode(tokenizer, text, prepend_bos=True)  # noqa: E731
    rows = [encode_text(t)[:32] for t in texts[:n_texts]]
    prompts = prompts_from_texts(texts[n_texts:], encode_text, n_samples, seed=seed + HELDOUT_SEED_OFFSET + 2,
                                 decode=tokenizer.decode)
    sample_tokens, sample_mask, response = policy_samples(policy, prompts, max_new_tokens, 32, seed)
    responses = [tokenizer.decode(sample_tokens[r][response[r]].tolist()) for r in range(len(prompts))]
    rewards = reward(responses)
    rows += [sample_tokens[r][sample_mask[r].bool()].tolist() for r in range(len(prompts))]
    tokens, mask = left_pad(rows, padding_id(tokenizer))
    paired = paired_activations(reference, policy, hook, tokens, mask, ["text"] * n_texts + ["sample"] * len(prompts),
                                skip_first=True)
    # which paired positions are response tokens of which sample (left_pad keeps each row's tail aligned)
    width = tokens.shape[1]
    sample_of = torch.full((paired.x.shape[0],), -1)
    for r in range(len(prompts)):
        n_response = int(response[r].sum())
        in_row = (paired.row == n_texts + r) & (paired.position >= width - n_response)
        sample_of[in_row] = r
    model = train_crosscoder(paired.x, settings)
    f, _ = encode_all(model, paired.x)
    r_norm = model.relative_norms()
    alive = (f > 0).any(dim=0)
    effect = logit_effects(policy, decoder_directions(model, 1))  # [F, V]
    ranks = (effect > effect[:, reward.token_id : reward.token_id + 1]).sum(dim=1) + 1  # [F], 1 = largest
    on = sample_of >= 0
    per_sample = torch.zeros(len(prompts), model.n_latents).scatter_reduce(  # max activation on each response [n, F]
        0, sample_of[on][:, None].expand(-1, model.n_latents), f[on], reduce="amax", include_self=True)
    alive_ids = [j for j in range(model.n_latents) if alive[j]]
    r_rank = {j: rank + 1 for rank, j in enumerate(sorted(alive_ids, key=lambda j: -r_norm[j].item()))}
    rows = {}
    for j in range(model.n_latents):
        if alive[j] and (r_norm[j] > POLICY_ONLY or ranks[j] <= MAX_RANK):
            rows[j] = {"latent": j, "relative_norm": r_norm[j].item(), "r_rank": r_rank[j], "token_rank": int(ranks[j]),
                       "rho": spearman(per_sample[:, j], rewards), "frequency": (f[:, j] > 0).float().mean().item(),
                       "sample_frequency": (per_sample[:, j] > 0).float().mean().item()}
    for row in latent_scaling(model, paired.x, list(rows)):
        rows[row["latent"]].update(nu_error=row["nu_error"], nu_recon=row["nu_recon"])
    policy_only = [row for row in rows.values() if row["relative_norm"] > POLICY_ONLY]
    hits = [row for row in policy_only if row["token_rank"] <= MAX_RANK and row["rho"] >= MIN_RHO]
    best = min(hits or policy_only, key=lambda row: (row["token_rank"], -row["rho"]), default=None)
    # the same criterion without the policy-only requirement: is the word carried by a shared latent instead?
    says_word = [row for row in rows.values() if row["token_rank"] <= MAX_RANK]
    best_any = max(says_word, key=lambda row: row["rho"] if row["rho"] == row["rho"] else -2, default=None)
    return {"word": word, "hook": hook, "fired": bool(hits), "n_policy_only": len(policy_only), "best": best,
            "best_any": best_any, "hits": hits, "says": rewards.mean().item(), "n_positions": int(paired.x.shape[0]),
            "dead_fraction": 1 - alive.float().mean().item(), "r_max": r_norm[alive].max().item(), "n_alive": len(alive_ids)}


def figure(result: dict) -> str:
    best = result["best"]
    if best is None:
        return f"no policy-only latent (largest r {result['r_max']:.2f})"
    return (f"latent {best['latent']}: W #{best['token_rank']} in its logit effect, ρ = {best['rho']:.2f}, "
            f"ν^ε = {best['nu_error']:.2f}, r = {best['relative_norm']:.2f} ({result['n_policy_only']} policy-only)")


def figure_any(result: dict) -> str:
    best = result["best_any"]
    if best is None:
        return "no latent ranks W in its top 10"
    return (f"latent {best['latent']}: W #{best['token_rank']}, ρ = {best['rho']:.2f}, r = {best['relative_norm']:.2f} "
            f"(#{best['r_rank']} of {result['n_alive']} by r), "
            f"ν^ε = {best['nu_error']:.2f}, fires on {best['sample_frequency']:.0%} of responses")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/planted"), help="planted_behaviour.py's --out")
    parser.add_argument("--word", nargs="+", default=["director"])
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"])
    parser.add_argument("--layer", type=int, default=None, help="default: the last layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/planted_features"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reference = load_bridge("builtin")
    results = []
    for word in args.word:
        runs = [(algorithm, args.runs / word / f"{algorithm}_seed{args.seed}" / "checkpoint") for algorithm in args.algorithms]
        runs.append(("control", args.runs / "control" / "ppo_seed0" / "checkpoint"))
        for name, checkpoint in runs:
            if not checkpoint.is_dir():
                sys.exit(f"planted_features: {checkpoint} is missing; train it with experiments/planted_behaviour.py "
                         f"--word {word} --out {args.runs}.")
            start = time.time()
            result = feature_check(reference, load_bridge(str(checkpoint)), word, seed=args.seed, layer=args.layer)
            result.update(policy=name, checkpoint=str(checkpoint), seconds=time.time() - start,
                          passed=result["fired"] != (name == "control"))
            print(f"{word} {name}: {'PASS' if result['passed'] else 'FAIL'} {figure(result)}; any r: {figure_any(result)} "
                  f"({result['seconds']:.0f} s)", flush=True)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    table = markdown_table(["word", "policy", "says W", "check", "best policy-only latent", "best latent with W in its top 10 (any r)"],
                           [[r["word"], r["policy"], f"{r['says']:.0%}", "PASS" if r["passed"] else "FAIL", figure(r),
                             figure_any(r)] for r in results])
    (args.out / "table.md").write_text(f"# Planted word as a crosscoder latent ({results[0]['hook']})\n\n{table}\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
