"""The measured processes of ``trl_side_by_side.py``: ``trl_workers.py KIND JOB.json OUT.json`` runs one job in a fresh
process and writes its figures. ``project``: the project's engine (``bench_models.bench_engine``) under this checkout;
``trl``: TRL 1.12's ``PPOTrainer.train()`` under the TRL virtualenv (torch, transformers, datasets, trl and the stdlib
helpers of ``bench_common``; never rlhf_scratch). Every part of a TRL update is timed by wrappers. ``raw``: the plain
Hugging Face module (``bench_models.bench_raw``) on the same shapes. ``points``: several jobs of one of those kinds
(``cost_curves.py``), one after the other in this one process."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, bench_models

from bench_common import others_cpu_share  # noqa: E402

PARTS = ("generation", "policy_forward", "reference_forward", "value_forward", "reward", "other_rollout", "learning")
"""The parts of one update that both sides time."""


def own_peak_rss_mib() -> float:
    """Peak resident memory of this process's own address space (VmHWM), in MiB (``bench_common.peak_rss_mib``)."""
    from bench_common import peak_rss_mib

    return peak_rss_mib()


def _set_threads(threads: int) -> None:
    from bench_common import set_threads

    set_threads(threads)


def project_worker(job: dict) -> dict:
    """One project run: ``bench_engine`` (warmup + timed phases) in this fresh process."""
    import argparse as _argparse

    from bench_common import cpu_seconds, prepare_process
    from bench_models import ModelSpec, bench_engine

    _set_threads(job["threads"])
    args = _argparse.Namespace(device="cpu", prompt=job["prompt"], seed=job["seed"], warmup=job["warmup"],
                               vader=False, verbose=False, threads=job["threads"])
    prepare_process(args)
    rss_imports = own_peak_rss_mib()
    spec = ModelSpec(**job["spec"])
    spec.phases = job["updates"]
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    engine, keep = bench_engine(spec, Path(job["model_dir"]), args)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    import torch

    rows = [{"generation": r["generate"], "policy_forward": r["policy_forward"],
             "reference_forward": r["reference_forward"], "reward": r["reward"], "other_rollout": r["other_rollout"],
             "learning": r["learning"], "total": r["phase"]} for r in engine["per_phase"]]
    return {
        "system": "project",
        "updates": rows,
        "setup_seconds": engine["setup_seconds"],
        "optimizer_steps_per_update": spec.ppo_epochs * spec.batch_size // spec.minibatch_size,
        "prompt_ids": keep["prompt_ids"],
        "old_policy_from_generation": engine.get("old_policy_from_generation", False),
        "peak_rss_mib": own_peak_rss_mib(),
        "rss_after_imports_mib": rss_imports,
        "parameters": {"policy_trunk": keep["trunk_parameters"], "value_head": keep["head_parameters"]},
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": wall,
        "others_cpu_share": others_cpu_share(busy1 - busy0, own1 - own0, wall),
    }


