#!/usr/bin/env python
"""Cost curves (issue 24, item 4): seconds per PPO phase and its parts against response length and batch size, for
the engine, the raw Hugging Face module and TRL 1.12, with the fitted growth of each.

    OMP_NUM_THREADS=1 python benchmarks/cost_curves.py --trl-python /work/trl-venv/bin/python   # ~15 min, 2 idle cores
    OMP_NUM_THREADS=1 python benchmarks/cost_curves.py --make-trl-venv /work/trl-venv           # make the venv first
    OMP_NUM_THREADS=1 python benchmarks/cost_curves.py --quick                                  # seconds: a smoke test

A random model of the built-in tiny shape (4 layers, 4 heads, d_model 128, vocab 2048; ``n_ctx`` raised to fit the
longest response) is built once (``bench_models.build_model_dir``). The sweeps: response length G in ``--lengths``
(24 64 128 256) at batch ``--length-batch`` (16), and batch B in ``--batches`` (16 64 256) at ``--batch-length``
tokens (24). Every episode has exactly G tokens (``stop_at_eos=False``); learning is ``--ppo-epochs`` (1) epochs of
minibatches of ``--minibatch`` (16, or B if smaller), so B/16 optimizer steps.

Each round runs every system once over every point, one fresh process per system and round, one torch thread
(``trl_workers.py points``): the engine (``bench_models.bench_engine``: the real ``PPOTrainer``), the raw module
(``bench_models.bench_raw``: a KV-cached sampling loop, one no-grad forward with the taken log-probs, the same
learning steps with fused AdamW) and, with ``--trl-python``, TRL's ``PPOTrainer`` (value and reward models of the
policy's shape), every other round with the points in reverse order. The figure of a part at a point is the median
over rounds of each process's median over its timed phases. The growth of a part along an axis is ``t = a · x^b`` fitted by least squares on log t against log x
(``fit_power``): cached decoding grows linearly in G (b ≈ 1); a part of the engine whose b exceeds the raw
loop's is a bug. The table and, with matplotlib, a plot (``--plot``) are the report; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)

# The parts of a phase, in table order, and their labels. ``forward`` of the raw loop is one no-grad pass.
PARTS = {"generation": "generation", "policy_forward": "old-policy forward", "reference_forward": "reference forward",
         "value_forward": "value forward (TRL)", "reward": "scoring", "learning": "learning", "total": "phase total"}
SYSTEMS = ("engine", "raw", "trl")
QUICK = {"lengths": [4, 8], "batches": [4, 8], "length_batch": 4, "batch_length": 4, "rounds": 1, "updates": 1,
         "warmup": 0}
GROWTH_TOLERANCE = 0.15  # b above the raw loop's by more than this is flagged (noise on a shared machine: ~0.1)
MIN_SECONDS = 2e-3  # a part below this at any point is not fitted (timer and scheduler noise)


def fit_power(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``t = a · x^b`` on log-log: ``log t = log a + b · log x``. Returns ``(a, b)``.

    b = Σ (u − ū)(v − v̄) / Σ (u − ū)² with u = log x, v = log t; log a = v̄ − b ū. Needs two distinct x > 0 and t > 0.
    """
    if len(xs) != len(ts) or len(set(xs)) < 2:
        raise ValueError(f"fit_power needs at least two distinct x with one t each (got x {xs}, t {ts})")
    if min(xs) <= 0 or min(ts) <= 0:
        raise ValueError(f"fit_power fits on log-log: every x and t must be > 0 (got x {xs}, t {ts})")
    u, v = [math.log(x) for x in xs], [math.log(t) for t in ts]
    mu, mv = statistics.fmean(u), statistics.fmean(v)
    b = sum((p - mu) * (q - mv) for p, q in zip(u, v)) / sum((p - mu) ** 2 for p in u)
    return math.exp(mv - b * mu), b


def point_key(B: int, G: int) -> str:
    """A point's name in the report: ``"B16_G24"``."""
    return f"B{B}_G{G}"


def point_of(key: str) -> tuple[int, int]:
    """(B, G) of a point's name."""
    B, G = key[1:].split("_G")
    return int(B), int(G)


