"""Data parallelism on ``torch.distributed``: the few helpers every trainer shares (launched by ``torchrun``).

A data-parallel run is N processes ("ranks"), each with a full copy of the model. Each rank samples
(or reads) its own share of the global batch; ``DistributedDataParallel`` (DDP) averages the gradients
across ranks in ``backward``, so every rank takes the same optimiser step and the weights stay
bit-identical. Launch::

    torchrun --nproc-per-node 2 -m rlhf_scratch ppo --batch-size 64 ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_from_env`` reads them. Without ``WORLD_SIZE`` (a plain ``python -m rlhf_scratch ...`` run) or
with ``WORLD_SIZE=1`` nothing is initialised and every helper here is the identity: a single-process
run computes exactly what it computed before this module existed, with no process group.

What is global (the same on every rank, equal to what one process computes on the global batch):

* the batch: ``--batch-size`` is the global number of episodes (pairs for DPO and reward models);
  each rank handles ``batch_size / world_size`` of them;
* the minibatches: one permutation per epoch, drawn from a generator seeded identically on every
  rank (``shared_seed``), cut into minibatches of ``minibatch_size`` global rows; rank r takes slice r
  of each (``rank_slice``);
* the loss: a masked mean over the global minibatch, Σ_global x / N_global. Rank r's loss is its
  *share* ``Σ_r x / N_global · W`` (``share``), so DDP's average of the ranks' gradients,
  (1/W) Σ_r ∇share_r, is the gradient of the global mean, whatever the number of real tokens each
  rank holds;
* statistics: sums and counts are all-reduced (``all_reduce_sum``) before dividing.

Failures: a rank that fails (a NaN loss, a bad reward, any exception) must not leave the others waiting in
a collective. Code between two collectives runs inside ``shared_failures(where)``: on leaving it, the ranks
exchange one flag each; if any failed, every rank raises ``RankFailedError`` naming the failing rank and
its error. The process group also has a timeout (``RLHF_SCRATCH_DIST_TIMEOUT`` seconds, default 600) as
a last resort, and ``torchrun`` ends every worker when one exits or is killed.
"""

from __future__ import annotations

import datetime
import inspect
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_ENV = "RLHF_SCRATCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


class RankFailedError(RuntimeError):
    """Some rank of a data-parallel run failed; raised on every rank, the message names the rank and cause."""


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single-process run)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks W (1 in a single-process run)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this rank writes outputs and prints progress (rank 0)."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment; returns whether one is running.

    No ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``: nothing happens (a plain run).
    Backend: NCCL for a CUDA ``device`` (each rank then uses ``cuda:LOCAL_RANK``), gloo otherwise.
    Calling it again once the group exists does nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def rank_device(device: str) -> str:
    """The device this rank uses: ``cuda:LOCAL_RANK`` for a CUDA run on several ranks, else ``device``."""
    if is_distributed() and str(device).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """This rank's sampling seed: ``seed`` itself in a single-process run, else a seed mixed from (seed, rank).

    Ranks must sample different episodes, and a run with seed s must not share a rank's stream with a run
    with seed s + 1 (as ``seed + rank`` would).
    """
    if not is_distributed():
        return seed
    # String seeding of random.Random goes through SHA-512: deterministic across runs and machines.
    return random.Random(f"rlhf_scratch:{seed}:{rank()}").getrandbits(63)


def check_divisible(n: int, what: str, flag: str) -> None:
    """Raise ValueError unless ``n`` (a global count) splits evenly over the ranks."""
    W = world_size()
    if n % W != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({W}): each rank takes "
                         f"{what} / {W}. Use e.g. {flag} {max(W, n - n % W)}.")


