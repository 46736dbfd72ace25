"""``python -m rlhf_scratch COMMAND ...``: the ``rlhf-scratch`` command, also as ``torchrun ... -m rlhf_scratch``."""

from rlhf_scratch.cli import main

raise SystemExit(main())