def sweep_points(lengths: list[int], batches: list[int], length_batch: int, batch_length: int) -> dict:
    """The points of each axis as (B, G) pairs, and the distinct points to measure (in order)."""
    axes = {"length": [(length_batch, g) for g in lengths], "batch": [(b, batch_length) for b in batches]}
    unique = list(dict.fromkeys(axes["length"] + axes["batch"]))
    return {"axes": axes, "unique": unique}


def raw_parts(update: dict, engine_policy_forward: bool) -> dict:
    """The raw loop's parts in the engine's names: its one forward is the reference forward, and also the old-policy
    forward when the engine runs one (else the old policy comes from the sampling steps on both sides: no part);
    the phase total is the sum of the passes the engine makes."""
    parts = {"generation": update["generation"], "reference_forward": update["forward"], "learning": update["learning"]}
    if engine_policy_forward:
        parts["policy_forward"] = update["forward"]
    parts["total"] = sum(parts.values())
    return parts


def worker_jobs(system: str, points: list, model_dir: Path, n_ctx: int, args, prompt_ids, hp) -> dict:
    """The ``trl_workers.py points`` job of one system over ``points`` [(B, G)]."""
    from rlhf_scratch.pretrain import PretrainConfig

    tiny = PretrainConfig()
    jobs = []
    for B, G in points:
        mb = min(args.minibatch, B)
        spec = {"name": "tiny", "n_layer": tiny.n_layer, "n_head": tiny.n_head, "d_model": tiny.d_model, "n_ctx": n_ctx,
                "vocab": tiny.vocab_size, "batch_size": B, "minibatch_size": mb, "ppo_epochs": args.ppo_epochs,
                "new_tokens": G, "phases": args.updates}
        job = {"spec": spec, "model_dir": str(model_dir), "threads": 1, "seed": args.seed, "warmup": args.warmup,
               "updates": args.updates, "prompt": args.prompt, "prompt_ids": prompt_ids}
        if system == "trl":
            from trl_side_by_side import trl_config_kwargs

            job.update(variant="full", small_shape=None, trl_config=trl_config_kwargs(
                B, mb, args.ppo_epochs, G, args.warmup + args.updates, hp, args.seed,
                str(model_dir.parent / f"trl_out_{B}_{G}")))
        jobs.append(job)
    return {"kind": {"engine": "project"}.get(system, system), "jobs": jobs}


def process_medians(result: dict) -> dict:
    """One worker's figures per part: the median over its timed phases."""
    rows = result["updates"]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}


def run_rounds(args, pythons: dict, points: list, model_dir: Path, n_ctx: int, hp: dict, workdir: Path) -> dict:
    """Every system once per round over every point (fresh process each); {system: {(B, G): [per-round parts]}}."""
    from trl_side_by_side import run_worker

    runs = {s: {p: [] for p in points} for s in pythons}
    prompt_ids, engine_policy_forward = None, True
    for r in range(args.rounds):
        for system, python in pythons.items():
            if system != "engine" and prompt_ids is None:
                raise RuntimeError("the engine runs first: it gives the prompt's token ids")
            t0, load = time.perf_counter(), os.getloadavg()[0]
            # Every other round backwards: a load that rises (or falls) through one process's sweep would otherwise
            # tilt every fitted exponent of that round the same way.
            order = points if r % 2 == 0 or prompt_ids is None else points[::-1]
            job = worker_jobs(system, order, model_dir, n_ctx, args, prompt_ids, hp)
            out = run_worker(python, "points", job, workdir, f"r{r}_{system}", 1, None, project=system != "trl")
            for point, res in zip(order, out["results"]):
                parts = process_medians(res)
                if system == "engine":
                    prompt_ids = prompt_ids or res["prompt_ids"]
                    engine_policy_forward = not res.get("old_policy_from_generation", False)
                elif system == "raw":
                    parts = raw_parts(parts, engine_policy_forward)
                runs[system][point].append(parts)
            print(f"  round {r + 1}/{args.rounds} {system}: {len(points)} points in {time.perf_counter() - t0:.0f} s "
                  f"(load {load:.1f})", flush=True)
    medians = {s: {p: {k: statistics.median(rr[k] for rr in rounds) for k in rounds[0]} for p, rounds in pts.items()}
               for s, pts in runs.items()}
    return {"per_round": runs, "median": medians, "engine_policy_forward": engine_policy_forward}


