"""A run's outputs, written by one object: the ``--out`` directory, ``config.json``, ``metrics.jsonl``,
``samples.jsonl``, ``summary.json`` and W&B (``--wandb``). Only rank 0 writes; on other ranks every call does nothing.

::

    outputs = RunOutputs(config, kind="ppo", unit="phase")
    outputs.open(completed=k)          mkdir, config.json; the row files keep their rows up to unit k (resume)
    outputs.log(row, samples)          one metrics row (and sample rows) per unit; W&B too
    outputs.finish(summary)            summary.json, W&B summary; outputs.close() ends W&B without one

The plots are the trainer's own (each draws its own curves) and go to ``outputs.out``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_scratch import distributed
from rlhf_scratch.outputs import append_jsonl, filter_jsonl, to_jsonable, write_json


def start_wandb(config):
    """A wandb run; offline mode unless WANDB_MODE says otherwise (no network here)."""
    import wandb  # heavy and optional: only a run with --wandb pays for the import

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=config.wandb_project, config=to_jsonable(config), mode=mode,
                      dir=str(config.out) if config.out is not None else None)


class RunOutputs:
    """The files of one run (``config.out``; None: nothing is written) and its W&B run (``config.wandb``).

    ``unit`` names the key that numbers the rows (``"phase"`` for the policy trainers, ``"step"`` for DPO and the
    reward model): on resume, rows past the checkpoint's unit are dropped (a run killed after logging a unit but
    before checkpointing it recomputes that unit)."""

    def __init__(self, config, kind: str, unit: str = "phase"):
        self.config, self.kind, self.unit = config, kind, unit
        self.out: Path | None = Path(config.out) if config.out is not None else None
        self.main = distributed.is_main()
        self.wandb_run = None

    def open(self, completed: int = 0, console=None) -> Path | None:
        """Create the directory and write config.json (rank 0), and start W&B if asked; metrics.jsonl and
        samples.jsonl keep their rows up to unit ``completed`` (none for a new run). Returns the directory."""
        out = self.out
        if out is not None:
            with distributed.shared_failures("opening the outputs"):
                if self.main:
                    if completed > 0 and not (out / "metrics.jsonl").is_file() and console is not None:
                        # `--resume RUN --out OTHER`: the history (summary, plots) is whole, the row files are not.
                        console.print(f"note: continuing from {self.unit} {completed} in {out}: its metrics.jsonl and "
                                      f"samples.jsonl start at {self.unit} {completed + 1}; the rows of {self.unit}s "
                                      f"1–{completed} stay in the run the checkpoint came from (summary.json and the "
                                      "plots cover all).")
                    out.mkdir(parents=True, exist_ok=True)
                    for name in ("metrics.jsonl", "samples.jsonl"):
                        filter_jsonl(out / name, lambda row: row.get(self.unit, 0) <= completed)
                    write_json(out / "config.json", self.config)
        if getattr(self.config, "wandb", False) and self.main:
            self.wandb_run = start_wandb(self.config)
        return out

    def log(self, row: dict, samples: list[dict] = (), step: int | None = None) -> None:
        """Append one metrics row and its sample rows (rank 0), and log the row to W&B at ``step``."""
        if self.out is not None and self.main:
            append_jsonl(self.out / "metrics.jsonl", row)
            for sample in samples:
                append_jsonl(self.out / "samples.jsonl", sample)
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=step)

    def finish(self, summary: dict) -> None:
        """summary.json (rank 0) and the W&B summary; ends the W&B run."""
        if self.out is not None and self.main:
            write_json(self.out / "summary.json", summary)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
        self.close()

    def close(self) -> None:
        """End the W&B run (if any) without a summary: a run stopped early."""
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
