#!/usr/bin/env python
"""The project's PPO next to TRL 1.12.0's PPOTrainer on the same weights, batch and step count.

For each model size (``tiny``: the built-in architecture, 1.1 M parameters; ``gpt2``:
GPT-2-small-sized, 124 M; both random weights from ``bench_models.build_model_dir``)
this script runs, round after round, each system in a fresh process with one torch
thread (``--threads``):

* project: ``bench_models.bench_engine`` (``PPOTrainer.sample_and_score`` +
  ``build_memory`` + ``learning_phase``) under this interpreter;
* TRL: ``trl.experimental.ppo.PPOTrainer.train()`` under ``--trl-python`` (a separate
  virtualenv: TRL is no dependency of the package), on the same saved directory
  (policy and reference), with a value model and a reward model
  (``AutoModelForSequenceClassification``, one output) that are either the same
  shape as the policy (``full``, loaded from the same directory) or the tiny
  architecture with the policy's vocabulary (``small``, random).

One TRL "update" is configured to be one project PPO phase: same prompt (a dataset of
identical prompts), batch, minibatch, PPO epochs and so optimizer steps, same response
length with no early stop, temperature 1, fp32 on the CPU. TRL is timed by wrapping its
module-level functions from the worker (``batch_generation``, ``forward``,
``selective_log_softmax``, ``get_reward``, ``empty_cache``, ``gc.collect``, the
dataloader and the optimizer's ``step``); site-packages are not edited.

The systems alternate (project, TRL full, TRL small, project, ...) and the report gives,
per round, project episodes/s ÷ TRL episodes/s: on a shared machine a ratio of
neighbouring runs is steadier than either figure.

Examples::

    python benchmarks/trl_side_by_side.py --trl-python /work/trl-venv/bin/python            # ~11 min
    python benchmarks/trl_side_by_side.py --trl-python /work/trl-venv/bin/python --models tiny  # ~2 min
    python benchmarks/trl_side_by_side.py --make-trl-venv /work/trl-venv --models tiny --rounds 1

See benchmarks/README.md ("trl_side_by_side.py") for the configuration and measured figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "TRL_EXPERIMENTAL_SILENCE": "1"}
for _var, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_var, _value)

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # bench_common, bench_models (safe to import in the TRL venv too)

# Exactly these pins for --make-trl-venv (torch pinned: an unpinned one pulls CUDA wheels).
TRL_VENV_PINS = ("torch==2.13.0", "trl==1.12.0", "transformers==5.24.0", "accelerate", "datasets")

# Timed parts of one update, in table order. Both systems fill the ones that apply to them.
from trl_workers import PARTS  # noqa: E402 (the measured processes; after sys.path above)


# --------------------------------------------------------------------------- configuration (no TRL needed)


def trl_batch_fields(batch_size: int, minibatch_size: int, ppo_epochs: int) -> dict:
    """TRL 1.12 PPOConfig batch fields that make one TRL update = one project PPO phase.

    TRL's rollout batch is ``per_device_train_batch_size × gradient_accumulation_steps``
    (× world size 1); it is cut into ``num_mini_batches`` minibatches, each minibatch
    into micro-batches of ``per_device_train_batch_size``, and accelerate steps the
    optimizer every ``gradient_accumulation_steps`` micro-batches. With
    ``gradient_accumulation_steps = 1`` and ``per_device_train_batch_size = batch`` each
    minibatch is one micro-batch (``range(0, minibatch, batch)`` has one start) and one
    optimizer step, as in the project. (``gradient_accumulation_steps > 1`` would make
    the accumulation span minibatches.) The rollout forwards take the whole batch at
    once, as the project's do.
    """
    if min(batch_size, minibatch_size, ppo_epochs) < 1:
        raise ValueError("batch size, minibatch size and PPO epochs must be >= 1")
    if batch_size % minibatch_size:
        raise ValueError(f"minibatch size {minibatch_size} must divide batch size {batch_size}")
    return {
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": batch_size // minibatch_size,
        "num_ppo_epochs": ppo_epochs,
        "local_rollout_forward_batch_size": batch_size,
    }


def trl_optimizer_steps(fields: dict) -> int:
    """Optimizer steps per update of TRL 1.12's PPO loop with these fields (one process)."""
    local_batch = fields["per_device_train_batch_size"] * fields["gradient_accumulation_steps"]
    minibatch = local_batch // fields["num_mini_batches"]
    micro_per_minibatch = math.ceil(minibatch / fields["per_device_train_batch_size"])
    micro_per_update = fields["num_ppo_epochs"] * fields["num_mini_batches"] * micro_per_minibatch
    return micro_per_update // fields["gradient_accumulation_steps"]


