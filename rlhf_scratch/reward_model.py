"""Reward models learned from preference pairs: losses, the model, training, saving, and use as a reward.

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

Commands: ``rlhf-scratch rm`` trains one (``train_reward_model``); ``--reward rm:DIR`` uses
one as a reward anywhere (``RewardModelReward``); ``rlhf-scratch score`` measures any
reward's pairwise accuracy on a pair file (``run_score``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, jaxtyped
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_scratch.models import CHECKPOINT_META_FILE, FINAL_RESIDUAL_HOOK
from rlhf_scratch.optimization import clipped_step
from rlhf_scratch.preferences import PairDataError, PreferencePair, load_pairs, split_heldout, write_pairs
from rlhf_scratch.rewards import RewardError
from rlhf_scratch.typecheck import typechecker

# is_pep484_tower: accept an int where a float is annotated (alpha=1), as PEP 484 does.

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
    """Share of pairs with r_w > r_l, strictly: a tie counts as wrong (a constant reward scores 0, not ½)."""
    if r_chosen.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair.")
    return (r_chosen > r_rejected).double().mean().item()


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
        from rlhf_scratch.sampling import left_pad, padding_id

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
        from rlhf_scratch.models import bridge_parameters

        return bridge_parameters(self.bridge)


# --------------------------------------------------------------------------- saving and loading


def save_reward_model(model: RewardModel, directory: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write the trunk (``save_model_dir``: save_pretrained layout, safetensors), ``reward_head.safetensors`` and
    ``rlhf_scratch.json`` (kind, head, num_ratings, prepend_bos and ``meta``, e.g. the loss and alpha), atomically."""
    from rlhf_scratch.models import drop_cached_activations, save_model_dir
    from rlhf_scratch.outputs import atomic_dir

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
        raise RewardError(f"No such reward model directory: {path}. Pass the --out folder of `rlhf-scratch rm` "
                          "(or its reward_model/ subfolder).")
    raise RewardError(f"{path} holds no reward model (no {REWARD_HEAD_FILE} in it or in {path / 'reward_model'}). "
                      "Train one with `rlhf-scratch rm --pairs FILE --out DIR` and pass DIR.")


def load_reward_model(directory: str | os.PathLike, device: str = "cpu") -> RewardModel:
    """A reward model saved by ``save_reward_model`` (``directory`` may also be the ``rm --out`` folder)."""
    from rlhf_scratch.models import load_bridge

    directory = find_reward_model_dir(directory)
    meta_file = directory / CHECKPOINT_META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as error:
        raise RewardError(f"{meta_file} is missing or not JSON ({error}); the reward model was not saved completely. "
                          "Train it again.") from error
    if meta.get("kind") != REWARD_MODEL_KIND or meta.get("head") not in HEADS:
        raise RewardError(f"{directory} is not a reward model (its {CHECKPOINT_META_FILE} says kind={meta.get('kind')!r}).")
    model = RewardModel(load_bridge(directory, device=device), head=meta["head"], num_ratings=int(meta["num_ratings"]),
                        prepend_bos=bool(meta.get("prepend_bos", True)))
    model.head.load_state_dict(load_file(directory / REWARD_HEAD_FILE))
    model.meta = meta
    return model.to(device).eval()


class RewardModelReward:
    """A trained reward model as a reward (``--reward rm:DIR``): texts → rewards [B], CPU float32."""

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", batch_size: int = 64):
        self.model = load_reward_model(directory, device=device)
        self.batch_size = batch_size
        self.name = f"rm:{directory}"

    @jaxtyped(typechecker=typechecker)
    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]:
        return self.model.score(texts, batch_size=self.batch_size)


# --------------------------------------------------------------------------- training