def rank_slice(n: int) -> slice:
    """The rows ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)`` of ``n`` global rows that rank r handles (sizes differ by at most 1
    when W does not divide n, e.g. an epoch's last, smaller batch)."""
    W, r = world_size(), rank()
    return slice(r * n // W, (r + 1) * n // W)


def share(value: Tensor, local_count: float, global_count: float) -> Tensor:
    """Rank r's share of a global mean, from its local mean.

    share = value · n_r / max(N, 1) · W      value = Σ_r x / max(n_r, 1) (a mean over this rank's n_r items)

    so Σ_r share_r / W = Σ_global x / N (the global mean) and DDP's average of the ranks' gradients is the
    gradient of the global mean. Items are real tokens (token means) or rows (row means); a rank with no
    real token gets share 0. Also used for gradient accumulation, where the pieces are micro-batches.
    """
    return value * (float(local_count) / max(float(global_count), 1.0) * world_size())


def _all_reduce(tensor: Tensor, op) -> Tensor:
    """``op`` over ranks of ``tensor``, on a copy on the collective's device (the identity in a single-process run)."""
    if not is_distributed():
        return tensor
    result = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(result, op=op)
    return result.to(tensor.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Σ over ranks of ``tensor`` (a new tensor; the identity in a single-process run)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """max over ranks of ``tensor`` (a new tensor; the identity in a single-process run)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` itself in a single-process run): a decision every rank must
    take together, such as stopping after Ctrl-C reached some of them."""
    if not is_distributed():
        return flag
    return bool(all_reduce_max(torch.tensor([int(flag)], device=collective_device())).item())


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (``value`` itself in a single-process run); a collective."""
    if not is_distributed():
        return value
    return int(all_reduce_max(torch.tensor([value], device=collective_device())).item())


def all_gather_objects(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` (picklable values; ``[value]`` in a single-process run).

    Tensors should be on the CPU: they are pickled and come back where they were.
    """
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value):
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def shared_failures(where: str) -> Iterator[None]:
    """Run the block; if it fails on any rank, raise ``RankFailedError`` on every rank, naming the rank and cause.

    Every rank must enter and leave the block in the same order, with no collective inside it (a rank that
    failed half-way would leave the others waiting in that collective). On leaving, the ranks all-reduce one
    failure flag each [W]; if any is set, they exchange the error messages. The failing rank's own
    exception is chained to its ``RankFailedError``. In a single-process run this does nothing.
    """
    if not is_distributed():
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 (any failure must reach the other ranks)
        failure = error
    flags = torch.zeros(world_size(), dtype=torch.int32, device=collective_device())
    flags[rank()] = int(failure is not None)
    dist.all_reduce(flags)
    if flags.sum().item() == 0:
        return
    messages = all_gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}")
    failed = [r for r, flag in enumerate(flags.tolist()) if flag]
    text = "; ".join(f"rank {r} of {world_size()} failed in {where}: {messages[r]}" for r in failed)
    raise RankFailedError(text) from failure


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_means(values: dict[str, float]) -> dict[str, float]:
    """Per-rank shares (``share``) of global means → the global means: Σ_r value_r / W, in one all-reduce.

    Keys ending in ``_max`` are maxima (all-reduced with max); ``grad_norm`` is already the same on every rank
    (the norm of the averaged gradient) and is kept as it is.
    """
    if not is_distributed():
        return values
    names = list(values)
    maxima = [n for n in names if n.endswith("_max")]
    means = [n for n in names if n not in maxima and n != "grad_norm"]
    result = dict(values)
    if means:
        total = all_reduce_sum(torch.tensor([values[n] for n in means], dtype=torch.float64))
        result.update({n: v / world_size() for n, v in zip(means, total.tolist())})
    if maxima:
        top = all_reduce_max(torch.tensor([values[n] for n in maxima], dtype=torch.float64))
        result.update(dict(zip(maxima, top.tolist())))
    return result


def wrap_ddp(module: torch.nn.Module, trained: list[torch.nn.Parameter]) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` over exactly the parameters in ``trained``
    (the optimiser's); ``module`` itself in a single-process run.

    Every other parameter is excluded from DDP (``_set_params_and_buffers_to_ignore_for_model``). This matters
    on the GPT-2 bridge: it exposes the fused ``c_attn`` weight as ``attn.qkv`` *and* the split q/k/v views the
    forward pass uses; the alias never gets a gradient, and wrapped naively (``find_unused_parameters=False``)
    DDP returns gradients that were never averaged on the first step and raises on the second. It also
    excludes parameters an algorithm does not train (REINFORCE's unused value head). Buffers are not
    broadcast: every rank loads the same model, and the bridge's buffers are constants.
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    keep = {id(p) for p in trained}
    # Every name of every other parameter, by every path: the bridge reaches one module by several paths
    # (``blocks.0`` and ``transformer.h.0``), and DDP names each module by whichever path it meets first.
    ignored = sorted({f"{prefix}.{name}" if prefix else name
                      for prefix, submodule in module.named_modules(remove_duplicate=False)
                      for name, p in submodule.named_parameters(recurse=False) if id(p) not in keep})
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    device_ids = [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
    # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers; either way, no sync per forward.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync)


@contextmanager
def maybe_no_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """``model.no_sync()`` unless ``sync``: gradient accumulation all-reduces only on the last micro-batch."""
    if sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
