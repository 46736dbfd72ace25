"""ReplayMemory: one rollout's tensors, by name, and the shuffled minibatches drawn from it.

Shapes: B batch, P prompt length, G generated length, S = P + G, V vocab.
"""

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker

# Each tensor field's dtype family and dims, checked in __post_init__ (see there for why
# not by @jaxtyped on the class). Order matters only for the order of the checks.
_FIELD_SPECS: dict[str, tuple[type, tuple[str, ...]]] = {
    "sequences": (Int, ("batch", "seq")),
    "attention_mask": (Int, ("batch", "seq")),
    "gen_mask": (Bool, ("batch", "gen")),
    "logprobs": (Float, ("batch", "gen")),
    "ref_logprobs": (Float, ("batch", "gen")),
    "values": (Float, ("batch", "gen")),
    "advantages": (Float, ("batch", "gen")),
    "returns": (Float, ("batch", "gen")),
    "rewards": (Float, ("batch",)),
    "ref_logits_gen": (Float, ("batch", "gen", "vocab")),
    "sequence_kl": (Float, ("batch",)),
}


_OPTIONAL_FIELDS = ("ref_logits_gen", "sequence_kl")


@dataclass(eq=False, repr=False)
class ReplayMemory:
    """Everything one rollout phase produced, for the learning phase to sample from.

    sequences       Int   [B, S]     prompt (left-padded to P) followed by the G generated tokens
    attention_mask  Int   [B, S]     1 on real prompt and generated tokens, 0 on left padding and post-EOS
    gen_mask        Bool  [B, G]     True on real generated tokens (through the first EOS);
                                     must equal attention_mask[:, P:]
    logprobs        Float [B, G]     log π_old(token) under the policy at rollout time
    ref_logprobs    Float [B, G]     log π_ref(token) under the reference model
    values          Float [B, G]     value head at rollout time (state before each generated token)
    advantages      Float [B, G]     from one-step TD or GAE, 0 on padding
    returns         Float [B, G]     value-head targets, 0 on padding
    rewards         Float [B]        the scalar task reward of each response
    prompt_len      int              P
    ref_logits_gen  Float [B, G, V]  reference logits at the generated positions, or None.
        Keep these only when the exact KL (full vocabulary) is a loss term. They cost
        B·G·V·4 bytes in float32: at GPT-2 size, 64·20·50257·4 ≈ 257 MB. Only the G
        generated positions are kept, not all S (B·S·V), since only they carry loss.
    sequence_kl     Float [B]        Σ_t KL_t(π_old ‖ π_ref) of each response, exact over the vocabulary, or None;
                                     its mean is logged as objective/kl and feeds the adaptive KL controller
    part_of         ReplayMemory     the whole minibatch this one is a piece of, or None (it is whole). A piece is
                                     one rank's slice (data-parallel runs) or one micro-batch (gradient
                                     accumulation): loss means and advantage whitening use the whole one's
                                     token counts and moments, so the pieces add up to the whole (``split``).

    Shapes are checked on construction, with messages that name the wrong field.
    ``memory[idx]`` (idx an int tensor of rows) is a smaller ReplayMemory;
    ``memory.minibatches(...)`` yields shuffled ones; ``print(memory)`` shows names,
    shapes and a few statistics.
    """

    sequences: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    gen_mask: Bool[Tensor, "batch gen"]
    logprobs: Float[Tensor, "batch gen"]
    ref_logprobs: Float[Tensor, "batch gen"]
    values: Float[Tensor, "batch gen"]
    advantages: Float[Tensor, "batch gen"]
    returns: Float[Tensor, "batch gen"]
    rewards: Float[Tensor, "batch"]
    prompt_len: int
    ref_logits_gen: Float[Tensor, "batch gen vocab"] | None = None
    sequence_kl: Float[Tensor, "batch"] | None = None
    part_of: "ReplayMemory | None" = None

    def __post_init__(self) -> None:
        # Checked here rather than by @jaxtyped on the class: jaxtyping would run before
        # __post_init__, take each size from the first field it reads and blame the next
        # one; these messages say which field is wrong and where the expected sizes came from.
        if not isinstance(self.sequences, Int[Tensor, "batch seq"]):
            raise TypeError(
                f"ReplayMemory.sequences must be an integer tensor [batch, seq], got {_describe(self.sequences)}."
            )
        batch, seq = self.sequences.shape
        if not isinstance(self.prompt_len, int) or not 1 <= self.prompt_len < seq:
            raise ValueError(
                f"ReplayMemory.prompt_len={self.prompt_len!r} must be an int with 1 <= prompt_len < seq={seq} "
                f"(sequences has shape {tuple(self.sequences.shape)}: P prompt tokens then G >= 1 generated ones)."
            )
        gen = seq - self.prompt_len
        sizes: dict[str, int | str] = {"batch": batch, "seq": seq, "gen": gen, "vocab": "vocab"}
        if isinstance(self.ref_logits_gen, Tensor) and self.ref_logits_gen.ndim == 3:
            sizes["vocab"] = self.ref_logits_gen.shape[2]  # V is whatever the reference model's vocab is
        origin = f"batch={batch}, seq={seq} from sequences; gen = seq - prompt_len = {seq} - {self.prompt_len} = {gen}"
        for name, (dtype_family, dims) in _FIELD_SPECS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            expected = tuple(sizes[d] for d in dims)
            if not isinstance(value, dtype_family[Tensor, " ".join(map(str, expected))]):
                raise ValueError(
                    f"ReplayMemory.{name} must be a {dtype_family.__name__} tensor of shape "
                    f"[{', '.join(dims)}] = {list(expected)}, but it is {_describe(value)} ({origin})."
                )
        real_gen = self.attention_mask[:, self.prompt_len :].bool()
        if not torch.equal(real_gen, self.gen_mask.to(real_gen.device)):
            raise ValueError(
                "ReplayMemory.gen_mask must equal attention_mask[:, prompt_len:] != 0 (both mark the real generated "
                "tokens); build them from the same first-EOS positions."
            )

    def __len__(self) -> int:
        """The batch size B."""
        return self.sequences.shape[0]

    @property
    def gen_len(self) -> int:
        """G, the number of generated positions."""
        return self.gen_mask.shape[1]

    @jaxtyped(typechecker=typechecker)
    def __getitem__(self, idx: Int[Tensor, "n"]) -> "ReplayMemory":
        """The rows ``idx`` [n] of every tensor, as a (whole) ReplayMemory with the same prompt_len."""
        idx = idx.to(self.sequences.device)
        rows = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, part_of=None, **{name: value[idx] for name, value in rows.items()})

    @property
    def whole(self) -> "ReplayMemory":
        """The whole minibatch this is a piece of (itself if it is whole)."""
        return self.part_of if self.part_of is not None else self

    def split(self, pieces: int) -> list["ReplayMemory"]:
        """This memory cut into ``pieces`` consecutive row ranges (micro-batches for gradient accumulation),
        each with ``part_of`` the whole minibatch; ``[self]`` when ``pieces == 1``."""
        if pieces == 1:
            return [self]
        if not 1 <= pieces <= len(self):
            raise ValueError(f"Cannot cut {len(self)} rows into {pieces} micro-batches: use at most {len(self)}.")
        return [replace(self[idx], part_of=self.whole) for idx in torch.arange(len(self)).tensor_split(pieces)]

    def minibatches(
        self, minibatch_size: int, epochs: int = 1, generator: torch.Generator | None = None,
        rank: int = 0, world_size: int = 1,
    ) -> Iterator["ReplayMemory"]:
        """Yield shuffled minibatches: ``epochs`` passes over the batch, B / minibatch_size per pass.

        Each epoch draws a fresh random permutation of the B rows (from ``generator``,
        a CPU generator, or torch's global RNG if None) and cuts it into consecutive
        chunks of ``minibatch_size``, so every row appears exactly once per epoch.
        B must be a multiple of ``minibatch_size``: equal minibatches keep every
        optimiser step on the same footing (same number of rows in each loss mean
        and in each advantage normalisation), rather than one small noisy last step.

        Data-parallel (``world_size`` W > 1, this memory the global batch, the generator seeded alike on
        every rank): each global minibatch is cut into W consecutive slices of ``minibatch_size / W`` rows and
        rank ``rank`` gets its slice, with ``part_of`` the global minibatch. The ranks' slices together are
        exactly the minibatches one process would draw with the same generator.
        """
        batch = len(self)
        if not 1 <= minibatch_size <= batch or batch % minibatch_size != 0:
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            raise ValueError(
                f"minibatch_size={minibatch_size} must divide the batch size {batch} exactly; "
                f"choose one of {divisors}, or change the rollout batch size."
            )
        if epochs < 1:
            raise ValueError(f"epochs={epochs} must be >= 1 (the number of passes over the rollout).")
        if minibatch_size % world_size != 0:
            raise ValueError(f"minibatch_size={minibatch_size} must be divisible by the number of processes "
                             f"({world_size}): each rank takes minibatch_size / {world_size} rows of every minibatch.")
        per_rank = minibatch_size // world_size
        for _ in range(epochs):
            permutation = torch.randperm(batch, generator=generator)
            for start in range(0, batch, minibatch_size):
                minibatch = self[permutation[start : start + minibatch_size]]
                if world_size == 1:
                    yield minibatch
                else:
                    yield replace(minibatch[torch.arange(rank * per_rank, (rank + 1) * per_rank)], part_of=minibatch)

    def summary(self) -> str:
        """One line per field: name, dtype, shape and a few statistics, never the values themselves.

        Float fields: mean, min, max and std over real generated positions (every row for
        ``rewards`` and ``sequence_kl``). ``sequences``: the range and number of distinct token ids among real
        tokens; ``attention_mask``: real prompt tokens per row; ``gen_mask``: response lengths.
        """
        real_tokens = self.attention_mask.bool()
        prompt_lengths = real_tokens[:, : self.prompt_len].sum(1)
        lengths = self.gen_mask.sum(1).float()
        ids = self.sequences[real_tokens]
        notes = {
            "sequences": f"token ids {int(ids.min())}..{int(ids.max())}, {int(ids.unique().numel())} distinct" if ids.numel() else "",
            "attention_mask": f"prompt tokens per row {int(prompt_lengths.min())}..{int(prompt_lengths.max())}, left-padded",
            "gen_mask": f"response lengths {int(lengths.min())}..{int(lengths.max())}, mean {lengths.mean():.1f}",
        }
        lines = [
            f"ReplayMemory(batch={len(self)}, prompt_len={self.prompt_len}, gen={self.gen_len}, "
            f"seq={self.sequences.shape[1]}, real generated tokens={int(self.gen_mask.sum())}/{self.gen_mask.numel()})"
        ]
        for name in _FIELD_SPECS:
            value = getattr(self, name)
            if value is None:
                lines.append(f"  {name:<15} None")
                continue
            line = f"  {name:<15} {str(value.dtype).removeprefix('torch.'):<8} {str(list(value.shape)):<16}  {notes.get(name, '')}"
            if value.is_floating_point():
                real = self._real_values(name, value)
                if real.numel() > 0:
                    real = real.detach().float()
                    std = real.std().item() if real.numel() > 1 else 0.0
                    line += f"mean {real.mean():+.4g}  min {real.min():+.4g}  max {real.max():+.4g}  std {std:.3g}"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _real_values(self, name: str, value: Tensor) -> Tensor:
        """The entries of a float field at real generated positions (all of them for ``rewards``)."""
        if name in ("rewards", "sequence_kl"):
            return value
        return value[self.gen_mask]  # [n_real] or, for ref_logits_gen, [n_real, V]


def _describe(value: object) -> str:
    """'float32 tensor of shape [4, 5]', or the type name for a non-tensor."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