@dataclass
class RewardModelConfig:
    """Train a reward model on preference pairs (Bradley–Terry, with margin, or distributional)."""

    pairs: Path
    """Pair file (.jsonl/.csv with prompt, chosen, rejected[, margin | chosen_score, rejected_score]) or a datasets name."""
    loss: Literal["bt", "margin", "dist"] = "bt"
    """"bt": −log σ(r_w − r_l); "margin": −log σ(r_w − r_l − m) with m = margin (or chosen_score − rejected_score);
    "dist": K-way rating head, −log Σ_ij p_w(i) p_l(j) σ(α(i − j))."""
    model: str = "builtin"
    """Trunk to start from: "builtin", a model directory or policy checkpoint, or a hub name."""
    num_ratings: int = 10
    """K, the number of ratings (0..K−1) of the distributional head."""
    alpha: float = 1.0
    """α of the distributional loss: how sharply a higher rating beats a lower one (σ(α) for one rating step)."""
    epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per gradient step (2× as many texts in one forward pass)."""
    lr: float = 3e-4
    """Peak learning rate of the trunk (linear decay to 0 over training)."""
    head_lr: float = 1e-3
    """Learning rate of the head (new, zero-initialised: it needs to move faster)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    heldout_fraction: float = 0.1
    """Share of pairs held out to measure pairwise accuracy, split by prompt (no held-out prompt is trained on); 0: none."""
    limit: int | None = None
    """Use only the first LIMIT pairs of the file."""
    prepend_bos: bool = True
    """Put BOS in front of every text (as the built-in model was trained)."""
    seed: int = 0
    device: str = "cpu"
    out: Path | None = Path("runs/rm")
    """Output directory: reward_model/, metrics.jsonl, heldout_pairs.jsonl, config.json, summary.json (None: write nothing)."""

    def __post_init__(self):
        checks = [
            (self.loss in LOSS_HEAD, f"loss must be one of {tuple(LOSS_HEAD)}, got {self.loss!r}."),
            (self.num_ratings >= 2, f"num_ratings must be >= 2, got {self.num_ratings}."),
            (self.alpha > 0 and math.isfinite(self.alpha), f"alpha must be a positive number, got {self.alpha}."),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.lr >= 0 and self.head_lr > 0, f"need lr >= 0 (0 freezes the trunk) and head_lr > 0, got {self.lr}, {self.head_lr}."),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}."),
            (0 <= self.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}."),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1 or omitted, got {self.limit}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def split_pairs(pairs: list[PreferencePair], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, heldout)`` pairs, split by prompt (``preferences.split_heldout``)."""
    train, heldout = split_heldout(pairs, heldout_fraction, seed)
    return [pairs[i] for i in train], [pairs[i] for i in heldout]