def project_hyperparameters() -> dict:
    """The project's PPOConfig defaults that the benchmark's engine run uses (and TRL is given)."""
    import dataclasses

    from rlhf_scratch.ppo import PPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    keys = ("lr", "kl_coef", "kl_estimator", "clip_coef", "vf_coef", "clip_range_value", "gamma", "lam",
            "weight_decay", "max_grad_norm", "ent_coef")
    return {k: defaults[k] for k in keys}


def trl_config_kwargs(batch_size: int, minibatch_size: int, ppo_epochs: int, new_tokens: int, updates: int,
                      hp: dict, seed: int, output_dir: str) -> dict:
    """Every PPOConfig field the TRL worker sets (the rest are TRL's defaults)."""
    if hp["kl_estimator"] not in ("k1", "k3"):
        raise ValueError(f"TRL's PPO has kl_estimator k1 or k3, not {hp['kl_estimator']!r}")
    return {
        **trl_batch_fields(batch_size, minibatch_size, ppo_epochs),
        "total_episodes": batch_size * updates,  # -> num_total_batches = updates
        "response_length": new_tokens,
        "stop_token": None,  # no EOS stop: every response has response_length tokens
        "stop_token_id": None,
        "missing_eos_penalty": None,
        "temperature": 1.0,
        "learning_rate": hp["lr"],
        "weight_decay": hp["weight_decay"],
        "kl_coef": hp["kl_coef"],
        "kl_estimator": hp["kl_estimator"],
        "cliprange": hp["clip_coef"],
        "vf_coef": hp["vf_coef"],
        # TRL always clips values; the project does not by default: a huge range = no clipping.
        "cliprange_value": hp["clip_range_value"] if hp["clip_range_value"] is not None else 1e9,
        "gamma": hp["gamma"],
        "lam": hp["lam"],
        "whiten_rewards": False,
        "bf16": False,  # TRL's default is bf16=True
        "fp16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,  # TRL's default is True
        "report_to": "none",
        "num_sample_generations": 0,
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": seed,
        "output_dir": output_dir,
    }


# --------------------------------------------------------------------------- workers


# --------------------------------------------------------------------------- orchestration


def worker_env(threads: int, project: bool) -> dict:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if project:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)  # the TRL venv must not see this checkout's package
    return env


def run_worker(python: str, kind: str, job: dict, workdir: Path, tag: str, threads: int, console,
               project: bool | None = None) -> dict:
    """``trl_workers.py KIND`` on ``job`` in a fresh process under ``python``, ``threads`` threads; its result with the
    process's wall time and load average. ``project``: whether it sees this checkout (default: ``kind == "project"``;
    a TRL process must not)."""
    project = kind == "project" if project is None else project
    job_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("job.json", "out.json", "log"))
    job_path.write_text(json.dumps(job))
    cmd = [python, str(BENCHMARKS / "trl_workers.py"), kind, str(job_path), str(out_path)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=worker_env(threads, project), stdout=log, stderr=subprocess.STDOUT,
                              cwd=str(BENCHMARKS.parent))
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    result = json.loads(out_path.read_text())
    result["process_seconds"] = time.perf_counter() - t0
    result["load_start"], result["load_end"] = load0, os.getloadavg()[0]
    return result


