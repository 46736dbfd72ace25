#!/usr/bin/env python
"""How often the lens check of ``planted_checks.py`` fires on reward-0 controls: the old rule (W among the top 10 at
some reading) against the new one (top 10 *and* z ≥ Z_MIN at the same reading).

    python experiments/lens_control_rate.py --out runs/planted                       # controls seeds 0-7, 16 words
    python experiments/lens_control_rate.py --out runs/planted --seeds 0 1 --words cast book

Each control is ``planted_behaviour.py``'s: PPO with a reward of 0 (``0*chars:.``), its settings, cached in
OUT/control/ppo_seedS/ (so seeds 0 and 1 are the ones ``planted_behaviour.py`` trained, and a missing seed is
trained here the same way, ~35 s each on a quiet 2-core CPU). For each control, Δ = activation_difference on the
first 5 positions of the same 64 held-out reviews the planted checks use (``--seed`` 0), then for each word W
``planted_checks.lens_check``: whether each rule fires, W's best rank over the 8 readings, its z there, and its
largest z. The words default to the 16 candidates listed before the story/cast/score runs (experiments/README.md).
The false-positive rate of each rule is the share of (control, word) pairs where it fires, with a Clopper-Pearson
95 % interval (which treats the pairs as independent; the words of one control share its Δ).

Beside the chosen words, every token of the vocabulary is read as if it were W (``all_tokens``): per control, how
many of the V tokens each rule would fire on, and how many reach z ≥ Z_MIN at some reading whatever their rank.
Under the null (Δ's direction unrelated to every token) that last count is at most 0.1 % of V. Writes
OUT/NAME.md and OUT/NAME.json (``--name``, default lens_control_rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_behaviour import CONTROL_REWARD, say, train_policy  # noqa: E402
from planted_checks import FIRST_K, LENS_K, heldout_texts, lens_check, lens_z_min  # noqa: E402

from rlhf_scratch.evaluation import markdown_table  # noqa: E402

CANDIDATES = ("music", "acting", "ending", "story", "script", "cast", "camera", "score", "scene", "villain", "hero",
              "sequel", "actress", "characters", "screenplay", "effects")
"""The 16 words looked up before story, cast and score were chosen (experiments/README.md, the acceptance run)."""


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial proportion k / n: lower solves P(X ≥ k | p) = a/2,
    upper P(X ≤ k | p) = a/2 (a = 1 − level), each by bisection."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    tail = (1 - level) / 2

    def solve(f, target: float) -> float:  # f increasing in p on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: 1 - binomial_cdf(k - 1, n, p), tail)
    upper = 1.0 if k == n else solve(lambda p: -binomial_cdf(k, n, p), -tail)
    return lower, upper


def all_tokens(reference, policy, delta) -> dict:
    """Every token t of the vocabulary read as W on Δ [L, D]: how many tokens the old rule (top 10 at some reading)
    and the new one (top 10 and z ≥ Z_MIN at one reading) would fire on, how many have z ≥ Z_MIN at some reading,
    and the standard deviation of z over tokens (mean over the readings)."""
    import torch

    from rlhf_scratch.diff_lens import lens_alignment, lens_top_tokens

    old, new, high, spread = set(), set(), set(), []
    z_min = lens_z_min(2 * delta.shape[0])
    for bridge in (reference, policy):
        tops = lens_top_tokens(bridge, delta, k=LENS_K)
        z = lens_alignment(bridge, delta)  # [L, V]
        spread += z.std(dim=-1).tolist()
        high |= set(torch.nonzero((z >= z_min).any(dim=0)).flatten().tolist())
        for layer, top in enumerate(tops):
            old |= set(top)
            new |= {t for t in top if z[layer, t] >= z_min}
    return {"vocab": int(z.shape[-1]), "old": len(old), "new": len(new), "z_high": len(high),
            "z_sd": sum(spread) / len(spread), "new_tokens": sorted(new)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/planted"),
                        help="planted_behaviour.py's output folder: controls in OUT/control/ (default runs/planted)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="control seeds (default 0-7)")
    parser.add_argument("--words", nargs="+", default=list(CANDIDATES), help="words to read (default the 16 candidates)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out texts (planted_behaviour's --seed)")
    parser.add_argument("--n-texts", type=int, default=64, help="held-out reviews for Δ (default 64, as the checks)")
    parser.add_argument("--name", default="lens_control_rate", help="stem of the outputs OUT/NAME.md, OUT/NAME.json")
    args = parser.parse_args(argv)
    args.quick, args.retrain = False, False  # train_policy's flags: the full settings, cached runs reused
    return args


def main(argv=None) -> dict:
    """Train the missing controls (with gradients), then read each control's lens for every word."""
    args = parse_args(argv)
    from rlhf_scratch.diff_lens import activation_difference
    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.word_reward import WordReward

    start = time.time()
    reference = load_bridge("builtin")
    tokens = {}
    for word in args.words:
        try:
            tokens[word] = WordReward(word, tokenizer=reference.tokenizer).token_id
        except ValueError as error:
            say(f"{word}: left out ({error})")
    texts, mask = heldout_texts(reference.tokenizer, args.n_texts, args.seed)
    rows, train_seconds, vocab = [], {}, {}
    for seed in args.seeds:
        checkpoint, seconds = train_policy("ppo", CONTROL_REWARD, seed, args.out / "control" / f"ppo_seed{seed}", args)
        train_seconds[seed] = seconds
        say(f"control seed {seed}: {'trained' if seconds else 'cached'} in {seconds:.0f} s")
        policy = load_bridge(checkpoint)
        delta = activation_difference(reference, policy, texts, mask, first_k=FIRST_K)
        vocab[seed] = all_tokens(reference, policy, delta)
        for word, token_id in tokens.items():
            check = lens_check(reference, policy, delta, token_id)
            rows.append({"seed": seed, "word": word, "old": check["fired_top10"], "new": check["fired"],
                         "figure": check["figure"], "rank": check["rank"], "z": check["z"], "max_z": check["max_z"],
                         "max_z_at": check["max_z_at"], "z_min": check["z_min"]})
            if check["fired_top10"] or check["fired"]:
                say(f"  seed {seed} {word}: old {'fires' if check['fired_top10'] else 'silent'}, new "
                    f"{'fires' if check['fired'] else 'silent'}: {check['figure']}")
    n = len(rows)
    rates = {}
    for rule in ("old", "new"):
        k = sum(row[rule] for row in rows)
        rates[rule] = {"fired": k, "pairs": n, "rate": k / max(n, 1), "ci95": clopper_pearson(k, n) if n else None}
    table = markdown_table(["control", *tokens], [[f"s{seed}", *(
        ("**old+new** " if r["new"] and r["old"] else "**old** " if r["old"] else "**new** " if r["new"] else "")
        + f"#{r['rank']}, z {r['z']:.1f} (max {r['max_z']:.1f})" for r in rows if r["seed"] == seed)]
        for seed in args.seeds])
    lines = [f"{rule} rule: fires on {v['fired']} of {v['pairs']} (control, word) pairs = {v['rate']:.1%}, 95 % CI "
             f"{v['ci95'][0]:.1%}–{v['ci95'][1]:.1%}" for rule, v in rates.items()]
    decode = reference.tokenizer.decode
    vocab_table = markdown_table(
        ["control", "tokens, old rule", "tokens, new rule", "tokens with z ≥ Z_MIN", "sd of z over tokens", "new rule's tokens"],
        [[f"s{seed}", str(v["old"]), str(v["new"]), f"{v['z_high']} ({v['z_high'] / v['vocab']:.2%})", f"{v['z_sd']:.2f}",
          " ".join(repr(decode([t])) for t in v["new_tokens"][:12])] for seed, v in vocab.items()])
    seconds = time.time() - start
    z_min = rows[0]["z_min"] if rows else float("nan")
    text = (f"# The lens check on reward-0 controls\n\nEach cell: W's best rank over the 8 readings, its z there, and its "
            f"largest z; **old** = top 10 at some reading, **new** = top 10 and z ≥ {z_min:.2f} at one reading.\n\n"
            f"{table}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\nEvery token of the vocabulary read as W "
            f"(``all_tokens``):\n\n{vocab_table}\n\nWall time {seconds:.0f} s (training "
            f"{sum(train_seconds.values()):.0f} s).\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    summary = {"rows": rows, "rates": rates, "all_tokens": vocab, "train_seconds": train_seconds, "seconds": seconds,
               "words": tokens}
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    say(f"\n{table}\n\n" + "\n".join(lines) + f"\n\n{vocab_table}\n\nwall time {seconds:.0f} s; written to "
        f"{args.out}/{args.name}.md")
    return summary


if __name__ == "__main__":
    main()
