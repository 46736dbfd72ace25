"""Training a reward model on preference pairs (``rlhf-scratch rm``) and scoring any reward on them (``rlhf-scratch score``).

    pairs file ─► load_pairs ─► copies dropped ─► held-out split by prompt (``preferences.split_heldout``)
    for each epoch, shuffled batches of pairs:
        r_w, r_l = RewardModel(prompt + chosen), RewardModel(prompt + rejected)   (or rating logits for "dist")
        loss = bt | margin | dist (``reward_model.py``) ─► backward, clip, AdamW step
    held-out pairwise accuracy ─► summary.json; the model ─► OUT/reward_model (use it as --reward rm:OUT)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.config import finite_float_checks
from rlhf_scratch.models import load_bridge
from rlhf_scratch.optimization import clipped_step
from rlhf_scratch.outputs import append_jsonl, write_json
from rlhf_scratch.preferences import (
    PairDataError,
    PreferencePair,
    load_pairs,
    split_heldout,
    usable_pairs,
    write_pairs,
)
from rlhf_scratch.reward_model import (
    LOSS_HEAD,
    RewardModel,
    bradley_terry_loss,
    distributional_preference_loss,
    pairwise_accuracy,
    save_reward_model,
)
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.ties import decided_wins


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
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    max_grad_norm: float = 1.0
    heldout_fraction: float = 0.1
    """Share of pairs held out to measure pairwise accuracy, split by prompt (no held-out prompt is trained on); 0: none."""
    limit: int | None = None
    """Use only the first LIMIT pairs of the file."""
    prepend_bos: bool = True
    """Put BOS in front of every text (as the built-in model was trained)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path | None = Path("runs/rm")
    """Output directory: reward_model/, metrics.jsonl, heldout_pairs.jsonl, config.json, summary.json (None: write nothing)."""

    def __post_init__(self):
        checks = [
            *finite_float_checks(self),
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


def pair_loss(model: RewardModel, pairs: list[PreferencePair], loss: str, alpha: float,
              forward=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, r_chosen [B], r_rejected [B])`` of a batch of pairs; chosen and rejected go through one forward pass
    (``forward(tokens, attention_mask)``: the model itself, or the model in DDP)."""
    texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    tokens, mask = model.tokenize(texts)
    outputs = (forward or model)(tokens.to(model.device), mask.to(model.device))
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


    distributed.init_from_env(config.device)
    main = distributed.is_main()  # data-parallel: only rank 0 prints and writes
    W = distributed.world_size()
    device = distributed.rank_device(config.device)
    console = Console(quiet=not main)
    start = time.time()
    torch.manual_seed(config.seed)
    pairs, n_duplicates = usable_pairs(load_pairs(config.pairs, limit=config.limit), config.pairs,
                                       note=lambda line: console.print(f"[bold yellow]rm:[/] {line}"))
    if config.loss == "margin":
        missing = sum(p.margin_value is None for p in pairs)
        if missing:
            raise PairDataError(
                f"--loss margin needs a margin for every pair, but {missing} of {len(pairs)} pairs in {config.pairs} have "
                "neither 'margin' nor both 'chosen_score' and 'rejected_score'. Add them (`rlhf-scratch pairs` writes "
                "scores) or use --loss bt."
            )
    train, heldout = split_pairs(pairs, config.heldout_fraction, config.seed)
    distributed.check_divisible(config.batch_size, "batch_size", "--batch-size")
    last = len(train) % config.batch_size or config.batch_size
    if min(last, config.batch_size) < W:
        raise ValueError(f"The last batch of an epoch has {last} pairs, fewer than the {W} processes: every rank needs "
                         "at least one. Change --batch-size or --limit.")
    model = RewardModel(load_bridge(config.model, device=device), head=LOSS_HEAD[config.loss],
                        num_ratings=config.num_ratings, prepend_bos=config.prepend_bos).to(device)
    model.eval()  # dropout off, as in the policy trainers
    optimizer = torch.optim.AdamW(
        [{"params": model.trunk_parameters(), "lr": config.lr}, {"params": list(model.head.parameters()), "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    learner = distributed.wrap_ddp(model, [p for group in optimizer.param_groups for p in group["params"]])
    out = Path(config.out) if config.out is not None and main else None
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
    with Progress(*columns, console=console, disable=not main) as progress:
        task = progress.add_task("rm", total=total_steps, epoch=1, loss=float("nan"))
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.time()
            order = list(range(len(train)))
            rng.shuffle(order)
            losses, correct = [], 0
            for i in range(0, len(order), config.batch_size):
                batch = [train[j] for j in order[i : i + config.batch_size]]
                # Data-parallel: this rank's slice of the batch; its loss is its share of the batch mean.
                local = batch[distributed.rank_slice(len(batch))]
                with distributed.shared_failures(f"reward model, epoch {epoch}, step {i // config.batch_size + 1}"):
                    loss, r_w, r_l = pair_loss(model, local, config.loss, config.alpha, forward=learner)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"The reward-model loss is {loss.item()} at epoch {epoch}; lower --lr.")
                loss = distributed.share(loss, len(local), len(batch)) if W > 1 else loss
                clipped_step(optimizer, loss, config.max_grad_norm, "Lower --lr, or check the pair file for extreme texts or margins.")
                scheduler.step()
                # The whole batch's loss and correct pairs (one all-reduce; the values themselves in one process).
                totals = distributed.all_reduce_sum(torch.stack([loss.detach().double(), decided_wins(r_w, r_l).sum().double()]))
                losses.append(totals[0].item() / W)
                initial_loss = losses[0] if initial_loss is None else initial_loss
                correct += int(totals[1].item())
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
        "n_duplicates_dropped": n_duplicates,
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
    if out is not None:  # rank 0 only
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
    wrong), ties (share of ties, exact or within float rounding: ``ties.decided_wins``), chosen_mean, rejected_mean, seconds.
    """


    start = time.time()
    pairs = load_pairs(config.pairs, limit=config.limit)
    reward = make_reward(config.reward)
    chosen, rejected = score_pairs(lambda texts: score_texts(reward, texts), pairs, config.batch_size)
    summary = {
        "reward": reward.name,
        "pairs": str(config.pairs),
        "n_pairs": len(pairs),
        "pairwise_accuracy": pairwise_accuracy(chosen, rejected),
        "ties": (~decided_wins(chosen, rejected) & ~decided_wins(rejected, chosen)).double().mean().item(),
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
