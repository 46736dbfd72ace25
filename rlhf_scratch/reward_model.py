"""Reward models learned from preference pairs: the losses, the model, saving and loading.

A reward model is a TransformerBridge trunk (the built-in model, or any policy checkpoint)
plus a linear head on the final residual stream (``ln_final.hook_out``, after the final
LayerNorm) read at the last real token of ``prompt + response``::

    texts ─► BOS + tokens, left-padded ─► tokens [B, S], attention_mask [B, S]
          ─► trunk (run_with_hooks: gradients reach the trunk) ─► resid [B, S, d] ─► resid[:, -1] [B, d]
          ─► head: "scalar" Linear(d, 1) ─► r [B]
                   "dist"   Linear(d, K) ─► logits [B, K], p = softmax(logits) over ratings 0..K−1,
                                            reward = expected rating Σ_i i·p(i) ∈ [0, K−1]

Losses over a batch of B pairs (w = chosen, l = rejected):

    Bradley–Terry            mean_b −log σ(r_w − r_l)
    Bradley–Terry + margin   mean_b −log σ(r_w − r_l − m),   m = the pair's margin (or score difference)
    distributional           mean_b −log Σ_{i,j} p_w(i)·p_l(j)·σ(α(i − j))

The distributional loss is the negative log of the probability that a rating drawn from
p_w beats one drawn from p_l under a Bradley–Terry comparison of the two ratings (scale α).

Training (``rlhf-scratch rm``) and ``rlhf-scratch score`` live in ``reward_model_training.py``;
``--reward rm:DIR`` uses a trained one as a reward anywhere (``rewards.RewardModelReward``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, jaxtyped
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_scratch.models import (
    CHECKPOINT_META_FILE,
    FINAL_RESIDUAL_HOOK,
    ModelLoadError,
    bridge_parameters,
    corrupted_model_message,
    drop_cached_activations,
    load_bridge,
    read_checkpoint_meta,
    save_model_dir,
)
from rlhf_scratch.outputs import atomic_dir
from rlhf_scratch.sampling import left_pad, padding_id
from rlhf_scratch.ties import decided_wins
from rlhf_scratch.typecheck import typechecker

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_MODEL_KIND = "reward_model"
"""``kind`` in the saved model's ``rlhf_scratch.json``."""
HEADS = ("scalar", "dist")
LOSS_HEAD = {"bt": "scalar", "margin": "scalar", "dist": "dist"}


# --------------------------------------------------------------------------- losses and metrics


@jaxtyped(typechecker=typechecker)
def bradley_terry_loss(
    r_chosen: Float[Tensor, "batch"], r_rejected: Float[Tensor, "batch"], margin: Float[Tensor, "batch"] | None = None
) -> Float[Tensor, ""]:
    """mean_b −log σ(r_w[b] − r_l[b] − m[b]), m = 0 without a margin.   [B], [B], [B] → scalar

    ``F.logsigmoid`` keeps it finite for any difference (log σ(x) ≈ x for x ≪ 0).
    """
    difference = r_chosen - r_rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


@jaxtyped(typechecker=typechecker)
def log_preference_probability(
    logits_chosen: Float[Tensor, "batch K"], logits_rejected: Float[Tensor, "batch K"], alpha: float
) -> Float[Tensor, "batch"]:
    """log P(w ≻ l) = log Σ_{i,j} p_w(i)·p_l(j)·σ(α(i − j)), p = softmax(logits) over ratings.   [B, K], [B, K] → [B]

    Computed in log space: logsumexp over (i, j) of log p_w(i) + log p_l(j) + log σ(α(i − j)),
    with log p from ``log_softmax`` and log σ from ``logsigmoid``, so nothing under- or overflows.
    """
    K = logits_chosen.shape[-1]
    log_p_w = F.log_softmax(logits_chosen, dim=-1)  # [B, K]
    log_p_l = F.log_softmax(logits_rejected, dim=-1)  # [B, K]
    ratings = torch.arange(K, dtype=log_p_w.dtype, device=log_p_w.device)
    log_beats = F.logsigmoid(alpha * (ratings[:, None] - ratings[None, :]))  # [K, K]: log σ(α(i − j))
    terms = log_p_w[:, :, None] + log_p_l[:, None, :] + log_beats  # [B, K, K]
    return torch.logsumexp(terms.flatten(1), dim=-1)


