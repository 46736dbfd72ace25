#!/usr/bin/env python
"""Data-parallel scaling of PPO: episodes/s on 1 and 2 processes, parallel efficiency, peak memory per rank,
and bfloat16 autocast against float32.

For each model (random weights built from a local ``GPT2Config``, as in ``ppo_throughput.py``: the built-in
model's shape ``tiny`` and GPT-2-small's ``gpt2``) the real ``PPOTrainer`` runs ``warmup`` untimed phases and
``phases`` timed ones (``run_phase``: sample, score, learn) in these set-ups, each in fresh processes:

    W=1 fp32     python ddp_scaling.py --worker ...                                 (no process group)
    W=2 fp32     python -m torch.distributed.run --nproc-per-node 2 ddp_scaling.py --worker ...
    W=1 bf16     the first with --dtype bfloat16 (autocast forward passes)

with the **same global batch** every time (W=2: each rank samples and learns on half of it) and one thread per
process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). Every response has exactly ``new_tokens`` tokens
(``stop_at_eos=False``) and the prompt is fixed, so the work per phase is the same in every set-up.

Reported per set-up: seconds per phase (mean of the timed phases, rank 0's clock: every phase ends with
collectives, so the ranks finish together), episodes/s = batch / that, rank 0's generate and learning
time per phase, peak RSS of every rank (``VmHWM``, ``bench_common.peak_rss_mib``), and for W=2 the parallel efficiency
(episodes/s at W=2) / (2 × episodes/s at W=1).

    python benchmarks/ddp_scaling.py                      # tiny and gpt2, ~5 min on 2 CPU cores
    python benchmarks/ddp_scaling.py --models tiny        # a minute
    python benchmarks/ddp_scaling.py --device cuda        # GPUs: W=2 needs 2 of them (NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the shared benchmark modules (also when started by torchrun)

import bench_common as bc  # noqa: E402  (offline environment, this checkout's rlhf_scratch, timing, memory)
import bench_models as bm  # noqa: E402  (model specs and model building)
import torch  # noqa: E402

SETUPS = (("W=1 fp32", 1, "float32"), ("W=2 fp32", 2, "float32"), ("W=1 bf16", 1, "bfloat16"))


def worker(args) -> None:
    """One rank: build the trainer, run warmup + timed phases, write rank 0's figures (and every rank's peak RSS)."""
    bc.set_threads(1)
    from rlhf_scratch import distributed
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    spec = bm.default_specs()[args.model]
    config = PPOConfig(model=str(args.model_dir), prompt="The movie", reward="chars:.", batch_size=spec.batch_size,
                       minibatch_size=spec.minibatch_size, ppo_epochs=spec.ppo_epochs, phases=args.warmup + args.phases + 1,
                       warmup_phases=0, dtype=args.dtype, device=args.device,
                       sampling=SamplingConfig(max_new_tokens=spec.new_tokens, stop_at_eos=False))
    trainer = PPOTrainer(config)
    for _ in range(args.warmup):
        trainer.run_phase()
    seconds, cpu, generate, learning = [], [], [], []
    for _ in range(args.phases):
        start, cpu_start = time.perf_counter(), time.process_time()
        record = trainer.run_phase()
        bc.sync(config.device)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        generate.append(record.metrics["time/generate"])
        learning.append(record.metrics["time/learning"])
    rss = distributed.all_gather_objects(bc.peak_rss_mib())
    cpu_per_rank = distributed.all_gather_objects(bc.mean(cpu))
    if distributed.is_main():
        phase = bc.mean(seconds)
        # Wall time on a busy machine measures the other jobs too; CPU time per rank measures this work. With a
        # core per rank a phase would take about the busiest rank's CPU time: the "CPU-bound" figures.
        result = {"seconds_per_phase": phase, "episodes_per_s": spec.batch_size / phase,
                  "cpu_seconds_per_rank": cpu_per_rank, "cpu_bound_episodes_per_s": spec.batch_size / max(cpu_per_rank),
                  "generate": bc.mean(generate),
                  "learning": bc.mean(learning), "peak_rss_mib": rss, "world_size": distributed.world_size(),
                  "dtype": args.dtype, "phases": seconds}
        if config.device.startswith("cuda"):
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_setup(model: str, model_dir: Path, world: int, dtype: str, args, workdir: Path) -> dict:
    result = workdir / f"{model}-{world}-{dtype}.json"
    flags = ["--worker", "--model", model, "--model-dir", str(model_dir), "--dtype", dtype, "--device", args.device,
             "--warmup", str(args.warmup), "--phases", str(args.phases), "--result", str(result)]
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(Path(__file__).resolve()), *flags], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model} W={world} {dtype} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,gpt2", help="comma-separated: tiny, gpt2")
    parser.add_argument("--phases", type=int, default=2, help="timed phases per set-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed phases first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    from rlhf_scratch.data import load_texts

    texts = load_texts("builtin", limit=3000)
    info = bc.machine_info(args)
    info["torch_threads"] = 1
    results = {"machine": info, "models": {}}
    busy_start, own_start, wall_start = *bc.cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model in args.models.split(","):
            spec = bm.default_specs()[model]
            built = bm.build_model_dir(spec, workdir / model, texts, 2048, seed=0)
            print(f"{model}: {built['parameters'] / 1e6:.1f} M parameters; global batch {spec.batch_size}, minibatch "
                  f"{spec.minibatch_size}, {spec.ppo_epochs} epoch(s), {spec.new_tokens} new tokens; "
                  f"{args.warmup} warmup + {args.phases} timed phases", flush=True)
            rows = {}
            for name, world, dtype in SETUPS:
                rows[name] = run_setup(model, workdir / model, world, dtype, args, workdir)
                row = rows[name]
                print(f"  {name}: {row['seconds_per_phase']:7.2f} s/phase  {row['episodes_per_s']:7.2f} episodes/s  "
                      f"CPU s/phase per rank {', '.join(f'{c:.2f}' for c in row['cpu_seconds_per_rank'])} "
                      f"({row['cpu_bound_episodes_per_s']:.2f} episodes/s CPU-bound)  "
                      f"generate {row['generate']:6.2f} s  learning {row['learning']:6.2f} s  "
                      f"peak RSS/rank {', '.join(f'{m:.0f}' for m in row['peak_rss_mib'])} MiB", flush=True)
            one, two, bf16 = rows["W=1 fp32"], rows["W=2 fp32"], rows["W=1 bf16"]
            efficiency = two["episodes_per_s"] / (2 * one["episodes_per_s"])
            cpu_efficiency = two["cpu_bound_episodes_per_s"] / (2 * one["cpu_bound_episodes_per_s"])
            bf16_speed = bf16["episodes_per_s"] / one["episodes_per_s"]
            bf16_cpu_speed = bf16["cpu_bound_episodes_per_s"] / one["cpu_bound_episodes_per_s"]
            print(f"  parallel efficiency (W=2 vs 2 × W=1): wall {efficiency:.2f}, CPU-bound {cpu_efficiency:.2f}; "
                  f"bf16 / fp32 episodes/s: wall {bf16_speed:.2f}, CPU-bound {bf16_cpu_speed:.2f}")
            results["models"][model] = {"parameters": built["parameters"], "spec": asdict(spec), "setups": rows,
                                        "parallel_efficiency": efficiency, "parallel_efficiency_cpu_bound": cpu_efficiency,
                                        "bf16_speedup": bf16_speed, "bf16_speedup_cpu_bound": bf16_cpu_speed}
    # On a shared machine, how much of it other processes took while this ran (their CPU seconds).
    busy_end, own_end = bc.cpu_seconds()
    wall = time.perf_counter() - wall_start
    others = (busy_end - busy_start) - (own_end - own_start)
    results["load"] = {"wall_seconds": wall, "cpu_seconds_available": wall * (os.cpu_count() or 1),
                       "cpu_seconds_of_other_processes": others}
    print(f"wall {wall:.0f} s; other processes used {others:.0f} of the {wall * (os.cpu_count() or 1):.0f} CPU-seconds "
          "this machine had meanwhile")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
