"""Checkpoints of a policy trainer, and resuming from one: everything the next phase depends on, as one dict.

``resume_state(trainer)`` is that dict: the phase, the config, the reference's identity, the pieces' ``state_dict``s
(learner: optimizer and scheduler; KL controller; algorithm), every random stream (per rank when data-parallel), the
table prompts, the history and the elapsed time. ``save_checkpoint`` writes it beside the policy's weights,
atomically (``outputs.atomic_dir``; layout in ``rlhf_scratch.checkpoint``); ``resume_trainer`` builds a new trainer
from a checkpoint and loads the dict into it, so the run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.checkpoint import (
    FORMAT_VERSION,
    find_checkpoint,
    read_resume_state,
    resumed_config,
    same_fingerprint,
    write_resume_state,
)
from rlhf_scratch.lora import ADAPTER_FILE
from rlhf_scratch.models import VALUE_HEAD_FILE, load_bridge, load_policy, save_model_dir
from rlhf_scratch.outputs import atomic_dir, to_jsonable

SNAPSHOTS_DIR = "snapshots"
"""Where ``--snapshot-every`` writes, inside ``--out``."""


def resume_trainer(cls, config, reward=None, fwd_hooks: list | tuple = (), reference=None):
    """A trainer of class ``cls`` that continues the run whose checkpoint is ``config.resume`` exactly where it stopped.

    Reads the checkpoint, merges ``config`` into the run's saved config (``checkpoint.resumed_config``: flags that
    change what is computed must agree), loads the trained policy, reloads the run's reference (``reference`` if
    given) and checks it is the one the run started with (weights fingerprint), then restores the learner, KL
    controller, algorithm, RNGs and history (``load_resume_state``).
    """
    distributed.init_from_env(config.device)  # the world size decides whether the checkpoint fits
    checkpoint = find_checkpoint(config.resume)
    state = read_resume_state(checkpoint)
    kind = cls.algorithm_class.kind
    if state["kind"] != kind:
        raise ValueError(f"{checkpoint} is a {state['kind']} checkpoint; resume it with "
                         f"`rlhf-scratch {state['kind']} --resume {config.resume}`.")
    config = resumed_config(config, state["config"], checkpoint)
    saved_world = state["rng"].get("world_size", 1)
    if saved_world != distributed.world_size():
        raise ValueError(
            f"{checkpoint} was written by a run on {saved_world} process(es) and this one has "
            f"{distributed.world_size()}: each rank's sampling stream is in the checkpoint, so the run continues "
            f"exactly only on {saved_world}. Resume with `torchrun --nproc-per-node {saved_world}` (or plain "
            "`python -m rlhf_scratch` for 1), or start a new run from the checkpoint's weights with --model."
        )
    if not isinstance(state.get("phase"), int) or not 0 <= state["phase"] <= config.phases:
        raise ValueError(f"{checkpoint}: its resume state says phase {state.get('phase')!r} of {config.phases}; the "
                         "file is damaged. Resume from an intact copy of the run (checkpoint.old).")
    if cls.algorithm_class.saves_value_head and not (checkpoint / VALUE_HEAD_FILE).is_file():
        raise ValueError(f"{checkpoint} has no {VALUE_HEAD_FILE}: a {kind} checkpoint needs its value head to "
                         "continue exactly. Resume from an intact copy of the run (checkpoint.old).")
    source = state["reference"]["source"]
    lora = (checkpoint / ADAPTER_FILE).is_file()
    if reference is None and lora and not config.reference:
        pass  # the reference is the checkpoint's own base weights without the adapters (lora.adapter_free_view)
    elif reference is None:
        if source is None:
            raise ValueError(
                "This run's reference was an in-memory model (the trainer was given policy= or reference=), so "
                "the checkpoint cannot reload it: pass reference=<the starting model's bridge> to resume()."
            )
        reference = load_bridge(source, device=config.device)
    trainer = cls(dataclasses.replace(config, resume=None), policy=load_policy(checkpoint, device=config.device, keep_adapters=True),
                  reward=reward, fwd_hooks=fwd_hooks, reference=reference)
    if not same_fingerprint(trainer.reference_fingerprint, state["reference"]["fingerprint"]):
        raise ValueError(
            f"The reference model ({source or 'passed in'}) is not the one this run started with (its weights "
            "differ). A resumed run must keep the original reference: pass the run's starting model."
        )
    trainer.config, trainer.reference_source = config, source
    load_resume_state(trainer, state)
    return trainer


def resume_state(trainer) -> dict:
    """Everything beyond the weights that the next phase depends on, for ``save_checkpoint``.

    Data-parallel: ``rng`` holds every rank's streams (``ranks``, gathered: a collective, so every rank calls this),
    the shared shuffle generator and the world size.
    """
    rng = {"torch": torch.get_rng_state(), "generator": trainer.generator.get_state(), "python": trainer.prompt_rng.getstate()}
    if torch.cuda.is_available() and str(trainer.config.device).startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if distributed.is_distributed():
        cpu = {k: (v.cpu() if isinstance(v, Tensor) else [t.cpu() for t in v] if k == "cuda" else v) for k, v in rng.items()}
        rng = {"world_size": distributed.world_size(), "ranks": distributed.all_gather_objects(cpu),
               "shuffle": trainer.shuffle_generator.get_state()}
    return {
        "format": FORMAT_VERSION,
        "kind": trainer.kind,
        "phase": trainer.phase,
        "config": to_jsonable(trainer.config),
        "reference": {"source": trainer.reference_source, "fingerprint": trainer.reference_fingerprint},
        **trainer.learner.state_dict(),  # "optimizer", "scheduler"
        "kl_controller": trainer.kl_controller.state_dict(),
        "algorithm": trainer.algorithm.state_dict(),
        "rng": rng,
        "table_prompts": trainer.table_prompts,
        "history": trainer.history,
        "elapsed_seconds": trainer.elapsed_seconds,
    }


def load_resume_state(trainer, state: dict) -> None:
    """Restore ``resume_state(trainer)`` into a freshly built trainer (same model and config)."""
    trainer.learner.load_state_dict(state)
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.algorithm.load_state_dict(state["algorithm"])
    trainer.phase, trainer.history = state["phase"], list(state["history"])
    trainer.table_prompts, trainer.elapsed_seconds = state["table_prompts"], state["elapsed_seconds"]
    rng = state["rng"]
    if "ranks" in rng:  # a data-parallel run (resume_trainer checked the world size)
        trainer.shuffle_generator.set_state(rng["shuffle"])
        rng = rng["ranks"][distributed.rank()]
    torch.set_rng_state(rng["torch"])
    trainer.generator.set_state(rng["generator"])
    trainer.prompt_rng.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(trainer, directory: Path) -> Path:
    """A resumable checkpoint, written atomically: the policy (save_pretrained layout, safetensors), the value head
    if the algorithm has one, and ``resume_state(trainer)``."""
    meta = {"kind": trainer.kind, "phase": trainer.phase, "base_model": trainer.config.model,
            "reference": trainer.reference_source}
    state = resume_state(trainer)  # data-parallel: gathers every rank's RNG streams, so every rank calls this
    with distributed.shared_failures(f"phase {trainer.phase}, writing the checkpoint"):
        if distributed.is_main():  # the weights are the same on every rank
            with atomic_dir(directory) as staging:
                save_model_dir(trainer.policy.bridge, staging,
                               value_head=trainer.policy.value_head if trainer.saves_value_head else None, meta=meta)
                write_resume_state(staging, state)
    return Path(directory)


def save_snapshot(trainer, out: Path) -> Path | None:
    """With ``snapshot_every``, the policy's weights after this phase in ``OUT/snapshots/phase_NNNN/``: a model
    directory (config, tokenizer, safetensors weights; no optimiser or value head), for ``diff --timeline``."""
    every = trainer.config.snapshot_every
    if not every or trainer.phase % every != 0:
        return None
    meta = {"kind": "snapshot", "trainer": trainer.kind, "phase": trainer.phase, "base_model": trainer.config.model,
            "reference": trainer.reference_source}
    directory = out / SNAPSHOTS_DIR / f"phase_{trainer.phase:04d}"
    with atomic_dir(directory) as staging:
        save_model_dir(trainer.policy.bridge, staging, meta=meta)
    return directory
