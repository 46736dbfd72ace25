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
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.checkpoint import FORMAT_VERSION, find_checkpoint, read_resume_state, resumed_config
from rlhf_scratch.models import load_bridge
from rlhf_scratch.optimization import clipped_step
from rlhf_scratch.outputs import to_jsonable, write_json
from rlhf_scratch.run import run_loop
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
    load_reward_model,
    pairwise_accuracy,
    save_reward_model,
)
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.algorithm_configs import RewardModelConfig  # noqa: F401 (defined there: importable without torch)
from rlhf_scratch.command_configs import ScoreConfig  # noqa: F401 (defined there: importable without torch)
from rlhf_scratch.ties import decided_wins


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


class RewardModelTrainer:
    """The reward model, its optimiser and schedule, the pairs, and one epoch at a time on the shared run loop
    (``run.run_loop``: --resume, Ctrl-C/SIGTERM, W&B, --eval-every, checkpoints, the output files)::

        trainer = RewardModelTrainer(RewardModelConfig(pairs="runs/pairs/pairs.jsonl"))
        row = trainer.run_unit()[0][0]     # one epoch: mean loss, running train accuracy, steps
        trainer.heldout_accuracy()         # pairwise accuracy on the held-out pairs
        summary = trainer.train()          # the remaining epochs, then OUT/reward_model and summary.json

    AdamW on trunk (``lr``) and head (``head_lr``), both decayed linearly to 0 over training, global gradient
    norm clipped to ``max_grad_norm``. The trunk stays in eval mode (no dropout), as in the policy trainers.
    Data-parallel (``torchrun``): every rank draws the same shuffle and computes the loss of its slice of each
    batch, as its share of the batch mean; only rank 0 prints and writes.
    """

    kind, title, unit = "rm", "rm", "epoch"
    progress_text = "loss {task.fields[loss]:.4f}"

    def __init__(self, config: RewardModelConfig, model: RewardModel | None = None):
        distributed.init_from_env(config.device)
        self.config = config
        self.main = distributed.is_main()  # data-parallel: only rank 0 prints and writes
        self.world = distributed.world_size()
        device = distributed.rank_device(config.device)
        self.console = Console(quiet=not self.main)
        torch.manual_seed(config.seed)
        pairs, self.n_duplicates = usable_pairs(load_pairs(config.pairs, limit=config.limit), config.pairs,
                                                note=lambda line: self.console.print(f"[bold yellow]rm:[/] {line}"))
        if config.loss == "margin":
            missing = sum(p.margin_value is None for p in pairs)
            if missing:
                raise PairDataError(
                    f"--loss margin needs a margin for every pair, but {missing} of {len(pairs)} pairs in {config.pairs} "
                    "have neither 'margin' nor both 'chosen_score' and 'rejected_score'. Add them (`rlhf-scratch pairs` "
                    "writes scores) or use --loss bt.")
        self.train_pairs, self.heldout = split_pairs(pairs, config.heldout_fraction, config.seed)
        distributed.check_divisible(config.batch_size, "batch_size", "--batch-size")
        last = len(self.train_pairs) % config.batch_size or config.batch_size
        if min(last, config.batch_size) < self.world:
            raise ValueError(f"The last batch of an epoch has {last} pairs, fewer than the {self.world} processes: every "
                             "rank needs at least one. Change --batch-size or --limit.")
        self.model = model if model is not None else RewardModel(
            load_bridge(config.model, device=device), head=LOSS_HEAD[config.loss], num_ratings=config.num_ratings,
            prepend_bos=config.prepend_bos).to(device)
        self.model.eval()  # dropout off, as in the policy trainers
        self.optimizer = torch.optim.AdamW(
            [{"params": self.model.trunk_parameters(), "lr": config.lr},
             {"params": list(self.model.head.parameters()), "lr": config.head_lr}], weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_pairs) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1 - step / total)
        self.learner = distributed.wrap_ddp(self.model, [p for group in self.optimizer.param_groups for p in group["params"]])
        self.rng = random.Random(config.seed)
        self.epoch, self.history, self.initial_loss, self.elapsed_seconds = 0, [], None, 0.0

    completed = property(lambda self: self.epoch)
    total = property(lambda self: self.config.epochs)

    def train(self, console=None, stop_after: int | None = None) -> dict:
        """The epochs left on the run loop, then the saved model and summary (``finish``)."""
        return run_loop(self, console or self.console, stop_after)

    def begin(self) -> None:
        if self.config.out is not None and self.main and self.heldout:
            write_pairs(Path(self.config.out) / "heldout_pairs.jsonl", self.heldout)

    def run_unit(self) -> tuple[list[dict], list[dict]]:
        """One epoch over the training pairs in a fresh shuffle: its mean loss and running train accuracy (each batch
        measured before its step); ``heldout_accuracy`` is filled by ``evaluate`` (--eval-every)."""
        config, W = self.config, self.world
        epoch, epoch_start = self.epoch + 1, time.time()
        order = list(range(len(self.train_pairs)))
        self.rng.shuffle(order)
        losses, correct = [], 0
        for i in range(0, len(order), config.batch_size):
            batch = [self.train_pairs[j] for j in order[i: i + config.batch_size]]
            # Data-parallel: this rank's slice of the batch; its loss is its share of the batch mean.
            local = batch[distributed.rank_slice(len(batch))]
            with distributed.shared_failures(f"reward model, epoch {epoch}, step {i // config.batch_size + 1}"):
                loss, r_w, r_l = pair_loss(self.model, local, config.loss, config.alpha, forward=self.learner)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"The reward-model loss is {loss.item()} at epoch {epoch}; lower --lr.")
            loss = distributed.share(loss, len(local), len(batch)) if W > 1 else loss
            clipped_step(self.optimizer, loss, config.max_grad_norm, "Lower --lr, or check the pair file for extreme texts or margins.")
            self.scheduler.step()
            # The whole batch's loss and correct pairs (one all-reduce; the values themselves in one process).
            totals = distributed.all_reduce_sum(torch.stack([loss.detach().double(), decided_wins(r_w, r_l).sum().double()]))
            losses.append(totals[0].item() / W)
            self.initial_loss = losses[0] if self.initial_loss is None else self.initial_loss
            correct += int(totals[1].item())
        self.epoch = epoch
        row = {"epoch": epoch, "loss": sum(losses) / len(losses), "train_accuracy_running": correct / len(self.train_pairs),
               "heldout_accuracy": None, "steps": epoch * self.steps_per_epoch, "seconds": time.time() - epoch_start}
        self.console.print(f"epoch {epoch}: loss {row['loss']:.4f}, running train accuracy {row['train_accuracy_running']:.3f}")
        return [row], []

    def progress_fields(self, rows: list[dict] | None) -> dict[str, float]:
        return {"loss": rows[-1]["loss"] if rows else float("nan")}

    def heldout_accuracy(self) -> float | None:
        """Pairwise accuracy (r_w > r_l) of the current model on the held-out pairs; None without any."""
        return pairwise_accuracy(*score_pairs(self.model.score, self.heldout)) if self.heldout else None

    def evaluate(self) -> dict:
        accuracy = self.heldout_accuracy()
        if accuracy is not None:
            self.console.print(f"epoch {self.epoch}: held-out accuracy {accuracy:.3f}")
        return {"heldout_accuracy": accuracy}

    def save_checkpoint(self, directory: Path) -> Path:
        """The reward model (``save_reward_model``: trunk, head, metadata) with ``resume_state``, written atomically."""
        state = {"format": FORMAT_VERSION, "kind": self.kind, "phase": self.epoch, "config": to_jsonable(self.config),
                 "reference": {"source": None}, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": {"python": self.rng.getstate(),
                                                                   "torch": torch.get_rng_state()},
                 "history": self.history, "initial_loss": self.initial_loss, "elapsed_seconds": self.elapsed_seconds}
        with distributed.shared_failures(f"reward model, epoch {self.epoch}, writing the checkpoint"):
            if self.main:
                save_reward_model(self.model, directory, meta=self.model_meta(), resume_state=state)
        return Path(directory)

    def model_meta(self) -> dict:
        config = self.config
        return {"loss": config.loss, "alpha": config.alpha, "base_model": config.model, "pairs": str(config.pairs)}

    @classmethod
    def resume(cls, config: RewardModelConfig) -> RewardModelTrainer:
        """A trainer that continues the run whose checkpoint is ``config.resume`` exactly where it stopped."""
        distributed.init_from_env(config.device)
        checkpoint = find_checkpoint(config.resume)
        state = read_resume_state(checkpoint)
        if state["kind"] != cls.kind:
            raise ValueError(f"{checkpoint} is a {state['kind']} checkpoint; resume it with "
                             f"`rlhf-scratch {state['kind']} --resume {config.resume}`.")
        config = resumed_config(config, state["config"], checkpoint)
        trainer = cls(config, model=load_reward_model(checkpoint, device=distributed.rank_device(config.device)))
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.rng.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        trainer.epoch, trainer.history = state["phase"], list(state["history"])
        trainer.initial_loss, trainer.elapsed_seconds = state["initial_loss"], state["elapsed_seconds"]
        return trainer

    def summary(self) -> dict:
        """Summary: pairwise_accuracy (held-out; None without held-out pairs), train_pairwise_accuracy (after training,
        all training pairs), final_loss (mean loss of the last epoch), initial_loss (the first step's),
        heldout_chosen_mean / heldout_rejected_mean, (dist) heldout_rating_entropy, n_train, n_heldout, steps, seconds."""
        config, model, heldout = self.config, self.model, self.heldout
        train_w, train_l = score_pairs(model.score, self.train_pairs)
        summary = {
            "loss": config.loss,
            "pairwise_accuracy": self.heldout_accuracy(),
            "train_pairwise_accuracy": pairwise_accuracy(train_w, train_l),
            "final_loss": self.history[-1]["loss"],
            "initial_loss": self.initial_loss,
            "n_train": len(self.train_pairs),
            "n_heldout": len(heldout),
            "n_duplicates_dropped": self.n_duplicates,
            "epochs": self.epoch,
            "steps": self.epoch * self.steps_per_epoch,
        }
        if heldout:
            held_w, held_l = score_pairs(model.score, heldout)
            summary.update(heldout_chosen_mean=held_w.mean().item(), heldout_rejected_mean=held_l.mean().item())
            if model.head_kind == "dist":
                texts = [p.prompt + p.chosen for p in heldout] + [p.prompt + p.rejected for p in heldout]
                summary["heldout_rating_entropy"] = model.rating_entropy(texts).mean().item()
        summary["seconds"] = self.elapsed_seconds
        return summary

    def finish(self, console, outputs, start) -> dict:
        """OUT/reward_model (use it as --reward rm:OUT) and summary.json (rank 0), and the closing line."""
        summary, out = self.summary(), outputs.out
        if out is not None and self.main:
            save_reward_model(self.model, out / "reward_model", meta=self.model_meta())
        outputs.finish(summary)
        accuracy = "–" if summary["pairwise_accuracy"] is None else f"{summary['pairwise_accuracy']:.3f}"
        console.print(f"rm ({self.config.loss}): held-out pairwise accuracy {accuracy} on {len(self.heldout)} pairs, "
                      f"train {summary['train_pairwise_accuracy']:.3f} on {len(self.train_pairs)}; loss "
                      f"{self.initial_loss:.4f} → {summary['final_loss']:.4f}; {summary['seconds']:.0f} s"
                      + (f" → {out / 'reward_model'}" if out else ""))
        self.model.history = self.history
        return summary


def fit_reward_model(config: RewardModelConfig) -> tuple[RewardModel, dict]:
    """Train a reward model on ``config.pairs`` (or continue ``config.resume``): ``(model, summary)``; writes the
    outputs if ``out`` is set (``RewardModelTrainer``)."""
    trainer = RewardModelTrainer.resume(config) if config.resume is not None else RewardModelTrainer(config)
    summary = trainer.train()
    return trainer.model, summary


def train_reward_model(config: RewardModelConfig) -> dict:
    """``fit_reward_model`` for the command line: the summary only."""
    return fit_reward_model(config)[1]


# --------------------------------------------------------------------------- scoring any reward on pairs


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
