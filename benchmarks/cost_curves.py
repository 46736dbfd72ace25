"""Cost curves (issue 24, item 4): seconds per PPO phase and its parts against response length and batch size, for
the engine and the raw Hugging Face module, with the fitted growth of each.

    OMP_NUM_THREADS=1 python benchmarks/cost_curves.py --threads 1                    # ~10 min on 2 idle cores
    OMP_NUM_THREADS=1 python benchmarks/cost_curves.py --threads 1 --lengths 24 64 --batches 16 64   # quicker

A random model of the built-in tiny shape (4 layers, 4 heads, d_model 128, vocab 2048; ``n_ctx`` raised to fit the
longest response) is built once. Each point runs ``bench_models.bench_engine`` (the real ``PPOTrainer``: one
untimed and ``--phases`` timed phases, each split into generation, old policy, reference forward, learning) and
``bench_models.bench_raw`` (the plain module: a KV-cached sampling loop, one forward, the same learning steps with
fused AdamW) on the same shapes, one after the other (engine then raw, in one process, one thread). Every episode
has exactly ``G`` tokens (``stop_at_eos=False``); minibatch 16, 4 epochs, so learning takes 4·B/16 steps.

Sweeps: response length G in ``--lengths`` at batch ``--length-batch`` (64), and batch B in ``--batches`` at
``--batch-length`` tokens (24). The growth exponent k of each part is the least-squares slope of log seconds
against log G (or log B): cached decoding should grow linearly in G (k ≈ 1) for the engine as for the raw loop; a
part of the engine that grows faster than the same part of the raw loop is a bug. With matplotlib installed the
curves are saved to ``--plot`` (default ``benchmarks/figures/cost_curves.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)
from bench_common import add_threads_argument, machine_info, prepare_process
from bench_models import ModelSpec, bench_engine, bench_raw, build_model_dir

ENGINE_PARTS = {"generate": "generate", "old policy": "policy_forward", "reference forward": "reference_forward",
                "learning": "learning", "phase": "phase"}
RAW_PARTS = {"generate": "generate", "forward": "forward", "learning": "learning"}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: the growth exponent k in y ∝ x^k."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(model_dir: Path, n_ctx: int, batch: int, length: int, args) -> dict:
    from rlhf_scratch.pretrain import PretrainConfig

    tiny = PretrainConfig()
    spec = ModelSpec("tiny", tiny.n_layer, tiny.n_head, tiny.d_model, n_ctx, tiny.vocab_size, batch_size=batch,
                     minibatch_size=min(16, batch), ppo_epochs=4, new_tokens=length, phases=args.phases)
    start = time.perf_counter()
    engine, keep = bench_engine(spec, model_dir, args)
    raw = bench_raw(spec, model_dir, keep, args) if args.raw else {}
    row = {"batch": batch, "length": length, "load": os.getloadavg()[0],
           "engine": {label: engine[key] for label, key in ENGINE_PARTS.items()},
           "raw": {label: raw[key] for label, key in RAW_PARTS.items()} if raw else {},
           "old_policy_from_generation": engine.get("old_policy_from_generation", False)}
    print(f"  B {batch:4d} G {length:4d}: engine " + ", ".join(f"{k} {v:.3f}" for k, v in row["engine"].items())
          + ("; raw " + ", ".join(f"{k} {v:.3f}" for k, v in row["raw"].items()) if raw else "")
          + f"  ({time.perf_counter() - start:.0f} s, load {row['load']:.1f})", flush=True)
    return row


def fits(rows: list[dict], axis: str) -> dict:
    xs = [row[axis] for row in rows]
    out = {}
    for side in ("engine", "raw"):
        for part in rows[0][side]:
            out[f"{side} {part}"] = slope(xs, [row[side][part] for row in rows])
    return out


def plot(length_rows: list[dict], batch_rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"generate": "C0", "old policy": "C1", "reference forward": "C2", "forward": "C2", "learning": "C3",
              "phase": "k"}
    for ax, rows, axis, title in ((axes[0], length_rows, "length", "response length G (batch {})"),
                                  (axes[1], batch_rows, "batch", "batch size B ({} tokens)")):
        if len(rows) < 2:
            ax.set_visible(False)
            continue
        xs = [row[axis] for row in rows]
        k = fits(rows, axis)
        for side, style in (("engine", "-o"), ("raw", "--x")):
            for part in rows[0][side]:
                ax.plot(xs, [row[side][part] for row in rows], style, color=colors.get(part, "C5"),
                        label=f"{side} {part} (k={k[f'{side} {part}']:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        other = rows[0]["batch" if axis == "length" else "length"]
        ax.set_xlabel(title.format(other))
        ax.set_ylabel("seconds per phase")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Cost of one PPO phase, tiny model (1 thread): engine (solid) vs raw module (dashed); k = fitted exponent")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[24, 64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--length-batch", type=int, default=64, help="batch of the length sweep (default: 64)")
    parser.add_argument("--batch-length", type=int, default=24, help="tokens of the batch sweep (default: 24)")
    parser.add_argument("--phases", type=int, default=1, help="timed phases per point (default: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed phases per point (default: 1)")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="engine only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "figures" / "cost_curves.png")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.device, args.prompt, args.vader, args.verbose, args.hf_generate = "cpu", "The movie", False, False, False
    prepare_process(args)
    from rlhf_scratch.corpus import generate_reviews
    from rlhf_scratch.pretrain import PretrainConfig

    info = machine_info(args)
    info["load_start"] = os.getloadavg()[0]
    n_ctx = max(max(args.lengths), args.batch_length) + 8
    tiny = PretrainConfig()
    with tempfile.TemporaryDirectory(prefix="cost_curves_") as workdir:
        model_dir = Path(workdir) / "tiny"
        shape = ModelSpec("tiny", tiny.n_layer, tiny.n_head, tiny.d_model, n_ctx, tiny.vocab_size, 1, 1, 1, 1, 1)
        build_model_dir(shape, model_dir, generate_reviews(3000, seed=args.seed), tiny.vocab_size, seed=args.seed)
        print(f"response length sweep at batch {args.length_batch}:", flush=True)
        length_rows = [measure(model_dir, n_ctx, args.length_batch, g, args) for g in args.lengths]
        print(f"batch sweep at {args.batch_length} tokens:", flush=True)
        batch_rows = [measure(model_dir, n_ctx, b, args.batch_length, args) for b in args.batches]
    info["load_end"] = os.getloadavg()[0]
    for rows, axis in ((length_rows, "length"), (batch_rows, "batch")):
        if len(rows) > 1:
            print(f"growth exponent k against {axis} (seconds ∝ {axis}^k): "
                  + ", ".join(f"{name} {k:.2f}" for name, k in fits(rows, axis).items()))
    print(f"machine: {info['cpu_model']}, torch {info['torch']} ({info['torch_threads']} thread(s)), transformers "
          f"{info['transformers']}, transformer-lens {info['transformer_lens']}; load average {info['load_start']:.1f} "
          f"at start, {info['load_end']:.1f} at end")
    if plot(length_rows, batch_rows, args.plot):
        print(f"plot saved to {args.plot}")
    else:
        print("matplotlib is not installed: no plot")
    report = {"machine": info, "length_sweep": length_rows, "batch_sweep": batch_rows,
              "fits": {"length": fits(length_rows, "length") if len(length_rows) > 1 else {},
                       "batch": fits(batch_rows, "batch") if len(batch_rows) > 1 else {}}}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
