#!/usr/bin/env python
"""Engine ÷ raw module on the rollout forwards and the learning pass, for a GPT-2, a Llama and a Gemma 2 of the
same tiny shape: does the plain-forward fast path (``rlhf_scratch/plain_forward.py``) serve rotary and RMSNorm
families as well as GPT-2?

Each family is a random model of the built-in tiny architecture (``PretrainConfig``: layers, heads, d_model,
n_ctx; MLP 4·d_model; Llama and Gemma 2 with as many key/value heads as query heads) with one BPE tokenizer,
built locally. Per round and family, ``ppo_throughput.bench_engine`` runs the real ``PPOTrainer`` (its
``time/policy_forward``, ``time/reference_forward`` and learning phase) and ``bench_models.bench_raw`` times
the plain Hugging Face module (``AutoModelForCausalLM``) on the same batch: one no-grad forward + log-softmax
gather, and forward + backward + clip + fused AdamW over the same minibatches. The families are interleaved
within each round, so slow drift of a shared machine's load hits all of them alike; the ratios are per round,
then their median.

    OMP_NUM_THREADS=1 python benchmarks/fastpath_families.py --threads 1 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

from bench_common import add_threads_argument, cpu_seconds, machine_info, others_cpu_share, prepare_process
from bench_models import ModelSpec, bench_engine, bench_raw, default_specs

import torch  # noqa: E402

FAMILIES = ("gpt2", "llama", "gemma2")
PARTS = ("policy_forward", "reference_forward", "learning")


def family_config(family: str, spec: ModelSpec, vocab: int, special: int):
    """A ``family`` config of ``spec``'s shape (random weights are drawn by the model class)."""
    import transformers as tf

    ids = dict(bos_token_id=special, eos_token_id=special, pad_token_id=special)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=spec.n_ctx, n_embd=spec.d_model, n_layer=spec.n_layer,
                             n_head=spec.n_head, **ids)
    rotary = dict(vocab_size=vocab, hidden_size=spec.d_model, intermediate_size=4 * spec.d_model,
                  num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head,
                  max_position_embeddings=spec.n_ctx, **ids)
    if family == "llama":
        return tf.LlamaConfig(**rotary)
    if family == "gemma2":
        return tf.Gemma2Config(**rotary, head_dim=spec.d_model // spec.n_head, sliding_window=spec.n_ctx)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def build_family_dir(family: str, spec: ModelSpec, directory: Path, texts: list[str], tokenizer_vocab: int, seed: int) -> int:
    """Save a random ``family`` model of ``spec``'s shape and its tokenizer in ``directory``; its parameter count."""
    from transformers import AutoModelForCausalLM

    from rlhf_scratch.pretrain import train_tokenizer

    tokenizer = train_tokenizer(texts, tokenizer_vocab, directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, spec, len(tokenizer), tokenizer.bos_token_id)).eval()
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def micro(directory: Path, keep: dict, repeats: int, rows: int = 0) -> dict:
    """Min and median seconds of one forward (no grad) and one forward + backward of the rollout batch through
    the raw module (with the bridge's attention implementation, eager: ``bench_raw`` loads the default, sdpa), the
    plain path and the bridge, the three interleaved in each repetition (min: the least
    disturbed by other processes)."""
    from transformers import AutoModelForCausalLM

    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.plain_forward import PlainForward

    bridge = load_bridge(directory)  # the raw module with the same attention kernels as the bridge's (eager)
    raw = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=bridge.original_model.config._attn_implementation).eval()
    plain = PlainForward(bridge)
    plain.check_against_bridge()
    tokens, mask = keep["sequences"], keep["attention_mask"]
    if rows:  # the first rows only: a small batch, where the hook points' Python overhead weighs most
        tokens, mask = tokens[:rows], mask[:rows]
    runs = {"raw": lambda: raw(input_ids=tokens, attention_mask=mask).logits,
            "plain": lambda: plain(tokens, mask)[0],
            "bridge": lambda: bridge(tokens, attention_mask=mask)}
    times = {f"{name}_{kind}": [] for name in runs for kind in ("forward", "backward")}
    for index in range(repeats + 1):  # the first repetition is warmup
        for name, run in runs.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
            middle = time.perf_counter()
            run().log_softmax(-1).mean().backward()
            end = time.perf_counter()
            if index:
                times[f"{name}_forward"].append(middle - start)
                times[f"{name}_backward"].append(end - middle)
    return {key: {"min": min(values), "median": statistics.median(values)} for key, values in times.items()}


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_threads_argument(parser, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the families (default: %(default)s)")
    parser.add_argument("--phases", type=int, default=2, help="timed PPO phases per round and family (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed phases (and raw repetitions) first (default: %(default)s)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--micro", type=int, default=15,
                        help="repetitions of the forward / forward+backward micro-benchmark per family, 0: none (default: %(default)s)")
    parser.add_argument("--micro-rows", type=int, default=0,
                        help="rows of the rollout batch the micro-benchmark takes, 0: all (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.families = args.families.split(",")
    for family in args.families:
        if family not in FAMILIES:
            parser.error(f"--families: unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    # What bench_engine / bench_raw read.
    args.device, args.prompt, args.seed, args.vader, args.verbose, args.hf_generate = "cpu", "The movie", 0, False, False, False
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    prepare_process(args)
    from rlhf_scratch.corpus import generate_reviews

    spec = replace(default_specs()["tiny"], phases=args.phases)
    info = machine_info(args) | {"commit": git_commit(), "load_start": os.getloadavg()[0]}
    wall_start, (busy_start, own_start) = time.perf_counter(), cpu_seconds()
    workdir = Path(tempfile.mkdtemp(prefix="fastpath_families_"))
    texts = generate_reviews(3000, seed=args.seed)
    rounds: dict[str, list[dict]] = {family: [] for family in args.families}
    fallbacks, micros = {}, {}
    try:
        parameters = {f: build_family_dir(f, spec, workdir / f, texts, spec.vocab or 2048, args.seed) for f in args.families}
        for index in range(args.rounds):
            for family in args.families:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    engine, keep = bench_engine(spec, workdir / family, args)
                fallbacks[family] = [str(w.message) for w in caught if "TransformerLens bridge" in str(w.message)]
                raw = bench_raw(spec, workdir / family, keep, args)
                ratios = {"policy_forward": engine["policy_forward"] / raw["forward"],
                          "reference_forward": engine["reference_forward"] / raw["forward"],
                          "learning": engine["learning"] / raw["learning"]}
                rounds[family].append({"engine": {k: engine[k] for k in PARTS}, "raw": {k: raw[k] for k in ("forward", "learning")},
                                       "ratios": ratios})
                if args.micro and index == args.rounds - 1:
                    micros[family] = micro(workdir / family, keep, args.micro, args.micro_rows)
                print(f"round {index + 1} {family}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                      + f" (raw forward {raw['forward'] * 1e3:.1f} ms, raw learning {raw['learning']:.3f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - wall_start
    busy_end, own_end = cpu_seconds()
    info |= {"wall_seconds": wall, "load_end": os.getloadavg()[0],
             "other_processes_cpu_share": others_cpu_share(busy_end - busy_start, own_end - own_start, wall)}
    summary = {f: {part: statistics.median(r["ratios"][part] for r in rounds[f]) for part in PARTS} for f in args.families}

    print(f"\ncommit {info['commit']}, torch {info['torch']}, transformers {info['transformers']}, transformer-lens "
          f"{info['transformer_lens']}, {info['cpu_model']}, {info['torch_threads']} thread(s); load {info['load_start']:.1f} -> "
          f"{info['load_end']:.1f}, other processes {100 * info['other_processes_cpu_share']:.0f} % of the CPUs")
    print(f"shape: {spec.n_layer} layers, d_model {spec.d_model}, {spec.n_head} heads; batch {spec.batch_size}, minibatch "
          f"{spec.minibatch_size}, {spec.ppo_epochs} epochs, {spec.new_tokens} new tokens; {args.rounds} rounds x {args.phases} phases")
    print("| family | parameters | plain path | policy forward | reference forward | learning pass |")
    print("|---|---|---|---|---|---|")
    for family in args.families:
        path = "bridge (fallback)" if fallbacks[family] else "plain module"
        print(f"| {family} | {parameters[family] / 1e6:.2f} M | {path} | " + " | ".join(
            f"{summary[family][part]:.2f}x" for part in PARTS) + " |")
    if micros:
        print(f"\none pass of {args.micro_rows or 'all'} rows of the rollout batch, min over the repetitions (median in brackets), ÷ the raw module:")
        print("| family | raw forward | plain ÷ raw | bridge ÷ raw | raw forward+backward | plain ÷ raw | bridge ÷ raw |")
        print("|---|---|---|---|---|---|---|")
        for family, m in micros.items():
            cells = []
            for kind in ("forward", "backward"):
                raw_time = m[f"raw_{kind}"]
                cells.append(f"{raw_time['min'] * 1e3:.1f} ms")
                cells += [f"{m[f'{name}_{kind}']['min'] / raw_time['min']:.2f}x "
                          f"({m[f'{name}_{kind}']['median'] / raw_time['median']:.2f}x)" for name in ("plain", "bridge")]
            print(f"| {family} | " + " | ".join(cells) + " |")
    report = {"machine": info, "micro": micros, "spec": spec.__dict__, "parameters": parameters, "fallbacks": fallbacks,
              "rounds": rounds, "median_ratios": summary}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
