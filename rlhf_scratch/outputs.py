"""Writing run outputs: JSON that accepts dataclasses and paths, JSON lines, directories replaced atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def to_jsonable(value):
    """Dataclasses, paths, tuples and tensors turned into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(to_jsonable(value), indent=2) + "\n")
    os.replace(temporary, path)
    return path


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON object as a line (used for metrics and samples, one per phase)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(to_jsonable(row)) + "\n")


# ---------------------------------------------------------------- directories written atomically
#
# A directory cannot be renamed over a non-empty one, so "write a temporary copy, then
# rename" takes two renames for a directory. The scheme (``swap_in_dir``):
#
#     1. rename TARGET -> TARGET.old      (after dropping a stale TARGET.old if TARGET exists)
#     2. rename STAGING -> TARGET         (STAGING: a complete copy, written beside TARGET)
#     3. delete TARGET.old
#
# Each rename is atomic, so at every instant a complete directory sits at TARGET or, only
# between steps 1 and 2, at TARGET.old; ``existing_dir`` reads TARGET and falls back to
# TARGET.old. A half-written STAGING is a hidden sibling (``.NAME.*.partial``) that no loader
# looks at; the next write to TARGET removes it. This protects against the process dying at
# any moment (kill, crash, Ctrl-C); files are not fsync'ed, so it does not claim to survive a
# power cut.

BACKUP_SUFFIX = ".old"
PARTIAL_SUFFIX = ".partial"


def backup_dir(target: Path) -> Path:
    """``TARGET.old``: where ``swap_in_dir`` keeps the previous directory for an instant."""
    target = Path(target)
    return target.with_name(target.name + BACKUP_SUFFIX)


def existing_dir(target: str | os.PathLike) -> Path:
    """The complete directory written at ``target``: ``target`` itself, or ``target.old`` if a
    process was killed between the two renames of ``swap_in_dir``. Raises FileNotFoundError."""
    target = Path(target)
    for candidate in (target, backup_dir(target)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"No directory at {target} (nor its fallback {backup_dir(target).name}).")


def swap_in_dir(staging: Path, target: Path) -> None:
    """Rename the complete directory ``staging`` to ``target``, replacing what was there (scheme above)."""
    backup = backup_dir(target)
    if target.exists():
        if backup.exists():  # left by a kill during step 3 of an earlier swap; TARGET is complete
            shutil.rmtree(backup)
        os.replace(target, backup)
    # If TARGET was missing and TARGET.old exists (a kill between steps 1 and 2), step 2 then 3 still hold.
    os.replace(staging, target)
    shutil.rmtree(backup, ignore_errors=True)


def _staging_dir(target: Path) -> Path:
    """A new empty hidden sibling of ``target`` (same filesystem, so the final rename is atomic).

    Staging directories left by a process killed while writing are removed first: they are
    never read (a complete directory is always at TARGET or TARGET.old) and may be large.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded staging directory; on success it replaces ``target``.

    ::

        with atomic_dir(out / "checkpoint") as staging:
            save_model_dir(bridge, staging)

    If the block raises, ``target`` is left untouched and the staging directory is removed.
    """
    target = Path(target)
    staging = _staging_dir(target)
    try:
        yield staging
        swap_in_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left there after a successful swap


def replace_dir(source: Path, target: Path, copy: bool) -> None:
    """Put the directory ``source`` at ``target`` atomically (copied, or moved if ``copy`` is False)."""
    target = Path(target)
    staging = _staging_dir(target)
    try:
        staging.rmdir()  # copytree and move want to create it
        (shutil.copytree if copy else shutil.move)(source, staging)
        swap_in_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def filter_jsonl(path: str | os.PathLike, keep) -> None:
    """Rewrite a JSON-lines file keeping the rows for which ``keep(row)`` is true (atomically); no file, no-op."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(row + "\n" for row in rows))
    os.replace(temporary, path)


# ---------------------------------------------------------------- the run directory a command writes


class RunDirectoryError(ValueError):
    """``--out`` cannot be used as asked; the message says what to do instead."""


RUN_MARKER = "config.json"
"""Every command writes its config here first thing; a directory holding it is an earlier run's."""


