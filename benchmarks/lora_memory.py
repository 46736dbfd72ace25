#!/usr/bin/env python
"""Peak memory of one PPO phase, full-parameter against LoRA, at the GPT-2-small shape (random weights, no download).

Each variant runs in a fresh process: ``PPOTrainer(...).run_phase()`` once, with a small phase (``--batch-size``
episodes of ``--new-tokens`` tokens, minibatches of ``--minibatch-size``, one epoch). It reports the process's
peak resident memory (``VmHWM``) after the imports and after the phase. It also reports the training state by
count:

    full:  policy weights 4N + gradients 4N + AdamW moments 8N + reference copy 4N     (float32, N = trunk + head)
    LoRA:  policy weights 4N + (gradients 4 + moments 8)·n_trainable + no reference copy (a view of the same tensors)

    python benchmarks/lora_memory.py                       # GPT-2 small (124M), rank 8, about 2 min on 2 busy cores
    python benchmarks/lora_memory.py --layers 2 --d-model 128 --vocab 0   # a quick look at a tiny shape

Figures: benchmarks/README.md ("LoRA: peak memory of a PPO phase").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import CHECKOUT, OFFLINE_ENV, peak_rss_mib


def one_phase(model_dir: str, lora_rank: int, args) -> dict:
    """Runs in the child process: one PPO phase; its peak RSS and parameter counts."""
    import torch

    from rlhf_scratch.models import bridge_parameters
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    torch.set_num_threads(1)
    after_imports = peak_rss_mib()
    config = PPOConfig(model=model_dir, prompt="The movie", reward="chars:e", phases=1, warmup_phases=0,
                       batch_size=args.batch_size, minibatch_size=args.minibatch_size, ppo_epochs=1,
                       lr=3e-4 if lora_rank else 3e-5, lora_rank=lora_rank,
                       sampling=SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False))
    trainer = PPOTrainer(config)
    trainer.run_phase()
    # Each storage once: the GPT-2 bridge's fused ``.qkv.`` alias is left out (``models.bridge_parameters``).
    trainable = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    policy = trainer.policy
    lora = [] if policy.lora is None else list(policy.lora.parameters())
    total = sum(p.numel() for p in (*bridge_parameters(policy.bridge), *policy.head_parameters(), *lora))
    shared = {p.data_ptr() for p in policy.parameters()}
    reference_copy = sum(p.numel() for p in bridge_parameters(trainer.reference) if p.data_ptr() not in shared)
    return {"lora_rank": lora_rank, "rss_after_imports_mib": after_imports, "rss_peak_mib": peak_rss_mib(),
            "parameters": total, "trainable": trainable, "reference_copy_parameters": reference_copy,
            "state_mib_by_count": (4 * total + 12 * trainable + 4 * reference_copy) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257, help="model vocabulary (0: the tokenizer's)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--minibatch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_phase(args.child[0], int(args.child[1]), args)))
        return

    from bench_models import ModelSpec, build_model_dir

    from rlhf_scratch.corpus import generate_reviews

    spec = ModelSpec("lora", args.layers, args.heads, args.d_model, 128, args.vocab, args.batch_size,
                     args.minibatch_size, 1, args.new_tokens, 1)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        build_model_dir(spec, Path(workdir), generate_reviews(2000, seed=0), 512, seed=0)
        for rank in (0, args.rank):
            command = [sys.executable, __file__, "--child", workdir, str(rank),
                       *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch_size", "minibatch_size", "new_tokens")]]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV,
                                    "PYTHONPATH": str(CHECKOUT), "OMP_NUM_THREADS": "1"}, check=False)
            if result.returncode != 0:
                sys.exit(f"the rank-{rank} phase failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<14}{'parameters':>12}{'trainable':>12}{'ref. copy':>12}{'state (count)':>15}{'RSS imports':>13}{'RSS peak':>10}")
    for row in rows:
        name = "full" if row["lora_rank"] == 0 else f"LoRA r={row['lora_rank']}"
        print(f"{name:<14}{row['parameters']:>12,}{row['trainable']:>12,}{row['reference_copy_parameters']:>12,}"
              f"{row['state_mib_by_count']:>11.0f} MiB{row['rss_after_imports_mib']:>9.0f} MiB{row['rss_peak_mib']:>6.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
