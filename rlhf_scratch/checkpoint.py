"""Resumable checkpoints: what a run needs to continue exactly where it stopped.

A run's ``OUT/checkpoint/`` holds

    config.json, model.safetensors, tokenizer files   the policy, ``save_pretrained`` layout (loads with
                                                      ``load_bridge``/``load_policy`` or plain transformers)
    value_head.safetensors                            PPO's value head
    rlhf_scratch.json                                 kind, phase, base model, reference source
    resume_state.safetensors                          every tensor of the trainer's state: AdamW moments,
                                                      the torch RNG states (global, sampling generator, CUDA)
    resume_state.json                                 everything else: config, phase, scheduler, KL controller,
                                                      Python RNG, reward statistics / baseline, metrics history

Nothing is pickled: tensors go through safetensors, the rest through JSON. A nested state
(``optimizer.state_dict()``, ``random.getstate()``) is split by ``split_tensors`` into a JSON
skeleton, in which each tensor is replaced by ``{"__tensor__": key}`` (tuples and non-string
dict keys are marked too, so they come back as they were), and a flat {key: tensor} dict.

The whole directory is written through ``outputs.atomic_dir``: at every instant a complete
checkpoint is at ``checkpoint/`` or, for an instant, at ``checkpoint.old``; ``find_checkpoint``
looks at both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlhf_scratch.outputs import existing_dir, to_jsonable

RESUME_STATE_JSON = "resume_state.json"
RESUME_STATE_TENSORS = "resume_state.safetensors"
FORMAT_VERSION = 1

RUN_FIELDS = ("out", "device", "wandb", "wandb_project", "samples_per_phase", "table_rows", "checkpoint_every",
              "snapshot_every", "eval_every", "eval_prompts", "resume", "debug", "debug_max_approx_kl", "stop_after_phase")
"""Config fields a resumed run may change: where and how it writes and checks, not what it computes.
(``device`` does change float rounding: resume on the device you trained on for exact equality.)"""
PER_CALL_FIELDS = ("stop_after_phase",)
"""Run fields that belong to one call and are never carried over from the run's saved config."""


# ---------------------------------------------------------------- state <-> (JSON, tensors)
def split_tensors(value, tensors: dict[str, Tensor] | None = None, key: str = "state"):
    """``(skeleton, tensors)``: ``value`` with every tensor replaced by ``{"__tensor__": key}``.

    dicts, lists, tuples, str, int, float, bool and None are kept; tuples become
    ``{"__tuple__": [...]}`` and dicts with non-string keys ``{"__items__": [[k, v], ...]}``.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(v, tensors, f"{key}.{i}")[0] for i, v in enumerate(value)]}, tensors
    if isinstance(value, list):
        return [split_tensors(v, tensors, f"{key}.{i}")[0] for i, v in enumerate(value)], tensors
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: split_tensors(v, tensors, f"{key}.{k}")[0] for k, v in value.items()}, tensors
        return {"__items__": [[k, split_tensors(v, tensors, f"{key}.{k}")[0]] for k, v in value.items()]}, tensors
    if value is None or isinstance(value, (str, int, float, bool)):
        return value, tensors
    raise TypeError(f"Cannot store a {type(value).__name__} at {key} in a checkpoint (tensors and JSON values only).")


def join_tensors(skeleton, tensors: dict[str, Tensor]):
    """The inverse of ``split_tensors``."""
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in skeleton["__items__"]}
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    return skeleton


def write_resume_state(directory: Path, state: dict) -> None:
    """Write ``state`` (nested dicts of tensors and JSON values) to ``directory`` (two files, see the module doc)."""
    skeleton, tensors = split_tensors(state)
    save_file(tensors, Path(directory) / RESUME_STATE_TENSORS)
    # json.dumps writes floats with repr, which reads back to the same float; NaN/inf as NaN/Infinity.
    (Path(directory) / RESUME_STATE_JSON).write_text(json.dumps(skeleton, indent=1) + "\n")


def read_resume_state(directory: Path) -> dict:
    """Read what ``write_resume_state`` wrote (safetensors and JSON: no code is run while loading)."""
    directory = Path(directory)
    try:
        skeleton = json.loads((directory / RESUME_STATE_JSON).read_text())
        state = join_tensors(skeleton, load_file(directory / RESUME_STATE_TENSORS))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise ValueError(
            f"Cannot read the resume state in {directory} ({type(error).__name__}: {str(error)[:200]}): "
            f"{RESUME_STATE_JSON} or {RESUME_STATE_TENSORS} is missing, truncated or garbled. Resume from an intact "
            "copy of the run (checkpoint.old, if a save was interrupted), or start a new run from its weights "
            "with --model DIR."
        ) from error
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory} has resume-state format {state.get('format')!r}; this version reads {FORMAT_VERSION}.")
    return state


# ---------------------------------------------------------------- finding a checkpoint
def find_checkpoint(path: str | os.PathLike) -> Path:
    """The resumable checkpoint at ``path``: a checkpoint directory or a run directory (``OUT``, whose
    checkpoint is ``OUT/checkpoint``); ``checkpoint.old`` if a kill interrupted the last save's swap."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        try:
            directory = existing_dir(candidate)
        except FileNotFoundError:
            continue
        if (directory / RESUME_STATE_JSON).is_file():
            return directory
    if (path / "config.json").is_file() or (path / "checkpoint" / "config.json").is_file():
        raise ValueError(
            f"{path} holds a model but no {RESUME_STATE_JSON}: it was written without resume state (by an older "
            "version or by save_model_dir). It can start a new run (--model DIR) but not be resumed."
        )
    raise FileNotFoundError(f"No checkpoint at {path}: pass a run directory (--out of the run) or its checkpoint/ folder.")


