"""Gradient checkpointing of the plain forward's transformer blocks (``--gradient-checkpointing``).

A learning pass keeps, for the backward pass, every intermediate activation of every block: layer-norm outputs,
q/k/v, attention scores and probabilities [B, H, S, S], the MLP's hidden layer [B, S, 4D], ... — many times the
block's input [B, S, D]. With checkpointing each block runs under ``torch.utils.checkpoint``: only its inputs are
kept, and its intermediates are recomputed, one block at a time, when the backward pass reaches it. Memory for
activations drops from ~L·k·B·S·D to ~L·B·S·D plus one block's k·B·S·D; the price is one more forward pass of
every block (about a third more time per learning step). The gradients are the same function's, computed by the
same kernels: equal to float rounding (``tests/test_checkpointing.py``).

The plain module (``plain_forward.PlainForward``) runs on the bridge's live tensors through ``functional_call``,
which swaps them in for the duration of the call only: by the time the backward pass recomputes a block, the
module holds ``meta`` tensors again. So each block is checkpointed with a ``context_fn`` whose *recompute* context
swaps back in the tensors that block ran on in the forward pass (``_swapped``), and nothing else changes:

    BlockCheckpointing(module)           wraps each decoder block's forward once (the module is the plain copy)
    with checkpointing.active():         checkpoint the blocks during this call
        functional_call(module, weights, ...)

Blocks are the modules transformers marks as checkpointable (``GradientCheckpointingLayer``: the decoder layer of
every family), else the items of the model's longest ``ModuleList``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def decoder_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every transformer block of a Hugging Face causal LM, in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no marker class
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is not None:
        blocks = [(name, m) for name, m in module.named_modules() if isinstance(m, GradientCheckpointingLayer)]
        if blocks:
            return blocks
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{index}", block) for index, block in enumerate(longest)]


@contextlib.contextmanager
def _swapped(slots: list[tuple[dict, str]], tensors: list[Tensor]) -> Iterator[None]:
    """Within, each ``table[key]`` of ``slots`` (a module's ``_parameters`` or ``_buffers``) holds the matching
    tensor of ``tensors``; the previous ones (``meta``) are put back on exit."""
    previous = [table[key] for table, key in slots]
    for (table, key), tensor in zip(slots, tensors):
        table[key] = tensor
    try:
        yield
    finally:
        for (table, key), tensor in zip(slots, previous):
            table[key] = tensor


class BlockCheckpointing:
    """Checkpointing for every decoder block of ``module`` (a plain module run by ``functional_call``); off unless
    inside ``active()`` with gradients enabled."""

    def __init__(self, module: nn.Module):
        self.blocks = decoder_blocks(module)
        if not self.blocks:
            raise ValueError(f"Gradient checkpointing found no transformer blocks in {type(module).__name__}.")
        self.enabled = False
        for _, block in self.blocks:
            self._wrap(block)

    def _wrap(self, block: nn.Module) -> None:
        slots = [(table, key) for _, owner in block.named_modules(remove_duplicate=False)
                 for table in (owner._parameters, owner._buffers) for key, value in table.items() if value is not None]
        forward = block.forward  # the class's (bound): an instance attribute now shadows it

        def checkpointed_forward(*args, **kwargs):
            if not self.enabled or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            # The tensors functional_call swapped in for this call (live, with grad): the recompute runs on them.
            tensors = [table[key] for table, key in slots]

            def contexts():
                return contextlib.nullcontext(), _swapped(slots, tensors)

            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

        block.forward = checkpointed_forward

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Checkpoint every block during the module's calls within (those with gradients enabled)."""
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