def summarize(result: dict, batch_size: int) -> dict:
    rows = result["updates"]
    keys = [k for k in (*PARTS, "total", "gc_empty_cache", "gc_rollout", "gc_learning") if k in rows[0]]
    mean = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    return {"mean": mean, "total_min": min(r["total"] for r in rows), "total_max": max(r["total"] for r in rows),
            "episodes_per_s": batch_size / mean["total"]}


def bench_model(spec, model_dir: Path, args, hp: dict, small_shape: dict, workdir: Path, console) -> dict:
    variants = [v for v in ("full", "small") if v not in args.skip_variants]
    if spec.name == "tiny" and "small" in variants and "full" in variants:
        variants.remove("small")  # the small value/reward model is the tiny shape: the same as full here
    fields = trl_batch_fields(spec.batch_size, spec.minibatch_size, spec.ppo_epochs)
    base_job = {"spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__}, "model_dir": str(model_dir),
                "threads": args.threads, "seed": args.seed, "warmup": args.warmup, "updates": args.updates,
                "prompt": args.prompt}
    trl_config = trl_config_kwargs(spec.batch_size, spec.minibatch_size, spec.ppo_epochs, spec.new_tokens,
                                   args.warmup + args.updates, hp, args.seed, str(workdir / f"trl_out_{spec.name}"))
    runs: dict[str, list[dict]] = {"project": [], **{f"trl_{v}": [] for v in variants}}
    prompt_ids = None
    for r in range(args.rounds):
        res = run_worker(sys.executable, "project", base_job, workdir, f"{spec.name}_r{r}_project", args.threads, console)
        prompt_ids = prompt_ids or res["prompt_ids"]
        runs["project"].append(res)
        console.print(f"  round {r + 1}/{args.rounds} project: {res['updates'][-1]['total']:.2f} s/update (last), "
                      f"peak {res['peak_rss_mib']:.0f} MiB, process {res['process_seconds']:.0f} s, "
                      f"load {res['load_start']:.1f}")
        for v in variants:
            job = {**base_job, "variant": v, "prompt_ids": prompt_ids, "small_shape": small_shape, "trl_config": trl_config}
            res = run_worker(args.trl_python, "trl", job, workdir, f"{spec.name}_r{r}_trl_{v}", args.threads, console)
            runs[f"trl_{v}"].append(res)
            console.print(f"  round {r + 1}/{args.rounds} TRL {v}: {res['updates'][-1]['total']:.2f} s/update (last), "
                          f"peak {res['peak_rss_mib']:.0f} MiB, process {res['process_seconds']:.0f} s, "
                          f"load {res['load_start']:.1f}")
            if res["optimizer_steps_per_update"] != runs["project"][-1]["optimizer_steps_per_update"]:
                raise RuntimeError(f"TRL made {res['optimizer_steps_per_update']} optimizer steps per update, the project "
                                   f"{runs['project'][-1]['optimizer_steps_per_update']}")

    systems = {}
    for name, results in runs.items():
        # Means over every timed update of every round; memory: the largest peak of the rounds.
        pooled = {"updates": [u for res in results for u in res["updates"]]}
        s = summarize(pooled, spec.batch_size)
        s["per_round_episodes_per_s"] = [summarize(res, spec.batch_size)["episodes_per_s"] for res in results]
        s["peak_rss_mib"] = max(res["peak_rss_mib"] for res in results)
        s["rss_after_imports_mib"] = statistics.fmean(res["rss_after_imports_mib"] for res in results)
        s["optimizer_steps_per_update"] = results[0]["optimizer_steps_per_update"]
        s["parameters"] = results[0]["parameters"]
        s["others_cpu_share"] = [res["others_cpu_share"] for res in results]
        s["load"] = [res["load_start"] for res in results]
        s["process_seconds"] = [res["process_seconds"] for res in results]
        s["torch_threads"] = results[0]["torch_threads"]
        systems[name] = s
    ratios = {}
    for name in systems:
        if name == "project":
            continue
        per_round = [p / t for p, t in zip(systems["project"]["per_round_episodes_per_s"],
                                           systems[name]["per_round_episodes_per_s"])]
        ratios[name] = {"per_round": per_round, "median": statistics.median(per_round),
                        "min": min(per_round), "max": max(per_round)}
    return {"spec": base_job["spec"], "trl_config": trl_config, "trl_batch_fields": fields, "variants": variants,
            "systems": systems, "episodes_per_s_ratio": ratios, "runs": runs}