@jaxtyped(typechecker=typechecker)
def preference_probability(
    logits_chosen: Float[Tensor, "batch K"], logits_rejected: Float[Tensor, "batch K"], alpha: float
) -> Float[Tensor, "batch"]:
    """P(w ≻ l) = Σ_{i,j} p_w(i)·p_l(j)·σ(α(i − j)) per pair.   [B, K], [B, K] → [B]

    For one-hot distributions on ratings i and j it is σ(α(i − j)); for equal distributions, ½.
    """
    return log_preference_probability(logits_chosen, logits_rejected, alpha).exp()


@jaxtyped(typechecker=typechecker)
def distributional_preference_loss(
    logits_chosen: Float[Tensor, "batch K"], logits_rejected: Float[Tensor, "batch K"], alpha: float
) -> Float[Tensor, ""]:
    """mean_b −log Σ_{i,j} p_w(i)·p_l(j)·σ(α(i − j)).   [B, K], [B, K] → scalar"""
    return -log_preference_probability(logits_chosen, logits_rejected, alpha).mean()


@jaxtyped(typechecker=typechecker)
def expected_rating(logits: Float[Tensor, "batch K"]) -> Float[Tensor, "batch"]:
    """Σ_i i·p(i), ratings indexed 0..K−1 (so the reward lies in [0, K−1]).   [B, K] → [B]"""
    ratings = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (torch.softmax(logits, dim=-1) * ratings).sum(-1)


@jaxtyped(typechecker=typechecker)
def rating_entropy(logits: Float[Tensor, "batch K"]) -> Float[Tensor, "batch"]:
    """−Σ_i p(i) log p(i) in nats (0 for one-hot, log K for uniform).   [B, K] → [B]"""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@jaxtyped(typechecker=typechecker)
def pairwise_accuracy(r_chosen: Float[Tensor, "batch"], r_rejected: Float[Tensor, "batch"]) -> float:
    """Share of pairs with r_w > r_l by more than rounding: a tie, exact or within float rounding
    (``ties.decided_wins``: r_w − r_l <= 1e-5·max(1, |r_w|, |r_l|)), counts as wrong (a constant reward scores 0,
    not ½), so the share is the same on every CPU, thread count and batch layout."""
    if r_chosen.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair.")
    return decided_wins(r_chosen, r_rejected).double().mean().item()


# --------------------------------------------------------------------------- the model


