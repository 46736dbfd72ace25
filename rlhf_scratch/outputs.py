"""Writing run outputs: JSON that accepts dataclasses and paths, JSON lines, run folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
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


def replace_dir(source: Path, target: Path, copy: bool) -> None:
    """Put ``source`` at ``target`` via a sibling temporary directory and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.rmdir()
    (shutil.copytree if copy else shutil.move)(source, staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
