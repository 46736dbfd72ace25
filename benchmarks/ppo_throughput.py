#!/usr/bin/env python
"""PPO throughput of the rlhf_scratch engine, and its overhead over the plain Hugging Face module.

For each model (the built-in tiny architecture and a GPT-2-small-sized one, both with
random weights built from a local ``GPT2Config``: no download) this script

1. runs the real engine (``PPOTrainer.rollout_phase`` + ``learning_phase``) for
   ``warmup`` untimed phases and then ``phases`` timed ones, and reports the mean
   seconds per phase split into generation, old-policy forward, reference forward,
   scoring (the task reward, ``chars:.``), the rest of the rollout (KL, GAE, ...) and
   learning; episodes/s, generated tokens/s and peak memory;
2. times the same weights as a plain ``AutoModelForCausalLM`` (``GPT2LMHeadModel`` here) (loaded separately from the
   same saved directory, so the bridge's in-place changes to ``bridge.original_model``
   do not matter), without the engine around it:
   * KV-cached sampling with a hand-written loop (``past_key_values``, softmax,
     multinomial, then ``batch_decode``: the same work as ``rlhf_scratch.sampling.generate``)
     and with ``model.generate(do_sample=True, ...)``;
   * one no-grad forward pass of the whole batch (log-softmax + gather of the taken
     tokens), to compare with each of the engine's two rollout forwards;
   * forward + backward + grad-norm clip + AdamW step on the engine's last batch of
     sequences, with the same minibatch size and number of steps as the learning
     phase (loss: cross-entropy of the generated tokens);
   and prints engine / raw ratios (the engine's overhead: TransformerLens bridge hooks,
   the value head, the PPO loss terms, bookkeeping).

Every response has exactly ``new_tokens`` tokens (``stop_at_eos=False``) and every
prompt is the same fixed text, so the numbers are comparable between runs.

Examples::

    python benchmarks/ppo_throughput.py                        # defaults, ~2.5 min on 2 idle CPU cores
    python benchmarks/ppo_throughput.py --skip-gpt2 --phases 1 # quick look at the tiny model
    python benchmarks/ppo_throughput.py --gpt2-batch-size 32 --gpt2-phases 3 --json out.json
    python benchmarks/ppo_throughput.py --device cuda

See benchmarks/README.md for the meaning of every column and measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench_common import MemoryMark, add_threads_argument, cpu_seconds, machine_info, peak_rss_mib, prepare_process
from bench_models import GPT2_SMALL_VOCAB, ModelSpec, bench_engine, bench_raw, build_model_dir, default_specs

import torch  # noqa: E402


# --------------------------------------------------------------------------- measuring


# --------------------------------------------------------------------------- models


# --------------------------------------------------------------------------- engine


# --------------------------------------------------------------------------- raw baselines


# --------------------------------------------------------------------------- one model


def _measured(name: str, args, *fn_args):
    """Run one benchmark function; return its result and the peak memory it added."""
    prepare_process(args)
    mark = MemoryMark(args.device)
    result = {"bench_engine": bench_engine, "bench_raw": bench_raw}[name](*fn_args, args)
    return result, mark.read()


def measured(name: str, args, *fn_args):
    """``_measured`` in a fresh process (--isolate: a clean peak-memory figure per unit) or in this one."""
    if not args.isolate:
        return _measured(name, args, *fn_args)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (name, args, *fn_args))


def bench_model(spec: ModelSpec, workdir: Path, texts: list[str], args, console) -> dict:
    directory = workdir / spec.name
    console.print(f"[bold]{spec.name}[/]: building a random model "
                  f"({spec.n_layer} layers, d_model {spec.d_model}, {spec.n_head} heads, n_ctx {spec.n_ctx}) ...")
    built = build_model_dir(spec, directory, texts, args.tokenizer_vocab, args.seed)
    console.print(f"  {built['parameters'] / 1e6:.1f} M parameters, vocab {built['vocab']} "
                  f"({built['bpe_tokens']} BPE + {built['dummy_tokens']} dummy tokens), built in {built['build_seconds']:.1f} s")
    console.print(f"  engine: batch {spec.batch_size}, minibatch {spec.minibatch_size}, {spec.ppo_epochs} epoch(s), "
                  f"{spec.new_tokens} new tokens, {args.warmup} warmup + {spec.phases} timed phase(s) ...")

    (engine, keep), engine_memory = measured("bench_engine", args, spec, directory)
    console.print(f"  engine: {engine['phase']:.2f} s/phase (setup {engine['setup_seconds']:.1f} s)")

    raw, raw_memory = None, None
    if args.raw:
        console.print("  raw Hugging Face baselines ...")
        raw, raw_memory = measured("bench_raw", args, spec, directory, keep)
    if not args.keep_models:
        shutil.rmtree(directory, ignore_errors=True)

    B, G = spec.batch_size, spec.new_tokens
    steps = spec.ppo_epochs * B // spec.minibatch_size
    summary = {
        "spec": asdict(spec),
        "model": built,
        "prompt_tokens": len(keep["prompt_ids"]),
        "learning_steps_per_phase": steps,
        "engine": engine,
        "engine_memory": engine_memory,
        "episodes_per_s": B / engine["phase"],
        "tokens_per_s": B * G / engine["generate"],
        "raw": raw,
        "raw_memory": raw_memory,
    }
    if raw is not None:
        raw_forwards = 1 if engine.get("old_policy_from_generation") else 2
        ratios = {
            "generate": engine["generate"] / raw["generate"],
            "policy_forward": engine["policy_forward"] / raw["forward"],
            "reference_forward": engine["reference_forward"] / raw["forward"],
            "learning": engine["learning"] / raw["learning"],
            # Whole phase vs. the sum of the raw parts (+ the same reward cost).
            # The raw parts: one forward per pass the engine needs (two, or one when it reads the old policy from
            # the decoding steps).
            "phase": engine["phase"] / (raw["generate"] + raw_forwards * raw["forward"] + engine["reward"] + raw["learning"]),
        }
        if "hf_generate" in raw:
            ratios["generate_vs_hf_generate"] = engine["generate"] / raw["hf_generate"]
        summary["ratios"] = ratios
        summary["raw_tokens_per_s"] = B * G / raw["generate"]
    return summary


# --------------------------------------------------------------------------- output


def print_report(console, info: dict, results: list[dict], args, baseline_rss: float) -> None:
    """Two tables, one column per model: the engine's phase split, then engine vs. raw."""
    from rich.table import Table

    console.print()
    console.print(f"[bold]command[/]: {info['command']}")
    console.print(f"[bold]machine[/]: {info['cpu_model']}, {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
                  f"torch {info['torch']} with {info['torch_threads']} threads, device {info['device']}"
                  + (f" ({info['gpu']})" if "gpu" in info else "")
                  + f"; transformer-lens {info['transformer_lens']}, transformers {info['transformers']}, "
                  f"python {info['python']}; other processes used {100 * info['other_processes_cpu_share']:.0f}% of the "
                  f"CPUs during the run (load average {info['load_start']:.1f} at start)")

    def table(title: str, rows: list[tuple[str, list[str]]]) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column("")
        for r in results:
            t.add_column(f"{r['spec']['name']} ({r['model']['parameters'] / 1e6:.1f}M)", justify="right")
        for label, row_cells in rows:
            if any(c != "-" for c in row_cells):
                t.add_row(label, *row_cells)
        return t

    def cells(fn) -> list[str]:
        out = []
        for r in results:
            try:
                out.append(fn(r))
            except (KeyError, TypeError):
                out.append("-")
        return out

    def mem(m: dict) -> str:
        return f"{m['peak_mib']:.0f} (+{m['increase_mib']:.0f})"

    e = lambda key, digits=3: cells(lambda r: f"{r['engine'][key]:.{digits}f}")  # noqa: E731
    rows = [
        ("batch × new tokens", cells(lambda r: f"{r['spec']['batch_size']} × {r['spec']['new_tokens']}")),
        ("minibatch × epochs → steps", cells(lambda r: f"{r['spec']['minibatch_size']} × {r['spec']['ppo_epochs']} "
                                                    f"→ {r['learning_steps_per_phase']}")),
        ("generate (KV cache)", e("generate")),
        ("old-policy forward (or value head only)", e("policy_forward")),
        ("reference forward", e("reference_forward")),
        ("scoring: chars:. (in phase)", e("reward", 4)),
        ("scoring: VADER (not in phase)", e("vader", 4)),
        ("other rollout (KL, GAE, ...)", e("other_rollout")),
        ("learning", e("learning")),
        ("phase total", e("phase")),
        ("  min – max over phases", cells(lambda r: f"{r['engine']['phase_min']:.3f} – {r['engine']['phase_max']:.3f}")),
        ("episodes / s", cells(lambda r: f"{r['episodes_per_s']:.2f}")),
        ("generated tokens / s", cells(lambda r: f"{r['tokens_per_s']:.0f}")),
        ("peak memory MiB (Δ)", cells(lambda r: mem(r["engine_memory"]))),
    ]
    console.print(table("Engine: mean seconds per PPO phase", rows))

    if any(r.get("raw") for r in results):
        raw = lambda key: cells(lambda r: f"{r['raw'][key]:.3f}")  # noqa: E731
        ratio = lambda key: cells(lambda r: f"{r['ratios'][key]:.2f}×")  # noqa: E731
        rows = [
            ("generate: engine", e("generate")),
            ("generate: raw KV-cache loop", raw("generate")),
            ("  ratio engine/raw", ratio("generate")),
            ("generate: raw HF generate()", raw("hf_generate")),
            ("  ratio engine/raw", ratio("generate_vs_hf_generate")),
            ("1 forward, no grad: raw", raw("forward")),
            ("  ratio old-policy fwd/raw", ratio("policy_forward")),
            ("  ratio reference fwd/raw", ratio("reference_forward")),
            ("learning: engine", e("learning")),
            ("learning: raw fwd+bwd+AdamW", raw("learning")),
            ("  ratio engine/raw", ratio("learning")),
            ("phase: ratio engine/raw parts", ratio("phase")),
            ("raw peak memory MiB (Δ)", cells(lambda r: mem(r["raw_memory"]))),
        ]
        console.print(table("Same model as a plain GPT2LMHeadModel, without the engine (seconds)", rows))

    notes = []
    for r in results:
        if r["model"]["dummy_tokens"]:
            notes.append(f"{r['spec']['name']}: model vocab {r['model']['vocab']} = {r['model']['bpe_tokens']} BPE tokens "
                         f"+ {r['model']['dummy_tokens']} dummy tokens added to the tokenizer (so every sampled id decodes).")
    if args.device.startswith("cuda"):
        notes.append("Peak memory: torch.cuda.max_memory_allocated, reset before each measurement (Δ: over the "
                     "memory allocated at its start).")
        notes.append("On CUDA the engine's per-part clocks do not synchronize, so time can shift between "
                     "neighbouring parts; the phase and learning totals are synchronized.")
    elif args.isolate:
        notes.append("Peak memory: peak RSS (VmHWM) of a fresh process that ran only that measurement; Δ is its "
                     "increase over the same process after imports (torch, transformers, transformer_lens).")
    else:
        notes.append(f"Peak memory: process-wide peak RSS (VmHWM), a high-water mark over the whole run; Δ is its "
                     f"increase during that measurement (models run left to right; {baseline_rss:.0f} MiB after "
                     f"imports). A raw Δ of +0 means the raw baseline stayed under the engine's peak.")
    if any(r.get("raw") for r in results):
        notes.append("Ratios are engine / raw (1.00× = no overhead). Phase ratio: engine phase / (raw generate + n × "
                     "raw forward + reward + raw learning), n = 1 when the engine reads the old policy from the decoding "
                     "steps (its old-policy row is then the value head alone), else 2.")
    busy = info["other_processes_cpu_share"]
    if busy > 0.1:
        notes.append(f"[yellow]The machine was shared: other processes used {100 * busy:.0f}% of its "
                     f"{info['cpus_usable']} CPUs during the run, so CPU timings are inflated and noisy. With "
                     f"{info['torch_threads']} torch threads on a contended machine every parallel op can wait for a "
                     f"descheduled thread (tiny models suffer most)"
                     + ("; compare --threads 1.[/]" if info["torch_threads"] > 1 else ".[/]"))
    for note in notes:
        console.print(f"[dim]note:[/] {note}")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    specs = default_specs()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md for what every column means.",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    add_threads_argument(parser)
    parser.add_argument("--skip-tiny", action="store_true", help="do not benchmark the tiny model")
    parser.add_argument("--skip-gpt2", action="store_true", help="do not benchmark the GPT-2-small-sized model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed phases (and raw repetitions) before timing (default: 1)")
    parser.add_argument("--prompt", default="The movie", help="the fixed prompt of every episode (default: %(default)r)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--tokenizer-vocab", type=int, default=specs["tiny"].vocab,
                        help="BPE vocabulary trained on the built-in review corpus (default: %(default)s)")
    parser.add_argument("--corpus-texts", type=int, default=3000, help="reviews the tokenizer is trained on (default: %(default)s)")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="skip the plain Hugging Face baselines")
    parser.add_argument("--no-hf-generate", dest="hf_generate", action="store_false",
                        help="skip the model.generate() baseline (the hand-written KV-cache loop still runs)")
    parser.add_argument("--no-vader", dest="vader", action="store_false", help="skip timing VADER on each phase's texts")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--workdir", type=Path, default=None, help="where model directories are built (default: a temp dir)")
    parser.add_argument("--keep-models", action="store_true", help="keep the built model directories")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every measurement in this process instead of a fresh one each (peak memory is then "
                             "a process-wide high-water mark)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every phase's timings")

    fields = (("phases", "timed phases"), ("batch-size", "episodes per phase"), ("minibatch-size", "episodes per step"),
              ("ppo-epochs", "passes over each batch"), ("new-tokens", "generated tokens per episode"))
    group = parser.add_argument_group("phase shape for both models (overrides the per-model values when given)")
    for flag, help_text in fields:
        group.add_argument(f"--{flag}", type=int, default=None, help=help_text)
    for name, spec in specs.items():
        group = parser.add_argument_group(f"{name} model")
        for flag, help_text in fields:
            group.add_argument(f"--{name}-{flag}", type=int, default=getattr(spec, flag.replace("-", "_")),
                               help=f"{help_text} (default: %(default)s)")
    group = parser.add_argument_group("gpt2 model architecture")
    group.add_argument("--gpt2-vocab", type=int, default=GPT2_SMALL_VOCAB,
                       help="model vocabulary (dummy tokens fill the tokenizer up to it); 0: the tokenizer's size "
                            "(default: %(default)s)")
    group.add_argument("--gpt2-layers", type=int, default=specs["gpt2"].n_layer, help="(default: %(default)s)")

    args = parser.parse_args(argv)
    args.specs = []
    for name, spec in specs.items():
        if getattr(args, f"skip_{name}"):
            continue
        for flag, _ in fields:
            attr = flag.replace("-", "_")
            common = getattr(args, attr)
            setattr(spec, attr, common if common is not None else getattr(args, f"{name}_{attr}"))
        if name == "gpt2":
            spec.vocab, spec.n_layer = args.gpt2_vocab, args.gpt2_layers
        if spec.batch_size % spec.minibatch_size:
            parser.error(f"{name}: minibatch size {spec.minibatch_size} must divide batch size {spec.batch_size}")
        if min(spec.phases, spec.batch_size, spec.minibatch_size, spec.ppo_epochs, spec.new_tokens) < 1:
            parser.error(f"{name}: phases, sizes, epochs and new tokens must be >= 1")
        args.specs.append(spec)
    if not args.specs:
        parser.error("nothing to run: both models skipped")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from rich.console import Console

    console = Console()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build ({torch.__version__}).")
    prepare_process(args)

    from rlhf_scratch.corpus import generate_reviews

    wall_start = time.perf_counter()
    info = machine_info(args)
    info["load_start"] = os.getloadavg()[0]
    busy_start, own_start = cpu_seconds()
    baseline_rss = peak_rss_mib()
    texts = generate_reviews(args.corpus_texts, seed=args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ppo_throughput_"))
    results = []
    try:
        for spec in args.specs:
            results.append(bench_model(spec, workdir, texts, args, console))
    finally:
        if args.workdir is None and not args.keep_models:
            shutil.rmtree(workdir, ignore_errors=True)
    info["wall_seconds"] = time.perf_counter() - wall_start
    info["load_end"] = os.getloadavg()[0]
    busy_end, own_end = cpu_seconds()
    # Share of all CPUs' time used by other processes while this ran (0: a quiet machine).
    info["other_processes_cpu_share"] = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / (
        info["wall_seconds"] * info["cpus_usable"])
    print_report(console, info, results, args, baseline_rss)
    console.print(f"total wall time {info['wall_seconds']:.0f} s")
    report = {"machine": info, "peak_rss_after_imports_mib": baseline_rss, "results": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        console.print(f"figures written to {args.json}")
    return report


if __name__ == "__main__":
    main()