# ---------------------------------------------------------------- the config of a resumed run
def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def config_from_dict(cls, data: dict):
    """A config dataclass from its ``to_jsonable`` dict (nested dataclasses and paths rebuilt); validated."""
    defaults = cls()
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue  # a field added since the checkpoint: keep its default
        value, default = data[field.name], getattr(defaults, field.name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = config_from_dict(type(default), value)
        elif value is not None and "Path" in str(field.type):
            value = Path(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def resumed_config(given, saved: dict, checkpoint: Path):
    """The config a resumed run uses: the run's saved config, with the run fields (``RUN_FIELDS``)
    taken from ``given`` where it sets them.

    A field of ``given`` counts as set when it differs from the class default. A set field that
    changes what is computed (phases, batch_size, lr, seed, ...) and differs from the run's is an
    error that lists each difference: the run could not continue as it would have.
    ``out`` defaults to the checkpoint's parent (the run directory).
    """
    cls = type(given)
    run_config = config_from_dict(cls, saved)
    flat_given, flat_default = _flatten(to_jsonable(given)), _flatten(to_jsonable(cls()))
    flat_saved = _flatten(to_jsonable(run_config))
    differences = [
        f"{key}: the run used {flat_saved.get(key)!r}, this call gives {value!r}"
        for key, value in flat_given.items()
        if key.split(".")[0] not in RUN_FIELDS and value != flat_default.get(key) and value != flat_saved.get(key)
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the configuration differs from the run's where it changes what is "
            f"computed ({'; '.join(differences)}). Drop those flags (the run's values are used) or start a new run."
        )
    overrides = {name: getattr(given, name) for name in RUN_FIELDS
                 if hasattr(given, name) and flat_given.get(name) != flat_default.get(name)}
    overrides.update({name: getattr(given, name) for name in PER_CALL_FIELDS if hasattr(given, name)})
    overrides.setdefault("out", checkpoint.parent)
    overrides["resume"] = given.resume
    return dataclasses.replace(run_config, **overrides)


# ---------------------------------------------------------------- the reference model's identity
def weights_fingerprint(module: torch.nn.Module) -> list[float]:
    """[Σ w, Σ |w|] over every parameter, in float64: equal for the same weights, different for almost any change.

    Recorded in the checkpoint so that a resumed run can tell whether the reference it reloads
    (or is given) is the one the run started with.
    """
    total, absolute = 0.0, 0.0
    with torch.no_grad():
        for param in module.parameters():
            total += float(param.sum(dtype=torch.float64))
            absolute += float(param.abs().sum(dtype=torch.float64))
    return [total, absolute]


def same_fingerprint(a: list[float], b: list[float], rel: float = 1e-6) -> bool:
    """Fingerprints equal up to summation order (another device sums in another order)."""
    return all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))