def check_run_dir(out: str | os.PathLike, command: str, overwrite: bool = False, resuming: bool = False) -> bool:
    """Refuse an ``--out`` that would lose or cannot hold results, before anything is loaded or written.

    * ``out`` (or a parent of it) is a file, or its nearest existing parent cannot be written: an error.
    * ``out`` is a non-empty directory: an error offering ``--resume`` (trainers) or ``--overwrite``,
      unless ``resuming`` into it. ``--overwrite`` is accepted only for an earlier run directory (one
      holding ``config.json``), so a mistyped ``--out .`` can never replace unrelated files.

    Returns whether ``out`` holds an earlier run that ``overwrite`` will replace (see ``claim_run_dir``).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory: choose a directory path for the outputs.")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirectoryError(f"--out {out} lies under {parent}, which is a file: choose a directory path.")
    try:  # a real write, not os.access: root passes access checks on read-only places such as /sys
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise RunDirectoryError(f"--out {out}: cannot write in {parent} ({error.strerror}); choose a writable path.") from error
    if not out.is_dir() or not any(out.iterdir()) or resuming:
        return False
    is_run = (out / RUN_MARKER).is_file()
    if overwrite and is_run:
        return True
    if not is_run:
        raise RunDirectoryError(
            f"--out {out} is a non-empty directory that is not an rlhf-scratch run (no {RUN_MARKER}); "
            "nothing was written. Choose a new or empty directory."
        )
    resume_hint = f"`rlhf-scratch {command} --resume {out}` to continue it, " if command in ("ppo", "reinforce") else ""
    raise RunDirectoryError(
        f"--out {out} already holds an earlier run ({', '.join(sorted(p.name for p in out.iterdir())[:6])}); "
        f"nothing was written. Use {resume_hint}a new --out directory, or add --overwrite to replace that run."
    )


def paths_inside(directory: Path, candidates: list[str]) -> list[str]:
    """The existing paths among ``candidates`` (``rm:DIR`` / ``hf:DIR:LABEL`` specs included) that lie in ``directory``."""
    inside, root = [], Path(directory).expanduser().resolve()
    for text in candidates:
        path_text = text.split(":")[1] if text.startswith(("rm:", "hf:")) else text
        path = Path(path_text).expanduser()
        if path_text and path.exists() and (path.resolve() == root or root in path.resolve().parents):
            inside.append(text)
    return inside


@contextmanager
def claim_run_dir(out: str | os.PathLike, command: str, overwrite: bool = False, resuming: bool = False,
                  inputs: list[str] = (), clean_on: tuple[type[BaseException], ...] = (Exception,),
                  kept_on: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Hold ``--out`` for one command (``check_run_dir`` first), so that a failing command loses nothing.

    * A new run that fails with one of ``clean_on`` leaves no half-written directory behind (a directory
      that was absent or empty before is removed or emptied again), unless it has written ``checkpoint/``
      (``--checkpoint-every``): that run is kept, to be resumed once the cause is fixed. An interrupted run
      (Ctrl-C) keeps what it wrote.
    * ``overwrite``: the earlier run is moved aside (``.NAME.replaced``), deleted only once the new run has
      finished, and moved back if the new run fails in any way. An input (``--model``, ``--pairs``,
      ``rm:DIR``, ...) inside the earlier run is refused: replacing the run would delete it.
    * ``kept_on``: exceptions after which the new run counts as finished (a run stopped by Ctrl-C at a phase
      boundary holds a checkpoint to resume from: it replaces the earlier run as a finished one would).
    """
    out = Path(out).expanduser()
    replaces = check_run_dir(out, command, overwrite=overwrite, resuming=resuming)
    endangered = paths_inside(out, list(inputs)) if replaces else []
    if endangered:
        raise RunDirectoryError(
            f"--overwrite would delete {', '.join(endangered)}, which this command reads and which "
            f"lies inside --out {out}. Copy it elsewhere first, or choose another --out."
        )
    existed_empty = out.is_dir() and not any(out.iterdir())
    fresh = not out.exists() or existed_empty
    aside = out.with_name(f".{out.name}.replaced")
    if replaces:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
    try:
        yield
    except kept_on:
        if replaces:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    except BaseException as error:
        resumable = (out / "checkpoint").is_dir()  # a failure after a periodic checkpoint keeps it (fix, then --resume)
        if replaces or (fresh and not resuming and isinstance(error, clean_on) and not resumable):
            shutil.rmtree(out, ignore_errors=True)
            if existed_empty:
                out.mkdir()
        if replaces:
            os.replace(aside, out)
        raise
    if replaces:
        shutil.rmtree(aside, ignore_errors=True)
