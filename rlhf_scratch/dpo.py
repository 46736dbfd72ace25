"""Direct Preference Optimization (DPO) and its f-divergence generalisation (f-DPO).

For a pair (x, y_w ≻ y_l) and the log-ratios of the whole responses

    u_w = log π_θ(y_w | x) − log π_ref(y_w | x),    u_l = log π_θ(y_l | x) − log π_ref(y_l | x)

f-DPO (Wang et al. 2023, "Beyond Reverse KL") replaces DPO's u by f′ of the ratio x = e^u:

    sigmoid loss   −log σ(β·(f′(e^{u_w}) − f′(e^{u_l})))
    hinge loss     max(0, 1 − β·(f′(e^{u_w}) − f′(e^{u_l})))

with f′ of the divergence that regularises π_θ towards π_ref (``f_prime``): reverse KL
(plain DPO), forward KL, Jensen–Shannon, or the α-divergence. Everything is computed from
u in log space, so no divergence gives NaN or inf at |u| = 50 in float32.

One training step, step by step::

    pairs ─► tokens: BOS prompt | response EOS | pad       (chosen rows, then rejected rows)
    reference log π_ref(y|x) [N], once for every pair, before training (no grad)
    for each shuffled batch of B pairs:
        policy forward on 2B rows ─► log π_θ(y_w|x), log π_θ(y_l|x)  [B] each (with grad)
        dpo_loss ─► loss, implicit rewards β·u, accuracy, margin ─► backward, clip, AdamW, LR step

This module holds the losses and the tokenisation; the trainer and the command
(``DPOTrainer``, ``rlhf-scratch dpo``) are in ``dpo_trainer.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.objectives import masked_sequence_sum, taken_logprobs
from rlhf_scratch.preferences import PreferencePair
from rlhf_scratch.sampling import encode
from rlhf_scratch.ties import decided_wins
from rlhf_scratch.typecheck import typechecker

Divergence = Literal["rkl", "fkl", "js", "alpha"]
LossType = Literal["sigmoid", "hinge"]

MAX_EXPONENT = 80.0
"""Largest exponent fed to ``exp`` in f′: e^80 ≈ 5.5e34 stays finite in float32 (max ≈ 3.4e38) even after
multiplying by β and subtracting two such terms. Only |u| > 80 (fkl) or α·|u| > 80 (alpha) is clamped."""


# --------------------------------------------------------------------------- the loss


def check_alpha(divergence: str, alpha: float) -> None:
    """Raise ``ValueError`` unless ``alpha`` is usable with ``divergence`` (only "alpha" reads it)."""
    if divergence == "alpha" and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha must be > 0 for the alpha divergence (f′(x) = (1 − x^−α)/α), got {alpha}. "
            "α → 0 is reverse KL: use --divergence rkl (plain DPO); α = 1 is forward KL (--divergence fkl). "
            "Values in (0, 1), e.g. --alpha 0.5, lie between the two."
        )


@jaxtyped(typechecker=typechecker)
def f_prime(log_ratio: Float[Tensor, "*batch"], divergence: Divergence, alpha: float = 0.5) -> Float[Tensor, "*batch"]:
    """f′(x) at x = e^u = π_θ(y|x)/π_ref(y|x), written in terms of u = ``log_ratio``.

    ============  =======================  ===============================  ======================
    divergence    f′(x)                    in log space                     large |u|
    ============  =======================  ===============================  ======================
    "rkl"         log x + 1                u + 1                            linear, never saturates
    "fkl"         −1/x                     −exp(−u)                         → 0 for u → +∞
    "js"          log(2x/(1 + x))          log 2 + log σ(u)                 → log 2 for u → +∞
    "alpha"       (1 − x^−α)/α             −expm1(−α·u)/α                   → 1/α for u → +∞
    ============  =======================  ===============================  ======================

    ``log_ratio`` any shape [*] -> the same shape. Reverse KL is plain DPO (the +1 cancels in
    f′_w − f′_l). ``log σ(u)`` = u − softplus(u) (``F.logsigmoid``) is exact for any u; the exponents
    of "fkl" and "alpha" are clamped at ``MAX_EXPONENT`` = 80 so that float32 never overflows
    (nothing changes for |u| ≤ 80).

    α convention: the f-DPO paper's α (Wang et al. 2023), f(x) = (x^{1−α} − (1−α)x − α)/(α(α−1)),
    so f′(x) = (1 − x^−α)/α. α → 0 gives log x (reverse KL, up to the constant 1); α = 1 gives
    1 − 1/x (forward KL up to a constant); α must be > 0. TRL's ``f_alpha_divergence_coef``
    changed meaning between versions: the 0.x DPOTrainer computed (x_l^−c − x_w^−c)/c, so c = α;
    the 1.x DPOTrainer computes f′(x) = (x^{c−1} − 1)/(c − 1) (c = 1 is reverse KL), so c = 1 − α.
    At c = 0.5 (TRL 1.x's default) the two agree.
    """
    if divergence == "rkl":
        return log_ratio + 1.0
    if divergence == "fkl":
        return -torch.exp((-log_ratio).clamp(max=MAX_EXPONENT))
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if divergence == "alpha":
        check_alpha(divergence, alpha)
        return -torch.expm1((-alpha * log_ratio).clamp(max=MAX_EXPONENT)) / alpha
    raise ValueError(f"Unknown divergence {divergence!r}; choose rkl, fkl, js or alpha.")


@dataclass(eq=False)
class DPOLossOutput:
    """The DPO loss of B pairs and its diagnostics (every tensor except ``loss``/``losses`` is detached).

    loss              Float []    mean of ``losses``: what the optimiser minimises
    losses            Float [B]   per-pair loss: −log σ(z) (sigmoid) or max(0, 1 − z) (hinge)
    chosen_rewards    Float [B]   implicit reward of the chosen response, β·u_w = β·log(π_θ/π_ref)(y_w|x)
    rejected_rewards  Float [B]   implicit reward of the rejected response, β·u_l
    margin            Float [B]   reward margin β·(u_w − u_l) = chosen_rewards − rejected_rewards
    f_margin          Float [B]   z = β·(f′(e^{u_w}) − f′(e^{u_l})), the loss's argument (= margin for rkl)
    accuracy          Float []    share of pairs with u_w − u_l > tie tolerance (see ``decided_accuracy``; the same for every
                                  divergence: f′ increases). A tie counts as not correct, so step 0 (π_θ = π_ref) gives 0.
    """

    loss: Float[Tensor, ""]
    losses: Float[Tensor, "batch"]
    chosen_rewards: Float[Tensor, "batch"]
    rejected_rewards: Float[Tensor, "batch"]
    margin: Float[Tensor, "batch"]
    f_margin: Float[Tensor, "batch"]
    accuracy: Float[Tensor, ""]


@jaxtyped(typechecker=typechecker)
def dpo_loss(
    policy_chosen_logps: Float[Tensor, "batch"],
    policy_rejected_logps: Float[Tensor, "batch"],
    ref_chosen_logps: Float[Tensor, "batch"],
    ref_rejected_logps: Float[Tensor, "batch"],
    beta: float = 0.1,
    loss: LossType = "sigmoid",
    divergence: Divergence = "rkl",
    alpha: float = 0.5,
) -> DPOLossOutput:
    """f-DPO loss of B pairs from whole-response log-probabilities.

    u_w = policy_chosen_logps − ref_chosen_logps,  u_l = policy_rejected_logps − ref_rejected_logps
    z   = β·(f′(e^{u_w}) − f′(e^{u_l}))            (see ``f_prime``)
    sigmoid:  loss_b = −log σ(z_b)        (``F.logsigmoid``: finite for any finite z)
    hinge:    loss_b = max(0, 1 − z_b)
    inputs [B] each -> ``DPOLossOutput`` (loss [], per-pair tensors [B]).

    With "rkl" this is standard DPO, −log σ(β·((log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)))).
    Its gradient raises log π_θ(y_w) and lowers log π_θ(y_l): ∂loss/∂u_w = −σ(−z)·β·f″ ≤ 0.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (larger β keeps the policy closer to the reference), got {beta}.")
    check_alpha(divergence, alpha)
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    z = beta * (f_prime(chosen_log_ratio, divergence, alpha) - f_prime(rejected_log_ratio, divergence, alpha))
    if loss == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss == "hinge":
        losses = torch.relu(1.0 - z)
    else:
        raise ValueError(f"Unknown loss {loss!r}; choose sigmoid or hinge.")
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return DPOLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=chosen_rewards - rejected_rewards,
        f_margin=z.detach(),
        accuracy=decided_accuracy(chosen_log_ratio, rejected_log_ratio,
                                  scale=torch.stack([policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps])),
    )