def goals(result: dict) -> list[str]:
    """The issue's two targets: speed ≥ 2× TRL at both sizes; GPT-2 peak memory ≤ TRL with a full value model."""
    out = []
    name = result["spec"]["name"]
    for variant, r in result["episodes_per_s_ratio"].items():
        met = r["median"] >= 2.0
        out.append(f"{name}: project episodes/s ÷ TRL ({variant.removeprefix('trl_')} value/reward) = {r['median']:.2f}× "
                   f"(median of {len(r['per_round'])} rounds, {r['min']:.2f}–{r['max']:.2f}; goal ≥ 2×): "
                   + (f"met with {r['median'] / 2.0:.2f}× the goal" if met else
                      f"missed: the project would need {2.0 / r['median']:.2f}× its speed"))
    if name == "gpt2" and "trl_full" in result["systems"]:
        p, t = result["systems"]["project"]["peak_rss_mib"], result["systems"]["trl_full"]["peak_rss_mib"]
        out.append(f"gpt2: peak RSS project {p:.0f} MiB vs TRL (full value/reward) {t:.0f} MiB (goal ≤): "
                   + (f"met, {t - p:.0f} MiB ({100 * (1 - p / t):.0f} %) below" if p <= t else
                      f"missed, {p - t:.0f} MiB ({100 * (p / t - 1):.0f} %) above"))
    return out


def print_report(console, info: dict, results: list[dict]) -> None:
    from rich.table import Table

    console.print()
    console.print(f"[bold]command[/]: {info['command']}")
    console.print(f"[bold]machine[/]: {info['cpu_model']}, {info['cpu_count']} CPUs, {info['threads']} torch thread(s) per "
                  f"process; project: torch {info['torch']}, transformers {info['transformers']}, transformer-lens "
                  f"{info['transformer_lens']}; TRL venv: " + ", ".join(f"{k} {v}" for k, v in info["trl_versions"].items())
                  + f"; other processes used {100 * info['other_processes_cpu_share']:.0f}% of the CPUs during the run "
                  f"(load average {info['load_start']:.1f} at start, {info['load_end']:.1f} at end)")
    labels = {"project": "project", "trl_full": "TRL, full value+reward", "trl_small": "TRL, small value+reward"}
    part_labels = {
        "generation": "generation", "policy_forward": "policy forward (+value head) / logprobs", "reference_forward": "reference forward",
        "value_forward": "value-model forward", "reward": "reward (chars:. / reward model)",
        "other_rollout": "other rollout", "learning": "learning", "total": "total per update",
    }
    for res in results:
        spec, systems = res["spec"], res["systems"]
        names = list(systems)
        t = Table(title=f"{spec['name']}: batch {spec['batch_size']} × {spec['new_tokens']} tokens, minibatch "
                        f"{spec['minibatch_size']} × {spec['ppo_epochs']} epoch(s) → "
                        f"{systems['project']['optimizer_steps_per_update']} optimizer steps; mean seconds per update",
                  title_justify="left")
        t.add_column("")
        for n in names:
            t.add_column(labels[n], justify="right")

        def cell(n, key):
            m = systems[n]["mean"]
            return f"{m[key]:.3f}" if key in m else "-"

        for key, label in part_labels.items():
            t.add_row(label, *[cell(n, key) for n in names])
        t.add_row("  min – max", *[f"{systems[n]['total_min']:.2f} – {systems[n]['total_max']:.2f}" for n in names])
        t.add_row("  of which gc+empty_cache (roll.+learn.)",
                  *[f"{systems[n]['mean']['gc_rollout']:.3f} + {systems[n]['mean']['gc_learning']:.3f}"
                    if "gc_rollout" in systems[n]["mean"] else "-" for n in names])
        t.add_row("episodes / s", *[f"{systems[n]['episodes_per_s']:.2f}" for n in names])
        t.add_row("project ÷ TRL episodes/s, per round",
                  "", *[" ".join(f"{x:.2f}" for x in res["episodes_per_s_ratio"][n]["per_round"]) for n in names[1:]])
        t.add_row("  median (min – max)", "",
                  *[f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"
                    for r in (res["episodes_per_s_ratio"][n] for n in names[1:])])
        t.add_row("peak RSS MiB (Δ over imports)",
                  *[f"{systems[n]['peak_rss_mib']:.0f} (+{systems[n]['peak_rss_mib'] - systems[n]['rss_after_imports_mib']:.0f})"
                    for n in names])
        t.add_row("parameters (M)", *[" + ".join(f"{v / 1e6:.1f}" for v in systems[n]["parameters"].values()) for n in names])
        t.add_row("others' CPU share per round",
                  *[" ".join(f"{100 * x:.0f}%" for x in systems[n]["others_cpu_share"]) for n in names])
        console.print(t)
        for line in goals(res):
            console.print(f"[bold]goal[/] {line}")
    console.print("[dim]note:[/] parameters: project = policy trunk + value head (the reference is a frozen copy of the "
                  "trunk); TRL = policy + reference + value model + reward model. Peak RSS: VmHWM of the fresh worker "
                  "process (its own high-water mark), largest over the rounds; Δ: over the same process after its imports.")
    if info["other_processes_cpu_share"] > 0.1 or info["load_start"] > info["cpu_count"]:
        console.print(f"[yellow]The machine was shared: other processes used {100 * info['other_processes_cpu_share']:.0f}% "
                      f"of its CPUs (load {info['load_start']:.1f} at start); absolute times are inflated, the per-round "
                      "ratios less so.[/]")


