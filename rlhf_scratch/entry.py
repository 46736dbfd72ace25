"""The ``rlhf-scratch`` console script: the CLI (``cli.main``), started so that it ends quietly when

- Ctrl-C arrives while torch and transformers are still importing (seconds; tens of seconds on a busy
  machine): one line instead of a traceback from inside ``import torch``;
- its output pipe closes early (``rlhf-scratch ppo --help | head``): like other Unix tools, it stops
  on SIGPIPE instead of printing a BrokenPipeError traceback.

This module imports nothing heavy itself; ``python -m rlhf_scratch`` runs the same ``main``.
"""

from __future__ import annotations

import signal
import sys

from rlhf_scratch.interrupts import INTERRUPTED_EXIT


def main() -> int:
    if hasattr(signal, "SIGPIPE"):  # POSIX only
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        from rlhf_scratch.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:  # during the imports or argument parsing (cli.main handles it while a command runs)
        print("rlhf-scratch: interrupted (Ctrl-C) while starting; nothing was written.", file=sys.stderr)
        return INTERRUPTED_EXIT
