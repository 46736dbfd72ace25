#!/usr/bin/env python
"""One prepared check of bf16 PPO with LoRA on a GPU: generation tokens/s, seconds per phase, and peak memory next
to the memory model's prediction (``bench_memory.py``, fitted by ``memory.py``). Run it through ``gpu_check.sh``,
which picks the GPU shapes when CUDA is there and a tiny CPU shape otherwise (the test suite runs that, so the
script cannot rot).

For each shape (random weights, built on the device from a config: no download) it runs the real ``PPOTrainer``
with ``--dtype bfloat16`` (autocast), LoRA rank 16 on every attention and MLP matrix when this checkout has LoRA
(else full-parameter, said so), gradient checkpointing, for ``--warmup`` untimed and ``--phases`` timed phases, and
prints one row: parameters, trainable parameters, generated tokens/s, seconds per phase (rollout, learning), and
peak memory (CUDA: ``max_memory_allocated`` over the timed phases; CPU: peak RSS) beside the prediction.

    benchmarks/gpu_check.sh                          # GPT-2-small and Llama-1B shapes on CUDA, or tiny on CPU
    python benchmarks/gpu_check.py --device cpu --shapes gpt2-tiny --phases 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)
from bench_memory import GB, SHAPES, Shape, load_fit, predict

TOKENIZER_VOCAB = 2048
LORA_RANK = 16


def build_model(shape: Shape, directory: Path, device: str, seed: int = 0) -> Path:
    """A random model of ``shape`` (initialised on ``device``: fast on a GPU) saved with a BPE tokenizer padded
    with dummy tokens up to the shape's vocabulary, so that every sampled id decodes."""
    import torch
    import transformers as tf

    from rlhf_scratch.corpus import generate_reviews
    from rlhf_scratch.pretrain import train_tokenizer

    tokenizer = train_tokenizer(generate_reviews(500, seed=seed), min(TOKENIZER_VOCAB, shape.vocab), directory)
    if shape.vocab > len(tokenizer):
        tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), shape.vocab)])
        tokenizer.save_pretrained(directory)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
                   pad_token_id=tokenizer.bos_token_id)
    if shape.family == "gpt2":
        config = tf.GPT2Config(vocab_size=shape.vocab, n_positions=shape.n_ctx, n_embd=shape.d_model,
                               n_layer=shape.n_layers, n_head=shape.n_heads, n_inner=shape.d_mlp, **special)
    else:
        config = tf.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                                num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                                num_key_value_heads=shape.n_kv_heads, max_position_embeddings=shape.n_ctx,
                                tie_word_embeddings=shape.tied, **special)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


class Peak:
    """Peak memory from now on: CUDA ``max_memory_allocated``, or the process's peak RSS (reset on Linux)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def read(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        return bench_common.peak_rss_mib() * 2**20


def check_shape(shape: Shape, args, workdir: Path) -> dict:
    import torch

    from rlhf_scratch.models import PolicyWithValueHead, load_bridge
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.rewards import make_reward
    from rlhf_scratch.sampling import SamplingConfig

    directory = build_model(shape, workdir / shape.name, args.device, args.seed)
    lora = {"lora_rank": LORA_RANK} if any(f.name == "lora_rank" for f in fields(PPOConfig)) else {}
    config = PPOConfig(model=str(directory), reward="chars:.", prompt="The movie", phases=args.warmup + args.phases,
                       warmup_phases=0, batch_size=args.batch_size, minibatch_size=args.minibatch_size, ppo_epochs=1,
                       sampling=SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False),
                       dtype="bfloat16", gradient_checkpointing=True, device=args.device, seed=args.seed, **lora)
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(load_bridge(directory, device=args.device)),
                         reward=make_reward("chars:."))
    trainable = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    rows, peak = [], None
    for index in range(args.warmup + args.phases):
        if index == args.warmup:
            peak = Peak(args.device)
        bench_common.sync(args.device)
        start = time.perf_counter()
        rollout = trainer.sample_and_score()
        memory, _ = trainer.build_memory(rollout)
        bench_common.sync(args.device)
        middle = time.perf_counter()
        trainer.learning_phase(memory)
        bench_common.sync(args.device)
        end = time.perf_counter()
        if index >= args.warmup:
            rows.append({"generate": rollout.stats["time/generate"], "rollout": middle - start, "learning": end - middle})
    measured = peak.read()
    tokens = args.minibatch_size * memory.sequences.shape[1]
    fit = load_fit()
    predicted = None if fit is None else predict(
        shape, tokens, fit, include_base=not args.device.startswith("cuda"), lora_rank=LORA_RANK if lora else 0,
        checkpointing=True)["total"]
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    del trainer
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"shape": shape.name, "parameters": shape.parameters, "trainable": trainable, "lora": bool(lora),
            "tokens_per_s": args.batch_size * args.new_tokens / mean["generate"], "rollout_s": mean["rollout"],
            "learning_s": mean["learning"], "phase_s": mean["rollout"] + mean["learning"], "peak": measured,
            "predicted": predicted, "minibatch_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="gpt2-small,llama-1b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--minibatch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        bench_common.set_threads(args.threads)
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = args.device + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
    print(f"gpu_check on {device}: bf16 autocast, gradient checkpointing, batch {args.batch_size}, minibatch "
          f"{args.minibatch_size}, {args.new_tokens} new tokens, {args.warmup} warmup + {args.phases} timed phase(s)",
          flush=True)
    if load_fit() is None:
        print("no memory fit (benchmarks/memory_fit.json): run benchmarks/memory.py for the predicted column")
    header = ("| shape | parameters | trainable | LoRA | generate tokens/s | s/phase (rollout + learning) | "
              "peak GB | predicted GB |")
    print(header + "\n|" + "---|" * header.count(" | ") + "---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for name in args.shapes.split(","):
            r = check_shape(SHAPES[name], args, Path(workdir))
            predicted = "—" if r["predicted"] is None else f"{r['predicted'] / GB:.2f}"
            print(f"| {r['shape']} | {r['parameters'] / 1e6:.1f} M | {r['trainable'] / 1e6:.2f} M | "
                  f"{'r' + str(LORA_RANK) if r['lora'] else 'no (not in this checkout)'} | {r['tokens_per_s']:.0f} | "
                  f"{r['phase_s']:.2f} ({r['rollout_s']:.2f} + {r['learning_s']:.2f}) | {r['peak'] / GB:.2f} | "
                  f"{predicted} |", flush=True)
    print(f"pid {os.getpid()} done")


if __name__ == "__main__":
    main()