def make_trl_venv(directory: Path, console) -> str:
    python = directory / "bin" / "python"
    if not python.exists():
        console.print(f"creating {directory} ...")
        subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TRL_VENV_PINS[0]], check=True)  # torch first, pinned (CPU wheel where the index has one)
    subprocess.run([*pip, *TRL_VENV_PINS], check=True)
    return str(python)


def check_trl_python(python: str) -> None:
    """One line, before any work, when --trl-python names no Python (instead of a FileNotFoundError traceback)."""
    if shutil.which(python) is None:
        raise SystemExit(f"--trl-python {python}: no such Python. Give the python of a virtualenv with trl 1.12.0, or "
                         "make one with --make-trl-venv DIR (needs network once).")


def trl_versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('torch', 'transformers', 'trl', 'accelerate', 'datasets')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=worker_env(1, False))
    if out.returncode != 0:
        raise SystemExit(f"--trl-python {python} cannot report its packages (are trl, transformers, accelerate and "
                         f"datasets installed there?):\n{out.stderr[-2000:]}")
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    if versions["trl"] != "1.12.0":
        print(f"warning: TRL {versions['trl']} is not 1.12.0, the release this benchmark's wrappers were written for",
              file=sys.stderr)
    return versions


def parse_args(argv=None):
    from bench_common import add_threads_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See benchmarks/README.md for the configuration and figures.")
    parser.add_argument("--models", default="tiny,gpt2", help="comma-separated: tiny, gpt2 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=2, help="timed updates per process (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first in each process (default: %(default)s)")
    add_threads_argument(parser, default=1)
    parser.add_argument("--trl-python", default=None, help="python of a virtualenv with trl 1.12.0 (see --make-trl-venv)")
    parser.add_argument("--make-trl-venv", type=Path, default=None, metavar="DIR",
                        help="create (or complete) a virtualenv at DIR with " + " ".join(TRL_VENV_PINS) + " and use it")
    parser.add_argument("--skip-full-value", action="store_true", help="no TRL run with full-size value/reward models")
    parser.add_argument("--skip-small-value", action="store_true", help="no TRL run with small value/reward models")
    parser.add_argument("--prompt", default="The movie", help="the fixed prompt of every episode (default: %(default)r)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every figure (each update of each run) here")
    parser.add_argument("--workdir", type=Path, default=None, help="models, job files and worker logs (default: temp dir)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the work directory (worker logs)")
    parser.add_argument("--worker", choices=("project", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-input", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.model_names or set(args.model_names) - {"tiny", "gpt2"}:
        parser.error(f"--models: choose from tiny, gpt2 (got {args.models!r})")
    if min(args.rounds, args.updates, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --updates, --threads must be >= 1 and --warmup >= 0")
    args.skip_variants = {v for v, skip in (("full", args.skip_full_value), ("small", args.skip_small_value)) if skip}
    if len(args.skip_variants) == 2:
        parser.error("both TRL variants skipped: nothing to compare")
    if args.trl_python is None and args.make_trl_venv is None:
        parser.error("give --trl-python PATH (a virtualenv with trl 1.12.0) or --make-trl-venv DIR")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:  # the form of earlier releases: now benchmarks/trl_workers.py KIND INPUT OUTPUT
        from trl_workers import run_worker_main

        run_worker_main(args.worker, args.worker_input, args.worker_output)
        return None
    if args.trl_python is not None:
        check_trl_python(args.trl_python)
    from bench_common import cpu_seconds, machine_info, others_cpu_share
    from bench_models import build_model_dir, default_specs
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 130)
    if args.make_trl_venv is not None:
        args.trl_python = make_trl_venv(args.make_trl_venv, console)
    versions = trl_versions(args.trl_python)
    import torch

    from rlhf_scratch.corpus import generate_reviews

    torch.set_num_threads(args.threads)
    info = machine_info(argparse.Namespace(device="cpu"))
    info.update(threads=args.threads, trl_python=args.trl_python, trl_versions=versions, load_start=os.getloadavg()[0])
    hp = project_hyperparameters()
    specs = default_specs()
    small = specs["tiny"]
    small_shape = {"n_layer": small.n_layer, "n_head": small.n_head, "d_model": small.d_model, "n_ctx": small.n_ctx}
    wall0 = time.perf_counter()
    busy0, own0 = cpu_seconds()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trl_side_by_side_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        texts = generate_reviews(3000, seed=args.seed)
        for name in args.model_names:
            spec = specs[name]
            model_dir = workdir / name
            built = build_model_dir(spec, model_dir, texts, specs["tiny"].vocab, args.seed)
            console.print(f"[bold]{name}[/]: {built['parameters'] / 1e6:.1f} M parameters, vocab {built['vocab']}; "
                          f"{args.rounds} round(s) × ({args.warmup} warmup + {args.updates} timed updates) per system")
            result = bench_model(spec, model_dir, args, hp, small_shape, workdir, console)
            result["model"] = built
            results.append(result)
    except RuntimeError as error:
        console.print(f"[red]{error}[/]\n(worker logs in {workdir})")
        raise SystemExit(1) from None
    finally:
        if args.workdir is None and not args.keep_workdir and results and len(results) == len(args.model_names):
            shutil.rmtree(workdir, ignore_errors=True)
    info["wall_seconds"] = time.perf_counter() - wall0
    busy1, own1 = cpu_seconds()
    info["other_processes_cpu_share"] = others_cpu_share(busy1 - busy0, own1 - own0, info["wall_seconds"])
    info["load_end"] = os.getloadavg()[0]
    info["project_hyperparameters"] = hp
    print_report(console, info, results)
    report = {"machine": info, "results": results, "goals": [g for r in results for g in goals(r)]}
    console.print(f"total wall time {info['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        console.print(f"figures written to {args.json}")
    return report


if __name__ == "__main__":
    main()
