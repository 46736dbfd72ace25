"""Invariants of one rollout + learning phase, checked every phase with ``--debug``.

Each check is a small pure function: it returns None when its invariant holds and raises
``InvariantError`` naming the check and showing the offending numbers when it does not.
``check_memory`` runs the replay-memory checks in the order below, so the error names the
*first* invariant that fails; the trainer then checks each minibatch before its optimiser step.

    check                        what must hold                                     what breaks it
    sampling_matches_rollout     each rollout (checked first, right after the       a broken KV cache, a hook
                                 rollout's policy forward): |log π recorded while   or temperature in one pass
                                 sampling − log π of that full forward| <= tol      only
                                 at every real generated position (when the
                                 rollout reads log-probs from the decoding steps,
                                 the forward pass it saved runs for this check)
    values_match_rollout         the same, for the value head when the rollout      a hook or dropout in one
                                 reads it from the decoding steps' final residual:  pass, a value read at the
                                 |V_decoding − V_forward| <= tol·max(1, |V|)        wrong position
    gen_mask_is_prefix           each row of gen_mask is True..True False..False    a real token after padding
    gen_mask_matches_attention   gen_mask == (attention_mask[:, P:] != 0)           masks built separately
    prompt_is_left_padded        attention_mask[:, :P] is 0..0 1..1 (some 1)        right-padded prompts
    padding_after_first_eos      generated tokens are real through the first EOS,   a response not cut at
                                 padding (gen_mask False, pad token) after it       its first EOS
    memory_is_finite             no NaN/inf at the real positions of any float      a broken reward or
                                 tensor (rewards: every row)                        value head
    ratio_is_one                 first minibatch of a phase, before any step:       dropout on, a hook in one
                                 max |exp(logp_new − logp_old) − 1| <= tol          pass only, a temperature
                                                                                    mismatch, misaligned logprobs
    approx_kl_bound              every minibatch: mean((r − 1) − log r) <= bound,   too large a step
                                 r = exp(logp_new − logp_old) (k3 of KL(π_old‖π))   (lr, epochs)

Only real positions are checked: padding may hold anything, since every loss masks it
with ``torch.where`` before use.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import approx_kl
from rlhf_scratch.typecheck import typechecker

RATIO_TOLERANCE = 1e-3
"""Largest |ratio − 1| accepted on a phase's first minibatch. The rollout reads all B rows in one
forward pass and learning reads a minibatch of them; on CPU the two agree exactly (measured 0 on
the built-in task), but GPU kernels picked by batch size may round differently, hence a margin.
A real bug (dropout on, a hook in one pass only, a temperature applied twice) moves the ratio
by far more."""


SAMPLING_TOLERANCE = 1e-3
"""Largest |log π_sampling − log π_rollout| (nats) accepted at a real generated position. The cached
decoding step and the full forward pass agree to about 1e-6 on CPU in float32; a decoder that lost
its context (transformers 5.24 with TransformerLens 4.3, unpatched) differs by 0.4 to 12."""


class InvariantError(AssertionError):
    """An invariant of the training loop does not hold. ``check`` is its name (see the module table)."""

    def __init__(self, check: str, detail: str, where: str = ""):
        self.check, self.detail, self.where = check, detail, where
        place = f" ({where})" if where else ""
        super().__init__(f"invariant {check!r} failed{place}: {detail}")


def _bits(row: Tensor, limit: int = 32) -> str:
    """A 0/1 row as a compact string, e.g. '1 1 0 1 0 0'."""
    values = [str(int(v)) for v in row[:limit].tolist()]
    return " ".join(values) + (" ..." if row.numel() > limit else "")


def _first(mask: Tensor) -> tuple[int, ...]:
    """Index of the first True entry of ``mask`` (row-major)."""
    return tuple(int(i) for i in torch.nonzero(mask)[0])


def _worst(deviation: Tensor) -> tuple[float, tuple[int, ...]]:
    """The largest entry of ``deviation`` (already 0 at padding; NaN counts as inf) and where it first occurs."""
    deviation = torch.where(torch.isnan(deviation), torch.full_like(deviation, float("inf")), deviation)
    if deviation.numel() == 0:
        return 0.0, ()
    return float(deviation.max()), _first(deviation == deviation.max())


@jaxtyped(typechecker=typechecker)
def check_gen_mask_is_prefix(gen_mask: Bool[Tensor, "batch gen"], where: str = "") -> None:
    """gen_mask[b] = [t < L_b for t in range(G)] with L_b = gen_mask[b].sum(): real tokens come first."""
    positions = torch.arange(gen_mask.shape[1], device=gen_mask.device)
    prefix = positions < gen_mask.sum(1, keepdim=True)
    bad_rows = (gen_mask != prefix).any(1)
    if bad_rows.any():
        row = int(torch.nonzero(bad_rows)[0])
        first_padding = int(torch.nonzero(~gen_mask[row])[0])
        column = first_padding + int(torch.nonzero(gen_mask[row, first_padding:])[0])
        raise InvariantError(
            "gen_mask_is_prefix",
            f"gen_mask must be True on a prefix of each row (real tokens, then padding), but row {row} is "
            f"[{_bits(gen_mask[row])}]: a real token at column {column} after padding ({int(bad_rows.sum())} of "
            f"{len(gen_mask)} rows affected). Build gen_mask from each row's first EOS.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_gen_mask_matches_attention(
    attention_mask: Int[Tensor, "batch seq"], gen_mask: Bool[Tensor, "batch gen"], prompt_len: int, where: str = ""
) -> None:
    """gen_mask == (attention_mask[:, P:] != 0): both masks mark the same real generated tokens."""
    real = attention_mask[:, prompt_len:] != 0
    if real.shape != gen_mask.shape or not torch.equal(real, gen_mask):
        if real.shape != gen_mask.shape:
            detail = f"attention_mask[:, {prompt_len}:] has shape {list(real.shape)}, gen_mask {list(gen_mask.shape)}"
        else:
            row, column = _first(real != gen_mask)
            detail = (f"row {row}, generated column {column}: attention_mask is {int(attention_mask[row, prompt_len + column])}"
                      f" but gen_mask is {bool(gen_mask[row, column])}")
        raise InvariantError(
            "gen_mask_matches_attention",
            f"gen_mask must equal attention_mask[:, P:] != 0 (P = {prompt_len}), but {detail}. "
            "Derive both from the same first-EOS positions.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_prompt_is_left_padded(attention_mask: Int[Tensor, "batch seq"], prompt_len: int, where: str = "") -> None:
    """attention_mask[b, :P] = [0]·(P − n_b) + [1]·n_b with n_b >= 1: padding on the left, the prompt after it."""
    prompt = attention_mask[:, :prompt_len]
    lengths = (prompt != 0).sum(1, keepdim=True)
    positions = torch.arange(prompt_len, device=prompt.device)
    expected = (positions >= prompt_len - lengths).long()
    bad_rows = (prompt != expected).any(1) | (lengths[:, 0] == 0)
    if bad_rows.any():
        row = int(torch.nonzero(bad_rows)[0])
        raise InvariantError(
            "prompt_is_left_padded",
            f"the prompt part of attention_mask (first P = {prompt_len} columns) must be 0..0 1..1 with at least one 1 "
            f"(left padding, then the prompt), but row {row} is [{_bits(prompt[row])}]. Left-pad prompts "
            "(sampling.left_pad) so that generated token i sits at column P + i in every row.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_padding_after_first_eos(
    sequences: Int[Tensor, "batch seq"], gen_mask: Bool[Tensor, "batch gen"], prompt_len: int, eos_id: int,
    pad_id: int, where: str = "",
) -> None:
    """Generated tokens are real up to and including the first EOS (all of them if none), padding after it.

    With E_b the column of row b's first EOS (G − 1 if it has none):
    gen_mask[b, t] = (t <= E_b), and sequences[b, P + t] = pad_id for t > E_b.
    """
    generated = sequences[:, prompt_len:]
    G = generated.shape[1]
    is_eos = generated == eos_id
    positions = torch.arange(G, device=generated.device)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], G - 1, dtype=torch.long))
    expected = positions <= first_eos[:, None]
    if not torch.equal(expected, gen_mask):
        row, column = _first(expected != gen_mask)
        eos_text = f"its first EOS (id {eos_id}) is at column {int(first_eos[row])}" if bool(is_eos[row].any()) else "it has no EOS"
        raise InvariantError(
            "padding_after_first_eos",
            f"row {row}: {eos_text}, so gen_mask should be {bool(expected[row, column])} at generated column {column}, "
            f"but it is [{_bits(gen_mask[row])}]. A response ends at its first EOS (kept, it carries loss); "
            "later positions are padding.",
            where,
        )
    not_pad = ~expected & (generated != pad_id)
    if not_pad.any():
        row, column = _first(not_pad)
        raise InvariantError(
            "padding_after_first_eos",
            f"row {row}, generated column {column} holds token {int(generated[row, column])} after the first EOS "
            f"(column {int(first_eos[row])}); padding positions must hold the pad token {pad_id}.",
            where,
        )


def check_memory_is_finite(memory: ReplayMemory, where: str = "") -> None:
    """No NaN or inf at the real positions of any float tensor of the memory (rewards, sequence_kl: every row)."""
    for name in ("rewards", "sequence_kl", "logprobs", "ref_logprobs", "values", "advantages", "returns", "ref_logits_gen"):
        value = getattr(memory, name)
        if value is None:
            continue
        real = torch.ones_like(value, dtype=torch.bool) if name in ("rewards", "sequence_kl") else memory.gen_mask
        if name == "ref_logits_gen":
            real = real[..., None].expand_as(value)
        bad = real & ~torch.isfinite(value)
        if bad.any():
            index = _first(bad)
            raise InvariantError(
                "memory_is_finite",
                f"memory.{name} has {int(bad.sum())} non-finite value(s) at real positions; the first is "
                f"{value[index].item()} at index {list(index)} (shape {list(value.shape)}). Check the reward "
                "(rewards), the value head (values, returns) or the advantages' inputs.",
                where,
            )


def check_memory(memory: ReplayMemory, eos_id: int | None = None, pad_id: int | None = None, where: str = "") -> None:
    """The replay-memory invariants in order; the error names the first that fails.

    ``eos_id``/``pad_id`` None skips ``padding_after_first_eos`` (sampling without stopping at EOS).
    """
    P = memory.prompt_len
    check_gen_mask_is_prefix(memory.gen_mask, where)
    check_gen_mask_matches_attention(memory.attention_mask, memory.gen_mask, P, where)
    check_prompt_is_left_padded(memory.attention_mask, P, where)
    if eos_id is not None and pad_id is not None:
        check_padding_after_first_eos(memory.sequences, memory.gen_mask, P, eos_id, pad_id, where)
    check_memory_is_finite(memory, where)


@jaxtyped(typechecker=typechecker)
def check_sampling_matches_rollout(
    sampled_logprobs: Float[Tensor, "batch gen"], rollout_logprobs: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"], tol: float = SAMPLING_TOLERANCE, where: str = "",
) -> None:
    """The tokens were sampled from the distribution the rollout forward pass reads back:
    max over real positions of |log π_sampling(y_t) − log π_rollout(y_t)| <= tol, both at the
    sampling temperature (``Generation.sampled_logprobs`` and the rollout's ``logprobs``)."""
    gap = torch.where(gen_mask, (sampled_logprobs - rollout_logprobs.detach().to(sampled_logprobs.device)).abs(),
                      torch.zeros_like(sampled_logprobs))
    worst, where_worst = _worst(gap)
    if not worst <= tol:
        row, column = where_worst
        raise InvariantError(
            "sampling_matches_rollout",
            f"the log-prob recorded while sampling differs from the rollout forward pass's by {worst:.3g} nats > "
            f"tol {tol:g}, at row {row}, generated column {column} (sampling {float(sampled_logprobs[row, column]):.5f}, "
            f"rollout {float(rollout_logprobs[row, column]):.5f}). The samples did not come from the policy that "
            "training reads: a KV cache that loses its context (check the library versions against "
            "constraints.txt), a hook or a temperature applied in one pass only.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_values_match_rollout(
    generation_values: Float[Tensor, "batch gen"], forward_values: Float[Tensor, "batch gen"],
    gen_mask: Bool[Tensor, "batch gen"], tol: float = SAMPLING_TOLERANCE, where: str = "",
) -> None:
    """The value head read on the decoding steps' final residual equals it read on a full forward pass over the
    batch: max over real positions of |V_decoding − V_forward| / max(1, |V_forward|) <= tol."""
    gap = torch.where(gen_mask, (generation_values - forward_values).abs() / forward_values.abs().clamp(min=1.0),
                      torch.zeros_like(generation_values))
    worst, where_worst = _worst(gap)
    if not worst <= tol:
        row, column = where_worst
        raise InvariantError(
            "values_match_rollout",
            f"the value read from the decoding step differs from the forward pass's by {worst:.3g} (relative) > tol "
            f"{tol:g}, at row {row}, generated column {column} (decoding {float(generation_values[row, column]):.5f}, "
            f"forward {float(forward_values[row, column]):.5f}). The final residual captured while sampling is not the "
            "one a forward pass gives: a hook or dropout in one pass only, or the residual read at the wrong position. "
            "--separate-rollout-forward reads the values from a forward pass instead.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_ratio_is_one(
    logprobs: Float[Tensor, "batch gen"], old_logprobs: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"],
    tol: float = RATIO_TOLERANCE, where: str = "",
) -> None:
    """Before any step of a phase the policy is the rollout policy: max over real positions of
    |exp(logp_new − logp_old) − 1| <= tol."""
    log_ratio = torch.where(gen_mask, logprobs.detach() - old_logprobs, torch.zeros_like(logprobs))
    worst, where_worst = _worst((torch.exp(log_ratio) - 1).abs())
    if not worst <= tol:
        row, column = where_worst
        raise InvariantError(
            "ratio_is_one",
            f"on the first minibatch, before any optimiser step, max |exp(logp_new − logp_old) − 1| = {worst:.3g} > "
            f"tol {tol:g}, at row {row}, generated column {column} (logp_new {float(logprobs[row, column]):.5f}, "
            f"logp_old {float(old_logprobs[row, column]):.5f}). The learning forward pass disagrees with the rollout's: "
            "look for dropout (call .eval()), a hook or a temperature applied in one pass only, "
            "or log-probs read at the wrong positions.",
            where,
        )


@jaxtyped(typechecker=typechecker)
def check_approx_kl(
    logprobs: Float[Tensor, "batch gen"], old_logprobs: Float[Tensor, "batch gen"], gen_mask: Bool[Tensor, "batch gen"],
    bound: float, where: str = "",
) -> None:
    """``objectives.approx_kl`` (masked_mean((r − 1) − log r), r = exp(logp_new − logp_old)) must be <= bound."""
    kl = float(approx_kl(logprobs.detach(), old_logprobs, gen_mask))
    if not kl <= bound:
        log_ratio = torch.where(gen_mask, logprobs.detach() - old_logprobs, torch.zeros_like(logprobs))  # for the message
        raise InvariantError(
            "approx_kl_bound",
            f"approx-KL(π_old ‖ π) of this minibatch is {kl:.4g} > bound {bound:g} (max ratio "
            f"{float(torch.exp(log_ratio).max()):.3g}). The policy moved too far within one phase: lower lr, "
            "ppo_epochs or max_grad_norm, or raise --debug-max-approx-kl if this is expected.",
            where,
        )


def check_minibatch(index: int, minibatch, logprobs: Tensor, max_approx_kl: float, where: str = "") -> None:
    """--debug checks on a minibatch after its losses, before its step (no extra forward pass): ratio = 1 on the
    phase's first minibatch (``index`` 0), approx-KL below ``max_approx_kl`` on every one."""
    if index == 0:
        check_ratio_is_one(logprobs, minibatch.logprobs, minibatch.gen_mask, where=where)
    check_approx_kl(logprobs, minibatch.logprobs, minibatch.gen_mask, max_approx_kl, where=where)