def trl_worker(job: dict) -> dict:
    """One TRL run: PPOTrainer.train() for warmup + timed updates, every part timed by wrappers.

    Runs under the TRL virtualenv: imports torch, transformers, datasets, trl (and the
    stdlib helpers of bench_common), never rlhf_scratch.
    """
    import gc
    import importlib.metadata as md

    from bench_common import cpu_seconds

    _set_threads(job["threads"])
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    rss_imports = own_peak_rss_mib()

    model_dir = job["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The saved tokenizer's pad = eos = bos, the prompt's first token. TRL treats every pad id
    # as padding (attention off), so, as TRL's own PPO example does for GPT-2, add a [PAD] token:
    # its id is >= the model's vocabulary, so no prompt or sampled token is ever taken for padding
    # (TRL replaces pad ids by 0 before every forward, so the model never sees it).
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = policy.config.vocab_size
    if tokenizer.pad_token_id < vocab:
        raise RuntimeError(f"pad id {tokenizer.pad_token_id} is inside the model's vocabulary ({vocab})")

    def score_model(seed: int):
        if job["variant"] == "full":  # same shape and trunk weights as the policy, new 1-output head
            return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        small = job["small_shape"]
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab, n_positions=small["n_ctx"], n_embd=small["d_model"],
                            n_layer=small["n_layer"], n_head=small["n_head"], num_labels=1,
                            bos_token_id=policy.config.bos_token_id, eos_token_id=policy.config.eos_token_id,
                            pad_token_id=policy.config.pad_token_id)
        return AutoModelForSequenceClassification.from_config(config)

    value_model, reward_model = score_model(job["seed"] + 1), score_model(job["seed"] + 2)
    updates = job["warmup"] + job["updates"]
    dataset = Dataset.from_dict({"input_ids": [list(job["prompt_ids"])] * (job["spec"]["batch_size"] * updates)})
    kwargs = job["trl_config"]
    config = PPOConfig(**kwargs)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model)
    rss_setup = own_peak_rss_mib()

    # ---- timers: wrap the module-level names the training loop looks up at call time
    clock = time.perf_counter
    state = {"current": None, "last": None, "done": [], "steps": 0}

    def open_update(t: float) -> None:
        close_update(t)
        state["current"] = {"start": t, "learning_start": None, "steps": 0, "gc_rollout": 0.0, "gc_learning": 0.0,
                            **{p: 0.0 for p in PARTS if p != "learning" and p != "other_rollout"}}

    def close_update(t: float) -> None:
        cur = state["current"]
        if cur is not None and cur["generation"] > 0:
            cur["end"] = t
            state["done"].append(cur)
        state["current"] = None

    def add(key: str, seconds: float) -> None:
        if state["current"] is not None:
            state["current"][key] += seconds

    def in_learning() -> bool:
        return state["current"] is not None and state["current"]["learning_start"] is not None

    new_tokens = job["spec"]["new_tokens"]
    original = {name: getattr(ppo_module, name) for name in
                ("batch_generation", "forward", "selective_log_softmax", "get_reward", "empty_cache")}

    def batch_generation(model, queries, *a, **k):
        t = clock()
        out = original["batch_generation"](model, queries, *a, **k)
        add("generation", clock() - t)
        if out[0].shape[1] - queries.shape[1] != new_tokens:
            raise RuntimeError(f"TRL generated {out[0].shape[1] - queries.shape[1]} tokens, expected {new_tokens}")
        state["last"] = "generation"
        return out

    def forward(model, *a, **k):
        t = clock()
        if model is trainer.ref_model:
            out = original["forward"](model, *a, **k)
            add("reference_forward", clock() - t)
            state["last"] = "reference"
            return out
        if state["current"] is not None and state["current"]["learning_start"] is None:
            state["current"]["learning_start"] = t  # first training forward of this update
        return original["forward"](model, *a, **k)

    def selective_log_softmax(logits, index):
        t = clock()
        out = original["selective_log_softmax"](logits, index)
        if not in_learning():
            # in the rollout: after the reference forward, its log-probs; else the policy's from generate()'s scores
            add("reference_forward" if state["last"] == "reference" else "policy_forward", clock() - t)
            state["last"] = None
        return out

    def get_reward(model, *a, **k):
        t = clock()
        out = original["get_reward"](model, *a, **k)
        add("reward" if model is trainer.reward_model else "value_forward", clock() - t)
        return out

    def empty_cache():
        t = clock()
        original["empty_cache"]()
        add("gc_learning" if in_learning() else "gc_rollout", clock() - t)

    class TimedGC:
        def __getattr__(self, name):
            return getattr(gc, name)

        @staticmethod
        def collect(*a, **k):
            t = clock()
            out = gc.collect(*a, **k)
            add("gc_learning" if in_learning() else "gc_rollout", clock() - t)
            return out

    ppo_module.batch_generation = batch_generation
    ppo_module.forward = forward
    ppo_module.selective_log_softmax = selective_log_softmax
    ppo_module.get_reward = get_reward
    ppo_module.empty_cache = empty_cache
    ppo_module.gc = TimedGC()

    class TimedLoader:
        """Marks the start of an update when the training loop asks for its next batch."""

        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            it = iter(self.loader)
            while True:
                t = clock()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                open_update(t)
                yield batch

    trainer.dataloader = TimedLoader(trainer.dataloader)
    def count_step(optimizer, a, k):
        if state["current"] is not None:
            state["current"]["steps"] += 1

    trainer.optimizer.optimizer.register_step_post_hook(count_step)  # the torch AdamW under accelerate's wrapper

    busy0, own0 = cpu_seconds()
    t0 = clock()
    try:
        trainer.train()
    finally:  # unwrapped again: a later run in this process (points_worker) wraps the originals, not these wrappers
        for name, function in original.items():
            setattr(ppo_module, name, function)
        ppo_module.gc = gc
    close_update(clock())
    wall = clock() - t0
    busy1, own1 = cpu_seconds()

    done = state["done"]
    if len(done) != updates:
        raise RuntimeError(f"timed {len(done)} TRL updates, expected {updates}")
    rows = []
    for u in done[job["warmup"]:]:
        total = u["end"] - u["start"]
        row = {p: u[p] for p in PARTS if p in u}
        row["learning"] = u["end"] - u["learning_start"]
        row["other_rollout"] = total - sum(row[p] for p in PARTS if p != "other_rollout")
        row["total"] = total
        row["gc_empty_cache"] = u["gc_rollout"] + u["gc_learning"]
        row["gc_rollout"], row["gc_learning"] = u["gc_rollout"], u["gc_learning"]
        row["optimizer_steps"] = u["steps"]
        rows.append(row)
    steps = {r["optimizer_steps"] for r in rows}

    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    return {
        "system": f"trl_{job['variant']}",
        "updates": rows,
        "optimizer_steps_per_update": steps.pop() if len(steps) == 1 else sorted(steps),
        "expected_optimizer_steps": _trl_optimizer_steps(kwargs),
        "peak_rss_mib": own_peak_rss_mib(),
        "rss_after_imports_mib": rss_imports,
        "rss_after_setup_mib": rss_setup,
        "parameters": {"policy": n_params(policy), "reference": n_params(trainer.ref_model),
                       "value": n_params(value_model), "reward": n_params(reward_model)},
        "trl_batch_size": config.batch_size, "trl_mini_batch_size": config.mini_batch_size,
        "trl_num_total_batches": config.num_total_batches,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": wall,
        "others_cpu_share": others_cpu_share(busy1 - busy0, own1 - own0, wall),
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "datasets")},
    }


