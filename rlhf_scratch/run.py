"""The run loop: the only loop over a run's units (a policy trainer's phases), with everything around them.

``run_loop(trainer, console, stop_after)`` drives any trainer that offers the small interface below, so stopping,
evaluating, snapshotting, checkpointing and resuming work the same way for every one of them::

    outputs.open(completed)                      --out, config.json, row files cut back to the checkpoint, W&B
    start = trainer.begin()                      e.g. the "before" sample table
    while units are left and no stop was requested (Ctrl-C or SIGTERM, on any rank):
        rows, samples = trainer.run_unit()       one phase: rollout ─► memory ─► learning ─► its metrics row
                                                 (DPO: one step's row, and the epoch's row after its last step)
        rows[-1] |= trainer.evaluate()           --eval-every N (and after the last unit)
        outputs.log(rows, samples)               history, metrics.jsonl, samples.jsonl, W&B
        trainer.save_snapshot(out)               --snapshot-every N
        trainer.save_checkpoint(out/checkpoint)  --checkpoint-every N, or --checkpoint-minutes M since the last one
    the checkpoint (if the last unit has none); stopped early: TrainingInterrupted with the --resume command
    trainer.finish(console, outputs, start)      sample table, plots, summary.json

The trainer supplies: ``kind``, ``title``, ``unit`` ("phase", or DPO's "step"), ``config`` (``out``, ``wandb``, ``checkpoint_every``,
``checkpoint_minutes``, ``snapshot_every``, ``eval_every``), ``completed`` and ``total`` (units), ``history``,
``elapsed_seconds``, ``progress_text`` and ``progress_fields(rows)``, and the methods named above plus ``summary()``
(``save_snapshot`` is optional).
A checkpoint is everything the next unit depends on, as one dict of the pieces' ``state_dict``s (the trainer's
``resume_state``); ``Trainer.resume(config)`` rebuilds the trainer from it, and this loop continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhf_scratch import distributed
from rlhf_scratch.interrupts import StopRequest, TrainingInterrupted
from rlhf_scratch.run_outputs import RunOutputs


def resume_command(kind: str, out: Path | str) -> str:
    """The command that continues the run in ``out`` (a data-parallel run resumes on as many processes)."""
    launcher = (f"torchrun --nproc-per-node {distributed.world_size()} -m rlhf_scratch" if distributed.is_distributed()
                else "rlhf-scratch")
    return f"{launcher} {kind} --resume {out}"


def should_evaluate(every: int, completed: int, total: int) -> bool:
    """Whether ``--eval-every`` asks for an evaluation after unit ``completed`` (and always after the last)."""
    return bool(every) and (completed % every == 0 or completed == total)


class CheckpointClock:
    """When to write the checkpoint after a unit: every ``checkpoint_every`` units, or once ``checkpoint_minutes`` have
    passed since the last one (or the start), so that even ``kill -9`` loses at most that much. Rank 0's clock decides
    for every rank (a checkpoint is a collective)."""

    def __init__(self, every: int, minutes: float):
        self.every, self.seconds = every, minutes * 60
        self.last = time.monotonic()

    def due(self, completed: int) -> bool:
        by_count = bool(self.every) and completed % self.every == 0
        by_time = self.seconds > 0 and distributed.broadcast_object(time.monotonic() - self.last >= self.seconds)
        return by_count or by_time

    def reset(self) -> None:
        self.last = time.monotonic()


def run_loop(trainer, console=None, stop_after: int | None = None) -> dict:
    """Run the units left (all of them for a new trainer) with a progress bar, logging and outputs; returns the summary.

    A trainer that has completed units (resumed from a checkpoint, or stepped by hand) continues from unit
    ``completed + 1``: metrics.jsonl and samples.jsonl keep their rows up to that unit and grow from there.
    ``stop_after=k`` stops after unit k (as if the run were interrupted there), with the checkpoint and outputs
    written. Ctrl-C or SIGTERM stops at the end of the current unit: the checkpoint is written and
    ``TrainingInterrupted`` raised, its message giving the ``--resume`` command (``rlhf_scratch.interrupts``).
    """
    config, unit = trainer.config, trainer.unit
    console = console or Console()
    last = trainer.total if stop_after is None else min(stop_after, trainer.total)
    if last < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}.")
    if trainer.history and trainer.completed >= trainer.total:  # e.g. --resume of a finished run: nothing to do, say so
        console.print(f"{trainer.title}: this run is already complete ({trainer.completed} of {trainer.total} {unit}s); "
                      f"nothing was trained. To train further, start a new run from its weights: rlhf-scratch "
                      f"{trainer.kind} --model {config.out or 'RUN'}/checkpoint --out NEW_DIR.")
        return trainer.summary()
    outputs = RunOutputs(config, trainer.kind, unit)
    out = outputs.open(trainer.completed, console)
    main = distributed.is_main()  # only rank 0 prints, evaluates and writes
    start = trainer.begin()
    clock, elapsed_before = time.time(), trainer.elapsed_seconds
    saved, first = None, trainer.completed
    checkpoints = CheckpointClock(config.checkpoint_every, getattr(config, "checkpoint_minutes", 0.0))
    columns = [TextColumn(f"[bold]{trainer.title}[/] {unit} {{task.completed}}/{{task.total}}"), BarColumn(),
               TextColumn(trainer.progress_text), TimeElapsedColumn(), TimeRemainingColumn()]
    with (Progress(*columns, console=console, disable=not main) as progress,
          StopRequest(console if main else None, f"this {unit}") as stop):
        task = progress.add_task(trainer.kind, total=trainer.total, completed=trainer.completed,
                                 **trainer.progress_fields(None))
        # Every rank stops at the same unit boundary if Ctrl-C or SIGTERM reached any of them (torchrun forwards both).
        while trainer.completed < last and not distributed.any_rank(stop.requested):
            rows, samples = trainer.run_unit()
            if main and should_evaluate(config.eval_every, trainer.completed, trainer.total):
                rows[-1].update(trainer.evaluate())
            progress.update(task, advance=1, **trainer.progress_fields(rows))
            trainer.history.extend(rows)
            with distributed.shared_failures(f"{unit} {trainer.completed}, writing the outputs"):
                for index, row in enumerate(rows):
                    outputs.log(row, samples if index == len(rows) - 1 else (), step=trainer.completed)
            trainer.elapsed_seconds = elapsed_before + time.time() - clock
            if out is not None and main and hasattr(trainer, "save_snapshot"):  # --snapshot-every (policy trainers)
                trainer.save_snapshot(out)
            if out is not None and checkpoints.due(trainer.completed):
                trainer.save_checkpoint(out / "checkpoint")
                saved = trainer.completed
                checkpoints.reset()
    interrupted = trainer.completed < last  # only a stop request ends the loop early
    if not trainer.history and not interrupted:
        raise ValueError(f"No {unit} to run or summarise: the trainer has completed {trainer.completed} of "
                         f"{trainer.total} {unit}s.")
    trainer.elapsed_seconds = elapsed_before + time.time() - clock
    # Rank 0's file system decides (a checkpoint is a collective: every rank must agree to write it).
    if out is not None and saved != trainer.completed and distributed.broadcast_object(
            trainer.completed > first or not (out / "checkpoint").exists()):
        trainer.save_checkpoint(out / "checkpoint")  # before the sample table: the state is the unit's end
    if interrupted:
        outputs.close()
        # The signal every rank reports: SIGTERM if it reached any rank (a scheduler may signal only some), else Ctrl-C.
        by = "SIGTERM" if distributed.max_over_ranks(int(stop.signal_name == "SIGTERM" and stop.requested)) else "Ctrl-C"
        raise TrainingInterrupted(interrupted_message(trainer, out, by), signal_name=by)
    return trainer.finish(console, outputs, start)


def interrupted_message(trainer, out: Path | None, by: str = "Ctrl-C") -> str:
    """What a run stopped at a unit boundary kept, and the command that continues it."""
    stopped = f"Stopped by {by} after {trainer.unit} {trainer.completed} of {trainer.total}"
    if out is None:
        return f"{stopped}; without --out nothing was saved."
    return f"{stopped}; checkpoint saved in {out / 'checkpoint'}. Continue with: {resume_command(trainer.kind, out)}"