def decided_accuracy(chosen: Float[Tensor, "batch"], rejected: Float[Tensor, "batch"],
                     scale: Float[Tensor, "..."]) -> Float[Tensor, ""]:
    """Share of pairs with chosen − rejected > TIE_RTOL·max(1, |scale| of that pair): ties count as not correct.

    At a tie the sign of chosen − rejected is rounding noise that differs between CPUs, thread counts and batch
    layouts (at step 0 of DPO the policy equals the reference, so u_w = u_l = 0 up to rounding); a fixed rule
    makes the metric the same everywhere (``ties.decided_wins``). ``scale`` [..., B] holds the numbers each pair's
    two sides were computed from (their rounding error is relative to those). inputs [B] -> [] (detached).
    """
    return decided_wins(chosen, rejected, scale).float().mean()


# --------------------------------------------------------------------------- sequence log-probabilities


@dataclass(eq=False)
class TokenizedResponses:
    """Prompt + response rows, right-padded: what ``sequence_logprobs`` scores.

    tokens          Int  [B, S]   BOS prompt | response EOS | pad pad
    attention_mask  Int  [B, S]    1   1     |    1      1  |  0   0
    response_mask   Bool [B, S]    F   F     |    T      T  |  F   F

    Right padding keeps every real token at the position it has alone (positions 0..L−1) and,
    with causal attention, padding at the end cannot change the real tokens' logits.
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    response_mask: Bool[Tensor, "batch seq"]

    def __repr__(self) -> str:
        return (f"TokenizedResponses(tokens={tuple(self.tokens.shape)}, "
                f"response_tokens={int(self.response_mask.sum())})")


def collate_responses(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenizedResponses:
    """Concatenate each prompt's and response's token ids and right-pad the rows (see ``TokenizedResponses``).

    Prompt and response are tokenized separately and joined as ids, so the boundary between them is exact
    (tokenizing the joined text could merge the last prompt token with the first response token).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"Need as many prompts as responses, at least one; got {len(prompts)} and {len(responses)}.")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError(f"Row {row}: the prompt has no tokens, so the first response token has nothing to be "
                             "predicted from. Prepend BOS (--prepend-bos, the default) or give every pair a prompt.")
        length = len(prompt) + len(response)
        tokens[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        response_mask[row, len(prompt):length] = True
    return TokenizedResponses(tokens=tokens, attention_mask=attention_mask, response_mask=response_mask)


@jaxtyped(typechecker=typechecker)
def response_logprobs(
    logits: Float[Tensor, "batch seq vocab"], tokens: Int[Tensor, "batch seq"], response_mask: Bool[Tensor, "batch seq"]
) -> Float[Tensor, "batch"]:
    """log π(y | x) = Σ over response positions t of log_softmax(logits[t − 1])[tokens[t]].

    logits [B, S, V], tokens [B, S], response_mask [B, S] -> [B]
    The logits at position t predict token t + 1 (``taken_logprobs`` with P = 1 gives the log-probs of
    tokens 1..S−1); position 0 is always prompt (BOS), so it never needs a log-prob.
    """
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask is True at position 0: every row needs at least one prompt token (BOS) first.")
    logprobs = taken_logprobs(logits, tokens, 1)  # [B, S−1]: log π(token t | tokens < t) for t = 1..S−1
    return masked_sequence_sum(logprobs, response_mask[:, 1:])


def sequence_logprobs(bridge, batch: TokenizedResponses) -> Float[Tensor, "batch"]:
    """log π(response | prompt) of each row under ``bridge`` (at temperature 1), with grad if enabled.

    One forward pass of tokens [B, S] with the attention mask -> logits [B, S, V] -> ``response_logprobs`` [B].
    """
    device = next(bridge.parameters()).device
    logits = bridge(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
    return response_logprobs(logits.float(), batch.tokens.to(device), batch.response_mask.to(device))


@dataclass(eq=False)
class TokenizedPairs:
    """Token ids of N pairs, ready for ``collate_responses``: the same prompt for chosen and rejected.

    prompts    N lists   (BOS) prompt ids
    chosen     N lists   chosen response ids, EOS appended
    rejected   N lists   rejected response ids, EOS appended
    """

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int], pad_id: int) -> TokenizedResponses:
        """Rows of pairs ``indices``: their chosen responses (rows 0..b−1), then their rejected ones (b..2b−1)."""
        prompts = [self.prompts[i] for i in indices]
        responses = [self.chosen[i] for i in indices] + [self.rejected[i] for i in indices]
        return collate_responses(prompts + prompts, responses, pad_id)


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], prepend_bos: bool, n_ctx: int) -> TokenizedPairs:
    """Token ids of each pair's prompt (with BOS if ``prepend_bos``) and of its two responses, each followed by EOS.

    EOS closes every response: a pair compares two *finished* answers, as the built-in model's samples
    end (a sample stops at its first EOS). A response cut at max_new_tokens also gets EOS here.
    Raises ``ValueError`` naming the first pair whose prompt + response (+ EOS) exceeds ``n_ctx`` tokens.
    """

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token; DPO closes every response with EOS. Set tokenizer.eos_token.")
    tokenized = TokenizedPairs([], [], [])
    for index, pair in enumerate(pairs):
        prompt = encode(tokenizer, pair.prompt, prepend_bos=prepend_bos)
        if not prompt:
            raise ValueError(f"Pair {index}: the prompt {pair.prompt!r} encodes to no tokens. Prepend BOS "
                             "(--prepend-bos, the default) or give every pair a prompt.")
        chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [eos]
        rejected = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + [eos]
        longest = len(prompt) + max(len(chosen), len(rejected))
        if longest > n_ctx:
            raise ValueError(
                f"Pair {index} is {longest} tokens long (prompt {len(prompt)} + response with EOS "
                f"{max(len(chosen), len(rejected))}), more than the model's context of {n_ctx} tokens. "
                "Remove or shorten that pair (e.g. build pairs with a smaller --max-new-tokens), "
                "or use a model with a longer context."
            )
        tokenized.prompts.append(prompt)
        tokenized.chosen.append(chosen)
        tokenized.rejected.append(rejected)
    return tokenized


# --------------------------------------------------------------------------- configuration