def _trl_optimizer_steps(fields: dict) -> int:
    from trl_side_by_side import trl_optimizer_steps  # stdlib only at import: safe in the TRL venv

    return trl_optimizer_steps(fields)


def raw_worker(job: dict) -> dict:
    """The plain Hugging Face module on the job's shapes (``bench_models.bench_raw``: a KV-cached sampling loop, one
    no-grad forward with the taken log-probs, the same learning steps with fused AdamW), in this fresh process.

    The batch it reads back (forward, learning) is ``job["prompt_ids"]`` followed by ``G`` uniform random tokens per
    row [B, P + G], every position real: the engine's batch has the same shape (``stop_at_eos=False``), and the cost
    of a pass does not depend on which tokens it reads."""
    import argparse as _argparse

    from bench_common import cpu_seconds, prepare_process
    from bench_models import ModelSpec, bench_raw

    _set_threads(job["threads"])
    args = _argparse.Namespace(device="cpu", seed=job["seed"], warmup=job["warmup"], hf_generate=False,
                               threads=job["threads"])
    prepare_process(args)
    import torch

    spec = ModelSpec(**job["spec"])
    spec.phases = job["updates"]
    prompt = torch.tensor(job["prompt_ids"], dtype=torch.long)
    B, G, P = spec.batch_size, spec.new_tokens, len(job["prompt_ids"])
    tokens = torch.randint(spec.vocab, (B, G), generator=torch.Generator().manual_seed(job["seed"]))
    sequences = torch.cat([prompt.expand(B, P), tokens], dim=1)
    keep = {"prompt_ids": job["prompt_ids"], "sequences": sequences, "attention_mask": torch.ones_like(sequences),
            "gen_mask": torch.ones(B, G, dtype=torch.bool), "prompt_len": P}
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    raw = bench_raw(spec, Path(job["model_dir"]), keep, args)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    return {"system": "raw", "updates": [{"generation": raw["generate"], "forward": raw["forward"],
                                          "learning": raw["learning"]}],
            "note": f"means of {spec.phases} timed repeats after {args.warmup} untimed",
            "peak_rss_mib": own_peak_rss_mib(), "torch_threads": torch.get_num_threads(), "wall_seconds": wall,
            "others_cpu_share": others_cpu_share(busy1 - busy0, own1 - own0, wall)}


def points_worker(job: dict) -> dict:
    """``job["jobs"]``, each a job of kind ``job["kind"]`` (project, raw or trl), run in order in this one process
    (one import of the libraries for a whole sweep); the results in the same order."""
    worker = WORKERS[job["kind"]]
    return {"system": job["kind"], "results": [worker(sub) for sub in job["jobs"]]}


WORKERS = {"project": project_worker, "trl": trl_worker, "raw": raw_worker}


def run_worker_main(kind: str, job_path: str, out_path: str) -> None:
    """Run one measured job (``project``, ``trl``, ``raw`` or ``points``) described by the JSON at ``job_path``; write
    its result."""
    job = json.loads(Path(job_path).read_text())
    if kind not in (*WORKERS, "points"):
        raise SystemExit(f"unknown worker kind {kind!r}: choose from {', '.join((*WORKERS, 'points'))}")
    result = points_worker(job) if kind == "points" else WORKERS[kind](job)
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_worker_main(*sys.argv[1:4])
