"""The learner: the optimiser, the learning-rate schedule, DDP, autocast, gradient accumulation and the clipped step.

``Learner.step(index, minibatch, loss_fn)`` is one optimiser step, nanoGPT's loop with its accumulation and DDP
sync toggle in view::

    zero_grad
    for k, piece in enumerate(minibatch.split(grad_accum_steps)):     # micro-batches of this rank's slice
        terms = loss_fn(piece)                                          # each term: the piece's share of the mean
        with no_sync unless k is the last: terms["loss"].backward()     # DDP all-reduces on the last backward only
    clip the global grad norm, check it is finite, AdamW step          (optimization.clip_and_step)
    return the whole (global) minibatch's terms: Σ of the shares, averaged over ranks

A piece of a minibatch (a rank's slice, a micro-batch) gives its *share* of each mean over the whole minibatch
(``token_share``, ``row_share``), so the pieces' gradients add up to the whole one's. The schedule steps once per
phase (``end_phase``). The learner knows nothing of the algorithm: ``loss_fn`` is given to ``step``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.models import PolicyOutput, PolicyWithValueHead
from rlhf_scratch.optimization import (clip_and_step, copy_to_views, fuse_strided_groups, fused_where_contiguous,
                                       regroup_optimizer_state)
from rlhf_scratch.schedule import warmup_decay_lambda


def autocast(device: str, dtype: str):
    """``torch.autocast`` in ``dtype`` for a forward pass (nothing in float32). Its outputs are cast back to float32
    by the caller: log-softmax, KL, losses, weights and optimiser state stay float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def token_share(value: Tensor, piece: ReplayMemory) -> Tensor:
    """A mean over ``piece``'s real generated tokens → its share of the mean over the whole minibatch
    (``distributed.share``); ``value`` itself when the piece is whole (one process, no accumulation)."""
    if piece.part_of is None:
        return value
    return distributed.share(value, piece.gen_mask.sum().item(), piece.part_of.gen_mask.sum().item())


def row_share(value: Tensor, piece: ReplayMemory) -> Tensor:
    """A mean over ``piece``'s rows → its share of the mean over the whole minibatch's rows."""
    if piece.part_of is None:
        return value
    return distributed.share(value, len(piece), len(piece.part_of))


def check_batch_split(config, group_size: int = 1) -> None:
    """The global batch and minibatch must split evenly over the ranks, each rank's share of a minibatch over the
    micro-batches (``grad_accum_steps``), and each rank's share of the batch into whole groups of ``group_size``."""
    distributed.check_divisible(config.batch_size, "batch_size", "--batch-size")
    minibatch = getattr(config, "minibatch_size", None) or config.batch_size
    distributed.check_divisible(minibatch, "minibatch_size", "--minibatch-size")
    local = minibatch // distributed.world_size()
    if local % config.grad_accum_steps != 0:
        raise ValueError(f"Each rank's share of a minibatch ({local} = {minibatch} / {distributed.world_size()} "
                         f"processes) must be divisible by grad_accum_steps ({config.grad_accum_steps}).")
    k, local = group_size, config.batch_size // distributed.world_size()
    if k > 1 and local % k != 0:
        raise ValueError(f"Each rank's share of the batch ({local} = {config.batch_size} / {distributed.world_size()} "
                         f"processes) must be a multiple of group_size ({k}): a group is sampled on one rank.")


NONFINITE_HINT = "Lower the learning rate or check the reward for extreme values."
"""What a non-finite loss or gradient error tells the user to do (an algorithm may name more: ``ppo.PPO``)."""