def growth(medians: dict, axes: dict) -> dict:
    """{axis: {system: {part: (a, b) or None}}}: the fit of each part along each axis (None: too small to fit).
    ``medians``: {system: {point name: {part: seconds}}}; ``axes``: {axis: [point names]}."""
    out = {}
    for axis, points in axes.items():
        if len(set(points)) < 2:
            continue
        xs = [point_of(p)[1 if axis == "length" else 0] for p in points]
        out[axis] = {}
        for system, by_point in medians.items():
            out[axis][system] = {}
            for part in PARTS:
                ts = [by_point[p].get(part) for p in points]
                fitted = None if any(t is None or t < MIN_SECONDS for t in ts) else fit_power(xs, ts)
                out[axis][system][part] = fitted
    return out


def flags(fits: dict) -> list[str]:
    """The parts of the engine (and TRL) whose exponent exceeds the raw loop's by more than ``GROWTH_TOLERANCE``."""
    out = []
    for axis, systems in fits.items():
        raw = systems.get("raw", {})
        for system in (s for s in systems if s != "raw"):
            for part, fitted in systems[system].items():
                reference = raw.get(part) or (raw.get("reference_forward") if part == "policy_forward" else None)
                if fitted and reference and fitted[1] - reference[1] > GROWTH_TOLERANCE:
                    out.append(f"{system} {PARTS[part]} grows as {axis}^{fitted[1]:.2f}, the raw loop's as "
                               f"{axis}^{reference[1]:.2f}")
    return out


