#!/usr/bin/env python
"""The planted behaviour, read as features: does a crosscoder find the planted word as a policy-only latent?

    python experiments/planted_features.py --runs runs/planted --mode early --word director dialogue --algorithms ppo grpo

Reads the policies ``experiments/planted_behaviour.py`` cached in RUNS/WORD/ALGORITHM_seedS/checkpoint (RUNS/WORD_MODE/
for ``--mode`` other than presence, as that script names them) and the reward-0 control in
RUNS/control/ppo_seed0/checkpoint; train them with that script first. For each policy and word W (token id t):

1. Both models read the same tokens: ``--n-texts`` held-out texts (32 tokens each) and, for ``--n-samples``
   held-out prompts, the policy's *and the reference's* samples (a mixed sample: responses with and without W).
   A BatchTopK crosscoder (``rlhf_scratch.crosscoder``) is trained on their paired activations at
   ``blocks.{layer}.hook_resid_post`` (default: the last layer), BOS excluded.
2. Per alive latent j: the relative decoder norm r_j and Minder, Dumas et al.'s norm difference Δ_j (policy-only:
   Δ ≥ 0.9, i.e. ‖d^pol‖ ≥ 5 ‖d^ref‖, r ≥ 5/6; ``crosscoder.latent_class``); the rank of t in its logit effect
   through the policy's final norm and unembedding (1 = largest); Latent Scaling ν^ε, ν^r (specific: ν^ε < 0.2
   and ν^r < 0.5, ``crosscoder.is_specific``); and
       ρ_j = Spearman(a_j, R) over the 2n pooled responses (n the policy's, n the reference's),
   a_j = the latent's largest activation at the positions that predict the response's tokens (the last prompt
   token through the second-to-last response token: where the distribution that chose each response token is
   read, ``patching.scored_positions``), R = the response's reward ``word:W:MODE`` (the reward the policy was
   trained on). The issue asks for a latent "whose activation correlates with the reward"; over the policy's
   own samples alone the reward is nearly constant once the policy says W in ~100 % of them (ρ undefined or
   resting on a handful of responses), so the pooled sample is where the correlation is defined. It is also
   reported over the policy's samples alone (ρ_pol).
3. The check *fires* when some latent is policy-only, specific, ranks t in its top 10 and has ρ ≥ 0.3. A trained
   policy passes when it fires, the control when it does not. Writes OUT/table.md and OUT/results.json.
   Without the policy-only requirement, the table also gives the most policy-leaning latent with t in its top 10.

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

from rlhf_scratch.crosscoder import (
    CrosscoderSettings,
    decoder_directions,
    encode_all,
    explained_variance,
    is_specific,
    latent_class,
    latent_scaling,
    norm_difference,
    train_crosscoder,
)
from rlhf_scratch.crosscoder_report import logit_effects, paired_activations
from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table
from rlhf_scratch.models import load_bridge
from rlhf_scratch.patching import scored_positions
from rlhf_scratch.patching_report import policy_samples
from rlhf_scratch.sampling import encode, left_pad, padding_id
from rlhf_scratch.word_reward import WordReward

MAX_RANK, MIN_RHO = 10, 0.3
SETTINGS = dict(n_latents=512, k=8, steps=3000, batch_size=512)


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


def per_response_max(f: torch.Tensor, response_of: torch.Tensor, n_responses: int) -> torch.Tensor:
    """[R, F]: for each response, the largest activation of each latent over its positions (f [N, F], response_of [N]
    the response index of each position or −1); 0 for a response with no position."""
    on = response_of >= 0
    out = torch.zeros(n_responses, f.shape[1])
    return out.scatter_reduce(0, response_of[on][:, None].expand(-1, f.shape[1]), f[on], reduce="amax", include_self=True)


def feature_check(reference, policy, word: str, mode: str = "presence", seed: int = 0, layer: int | None = None,
                  n_texts: int = 512, n_samples: int = 128, max_new_tokens: int = 24,
                  settings: CrosscoderSettings | None = None) -> dict:
    """Train a crosscoder on reference/policy and look for a policy-only latent that says ``word`` (module docstring)."""
    reward = WordReward(word, mode=mode, tokenizer=policy.tokenizer)
    layer = reference.cfg.n_layers - 1 if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_post"
    settings = settings or CrosscoderSettings(**SETTINGS, seed=seed)
    tokenizer = policy.tokenizer
    texts = load_texts("builtin", seed=seed + HELDOUT_SEED_OFFSET)
    encode_text = lambda text: encode(tokenizer, text, prepend_bos=True)  # noqa: E731
    rows = [encode_text(t)[:32] for t in texts[:n_texts]]
    prompts = prompts_from_texts(texts[n_texts:], encode_text, n_samples, seed=seed + HELDOUT_SEED_OFFSET + 2,
                                 decode=tokenizer.decode)
    rewards, scored = [], []
    for model in (policy, reference):  # the mixed sample: each model's responses to the same prompts
        sample_tokens, sample_mask, response = policy_samples(model, prompts, max_new_tokens, 32, seed)
        responses = [tokenizer.decode(sample_tokens[r][response[r]].tolist()) for r in range(len(prompts))]
        rewards.append(reward(responses))
        predicts = scored_positions(response)  # [n, S]: positions whose next token is a response token
        for r in range(len(prompts)):
            real = sample_mask[r].bool()
            rows.append(sample_tokens[r][real].tolist())
            scored.append(predicts[r][real])
    rewards = torch.cat(rewards)  # [2n]: the policy's responses, then the reference's
    tokens, mask = left_pad(rows, padding_id(tokenizer))
    width = tokens.shape[1]
    predicts = torch.zeros_like(mask, dtype=torch.bool)  # left_pad keeps each row's tail aligned
    for i, row_scored in enumerate(scored):
        predicts[n_texts + i, width - len(row_scored):] = row_scored
    sources = ["text"] * n_texts + ["policy sample"] * len(prompts) + ["reference sample"] * len(prompts)
    paired = paired_activations(reference, policy, hook, tokens, mask, sources, skip_first=True)
    response_of = torch.where(predicts[paired.row, paired.position], paired.row - n_texts, torch.full_like(paired.row, -1))
    start = time.time()
    model = train_crosscoder(paired.x, settings)
    seconds_train = time.time() - start
    f, _ = encode_all(model, paired.x)
    r_norm = model.relative_norms()
    alive = (f > 0).any(dim=0)
    effect = logit_effects(policy, decoder_directions(model, 1))  # [F, V]
    ranks = (effect > effect[:, reward.token_id : reward.token_id + 1]).sum(dim=1) + 1  # [F], 1 = largest
    per_response = per_response_max(f, response_of, len(rewards))  # [2n, F]
    n = len(prompts)
    alive_ids = [j for j in range(model.n_latents) if alive[j]]
    r_rank = {j: rank + 1 for rank, j in enumerate(sorted(alive_ids, key=lambda j: -r_norm[j].item()))}
    rows = {}
    for j in alive_ids:
        if latent_class(r_norm[j].item()) == "policy-only" or ranks[j] <= MAX_RANK:
            rows[j] = {"latent": j, "relative_norm": r_norm[j].item(), "norm_difference": norm_difference(r_norm[j].item()),
                       "class": latent_class(r_norm[j].item()), "r_rank": r_rank[j], "token_rank": int(ranks[j]),
                       "rho": spearman(per_response[:, j], rewards), "rho_policy": spearman(per_response[:n, j], rewards[:n]),
                       "frequency": (f[:, j] > 0).float().mean().item(),
                       "policy_response_frequency": (per_response[:n, j] > 0).float().mean().item(),
                       "reference_response_frequency": (per_response[n:, j] > 0).float().mean().item()}
    for row in latent_scaling(model, paired.x, list(rows)):
        rows[row["latent"]].update(nu_error=row["nu_error"], nu_recon=row["nu_recon"],
                                   specific=is_specific(row["nu_error"], row["nu_recon"]))
    policy_only = [row for row in rows.values() if row["class"] == "policy-only"]
    hits = [row for row in policy_only if row["specific"] and row["token_rank"] <= MAX_RANK and row["rho"] >= MIN_RHO]
    says = [row for row in policy_only if row["token_rank"] <= MAX_RANK]
    best = min(hits or says or policy_only, key=lambda row: (row["token_rank"], -row["rho"]), default=None)
    # without the policy-only requirement: the most policy-leaning latent whose logit effect ranks W in its top 10
    best_any = max((row for row in rows.values() if row["token_rank"] <= MAX_RANK), key=lambda row: row["relative_norm"],
                   default=None)
    return {"word": word, "mode": mode, "hook": hook, "fired": bool(hits), "n_policy_only": len(policy_only), "best": best,
            "best_any": best_any, "hits": hits, "says": (rewards[:n] > 0).float().mean().item(),
            "reference_says": (rewards[n:] > 0).float().mean().item(), "n_positions": int(paired.x.shape[0]),
            "dead_fraction": 1 - alive.float().mean().item(), "r_max": r_norm[alive].max().item(), "n_alive": len(alive_ids),
            "explained_variance": explained_variance(model, paired.x), "seconds_train": seconds_train,
            "settings": {k: getattr(settings, k) for k in ("n_latents", "k", "steps", "batch_size", "lr", "seed")}}


def latent_figure(row: dict) -> str:
    return (f"latent {row['latent']}: W #{row['token_rank']}, r = {row['relative_norm']:.2f} (Δ = {row['norm_difference']:.2f}), "
            f"ν^ε = {row['nu_error']:.2f}, ν^r = {row['nu_recon']:.2f}, ρ = {row['rho']:.2f} (ρ_pol {row['rho_policy']:.2f}); "
            f"fires on {row['policy_response_frequency']:.0%} / {row['reference_response_frequency']:.0%} of policy / reference responses")


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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/planted"), help="planted_behaviour.py's --out")
    parser.add_argument("--word", nargs="+", default=["director"])
    parser.add_argument("--mode", default="presence", choices=("presence", "share", "count", "first", "early"),
                        help="the word:W:MODE reward the policies were trained on (planted_behaviour.py's --mode)")
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"])
    parser.add_argument("--layer", type=int, default=None, help="default: the last layer")
    parser.add_argument("--n-texts", type=int, default=512, help="held-out texts both models read (default 512)")
    parser.add_argument("--n-samples", type=int, default=128, help="prompts; each model answers each (default 128)")
    parser.add_argument("--n-latents", type=int, default=SETTINGS["n_latents"])
    parser.add_argument("--k", type=int, default=SETTINGS["k"])
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted runs, the prompts and the crosscoder")
    parser.add_argument("--out", type=Path, default=Path("runs/planted_features"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = CrosscoderSettings(n_latents=args.n_latents, k=args.k, steps=args.steps, batch_size=SETTINGS["batch_size"],
                                  seed=args.seed)
    reference = load_bridge("builtin")
    results = []
    for word in args.word:
        folder = args.runs / (word if args.mode == "presence" else f"{word}_{args.mode}")
        runs = [(algorithm, folder / f"{algorithm}_seed{args.seed}" / "checkpoint") for algorithm in args.algorithms]
        runs.append(("control", args.runs / "control" / "ppo_seed0" / "checkpoint"))
        for name, checkpoint in runs:
            if not checkpoint.is_dir():
                sys.exit(f"planted_features: {checkpoint} is missing; train it with experiments/planted_behaviour.py "
                         f"--word {word} --mode {args.mode} --out {args.runs}.")
            start = time.time()
            result = feature_check(reference, load_bridge(str(checkpoint)), word, mode=args.mode, seed=args.seed,
                                   layer=args.layer, n_texts=args.n_texts, n_samples=args.n_samples, settings=settings)
            result.update(policy=name, checkpoint=str(checkpoint), seconds=time.time() - start,
                          passed=result["fired"] != (name == "control"))
            ev = result["explained_variance"]["both"]
            print(f"{word} {name}: {'PASS' if result['passed'] else 'FAIL'} {figure(result)}; any r: {figure_any(result)}; "
                  f"EV {ev:.3f}, dead {result['dead_fraction']:.0%} ({result['seconds']:.0f} s)", flush=True)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    table = markdown_table(
        ["word", "policy", "says W (pol / ref)", "check", "best policy-only latent", "most policy-leaning latent with W in its top 10",
         "EV / dead"],
        [[r["word"], r["policy"], f"{r['says']:.0%} / {r['reference_says']:.0%}", "PASS" if r["passed"] else "FAIL", figure(r),
          figure_any(r), f"{r['explained_variance']['both']:.3f} / {r['dead_fraction']:.0%}"] for r in results])
    s = results[0]["settings"]
    (args.out / "table.md").write_text(f"# Planted word as a crosscoder latent ({results[0]['hook']}, word:W:{args.mode}; "
                                       f"F = {s['n_latents']}, k = {s['k']}, {s['steps']} steps)\n\n{table}\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
