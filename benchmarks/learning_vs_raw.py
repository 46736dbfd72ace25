"""The PPO learning pass against a raw loop doing the same maths (issue 24, item 2), interleaved, one thread.

    OMP_NUM_THREADS=1 python benchmarks/learning_vs_raw.py --threads 1 --rounds 7          # built-in tiny model
    OMP_NUM_THREADS=1 python benchmarks/learning_vs_raw.py --threads 1 --profile           # + cProfile of each
    OMP_NUM_THREADS=1 python benchmarks/learning_vs_raw.py --threads 1 --model gpt2 --rounds 3 --batch-size 16 \\
        --minibatch-size 8 --ppo-epochs 1                                                   # GPT-2-small shape

One rollout of the real ``PPOTrainer`` (fixed prompt, ``new_tokens`` tokens, reward ``chars:.``) gives the replay
memory and its shuffled minibatches. Then, in each round, both of:

* **engine**: ``trainer.learning_phase(memory, minibatches)`` — the learner's steps (forward with the value head,
  the PPO terms through ``algorithm.learning_losses``, backward, clip, AdamW), its logging and checks;
* **raw**: the plain Hugging Face module (``from_pretrained`` of the same weights, its own parameters) with a copy of
  the value head, on the same minibatches, the same maths written out in one function: log-softmax at the generated
  positions, whitened advantages, clipped surrogate, value loss, entropy bonus, backward, gradient-norm clip and a
  fused AdamW (the best plain PyTorch: no logging, no checks, no host reads).

The order alternates between rounds. Printed: the median seconds of each, the median of the per-round ratios
engine ÷ raw, and every round; the machine's load average, versions and the commit. ``--profile`` adds a cProfile
of one learning phase of each (top functions by own time).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import bench_common
from bench_common import add_threads_argument, machine_info, prepare_process, profiled

import torch  # noqa: E402 (after bench_common: the offline environment first)


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(bench_common.CHECKOUT), "log", "-1", "--format=%h"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(bench_common.CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def model_directory(name: str, workdir: Path) -> Path:
    """``builtin`` (the cached built-in model), ``gpt2`` (GPT-2-small shape, random weights, built here) or a dir."""
    if name == "builtin":
        from rlhf_scratch.pretrain import ensure_builtin_model

        return Path(ensure_builtin_model())
    if name == "gpt2":
        from bench_models import build_model_dir, default_specs

        from rlhf_scratch.corpus import generate_reviews

        directory = workdir / "gpt2"
        build_model_dir(default_specs()["gpt2"], directory, generate_reviews(3000, seed=0), 2048, seed=0)
        return directory
    return Path(name)


def make_engine(model_dir: Path, args):
    """A PPOTrainer, one rollout's memory and its minibatches (drawn once, reused by every round)."""
    from rlhf_scratch.models import PolicyWithValueHead, load_bridge
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    config = PPOConfig(model=str(model_dir), reward="chars:.", prompt="The movie", phases=1000, warmup_phases=0,
                       batch_size=args.batch_size, minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
                       sampling=SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False), seed=args.seed,
                       lr=1e-6, head_lr=1e-6)
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    torch.nn.init.normal_(trainer.policy.value_head.out.weight, std=0.1)  # non-zero values, as after some training
    memory, _ = trainer.build_memory(trainer.sample_and_score())
    return trainer, memory, list(trainer.minibatches(memory))


def make_raw(model_dir: Path, trainer, minibatches, args):
    """The raw learning loop over ``minibatches``: a closure that runs one learning phase (module docstring)."""
    from transformers import AutoModelForCausalLM

    config = trainer.config
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    head = copy.deepcopy(trainer.policy.value_head)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": config.lr},
                                   {"params": list(head.parameters()), "lr": config.head_lr}], fused=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    eps, vf_coef, ent_coef, max_norm = config.clip_coef, config.vf_coef, config.ent_coef, config.max_grad_norm

    def masked_mean(x, mask):
        return (x * mask).sum() / mask.sum()

    def step(mb):
        P, mask = mb.prompt_len, mb.gen_mask
        maskf = mask.float()
        position_ids = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=mb.sequences, attention_mask=mb.attention_mask, position_ids=position_ids,
                    output_hidden_states=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, P - 1 : -1], dim=-1)
        logprobs = logp.gather(-1, mb.sequences[:, P:, None]).squeeze(-1)
        values = head(out.hidden_states[-1][:, P - 1 : -1])
        adv = mb.advantages
        mean = masked_mean(adv, maskf)
        centred = (adv - mean) * maskf
        adv = centred * torch.rsqrt((centred**2).sum() / (maskf.sum() - 1) + 1e-8)
        ratio = torch.exp((logprobs - mb.logprobs) * maskf)
        surrogate = masked_mean(torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv), maskf)
        value_loss = 0.5 * vf_coef * masked_mean((values - mb.returns) ** 2, maskf)
        entropy = masked_mean(-(logp.exp() * logp).sum(-1), maskf)
        loss = -(surrogate - value_loss + ent_coef * entropy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()

    def phase():
        for mb in minibatches:
            step(mb)

    return phase


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin | gpt2 | a model directory (default: builtin)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--minibatch-size", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one phase of each")
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.device = "cpu"
    prepare_process(args)

    with tempfile.TemporaryDirectory(prefix="learning_vs_raw_") as workdir:
        model_dir = model_directory(args.model, Path(workdir))
        trainer, memory, minibatches = make_engine(model_dir, args)
        raw = make_raw(model_dir, trainer, minibatches, args)
        engine = lambda: trainer.learning_phase(memory, minibatches=minibatches)  # noqa: E731
        info = machine_info(args)
        load_start = os.getloadavg()
        times = {"engine": [], "raw": []}
        for index in range(args.warmup + args.rounds):
            order = [("engine", engine), ("raw", raw)]
            if index % 2:
                order.reverse()
            for name, fn in order:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if index >= args.warmup:
                    times[name].append(elapsed)
        load_end = os.getloadavg()
        profiles = [profiled(fn, f"{name} (by own time, then cumulative)", args.top, ("tottime", "cumulative"))
                    for name, fn in (("engine", engine), ("raw", raw))] if args.profile else []

    ratios = [e / r for e, r in zip(times["engine"], times["raw"])]
    steps = len(minibatches)
    print(f"commit {commit()}; {info['cpu_model']}, torch {info['torch']} ({info['torch_threads']} thread(s)), "
          f"transformers {info['transformers']}, transformer-lens {info['transformer_lens']}, python {info['python']}")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; model {args.model} "
          f"({sum(p.numel() for p in trainer.policy.trunk_parameters()) / 1e6:.1f}M); batch {args.batch_size}, "
          f"minibatch {args.minibatch_size}, {args.ppo_epochs} epoch(s) = {steps} steps, {args.new_tokens} new tokens")
    print(f"learning phase, median of {args.rounds} rounds: engine {statistics.median(times['engine']):.3f} s, "
          f"raw {statistics.median(times['raw']):.3f} s, engine / raw {statistics.median(ratios):.3f}x "
          f"(per round {min(ratios):.2f}-{max(ratios):.2f}x)")
    print("rounds: " + ", ".join(f"{e:.3f}/{r:.3f}" for e, r in zip(times["engine"], times["raw"])))
    for text in profiles:
        print(text)
    return {"engine": times["engine"], "raw": times["raw"], "ratios": ratios}


if __name__ == "__main__":
    main()
