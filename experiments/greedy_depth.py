#!/usr/bin/env python
"""How many components does patching need? Greedy forward selection vs the singles ranking beyond a quarter.

    python experiments/greedy_depth.py dialogue:dpo book:dpo plot:ppo --out runs/planted [--max-n 10]

For each WORD:ALGORITHM policy cached by ``planted_behaviour.py --mode early`` (OUT/WORD_early/ALGORITHM_seed0),
on the patching check's 32 held-out texts (``planted_checks.patching``): the share p(S_n) / p_policy(W) of the
reference with S_n patched from the policy, for n = 1 .. max-n, with S_n the greedy prefix
(``patching_greedy.greedy_ranking``, metric p(W)) and the n best singles (``patch_scan``'s recovered log-prob of W),
and with all heads and MLPs patched. Prints one line per policy; writes OUT/greedy_depth.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_checks import heldout_texts, mean_token_prob  # noqa: E402

from rlhf_scratch.models import load_bridge  # noqa: E402
from rlhf_scratch.patching import components, patch_scan, patched_logits, scored_positions  # noqa: E402
from rlhf_scratch.patching_greedy import greedy_ranking, token_prob_score  # noqa: E402
from rlhf_scratch.word_reward import WordReward  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="WORD:ALGORITHM, e.g. dialogue:dpo")
    parser.add_argument("--out", type=Path, default=Path("runs/planted"))
    parser.add_argument("--max-n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    reference = load_bridge("builtin")
    tokens, mask = heldout_texts(reference.tokenizer, 32, args.seed)
    scored = mask.bool() & (mask.cumsum(1) > 1)
    predicting = scored_positions(scored)
    candidates = [c for c in components(reference) if not c.endswith(".resid")]
    results = {}
    for spec in args.policies:
        word, _, algorithm = spec.partition(":")
        if not algorithm:
            raise SystemExit(f"{spec!r}: give WORD:ALGORITHM, e.g. dialogue:dpo.")
        start = time.time()
        policy = load_bridge(args.out / f"{word}_early" / f"{algorithm}_seed{args.seed}" / "checkpoint")
        token = WordReward(word, tokenizer=reference.tokenizer).token_id
        p_policy = mean_token_prob(policy(tokens, attention_mask=mask), predicting, token)

        def share(chosen):
            return mean_token_prob(patched_logits(reference, policy, tokens, mask, chosen), predicting, token) / p_policy

        greedy = greedy_ranking(reference, policy, tokens, mask, candidates, token_prob_score(token, predicting), args.max_n)
        singles = patch_scan(reference, policy, tokens, mask, scored, token_ids=[token]).ranked("tokens", kinds=("head", "mlp"))
        results[spec] = {"greedy": greedy.order, "greedy_shares": [s / p_policy for s in greedy.scores],
                         "singles": singles[: args.max_n], "singles_shares": [share(singles[:n]) for n in range(1, args.max_n + 1)],
                         "all": share(candidates)}
        r = results[spec]
        print(f"{spec}: greedy {' '.join(f'{s:.2f}' for s in r['greedy_shares'])} | singles "
              f"{' '.join(f'{s:.2f}' for s in r['singles_shares'])} | all {len(candidates)}: {r['all']:.2f} | "
              f"{' '.join(r['greedy'])} ({time.time() - start:.0f} s)", flush=True)
    (args.out / "greedy_depth.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