class RewardModel(nn.Module):
    """A TransformerBridge trunk and a linear head read at each text's last real token.

    ``head="scalar"``: Linear(d_model, 1), the reward is its output. ``head="dist"``:
    Linear(d_model, K), logits over ratings 0..K−1; the reward is the expected rating.
    The head starts at zero weight and bias, so every pair starts at P(w ≻ l) = ½ (loss
    log 2) for all three losses, instead of at a random preference.

    Texts are tokenized as the trunk was pretrained: BOS (if ``prepend_bos``) then the
    tokens of ``prompt + response``. A text longer than the context ``n_ctx`` is truncated
    from the left, keeping BOS and the last ``n_ctx − 1`` tokens: the head reads the end of
    the text, so the end is what must be kept.
    """

    def __init__(self, bridge, head: str = "scalar", num_ratings: int = 10, prepend_bos: bool = True):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
        if head == "dist" and num_ratings < 2:
            raise ValueError(f"A distributional head needs num_ratings >= 2, got {num_ratings}.")
        self.bridge = bridge
        self.head_kind = head
        self.num_ratings = num_ratings if head == "dist" else 1
        self.prepend_bos = prepend_bos
        self.head = nn.Linear(bridge.cfg.d_model, self.num_ratings)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, texts: list[str]) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """Left-padded ``(tokens [B, S], attention_mask [B, S])``: column −1 is every row's last real token."""

        if not texts:
            raise ValueError("No texts to score: pass at least one.")
        tokenizer, n_ctx = self.tokenizer, self.bridge.cfg.n_ctx
        bos = tokenizer.bos_token_id if self.prepend_bos else None
        rows = []
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:  # = sampling.encode, batched
            ids = ([bos] if bos is not None else []) + ids
            if len(ids) > n_ctx:  # keep BOS and the end of the text
                ids = ids[:1] + ids[len(ids) - n_ctx + 1 :] if bos is not None else ids[-n_ctx:]
            rows.append(ids)
        if any(not ids for ids in rows):
            raise ValueError("A text encodes to no tokens (empty text without BOS); score non-empty texts.")
        return left_pad(rows, padding_id(tokenizer))

    @jaxtyped(typechecker=typechecker)
    def forward(self, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch out"]:
        """Head outputs at the last column: [B, 1] (scalar) or rating logits [B, K] (dist).

        The final residual stream is captured with ``run_with_hooks`` (not ``run_with_cache``,
        which detaches), so a loss on the output trains the trunk too. Left padding puts every
        row's last real token in the last column; the attention mask hides the padding and the
        bridge derives position ids from it, so a padded row scores as it would alone.
        """
        captured: dict[str, Tensor] = {}

        def capture_final_resid(resid, hook):
            captured["resid"] = resid
            return resid

        self.bridge.run_with_hooks(tokens, fwd_hooks=[(FINAL_RESIDUAL_HOOK, capture_final_resid)], attention_mask=attention_mask)
        return self.head(captured["resid"][:, -1, :])

    def outputs(self, texts: list[str]) -> Float[Tensor, "batch out"]:
        """``forward`` on texts (with grad when enabled)."""
        tokens, mask = self.tokenize(texts)
        return self(tokens.to(self.device), mask.to(self.device))

    def rewards_from_outputs(self, outputs: Float[Tensor, "batch out"]) -> Float[Tensor, "batch"]:
        """Scalar rewards [B]: the scalar head's output, or the expected rating of the rating logits."""
        return outputs.squeeze(-1) if self.head_kind == "scalar" else expected_rating(outputs)

    @torch.no_grad()
    def score(self, texts: list[str], batch_size: int = 64) -> Float[Tensor, "batch"]:
        """Rewards of ``texts`` (CPU float32 [B]), in batches of ``batch_size``, without gradients."""
        parts = [self.rewards_from_outputs(self.outputs(texts[i : i + batch_size])).float().cpu()
                 for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0)

    @torch.no_grad()
    def rating_entropy(self, texts: list[str], batch_size: int = 64) -> Float[Tensor, "batch"]:
        """Entropy (nats) of each text's rating distribution (distributional head only)."""
        if self.head_kind != "dist":
            raise ValueError("rating_entropy needs a distributional reward model (trained with --loss dist).")
        parts = [rating_entropy(self.outputs(texts[i : i + batch_size]).float()).cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters, each storage once (``models.bridge_parameters``)."""

        return bridge_parameters(self.bridge)


# --------------------------------------------------------------------------- saving and loading


def save_reward_model(model: RewardModel, directory: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write the trunk (``save_model_dir``: save_pretrained layout, safetensors), ``reward_head.safetensors`` and
    ``rlhf_scratch.json`` (kind, head, num_ratings, prepend_bos and ``meta``, e.g. the loss and alpha), atomically."""

    drop_cached_activations(model.bridge)
    info = {**(meta or {}), "kind": REWARD_MODEL_KIND, "head": model.head_kind, "num_ratings": model.num_ratings,
            "prepend_bos": model.prepend_bos}
    with atomic_dir(directory) as staging:
        save_model_dir(model.bridge, staging, meta=info)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, staging / REWARD_HEAD_FILE)
    return Path(directory)


def find_reward_model_dir(path: str | os.PathLike) -> Path:
    """The reward model directory: ``path`` itself, or ``path/reward_model`` (an ``rlhf-scratch rm --out`` folder)."""
    path = Path(path).expanduser()
    for candidate in (path, path / "reward_model"):
        if (candidate / REWARD_HEAD_FILE).is_file():
            return candidate
    if not path.exists():
        raise ModelLoadError(f"No such reward model directory: {path}. Pass the --out folder of `rlhf-scratch rm` "
                          "(or its reward_model/ subfolder).")
    raise ModelLoadError(f"{path} holds no reward model (no {REWARD_HEAD_FILE} in it or in {path / 'reward_model'}). "
                      "Train one with `rlhf-scratch rm --pairs FILE --out DIR` and pass DIR.")


def load_reward_model(directory: str | os.PathLike, device: str = "cpu") -> RewardModel:
    """A reward model saved by ``save_reward_model`` (``directory`` may also be the ``rm --out`` folder)."""

    directory = find_reward_model_dir(directory)
    meta = read_checkpoint_meta(directory / CHECKPOINT_META_FILE)
    if meta.get("kind") != REWARD_MODEL_KIND or meta.get("head") not in HEADS:
        raise ModelLoadError(f"{directory} is not a reward model (its {CHECKPOINT_META_FILE} says kind={meta.get('kind')!r}).")
    model = RewardModel(load_bridge(directory, device=device), head=meta["head"], num_ratings=int(meta["num_ratings"]),
                        prepend_bos=bool(meta.get("prepend_bos", True)))
    try:
        model.head.load_state_dict(load_file(directory / REWARD_HEAD_FILE))
    except (OSError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(corrupted_model_message(directory, error)) from error
    model.meta = meta
    return model.to(device).eval()
