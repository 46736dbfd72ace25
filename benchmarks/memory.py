#!/usr/bin/env python
"""Peak memory of one PPO phase on CPU, measured per configuration, and the memory model fitted on it.

For GPT-2-small and GPT-2-medium shapes (124M and 355M parameters, random weights built locally from a
``GPT2Config``: no download) and each configuration — full fp32, gradient checkpointing, a bfloat16 reference,
LoRA (when this checkout has it), LoRA + checkpointing — one child process per measured point

1. imports everything and reads its resident memory (``base``),
2. builds the real ``PPOTrainer`` (policy, frozen reference, value head) on the saved model,
3. resets its peak-RSS mark (``/proc/self/clear_refs``) and runs one phase: rollout (``batch`` episodes of a fixed
   3-token prompt and exactly ``new_tokens`` generated tokens) and learning (2 AdamW steps on minibatches of all
   ``batch`` rows, so the second step runs with the optimiser state allocated),
4. reports its peak resident memory (``VmHWM``) over the phase and the counts the model needs.

The memory model (``bench_memory.py``: weights, reference, gradients, AdamW moments by their known bytes per
parameter; activations per token × layer × d_model with and without checkpointing, full-vocabulary tensors per
token × vocab, and a constant, fitted by least squares) is then fitted on the points, checked against each of them
(acceptance: within 15 %), written to ``memory_fit.json`` and used to predict Llama-shaped 0.5B–8B models.

    nice -n 5 python benchmarks/memory.py --json benchmarks/memory_measured.json   # ~15 min, 8 GB at the 355M points
    python benchmarks/memory.py --fit-from benchmarks/memory_measured.json          # refit and print, no measuring
    python benchmarks/memory.py --shapes gpt2-small --configs full,ckpt            # a subset

Run nothing else heavy meanwhile: the 355M full-fp32 point holds ~8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path)
from bench_memory import GB, SHAPES, Fit, predict, save_fit, terms

CONFIGS = {
    "full": {},
    "ckpt": {"gradient_checkpointing": True},
    "bf16-ref": {"reference_dtype": "bfloat16"},
    "bf16-ref+ckpt": {"reference_dtype": "bfloat16", "gradient_checkpointing": True},
    "lora": {"lora_rank": 16},
    "lora+ckpt": {"lora_rank": 16, "gradient_checkpointing": True},
}
"""Configuration name → PPOConfig fields. LoRA: rank 16 on every attention and MLP matrix (the config's default
targets), only when this checkout's PPOConfig has ``lora_rank``."""

PLAN = {
    # shape: [(batch, new tokens, configurations or None: all), ...]
    "gpt2-small": [(4, 16, None), (8, 56, None)],
    # GPT-2-small's body with a 2048-token vocabulary: activations per token·layer·d_model apart from the
    # full-vocabulary tensors (the two grow together with the tokens at one shape)
    "gpt2-small-v2k": [(4, 16, ("full", "ckpt")), (8, 56, ("full", "ckpt"))],
    "gpt2-medium": [(4, 16, None)],
    "gpt2-tiny": [(4, 8, None)],  # a smoke test (--shapes gpt2-tiny), not part of the fit
}
PROMPT = "The movie"  # 3 tokens with BOS
TOKENIZER_VOCAB = 2048


