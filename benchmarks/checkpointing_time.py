#!/usr/bin/env python
"""The time cost of ``--gradient-checkpointing``: CPU seconds of the learning pass (policy forward with the value
head, a loss over the logits and values, backward) with and without it, alternated, on a saved model.

CPU seconds of this process (``time.process_time``), not wall time: on a shared machine other processes stretch the
wall clock but not (much) the work this process does. One thread.

    python benchmarks/memory.py --shapes gpt2-small --configs full --no-save-fit   # saves the random GPT-2-small
    python benchmarks/checkpointing_time.py --model /tmp/rlhf_scratch_memory/gpt2-small --batch 8 --seq 59
"""

from __future__ import annotations

import argparse
import time

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=59)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_common.set_threads(1)
    import torch

    from rlhf_scratch.models import PolicyWithValueHead, load_bridge

    policy = PolicyWithValueHead(load_bridge(args.model))
    tokens = torch.randint(0, policy.cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)

    def learning_pass(checkpointing: bool) -> float:
        policy.gradient_checkpointing = checkpointing
        policy.zero_grad(set_to_none=True)
        start = time.process_time()
        output = policy(tokens, mask)
        (output.logits.log_softmax(-1).mean() + output.values.square().mean()).backward()
        return time.process_time() - start

    learning_pass(False)  # warm up
    seconds = {False: [], True: []}
    for _ in range(args.repeats):
        for checkpointing in (False, True):
            seconds[checkpointing].append(learning_pass(checkpointing))
    plain, checkpointed = min(seconds[False]), min(seconds[True])
    print(f"{args.batch} × {args.seq} tokens: learning pass {plain:.2f} CPU s without checkpointing, "
          f"{checkpointed:.2f} with it ({checkpointed / plain - 1:+.0%}); all: {seconds}")


if __name__ == "__main__":
    main()