def pair_loss(model: RewardModel, pairs: list[PreferencePair], loss: str, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, r_chosen [B], r_rejected [B])`` of a batch of pairs; chosen and rejected go through one forward pass."""
    texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    outputs = model.outputs(texts)
    out_w, out_l = outputs[: len(pairs)], outputs[len(pairs) :]
    r_w, r_l = model.rewards_from_outputs(out_w), model.rewards_from_outputs(out_l)
    if loss == "dist":
        value = distributional_preference_loss(out_w, out_l, alpha)
    elif loss == "margin":
        margins = torch.tensor([p.margin_value for p in pairs], dtype=r_w.dtype, device=r_w.device)
        value = bradley_terry_loss(r_w, r_l, margins)
    else:
        value = bradley_terry_loss(r_w, r_l)
    return value, r_w, r_l


def score_pairs(score, pairs: list[PreferencePair], batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """``(scores of prompt+chosen [N], scores of prompt+rejected [N])`` with ``score(texts) -> [n]``, in batches."""
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        chosen.append(score([p.prompt + p.chosen for p in batch]))
        rejected.append(score([p.prompt + p.rejected for p in batch]))
    return torch.cat(chosen), torch.cat(rejected)


def fit_reward_model(config: RewardModelConfig) -> tuple[RewardModel, dict]:
    """Train a reward model on ``config.pairs``; returns ``(model, summary)`` and writes the outputs if ``out`` is set.

    AdamW on trunk (``lr``) and head (``head_lr``), both decayed linearly to 0 over training,
    global gradient norm clipped to ``max_grad_norm``. The trunk stays in eval mode (no dropout),
    as in the policy trainers. Per epoch it logs the mean training loss, the running training
    accuracy (each minibatch measured before its step) and the held-out accuracy.

    Summary: pairwise_accuracy (held-out; None without held-out pairs), train_pairwise_accuracy
    (after training, all training pairs), final_loss (mean loss of the last epoch), initial_loss
    (the first step's), heldout_chosen_mean / heldout_rejected_mean, (dist) heldout_rating_entropy,
    n_train, n_heldout, steps, seconds.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.outputs import append_jsonl, write_json

    console = Console()
    start = time.time()
    torch.manual_seed(config.seed)
    pairs = load_pairs(config.pairs, limit=config.limit)
    if config.loss == "margin":
        missing = sum(p.margin_value is None for p in pairs)
        if missing:
            raise PairDataError(
                f"--loss margin needs a margin for every pair, but {missing} of {len(pairs)} pairs in {config.pairs} have "
                "neither 'margin' nor both 'chosen_score' and 'rejected_score'. Add them (`rlhf-scratch pairs` writes "
                "scores) or use --loss bt."
            )
    train, heldout = split_pairs(pairs, config.heldout_fraction, config.seed)
    model = RewardModel(load_bridge(config.model, device=config.device), head=LOSS_HEAD[config.loss],
                        num_ratings=config.num_ratings, prepend_bos=config.prepend_bos).to(config.device)
    model.eval()  # dropout off, as in the policy trainers
    optimizer = torch.optim.AdamW(
        [{"params": model.trunk_parameters(), "lr": config.lr}, {"params": list(model.head.parameters()), "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    out = Path(config.out) if config.out is not None else None
    if out is not None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        write_json(out / "config.json", config)
        if heldout:
            write_pairs(out / "heldout_pairs.jsonl", heldout)

    def evaluate_pairs(subset: list[PreferencePair]) -> tuple[Tensor, Tensor]:
        return score_pairs(model.score, subset)

    rng = random.Random(config.seed)
    history, initial_loss = [], None
    columns = [TextColumn(f"[bold]rm[/] ({config.loss}) epoch {{task.fields[epoch]}}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rm", total=total_steps, epoch=1, loss=float("nan"))
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.time()
            order = list(range(len(train)))
            rng.shuffle(order)
            losses, correct = [], 0
            for i in range(0, len(order), config.batch_size):
                batch = [train[j] for j in order[i : i + config.batch_size]]
                loss, r_w, r_l = pair_loss(model, batch, config.loss, config.alpha)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"The reward-model loss is {loss.item()} at epoch {epoch}; lower --lr.")
                clipped_step(optimizer, loss, config.max_grad_norm)
                scheduler.step()
                losses.append(loss.item())
                initial_loss = losses[0] if initial_loss is None else initial_loss
                correct += int((r_w > r_l).sum())
                progress.update(task, advance=1, epoch=epoch, loss=sum(losses[-20:]) / len(losses[-20:]))
            row = {"epoch": epoch, "loss": sum(losses) / len(losses), "train_accuracy_running": correct / len(train),
                   "heldout_accuracy": pairwise_accuracy(*evaluate_pairs(heldout)) if heldout else None,
                   "steps": epoch * steps_per_epoch, "seconds": time.time() - epoch_start}
            history.append(row)
            if out is not None:
                append_jsonl(out / "metrics.jsonl", row)
            heldout_text = f", held-out accuracy {row['heldout_accuracy']:.3f}" if heldout else ""
            progress.console.print(f"epoch {epoch}: loss {row['loss']:.4f}, running train accuracy "
                                   f"{row['train_accuracy_running']:.3f}{heldout_text}")

    train_w, train_l = evaluate_pairs(train)
    summary = {
        "loss": config.loss,
        "pairwise_accuracy": history[-1]["heldout_accuracy"],
        "train_pairwise_accuracy": pairwise_accuracy(train_w, train_l),
        "final_loss": history[-1]["loss"],
        "initial_loss": initial_loss,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "epochs": config.epochs,
        "steps": total_steps,
    }
    if heldout:
        held_w, held_l = evaluate_pairs(heldout)
        summary.update(heldout_chosen_mean=held_w.mean().item(), heldout_rejected_mean=held_l.mean().item())
        if model.head_kind == "dist":
            texts = [p.prompt + p.chosen for p in heldout] + [p.prompt + p.rejected for p in heldout]
            summary["heldout_rating_entropy"] = model.rating_entropy(texts).mean().item()
    summary["seconds"] = time.time() - start
    if out is not None:
        save_reward_model(model, out / "reward_model", meta={"loss": config.loss, "alpha": config.alpha,
                                                              "base_model": config.model, "pairs": str(config.pairs)})
        write_json(out / "summary.json", summary)
    accuracy = "–" if summary["pairwise_accuracy"] is None else f"{summary['pairwise_accuracy']:.3f}"
    console.print(f"rm ({config.loss}): held-out pairwise accuracy {accuracy} on {len(heldout)} pairs, train "
                  f"{summary['train_pairwise_accuracy']:.3f} on {len(train)}; loss {initial_loss:.4f} → "
                  f"{summary['final_loss']:.4f}; {summary['seconds']:.0f} s" + (f" → {out / 'reward_model'}" if out else ""))
    model.history = history
    return model, summary


def train_reward_model(config: RewardModelConfig) -> dict:
    """``fit_reward_model`` for the command line: the summary only."""
    return fit_reward_model(config)[1]


# --------------------------------------------------------------------------- scoring any reward on pairs


@dataclass
class ScoreConfig:
    """Pairwise accuracy of any reward (rm:DIR, vader, chars:C, hf:DIR:LABEL) on a pair file."""

    pairs: Path
    """Pair file (.jsonl/.csv) or a datasets name."""
    reward: str = "vader"
    """Reward spec: rm:DIR | vader | chars:C | hf:PATH_OR_NAME:LABEL[:prob]."""
    out: Path | None = None
    """If given, write config.json and summary.json here."""
    batch_size: int = 64
    """Texts scored per reward call."""
    limit: int | None = None
    """Use only the first LIMIT pairs."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or omitted, got {self.limit}.")


def run_score(config: ScoreConfig) -> dict:
    """Score ``prompt + chosen`` and ``prompt + rejected`` of every pair with the reward; write summary.json.

    Summary: reward, pairs, n_pairs, pairwise_accuracy (share with score(chosen) > score(rejected), ties
    wrong), ties (share of exact ties), chosen_mean, rejected_mean, seconds.
    """
    from rich.console import Console

    from rlhf_scratch.outputs import write_json
    from rlhf_scratch.rewards import make_reward, score_texts

    start = time.time()
    pairs = load_pairs(config.pairs, limit=config.limit)
    reward = make_reward(config.reward)
    chosen, rejected = score_pairs(lambda texts: score_texts(reward, texts), pairs, config.batch_size)
    summary = {
        "reward": reward.name,
        "pairs": str(config.pairs),
        "n_pairs": len(pairs),
        "pairwise_accuracy": pairwise_accuracy(chosen, rejected),
        "ties": (chosen == rejected).double().mean().item(),
        "chosen_mean": chosen.mean().item(),
        "rejected_mean": rejected.mean().item(),
        "seconds": time.time() - start,
    }
    if config.out is not None:
        write_json(Path(config.out) / "config.json", config)
        write_json(Path(config.out) / "summary.json", summary)
    Console().print(f"score: {reward.name} pairwise accuracy {summary['pairwise_accuracy']:.3f} on {len(pairs)} pairs "
                    f"(ties {summary['ties']:.3f}; chosen {summary['chosen_mean']:+.3f} vs rejected "
                    f"{summary['rejected_mean']:+.3f})")
    return summary
