"""Ctrl-C or SIGTERM during training: finish the current phase, save a checkpoint, say how to continue.

A KeyboardInterrupt raised in the middle of a phase leaves the trainer half-updated (some minibatches
stepped, the schedule not), so nothing consistent could be saved from there. Instead, while a
``StopRequest`` is active, the first Ctrl-C (SIGINT) or SIGTERM only sets ``requested``; the training
loop checks it at each phase boundary, writes its checkpoint (atomically) and raises ``TrainingInterrupted``
with the ``--resume`` command. The command then exits with 128 + the signal's number: 130 after Ctrl-C,
143 after SIGTERM, as shells report a process those signals ended. SIGTERM is what Slurm, Kubernetes and
torchrun send before they kill a job, so a scheduler's stop loses at most the phase in progress. A second
signal raises KeyboardInterrupt at once, as usual (losing the work since the last checkpoint).
"""

from __future__ import annotations

import signal
import threading

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""
TERMINATED_EXIT = 143
"""Exit status after SIGTERM (128 + 15)."""
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
EXIT_CODES = {"Ctrl-C": INTERRUPTED_EXIT, "SIGTERM": TERMINATED_EXIT}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a phase boundary after Ctrl-C or SIGTERM; the message says what was saved and how to
    continue, ``exit_code`` is the command's exit status (130 or 143).

    A KeyboardInterrupt, so that code which stops on Ctrl-C (a notebook, a script's ``except
    KeyboardInterrupt``) still stops; ``str(error)`` is the message for the user."""

    def __init__(self, message: str = "", signal_name: str = "Ctrl-C"):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, INTERRUPTED_EXIT)


class StopRequest:
    """``with StopRequest(console) as stop: ... if stop.requested: ...``: the first SIGINT or SIGTERM sets
    ``requested`` and ``signal_name`` (and prints what will happen); a second one raises KeyboardInterrupt. Outside
    the main thread, where Python cannot install signal handlers, it does nothing; a signal the process was started
    to ignore (SIGINT under ``nohup`` or in a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, console=None, what: str = "the current phase"):
        self.console, self.what = console, what
        self.requested = False
        self.signal_name = "Ctrl-C"
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        if self.console is not None:
            again = "press Ctrl-C" if signum == signal.SIGINT else f"send {self.signal_name}"
            self.console.print(f"[yellow]{self.signal_name}: stopping after {self.what} and saving a checkpoint "
                               f"({again} again to stop at once, losing the work since the last checkpoint).[/]")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
