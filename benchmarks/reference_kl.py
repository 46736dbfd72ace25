#!/usr/bin/env python
"""The KL a policy gets against a bfloat16 / float16 reference, next to the float32 one (``--reference-dtype``).

For each policy given (``--policy``: "builtin" — at step 0 the policy *is* the reference, so the true KL is 0 — and
any trained run's directory), sample ``--prompts`` held-out prompts of the built-in task once from the policy
(seeded), and read the same responses with the reference in float32, bfloat16 and float16. Per reference dtype:

* sequence KL: the mean over responses of Σ_t (log π − log π_ref) (k1, what ``objective/kl`` logs by default) and
  of Σ_t KL_t exact over the vocabulary (``objective/kl_exact``);
* |Δ log π_ref(token)|: the taken tokens' log-prob under the reference in that dtype less the float32 one
  (mean and max over real generated tokens) — the rounding itself.

    python benchmarks/reference_kl.py --policy builtin --policy runs/ppo     # the figures of docs/memory.md
"""

from __future__ import annotations

import argparse

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)

DTYPES = ("float32", "bfloat16", "float16")


def measure(policy_source: str, reference_source: str, n_prompts: int, new_tokens: int, seed: int) -> dict:
    import torch

    from rlhf_scratch.config import EvalConfig, SamplingConfig
    from rlhf_scratch.evaluation import evaluation_prompts
    from rlhf_scratch.models import load_bridge, make_reference
    from rlhf_scratch.objectives import generated_logprobs, kl_exact_from_logprobs
    from rlhf_scratch.plain_forward import reference_logits
    from rlhf_scratch.sampling import generate

    policy = load_bridge(policy_source)
    base = load_bridge(reference_source)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    prompts = evaluation_prompts(EvalConfig(n_prompts=n_prompts, seed=seed), policy.tokenizer)
    generation = generate(policy, prompts, sampling, generator=torch.Generator().manual_seed(seed))
    sequences, mask, gen = generation.sequences, generation.attention_mask, generation.gen_mask
    P = generation.prompt_len
    with torch.no_grad():
        _, logp_gen, logprobs = generated_logprobs(reference_logits(policy, sequences, mask).float(), sequences, P, 1.0)
        rows, float32_taken = {}, None
        for dtype in DTYPES:
            reference = make_reference(base, dtype)
            logits = reference_logits(reference, sequences, mask).float()
            _, ref_logp_gen, ref_logprobs = generated_logprobs(logits, sequences, P, 1.0)
            k1 = torch.where(gen, logprobs - ref_logprobs, 0.0).sum(1)
            exact = torch.where(gen, kl_exact_from_logprobs(logp_gen, ref_logp_gen), 0.0).sum(1)
            if float32_taken is None:
                float32_taken = ref_logprobs
            rounding = (ref_logprobs - float32_taken)[gen].abs()
            rows[dtype] = {"kl_k1": k1.mean().item(), "kl_k1_se": (k1.std() / len(k1) ** 0.5).item(),
                           "kl_exact": exact.mean().item(), "dlogp_mean": rounding.mean().item(),
                           "dlogp_max": rounding.max().item()}
    return {"policy": policy_source, "responses": len(prompts), "tokens": int(gen.sum()), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", default=None, help="policy model (repeatable; default: builtin)")
    parser.add_argument("--reference", default="builtin", help="the reference model (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    bench_common.set_threads(args.threads)
    print("| policy | reference dtype | KL k1 (± s.e.) | KL exact | mean |Δ log π_ref| | max |Δ log π_ref| |")
    print("|---|---|---|---|---|---|")
    for source in args.policy or ["builtin"]:
        result = measure(source, args.reference, args.prompts, args.new_tokens, args.seed)
        for dtype, row in result["rows"].items():
            print(f"| {source} ({result['responses']} responses, {result['tokens']} tokens) | {dtype} | "
                  f"{row['kl_k1']:+.4f} ± {row['kl_k1_se']:.4f} | {row['kl_exact']:.5f} | {row['dlogp_mean']:.2e} | "
                  f"{row['dlogp_max']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