def read_status(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start a new peak-RSS mark at the current resident size (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def settle() -> None:
    """Free what can be freed before a reading: garbage, and the C allocator's unused heap."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def lora_available() -> bool:
    from dataclasses import fields

    from rlhf_scratch.algorithm_configs import PPOConfig

    return any(f.name == "lora_rank" for f in fields(PPOConfig))


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one storage counted once)."""
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- child processes


def build_child(shape_name: str, directory: Path, seed: int) -> dict:
    """Save a random model of the shape (and its tokenizer) in ``directory``."""
    from bench_models import ModelSpec, build_model_dir

    from rlhf_scratch.corpus import generate_reviews

    shape = SHAPES[shape_name]
    spec = ModelSpec(shape.name, shape.n_layers, shape.n_heads, shape.d_model, shape.n_ctx, shape.vocab,
                     batch_size=1, minibatch_size=1, ppo_epochs=1, new_tokens=1, phases=1)
    return build_model_dir(spec, directory, generate_reviews(1000, seed=seed), TOKENIZER_VOCAB, seed)


def measure_child(point: dict, directory: Path) -> dict:
    """One PPO phase of ``point`` (shape, config, batch, new_tokens) on the saved model; peak memory and counts."""
    import torch

    from rlhf_scratch.models import PolicyWithValueHead, load_bridge
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.rewards import make_reward
    from rlhf_scratch.sampling import SamplingConfig

    settle()
    base = read_status("VmRSS")
    B, G = point["batch"], point["new_tokens"]
    start = time.perf_counter()
    policy = PolicyWithValueHead(load_bridge(directory))
    config = PPOConfig(model=str(directory), reward="chars:.", prompt=PROMPT, phases=2, warmup_phases=0,
                       batch_size=B, minibatch_size=B, ppo_epochs=2, seed=0,
                       sampling=SamplingConfig(max_new_tokens=G, stop_at_eos=False), **CONFIGS[point["config"]])
    trainer = PPOTrainer(config, policy=policy, reward=make_reward("chars:."))
    setup_seconds = time.perf_counter() - start
    settle()
    static = read_status("VmRSS")
    reset_peak()
    clock = time.perf_counter()
    rollout = trainer.sample_and_score()
    memory, _ = trainer.build_memory(rollout)
    rollout_seconds = time.perf_counter() - clock
    peak_rollout = read_status("VmHWM")
    del rollout
    settle()
    reset_peak()
    clock = time.perf_counter()
    trainer.learning_phase(memory)
    learning_seconds = time.perf_counter() - clock
    peak_learning = read_status("VmHWM")
    trainable = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    policy_storages = {p.untyped_storage().data_ptr() for p in trainer.policy.parameters()}
    reference_own = [p for p in trainer.reference.parameters() if p.untyped_storage().data_ptr() not in policy_storages]
    return {
        **point,
        "base": base, "static": static, "peak_rollout": peak_rollout, "peak_learning": peak_learning,
        "peak": max(peak_rollout, peak_learning),
        "tokens": B * memory.sequences.shape[1],  # one learning minibatch: all B rows × S
        "sequence_length": memory.sequences.shape[1],
        "policy_storage_bytes": storage_bytes(trainer.policy.parameters()),
        "reference_storage_bytes": storage_bytes(reference_own),  # LoRA: none of its own (a view of the policy's)
        "trainable_parameters": sum(p.numel() for p in trainable),
        "setup_seconds": setup_seconds, "rollout_seconds": rollout_seconds, "learning_seconds": learning_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(args: list[str]) -> dict:
    """``memory.py --child ...`` in a fresh process; its result (the last stdout line, JSON)."""
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- fit


def options_of(point: dict) -> dict:
    """``bench_memory.terms`` options of a measured point: its configuration, and whether the policy held GPT-2's
    q/k/v twice (measured: its storage; points from before main's 26754fa did not)."""
    options, shape = CONFIGS[point["config"]], SHAPES[point["shape"]]
    single = 4 * (shape.parameters + shape.value_head_parameters)
    lora_rank = options.get("lora_rank", 0)
    return {"lora_rank": lora_rank, "checkpointing": options.get("gradient_checkpointing", False),
            "reference_dtype": options.get("reference_dtype", "float32"),
            "qkv_copy": lora_rank == 0 and point["policy_storage_bytes"] > 1.01 * single}


def design_row(point: dict) -> tuple[list[float], float]:
    """The fitted coefficients' regressors [N_trainable, T·L·D (no ckpt), T·L·D (ckpt), T·V, 1] and the measured
    peak less the known terms (base and the state's bytes per parameter)."""
    t = terms(SHAPES[point["shape"]], point["tokens"], **options_of(point))
    known = point["base"] + t["weights"] + t["reference"] + t["gradients"] + t["adam"]
    ckpt = t["checkpointing"]
    x = [t["trainable"], 0.0 if ckpt else t["token_layer_width"], t["token_layer_width"] if ckpt else 0.0,
         t["token_vocab"], 1.0]
    return x, point["peak"] - known


def fit_points(points: list[dict], source: str) -> Fit:
    """Least squares of the module docstring's model on the measured points (relative errors weighted alike)."""
    import numpy as np

    rows = [design_row(p) for p in points]
    X = np.array([x for x, _ in rows])
    y = np.array([y for _, y in rows])
    weights = 1.0 / np.array([p["peak"] for p in points])  # minimise relative, not absolute, error
    # Non-negative least squares by elimination: a coefficient the data would make negative (no such memory) is
    # held at 0 and the rest refitted; one never measured (no checkpointing point) stays 0.
    used = X.any(axis=0)
    while True:
        solution = np.zeros(X.shape[1])
        solution[used] = np.linalg.lstsq(X[:, used] * weights[:, None], y * weights, rcond=None)[0]
        if solution.min() >= 0:
            break
        used[np.argmin(solution)] = False
    base = float(np.median([p["base"] for p in points]))
    return Fit(base=base, t=float(solution[0]), a=float(solution[1]), a_ckpt=float(solution[2]), v=float(solution[3]),
               c=float(solution[4]), source=source)


def point_prediction(point: dict, fit: Fit) -> float:
    return predict(SHAPES[point["shape"]], point["tokens"], fit, **options_of(point))["total"] - fit.base + point["base"]


# --------------------------------------------------------------------------- tables


def measured_table(points: list[dict], fit: Fit) -> list[str]:
    lines = ["| shape | configuration | batch × seq (tokens) | measured peak GB | predicted GB | error | "
             "trainable params | reference storage GB | phase s |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        predicted = point_prediction(p, fit)
        error = (predicted - p["peak"]) / p["peak"]
        # the copy's own storage (LoRA's adapter-free reference is a view of the policy's: none; points measured
        # before 2026-12-07 16:00 counted its storage as if it were a copy)
        reference = 0 if "lora" in p["config"] else p["reference_storage_bytes"]
        seconds = p["rollout_seconds"] + p["learning_seconds"]
        copy = " (q/k/v ×2)" if options_of(p)["qkv_copy"] else ""
        lines.append(f"| {p['shape']} | {p['config']}{copy} | {p['batch']} × {p['sequence_length']} ({p['tokens']}) | "
                     f"{p['peak'] / GB:.2f} | {predicted / GB:.2f} | {error:+.1%} | {p['trainable_parameters'] / 1e6:.1f} M | "
                     f"{reference / GB:.2f} | {seconds:.0f} |")
    return lines


PREDICTED = [  # (label, options) of the "How big a model fits" table
    ("full fp32", {}),
    ("full + ckpt + bf16 ref", {"checkpointing": True, "reference_dtype": "bfloat16"}),
    ("LoRA r16", {"lora_rank": 16}),
    ("LoRA r16 + ckpt", {"lora_rank": 16, "checkpointing": True}),
    ("LoRA r16 + ckpt, bf16 frozen base*", {"lora_rank": 16, "checkpointing": True, "base_dtype": "bfloat16"}),
]


def predicted_table(fit: Fit, tokens: int) -> list[str]:
    """GB predicted for each Llama-shaped model (GPU: no process base) with ``tokens`` per learning minibatch."""
    names = [name for name in SHAPES if name.startswith("llama")]
    lines = [f"| configuration ({tokens} tokens per minibatch) | " + " | ".join(
        f"{name} ({SHAPES[name].parameters / 1e9:.2f} B)" for name in names) + " |",
        "|---|" + "---|" * len(names)]
    for label, options in PREDICTED:
        cells = [predict(SHAPES[name], tokens, fit, include_base=False, **options)["total"] / GB for name in names]
        lines.append(f"| {label} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    return lines


def fits_table(fit: Fit, tokens: int, budgets=(24, 80, 141)) -> list[str]:
    """Which configurations of which Llama-shaped models fit in each GPU memory budget (GB, ~1 GB for the CUDA
    context and fragmentation kept free)."""
    names = [name for name in SHAPES if name.startswith("llama")]
    lines = ["| GPU memory | " + " | ".join(label for label, _ in PREDICTED) + " |", "|---|" + "---|" * len(PREDICTED)]
    for budget in budgets:
        cells = []
        for _, options in PREDICTED:
            fitting = [name.removeprefix("llama-") for name in names
                       if predict(SHAPES[name], tokens, fit, include_base=False, **options)["total"] / GB <= budget - 1]
            cells.append(", ".join(fitting) or "none")
        lines.append(f"| {budget} GB | " + " | ".join(cells) + " |")
    return lines


def report(points: list[dict], fit: Fit, tokens: int) -> str:
    worst = max(abs(point_prediction(p, fit) - p["peak"]) / p["peak"] for p in points)
    lines = [
        f"Fit ({fit.source}): base {fit.base / GB:.2f} GB (the process after imports), {fit.t:.1f} B per trainable "
        f"parameter beyond its gradient and moments, activations "
        f"{fit.a:.1f} B per token·layer·d_model without checkpointing, {fit.a_ckpt:.1f} with it, {fit.v:.1f} B per "
        f"token·vocab entry, constant {fit.c / GB:+.2f} GB.",
        "", "Measured on CPU (peak RSS of one PPO phase) and predicted:", "", *measured_table(points, fit), "",
        f"Worst error at a measured point: {worst:.1%} (acceptance: 15 %).", "",
        "Predicted peak on a GPU (GB; no process base), Llama shapes:", "", *predicted_table(fit, tokens), "",
        "What fits (predicted, 1 GB left for the CUDA context):", "", *fits_table(fit, tokens),
        "", "* a bfloat16 frozen base is not implemented (the engine keeps weights in float32): what it would save.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gpt2-small,gpt2-small-v2k,gpt2-medium",
                        help="comma-separated: " + ", ".join(PLAN))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rlhf_scratch_memory"),
                        help="where the random models are saved (kept for the next run; default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the measured points here (points already in it are kept "
                        "and not measured again: a cut-off run goes on where it stopped)")
    parser.add_argument("--fit-from", type=Path, help="refit and print from points a previous --json wrote")
    parser.add_argument("--no-save-fit", dest="save_fit", action="store_false",
                        help="do not write the fit to benchmarks/memory_fit.json")
    parser.add_argument("--predict-tokens", type=int, default=512,
                        help="tokens per learning minibatch of the predicted table (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each child (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["build", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        bench_common.set_threads(args.threads)
        import transformers

        import rlhf_scratch.ppo  # noqa: F401 (every import before the base reading)

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        point = json.loads(args.point)
        directory = args.workdir / point["shape"]
        result = build_child(point["shape"], directory, args.seed) if args.child == "build" else measure_child(point, directory)
        print(json.dumps(result))
        return

    if args.fit_from:
        points = json.loads(args.fit_from.read_text())["points"]
    else:
        points = json.loads(args.json.read_text())["points"] if args.json and args.json.is_file() else []
        done = {(p["shape"], p["config"], p["batch"], p["new_tokens"]) for p in points}
        configs = [c for c in args.configs.split(",") if c]
        unknown = [c for c in configs if c not in CONFIGS] + [s for s in args.shapes.split(",") if s not in PLAN]
        if unknown:
            raise SystemExit(f"Unknown shape or configuration {unknown}: choose from {list(PLAN)} and {list(CONFIGS)}.")
        if not lora_available():
            skipped = [c for c in configs if "lora" in c]
            configs = [c for c in configs if "lora" not in c]
            if skipped:
                print(f"not measured (LoRA not in this checkout): {', '.join(skipped)}", flush=True)
        common = ["--workdir", str(args.workdir), "--threads", str(args.threads), "--seed", str(args.seed)]
        for shape in args.shapes.split(","):
            if not (args.workdir / shape / "config.json").is_file():
                print(f"building a random {shape} in {args.workdir / shape} ...", flush=True)
                run_child([*common, "--child", "build", "--point", json.dumps({"shape": shape})])
            for batch, new_tokens, only in PLAN[shape]:
                for config in configs:
                    if (only is not None and config not in only) or (shape, config, batch, new_tokens) in done:
                        continue
                    point = {"shape": shape, "config": config, "batch": batch, "new_tokens": new_tokens}
                    clock = time.perf_counter()
                    result = run_child([*common, "--child", "measure", "--point", json.dumps(point)])
                    points.append(result)
                    print(f"{shape:12s} {config:14s} batch {batch} × {result['sequence_length']}: peak "
                          f"{result['peak'] / GB:.2f} GB (rollout {result['peak_rollout'] / GB:.2f}, base "
                          f"{result['base'] / GB:.2f}) in {time.perf_counter() - clock:.0f} s", flush=True)
                    if args.json:  # after every point: a cut-off run keeps what it measured
                        args.json.write_text(json.dumps({"points": points, "machine": os.uname().nodename}, indent=1))
    source = f"{len(points)} points, {time.strftime('%Y-%m-%d')}"
    fit = fit_points(points, source)
    if args.save_fit:
        save_fit(fit)
    print(report(points, fit, args.predict_tokens))


if __name__ == "__main__":
    main()
