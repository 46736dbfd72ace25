"""Loading a model: a local directory (a run's ``--out`` or ``checkpoint/`` too) or a hub name, with the checks that
say what to do when it fails. ``models.load_bridge`` adds ``"builtin"`` (built by ``pretrain``, which loads its
model through this module: so neither imports the other in a cycle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformer_lens.model_bridge import TransformerBridge

from rlhf_scratch import data
from rlhf_scratch.outputs import backup_dir


CHECKPOINT_META_FILE = "rlhf_scratch.json"


BUILTIN_NAMES = ("builtin", "tiny", "tiny-reviews")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A local model directory holds at least one of these (fast tokenizer, sentencepiece, BPE vocabulary, WordPiece)."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def complete_checkpoint_dir(source: str | os.PathLike) -> Path:
    """The model directory ``source`` names: ``source`` itself; a run directory (a trainer's ``--out``, which holds
    no weights of its own) as its ``checkpoint/``; or the ``.old`` sibling when a run was killed between the two
    renames that swap a new checkpoint in (``outputs.swap_in_dir``) and only the previous one is complete."""

    path = Path(str(source)).expanduser()
    if not path.exists() and backup_dir(path).is_dir():
        return backup_dir(path)
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        run_checkpoint = complete_checkpoint_dir(path / "checkpoint")
        if run_checkpoint.is_dir():
            return run_checkpoint
    return path


def looks_like_path(source: str) -> bool:
    """Whether a model name that is not an existing directory was meant as a path rather than a hub name:
    it starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first part is a local directory
    (``runs/ppo`` when ``runs/`` exists; a hub name is ``owner/name``)."""
    first = source.split("/", 1)[0]
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or ("/" in source and Path(first).is_dir())


def check_model_source(source: str | os.PathLike, flag: str = "--model") -> None:
    """Fail before anything loads when ``source`` names a local directory that does not exist (ModelLoadError).
    ``"builtin"``, existing directories and hub names pass (a hub name is checked when it loads)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        raise ModelLoadError(f"{flag} {source} is a file; pass the folder that holds it ({path.parent}): a model is a "
                             "directory with config.json, the weights and the tokenizer files.")
    if source in BUILTIN_NAMES or complete_checkpoint_dir(source).exists():
        return
    if looks_like_path(source):
        raise ModelLoadError(f"No such model directory: {source} (given as {flag}; resolved to "
                             f"{Path(source).expanduser().resolve()}). Check the path: pass a run's --out folder, its "
                             "checkpoint/ folder or a saved model directory.")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


def check_device(device: str | torch.device) -> None:
    """Raise ValueError unless ``device`` names a device this machine has (before any model loads)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown --device {device!r}: use cpu, cuda, cuda:N or mps.") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")


def load_bridge_from(source: str | os.PathLike, device: str = "cpu"):
    """Load a ``TransformerBridge`` from a local directory (a run's ``--out`` or ``checkpoint/`` too) or a hub name
    (``models.load_bridge`` also takes ``"builtin"``, built on first use).

    The model is returned in eval mode (dropout off): RLHF compares log-probs of the
    same tokens across forward passes, and dropout noise would make the PPO ratio
    differ from 1 even before any update.
    """

    check_device(device)
    source = str(source)
    check_model_source(source)
    path = complete_checkpoint_dir(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} exists but has no config.json, so it is not a model directory. "
                "Pass a directory written by `save_pretrained` (config.json, weights, "
                "tokenizer files) or by `rlhf-scratch` (a run's checkpoint/ folder)."
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}): the model was saved without it. "
                "Save it next to the weights (`tokenizer.save_pretrained(DIR)`), or copy tokenizer.json and "
                "tokenizer_config.json from the model it came from."
            )
        try:
            bridge = TransformerBridge.boot_transformers(str(path), device=device)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ModelLoadError(corrupted_model_message(path, error)) from error
    else:
        # Without this check an unreachable hub costs ~25 s of retries before failing.
        offline_var = data.hub_offline_var()
        if offline_var or not data.hub_is_reachable():
            reason = f"{offline_var} is set" if offline_var else "the hub is unreachable from this machine"
            raise ModelLoadError(
                f"No such model directory: {source} (resolved to {Path(source).expanduser().resolve()}); check the path. "
                f"If you meant the Hugging Face hub model {source!r}, it cannot be loaded here: {reason}. "
                "On a machine with network, download it once "
                f"(`huggingface-cli download {source} --local-dir DIR`, or "
                "`AutoModelForCausalLM.from_pretrained(name).save_pretrained(DIR)` plus the "
                "tokenizer) and pass --model DIR; or use --model builtin for the offline model."
            )
        try:
            bridge = TransformerBridge.boot_transformers(source, device=device)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"Could not load {source!r} from the Hugging Face hub ({type(error).__name__}: "
                f"{brief(error)}). If the hub is unreachable, download the model on a "
                "machine with network, save it to a directory and pass --model DIR; "
                "or use --model builtin for the offline model."
            ) from error
    bridge.eval()
    damaged = [name for name, value in bridge.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        raise ModelLoadError(
            f"The model from {source} has NaN or inf weights ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): "
            "a damaged file, or a checkpoint of a run that diverged. Load an intact copy (a run's checkpoint.old, or "
            "the model it started from)."
        )
    return bridge


def read_checkpoint_meta(meta_file: Path) -> dict:
    """The JSON of a checkpoint's ``rlhf_scratch.json``, or a ModelLoadError that names the damaged file."""
    try:
        return dict(json.loads(Path(meta_file).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{meta_file} is missing or not readable JSON ({type(error).__name__}: {error}): the model "
                             "was not saved completely or is damaged. Save or train it again, or use an intact copy "
                             "(a run's checkpoint.old).") from error


def brief(error: Exception, limit: int = 200) -> str:
    """A library's error message on one line, cut at a word (with "…") when longer than ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def corrupted_model_message(path: Path, error: Exception, file: str | None = None) -> str:
    """What to say when a model directory exists but cannot be read (a truncated or garbled file, named if known)."""
    which = f"{file} in it is" if file else "A file in it is"
    return (
        f"Could not load the model in {path} ({type(error).__name__}: {brief(error)}). {which} missing, "
        "truncated or not what its name says (an interrupted copy or download?). Copy or save the model again; for "
        "a run's checkpoint, the previous complete one may be at checkpoint.old."
    )
