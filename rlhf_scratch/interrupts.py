"""Ctrl-C during training: finish the current phase, save a checkpoint, say how to continue.

A KeyboardInterrupt raised in the middle of a phase leaves the trainer half-updated (some minibatches
stepped, the schedule not), so nothing consistent could be saved from there. Instead, while a
``StopRequest`` is active, the first Ctrl-C only sets ``requested``; the training loop checks it at
each phase boundary, writes its checkpoint and raises ``TrainingInterrupted`` with the ``--resume``
command. A second Ctrl-C raises KeyboardInterrupt at once, as usual (losing the work since the last
checkpoint).
"""

from __future__ import annotations

import signal
import threading

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a phase boundary after Ctrl-C; the message says what was saved and how to continue.

    A KeyboardInterrupt, so that code which stops on Ctrl-C (a notebook, a script's ``except
    KeyboardInterrupt``) still stops; ``str(error)`` is the message for the user."""


class StopRequest:
    """``with StopRequest(console) as stop: ... if stop.requested: ...``: the first SIGINT sets ``requested``
    (and prints what will happen); a second one raises KeyboardInterrupt. Outside the main thread, where
    Python cannot install signal handlers, and where SIGINT is ignored, it does nothing."""

    def __init__(self, console=None, what: str = "the current phase"):
        self.console, self.what = console, what
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.console is not None:
            self.console.print(f"[yellow]Ctrl-C: stopping after {self.what} and saving a checkpoint "
                               "(press Ctrl-C again to stop at once, losing the work since the last checkpoint).[/]")

    def __enter__(self) -> StopRequest:
        # A process started to ignore Ctrl-C (`nohup`, a background job) keeps ignoring it.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