class Learner:
    """AdamW over ``param_groups`` (fused: strided parameters made contiguous first), the warmup-then-decay schedule over
    ``phases``, and the policy as the learning passes see it (``module``: itself, or in DDP when data-parallel).

    ``config`` is a ``PolicyTrainingConfig`` (device, weight_decay, phases, warmup_phases, final_lr_scale,
    max_grad_norm, grad_accum_steps, dtype); ``fwd_hooks`` run on every learning pass.
    """

    def __init__(self, policy: PolicyWithValueHead, param_groups: list[dict], config, fwd_hooks: list = (),
                 nonfinite_hint: str = NONFINITE_HINT):
        self.config, self.fwd_hooks, self.nonfinite_hint = config, fwd_hooks, nonfinite_hint
        self.param_groups = param_groups
        groups, self.strided_views = fuse_strided_groups(fused_where_contiguous(param_groups, config.device), config.device)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.fused = [group["fused"] for group in self.optimizer.param_groups]
        self.module = distributed.wrap_ddp(policy, [p for group in self.optimizer.param_groups for p in group["params"]])
        """The policy the learning passes run through: the policy itself, or wrapped in DDP (data-parallel)."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_decay_lambda(config.phases, config.effective_warmup_phases, config.final_lr_scale))

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (the trunk) for the coming step."""
        return self.optimizer.param_groups[0]["lr"]

    def forward(self, minibatch: ReplayMemory) -> PolicyOutput:
        """The policy's logits [B, S, V] and values [B, S] on a minibatch, with grad, in float32: through ``module``
        (DDP in a data-parallel run), under ``autocast`` for ``--dtype bfloat16``."""
        with autocast(self.config.device, self.config.dtype):
            output = self.module(minibatch.sequences, minibatch.attention_mask, fwd_hooks=self.fwd_hooks)
        return PolicyOutput(logits=output.logits.float(), values=output.values.float())

    def step(self, minibatch: ReplayMemory, loss_fn, where: str = "") -> dict[str, float]:
        """One optimiser step on a minibatch (this rank's slice): ``loss_fn(piece)`` gives each micro-batch's terms
        by name (``"loss"`` the one to minimise, each the piece's share); returns the whole minibatch's terms
        (``*_max`` terms: maxima) and ``grad_norm``, averaged over the ranks (``distributed.reduce_means``)."""
        self.optimizer.zero_grad(set_to_none=True)
        pieces = minibatch.split(self.config.grad_accum_steps)
        kept: list[dict[str, Tensor]] = []
        for k, piece in enumerate(pieces):
            with distributed.shared_failures(where):
                terms = loss_fn(piece)
            with distributed.maybe_no_sync(self.module, sync=k == len(pieces) - 1):
                terms["loss"].backward()
            kept.append({name: value.detach() for name, value in terms.items()})
        grad_norm = clip_and_step(self.optimizer, self.config.max_grad_norm, self.nonfinite_hint)
        copy_to_views(self.strided_views)  # the bridge's c_attn alias follows its q/k/v
        # Every piece's terms and the norm read back in one transfer (one host-device sync per step on a GPU).
        names = list(kept[0])
        read = torch.stack([terms[name].float() for terms in kept for name in names] + [grad_norm.float()]).tolist()
        totals: dict[str, float] = {}
        for k in range(len(kept)):
            for i, name in enumerate(names):
                value = read[k * len(names) + i]
                if name not in totals:
                    totals[name] = value
                else:
                    totals[name] = max(totals[name], value) if name.endswith("_max") else totals[name] + value
        return distributed.reduce_means({**totals, "grad_norm": read[-1]})

    def end_phase(self) -> None:
        """One scheduler step per phase."""
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a checkpoint written before the fused/plain split of each group (one group per
        learning rate) is regrouped so that every moment lands on its parameter."""
        saved, scheduler = state["optimizer"], state["scheduler"]
        if len(saved["param_groups"]) != len(self.optimizer.param_groups):
            saved = regroup_optimizer_state(saved, self.param_groups, self.optimizer)
            origins = [group["origin"] for group in self.optimizer.param_groups]
            scheduler = {**scheduler, **{key: [scheduler[key][i] for i in origins] for key in ("base_lrs", "_last_lr")
                                         if key in scheduler}}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in saved["state"].items():
            shape = tuple(moments["exp_avg"].shape)
            if index >= len(params) or tuple(params[index].shape) != shape:
                have = tuple(params[index].shape) if index < len(params) else "no such parameter"
                raise ValueError(f"The checkpoint's optimizer state does not fit this model (parameter {index}: saved "
                                 f"{list(shape)}, model {have}); resume with the model the run trained.")
        self.optimizer.load_state_dict(saved)
        for group, fused in zip(self.optimizer.param_groups, self.fused):  # a checkpoint's flags may predate fusing
            group["fused"] = fused
        self.scheduler.load_state_dict(scheduler)