def table_rows(report: dict, axis: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of one axis's table: system, part, seconds at each point, b, b − raw's b, engine ÷ raw
    at the first and the last point."""
    medians, points, fits = report["median"], report["axes"][axis], report["fits"][axis]
    header = ["system", "part", *[("G=%d" if axis == "length" else "B=%d") % point_of(p)[axis == "length"]
                                  for p in points], "b", "Δb vs raw", "÷ raw (first, last)"]
    rows = []
    for system in medians:
        for part, label in PARTS.items():
            ts = [medians[system][p].get(part) for p in points]
            if all(t is None for t in ts):
                continue
            fitted, raw = fits[system][part], fits.get("raw", {}).get(part)
            raw_ts = [medians.get("raw", {}).get(p, {}).get(part) for p in points]
            ratio = (f"{ts[0] / raw_ts[0]:.2f}×, {ts[-1] / raw_ts[-1]:.2f}×"
                     if system != "raw" and None not in (ts[0], ts[-1], raw_ts[0], raw_ts[-1]) else "")
            rows.append([system, label, *["-" if t is None else f"{t:.4f}" for t in ts],
                         f"{fitted[1]:.2f}" if fitted else "-",
                         f"{fitted[1] - raw[1]:+.2f}" if fitted and raw and system != "raw" else "", ratio])
    return header, rows


def print_tables(report: dict, markdown: bool = False) -> None:
    """Each axis's table: rich on the terminal, or Markdown (``--markdown``, for benchmarks/README.md)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    for axis in report["fits"]:
        B, G = point_of(report["axes"][axis][0])
        title = (f"seconds per phase against {'response length G' if axis == 'length' else 'batch B'} "
                 f"({f'batch {B}' if axis == 'length' else f'{G} tokens'}; median of {report['rounds']} round(s)); "
                 "b: t = a·x^b fitted on log-log; Δb: b − the raw loop's b")
        header, rows = table_rows(report, axis)
        if markdown:
            print(f"\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            for row in rows:
                print("| " + " | ".join(row) + " |")
            continue
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 else "right")
        for i, row in enumerate(rows):
            if i and row[0] != rows[i - 1][0]:
                table.add_section()
            table.add_row(*row)
        console.print(table)


def plot(medians: dict, axes: dict, fits: dict, path: Path) -> str:
    """One panel per axis and part, a line per system (log-log). Returns what was done, for the report."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in PARTS if any(p in v for by_point in medians.values() for v in by_point.values())]
    rows = [axis for axis in axes if axis in fits]
    fig, grid = plt.subplots(len(rows), len(parts), figsize=(3.1 * len(parts), 3.0 * len(rows)), squeeze=False)
    styles = {"engine": ("C0", "-o"), "raw": ("k", "--x"), "trl": ("C3", ":s")}
    for i, axis in enumerate(rows):
        points = axes[axis]
        xs = [point_of(p)[1 if axis == "length" else 0] for p in points]
        for j, part in enumerate(parts):
            ax = grid[i][j]
            for system, by_point in medians.items():
                ts = [by_point[p].get(part) for p in points]
                if any(t is None or t <= 0 for t in ts):
                    continue
                fitted = fits[axis][system][part]
                color, style = styles[system]
                ax.plot(xs, ts, style, color=color, label=f"{system} b={fitted[1]:.2f}" if fitted else system)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            B, G = point_of(points[0])
            fixed = f"B={B}" if axis == "length" else f"G={G}"
            ax.set_title(f"{PARTS[part]} ({fixed})", fontsize=9)
            ax.set_xlabel("new tokens G" if axis == "length" else "batch B", fontsize=8)
            if j == 0:
                ax.set_ylabel("seconds per phase", fontsize=8)
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
    fig.suptitle("Seconds per PPO phase part, built-in tiny shape, 1 thread; b: fitted t = a·x^b", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return f"plot saved to {path}"


def trl_python_or_note(args) -> tuple[str | None, str]:
    """The TRL venv's python and its versions' line, or None and why TRL is skipped."""
    import trl_side_by_side as side

    python = args.trl_python
    try:
        if python is None and args.make_trl_venv is not None:
            from rich.console import Console

            python = side.make_trl_venv(args.make_trl_venv, Console())
        if python is None:
            return None, "TRL skipped: give --trl-python PATH (a venv with trl 1.12.0) or --make-trl-venv DIR"
        side.check_trl_python(python)
        versions = side.trl_versions(python)
    except (SystemExit, OSError, Exception) as error:  # noqa: BLE001 (any failure: skip TRL with a note)
        return None, f"TRL skipped: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
    return python, "TRL venv: " + ", ".join(f"{k} {v}" for k, v in versions.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[24, 64, 128, 256], help="(default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="(default: %(default)s)")
    parser.add_argument("--length-batch", type=int, default=16, help="batch of the length sweep (default: %(default)s)")
    parser.add_argument("--batch-length", type=int, default=24, help="tokens of the batch sweep (default: %(default)s)")
    parser.add_argument("--minibatch", type=int, default=16, help="learning minibatch (default: %(default)s, ≤ B)")
    parser.add_argument("--ppo-epochs", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=2, help="timed phases per point and process (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed phases first (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny lengths and batches, one round: a smoke test")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="no raw-module run")
    parser.add_argument("--trl-python", default=None, help="python of a virtualenv with trl 1.12.0")
    parser.add_argument("--make-trl-venv", type=Path, default=None, metavar="DIR",
                        help="create (or complete) that virtualenv at DIR (PyPI) and use it; TRL is skipped if it fails")
    parser.add_argument("--prompt", default="The movie", help="the fixed prompt of every episode (default: %(default)r)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "figures" / "cost_curves.png",
                        help="where to save the plot (default: %(default)s)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="measure nothing: print the tables and plot of a --json report")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--workdir", type=Path, default=None, help="model, jobs and worker logs (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if min(args.lengths + args.batches + [args.length_batch, args.batch_length, args.minibatch, args.ppo_epochs,
                                          args.rounds, args.updates]) < 1 or args.warmup < 0:
        parser.error("lengths, batches, minibatch, epochs, rounds and updates must be >= 1, warmup >= 0")
    bad = [B for B in args.batches + [args.length_batch] if B % min(args.minibatch, B)]
    if bad:
        parser.error(f"--minibatch {args.minibatch} must divide every batch (not {bad}): pick batches that are multiples")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report.setdefault("rounds", int(report["args"]["rounds"]))
        report["fits"] = growth(report["median"], report["axes"])  # refitted: the fit as this version does it
        report["flags"] = flags(report["fits"])
        render(report, args)
        return report
    from bench_common import cpu_seconds, machine_info, others_cpu_share
    from bench_models import ModelSpec, build_model_dir

    from rlhf_scratch.corpus import generate_reviews
    from rlhf_scratch.pretrain import PretrainConfig

    pythons = {"engine": sys.executable, **({"raw": sys.executable} if args.raw else {})}
    trl_python, trl_note = trl_python_or_note(args)
    print(trl_note, flush=True)
    if trl_python:
        pythons["trl"] = trl_python
    from trl_side_by_side import project_hyperparameters

    info = machine_info(argparse.Namespace(device="cpu"))
    info.update(torch_threads=1, trl=trl_note, load_start=list(os.getloadavg()))
    sweep = sweep_points(args.lengths, args.batches, args.length_batch, args.batch_length)
    tiny = PretrainConfig()
    n_ctx = max(tiny.n_ctx, max(args.lengths + [args.batch_length]) + 16)  # room for the prompt
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cost_curves_"))
    model_dir = workdir / "tiny"
    shape = ModelSpec("tiny", tiny.n_layer, tiny.n_head, tiny.d_model, n_ctx, tiny.vocab_size, 1, 1, 1, 1, 1)
    built = build_model_dir(shape, model_dir, generate_reviews(3000, seed=args.seed), tiny.vocab_size, seed=args.seed)
    print(f"tiny shape, n_ctx {n_ctx}: {built['parameters'] / 1e6:.2f} M parameters; points (B, G): {sweep['unique']}; "
          f"systems {', '.join(pythons)}; {args.rounds} round(s) × ({args.warmup} warmup + {args.updates} timed)",
          flush=True)
    wall0, (busy0, own0) = time.perf_counter(), cpu_seconds()
    result = run_rounds(args, pythons, sweep["unique"], model_dir, n_ctx, project_hyperparameters(), workdir)
    info["wall_seconds"] = time.perf_counter() - wall0
    busy1, own1 = cpu_seconds()
    info["other_processes_cpu_share"] = others_cpu_share(busy1 - busy0, own1 - own0, info["wall_seconds"])
    info["load_end"] = list(os.getloadavg())
    axes = {a: [point_key(*p) for p in pts] for a, pts in sweep["axes"].items()}
    medians = {s: {point_key(*p): v for p, v in by.items()} for s, by in result["median"].items()}
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "n_ctx": n_ctx,
              "rounds": args.rounds, "axes": axes, "median": medians,
              "per_round": {s: {point_key(*p): v for p, v in by.items()} for s, by in result["per_round"].items()},
              "fits": growth(medians, axes), "engine_policy_forward": result["engine_policy_forward"]}
    report["flags"] = flags(report["fits"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    render(report, args)
    return report


def render(report: dict, args) -> None:
    """The tables, the flagged parts, the machine line and the plot of a report (a run's, or ``--from-json``)."""
    info = report["machine"]
    print_tables(report, markdown=args.markdown)
    print("faster growth than the raw loop (b − raw b > %.2f): " % GROWTH_TOLERANCE + ("; ".join(report["flags"]) or "none"))
    print(f"machine: {info['cpu_model']}, {info['cpus_usable']} CPUs, 1 thread per process; torch {info['torch']}, "
          f"transformers {info['transformers']}, transformer-lens {info['transformer_lens']}; {info['trl']}; load average "
          f"{info['load_start'][0]:.1f} at start, {info['load_end'][0]:.1f} at end; other processes took "
          f"{100 * info['other_processes_cpu_share']:.0f}% of the CPUs; {info['wall_seconds']:.0f} s")
    if args.plot is not None:
        print(plot(report["median"], report["axes"], report["fits"], args.plot))


if __name__ == "__main__":
    main()
