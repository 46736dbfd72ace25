"""The DPO trainer and ``rlhf-scratch dpo``: f-DPO on preference pairs, evaluated with the shared metrics.

``DPOTrainer(config)`` holds the policy, the frozen reference, the tokenized pairs and the stored
reference log-probs; ``train_step(indices)`` is one step, ``train()`` all epochs with logging,
checkpoint and evaluation. The losses are in ``dpo.py``::

    pairs ─► tokenize_pairs ─► reference log π_ref(y|x) [N], once (no grad)
    for each epoch, shuffled batches of B pairs: train_step ─► dpo_loss ─► backward, clip, AdamW, LR step
    held-out pairs: loss, accuracy, implicit-reward margin; held-out prompts: reward, KL, diversity
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.checkpoint import FORMAT_VERSION, find_checkpoint, read_resume_state, resumed_config, write_resume_state
from rlhf_scratch.dpo import DPOLossOutput, dpo_loss, sequence_logprobs, tokenize_pairs
from rlhf_scratch.evaluation import (
    ModelSampler,
    evaluate,
    evaluation_prompts,
    print_metrics_table,
    print_sample_table,
    pyplot,
)
from rlhf_scratch.models import bridge_parameters, load_bridge, make_reference, save_model_dir
from rlhf_scratch.optimization import check_finite, clipped_step
from rlhf_scratch.outputs import atomic_dir, to_jsonable
from rlhf_scratch.run import run_loop
from rlhf_scratch.preferences import (
    PreferencePair,
    load_pairs,
    split_heldout,
    usable_pairs,
)
from rlhf_scratch.rewards import make_reward
from rlhf_scratch.sampling import padding_id
from rlhf_scratch.schedule import warmup_decay_lambda
from rlhf_scratch.algorithm_configs import DPOConfig  # noqa: F401 (defined there: importable without torch)

NONFINITE_HINT = "Lower --lr or --beta, or check the pair file for extreme texts."


def load_preference_pairs(config: DPOConfig) -> list[PreferencePair]:
    """The pairs of ``config.pairs`` (``preferences.load_pairs``), at most ``config.max_pairs``."""

    return load_pairs(str(config.pairs), limit=config.max_pairs)


# --------------------------------------------------------------------------- the trainer


class DPOTrainer:
    """Holds the policy, the frozen reference, the tokenized pairs, the stored reference log-probs and the optimiser.

    Step through it::

        trainer = DPOTrainer(DPOConfig(pairs="runs/pairs/pairs.jsonl"))
        trainer.ref_chosen_logps[:4]               # log π_ref(y_w|x) of every pair, computed once in __init__
        out = trainer.train_step([0, 1, 2, 3])     # named tensors: loss, chosen_rewards, accuracy, ...
        trainer.heldout_metrics()                  # pair accuracy on the held-out pairs
        trainer.train()                            # all epochs with logging, checkpoint and evaluation

    Data-parallel (``torchrun``, ``rlhf_scratch.distributed``): every rank holds every pair and draws the same
    shuffle; ``batch_size`` is the global number of pairs per step, and rank r computes the loss of its slice
    of each batch through ``self.learner`` (the bridge in DDP), as its share of the batch mean. The step's
    metrics are those of the whole batch. Only rank 0 prints, writes outputs and evaluates.
    """

    def __init__(self, config: DPOConfig, pairs: list[PreferencePair] | None = None, bridge=None, reference=None):

        distributed.init_from_env(config.device)
        if distributed.is_distributed():
            config = dataclasses.replace(config, device=distributed.rank_device(config.device))
        self.config = config
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        # Pairs first: a bad pair file fails before the slower model load.
        self.pairs, self.n_duplicates = usable_pairs(
            list(pairs) if pairs is not None else load_preference_pairs(config),
            config.pairs if pairs is None else "the given pairs",
            note=lambda line: Console().print(f"[bold yellow]dpo:[/] {line}"))
        if len(self.pairs) < 2:
            raise ValueError(f"DPO needs at least 2 preference pairs, got {len(self.pairs)} from {config.pairs}.")
        self.bridge = bridge if bridge is not None else load_bridge(config.model, device=config.device)
        self.bridge.eval()  # dropout off: the same tokens must get the same log-probs in every pass
        # The frozen reference: a copy of the starting policy (given separately when resuming: the policy is trained).
        self.reference = make_reference(reference if reference is not None else self.bridge)
        self.reference_source = config.model if bridge is None or reference is not None else None
        tokenizer = self.bridge.tokenizer
        self.pad_id = padding_id(tokenizer)

        # The evaluation's reward and prompts are checked now, so that a bad --reward or a prompt too long for
        # the context fails before training rather than after it.
        self.eval_reward = make_reward(config.reward) if config.reward is not None else None
        self.eval_prompts = evaluation_prompts(config.eval_config(), tokenizer) if config.reward is not None else []
        longest = max((len(p) for p in self.eval_prompts), default=0)
        if longest + config.sampling.max_new_tokens > self.bridge.cfg.n_ctx:
            raise ValueError(f"Evaluation prompts of up to {longest} tokens + max_new_tokens ({config.sampling.max_new_tokens}) "
                             f"exceed the model's context of {self.bridge.cfg.n_ctx}: use a shorter --prompt or fewer "
                             "--max-new-tokens.")
        self.tokens = tokenize_pairs(tokenizer, self.pairs, config.prepend_bos, self.bridge.cfg.n_ctx)
        self.train_indices, self.heldout_indices = split_heldout(self.pairs, config.heldout_fraction, config.seed)

        self.ref_chosen_logps, self.ref_rejected_logps = self.reference_logprobs()

        self.steps_per_epoch = math.ceil(len(self.train_indices) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({config.warmup_steps}) must be less than the number of optimiser steps "
                f"({self.total_steps} = {config.epochs} epochs × {self.steps_per_epoch} batches of {config.batch_size} "
                f"pairs); lower --warmup-steps or train longer."
            )
        # bridge_parameters: each storage once (no fused qkv alias).
        self.optimizer = torch.optim.AdamW(bridge_parameters(self.bridge), lr=config.lr, weight_decay=config.weight_decay)
        self.learner = distributed.wrap_ddp(self.bridge, bridge_parameters(self.bridge))
        """The bridge the training passes run through: itself, or in DDP (data-parallel)."""
        distributed.check_divisible(config.batch_size, "batch_size", "--batch-size")
        last = len(self.train_indices) % config.batch_size or config.batch_size
        if min(last, config.batch_size) < distributed.world_size():
            raise ValueError(f"The last batch of an epoch has {last} pairs, fewer than the {distributed.world_size()} "
                             "processes: every rank needs at least one. Change --batch-size or --max-pairs.")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_decay_lambda(self.total_steps, config.warmup_steps, config.final_lr_scale))
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        """Every metrics row so far: one per step (type \"step\"), one per epoch (type \"epoch\")."""
        self.pending: list[list[int]] = []
        """The batches of the current epoch not yet stepped on (drawn at the epoch's first step)."""
        self.elapsed_seconds = 0.0

    @torch.no_grad()
    def reference_logprobs(self) -> tuple[Float[Tensor, "pairs"], Float[Tensor, "pairs"]]:
        """log π_ref(y_w|x) and log π_ref(y_l|x) of every pair [N] each: computed once, before training.

        The reference never changes, so DPO needs its log-probs only once; training then runs the policy alone.
        """
        chunk = max(1, self.config.eval_batch_size // 2)  # a batch of b pairs is 2b sequences
        chosen, rejected = [], []
        for start in range(0, len(self.tokens), chunk):
            indices = list(range(start, min(start + chunk, len(self.tokens))))
            logps = sequence_logprobs(self.reference, self.tokens.batch(indices, self.pad_id)).cpu()
            chosen.append(logps[: len(indices)])
            rejected.append(logps[len(indices):])
        return torch.cat(chosen), torch.cat(rejected)

    def policy_logprobs(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """log π_θ(y_w|x), log π_θ(y_l|x) [b] each for pairs ``indices``: one forward pass of 2b rows (grad if enabled)."""
        logps = sequence_logprobs(self.learner, self.tokens.batch(indices, self.pad_id))
        return logps[: len(indices)], logps[len(indices):]

    def compute_loss(self, indices: list[int]) -> tuple[DPOLossOutput, Tensor, Tensor]:
        """``dpo_loss`` of pairs ``indices`` (the policy's log-probs now against the stored reference ones), and the
        policy's log π_θ(y_w|x), log π_θ(y_l|x) [b]."""
        config = self.config
        chosen, rejected = self.policy_logprobs(indices)
        index = torch.tensor(indices, dtype=torch.long)
        device = chosen.device
        out = dpo_loss(chosen, rejected, self.ref_chosen_logps[index].to(device), self.ref_rejected_logps[index].to(device),
                       beta=config.beta, loss=config.loss, divergence=config.divergence, alpha=config.alpha)
        return out, chosen, rejected

    def train_step(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        """One AdamW step on pairs ``indices``; returns named tensors (per-pair ones [b], the rest 0-d).

        loss, losses, chosen_rewards, rejected_rewards, margin, f_margin, accuracy (see ``DPOLossOutput``),
        policy_chosen_logps, policy_rejected_logps [b], grad_norm (before clipping), lr (of this step).
        """

        lr = self.optimizer.param_groups[0]["lr"]
        indices = [int(i) for i in indices]
        # Data-parallel: this rank's slice of the batch (nearly equal slices); its loss is its share of the batch mean.
        W = distributed.world_size()
        local = indices[distributed.rank_slice(len(indices))]
        with distributed.shared_failures(f"DPO step {self.step + 1}"):
            out, chosen, rejected = self.compute_loss(local)
            check_finite("DPO loss", out.loss, NONFINITE_HINT)
        loss = distributed.share(out.loss, len(local), len(indices)) if W > 1 else out.loss
        grad_norm = clipped_step(self.optimizer, loss, self.config.max_grad_norm, NONFINITE_HINT)
        self.scheduler.step()
        self.step += 1
        per_pair = {"losses": out.losses.detach(), "chosen_rewards": out.chosen_rewards,
                    "rejected_rewards": out.rejected_rewards, "margin": out.margin, "f_margin": out.f_margin,
                    "policy_chosen_logps": chosen.detach(), "policy_rejected_logps": rejected.detach()}
        accuracy = out.accuracy
        if W > 1:  # the whole batch's values, in the batch's order (rank 0's slice first)
            pieces = distributed.all_gather_objects({k: v.cpu() for k, v in per_pair.items()})
            per_pair = {k: torch.cat([piece[k] for piece in pieces]).to(out.loss.device) for k in per_pair}
            accuracy = distributed.all_reduce_sum(out.accuracy * len(local)) / len(indices)
        return {"loss": per_pair["losses"].mean() if W > 1 else out.loss.detach(), **per_pair, "accuracy": accuracy,
                "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr)}

    def epoch_batches(self) -> list[list[int]]:
        """The training pairs in a fresh seeded shuffle, cut into batches of ``batch_size`` (the last may be smaller)."""
        order = torch.randperm(len(self.train_indices), generator=self.generator).tolist()
        shuffled = [self.train_indices[i] for i in order]
        size = self.config.batch_size
        return [shuffled[i: i + size] for i in range(0, len(shuffled), size)]

    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float] | None:
        """Loss, pair accuracy (u_w > u_l) and reward margin of the current policy on the held-out pairs; None if none."""
        if not self.heldout_indices:
            return None
        chunk = max(1, self.config.eval_batch_size // 2)
        outs = [self.compute_loss(self.heldout_indices[i: i + chunk])[0] for i in range(0, len(self.heldout_indices), chunk)]
        losses = torch.cat([o.losses for o in outs])
        accuracy = sum(o.accuracy.item() * len(o.losses) for o in outs) / len(losses)
        margin = torch.cat([o.margin for o in outs])
        return {"heldout/loss": losses.mean().item(), "heldout/accuracy": accuracy, "heldout/margin": margin.mean().item()}

    # ------------------------------------------------------------------ the run loop's interface (run.py)
    kind, title, unit = "dpo", "DPO", "step"
    progress_text = "loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.2f}"
    completed = property(lambda self: self.step)
    total = property(lambda self: self.total_steps)

    def train(self, console=None, stop_after: int | None = None) -> dict:
        """All steps left with a progress bar, metrics.jsonl (a row per step and per epoch, with the held-out pair
        accuracy), checkpoints, Ctrl-C/SIGTERM stops, W&B, --eval-every, then the evaluation and summary
        (``run.run_loop``). ``stop_after=k`` stops after step k as an interrupted run would."""
        return run_loop(self, console or Console(quiet=not distributed.is_main()), stop_after)

    def begin(self) -> None:
        config = self.config
        if distributed.is_main() and self.step == 0:
            alpha = f", α={config.alpha}" if config.divergence == "alpha" else ""
            Console().print(f"DPO ({config.loss}, {config.divergence}{alpha}, β={config.beta}): {len(self.train_indices)} "
                            f"training pairs, {len(self.heldout_indices)} held out, {self.total_steps} steps")

    def run_unit(self) -> tuple[list[dict], list[dict]]:
        """One optimiser step: its row; after an epoch's last step, also the epoch's row (mean training loss and
        accuracy of its steps, held-out loss, accuracy and margin). An epoch's batches are drawn at its first step."""
        if not self.pending:
            self.pending = self.epoch_batches()
        terms = self.train_step(self.pending.pop(0))
        rows = [{"type": "step", "step": self.step, "epoch": self.epoch, **step_metrics(terms)}]
        if not self.pending:
            self.epoch += 1
            steps = [r for r in self.history + rows if r["type"] == "step" and r["epoch"] == self.epoch - 1]
            rows.append({"type": "epoch", "step": self.step, "epoch": self.epoch,
                         "train/loss": sum(r["loss"] for r in steps) / len(steps),
                         "train/accuracy": sum(r["rewards/accuracy"] for r in steps) / len(steps),
                         **(self.heldout_metrics() or {})})
        return rows, []

    def progress_fields(self, rows: list[dict] | None) -> dict[str, float]:
        if not rows:
            return {"loss": float("nan"), "acc": float("nan")}
        return {"loss": rows[0]["loss"], "acc": rows[0]["rewards/accuracy"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """--eval-every: the policy on the held-out prompts with the true reward (``eval/*``; seed + 1, its own
        generator: training is untouched)."""
        if self.eval_reward is None:
            return {}
        clock = time.perf_counter()
        sampler = ModelSampler("dpo", self.bridge, self.reference, self.config.sampling)
        result = evaluate(sampler, self.eval_prompts, self.eval_reward, seed=self.config.seed + 1,
                          batch_size=self.config.eval_batch_size)
        metrics = {f"eval/{key}": result.metrics[key] for key in EVAL_KEYS if result.metrics.get(key) is not None}
        return {**metrics, "time/eval": time.perf_counter() - clock}

    def save_checkpoint(self, directory: Path) -> Path:
        """The policy in save_pretrained layout (safetensors) and ``resume_state()``, written atomically
        (``outputs.atomic_dir``): a model directory (``--model DIR``) that also continues the run (``--resume``)."""
        config = self.config
        meta = {"kind": "dpo", "step": self.step, "epochs": self.epoch, "base_model": config.model, "loss": config.loss,
                "divergence": config.divergence, "alpha": config.alpha, "beta": config.beta}
        state = dpo_resume_state(self)
        with distributed.shared_failures(f"DPO step {self.step}, writing the checkpoint"):
            if distributed.is_main():
                with atomic_dir(directory) as staging:
                    save_model_dir(self.bridge, staging, meta=meta)
                    write_resume_state(staging, state)
        return Path(directory)

    @classmethod
    def resume(cls, config: DPOConfig, pairs: list[PreferencePair] | None = None) -> DPOTrainer:
        """A trainer that continues the run whose checkpoint is ``config.resume`` exactly where it stopped
        (``resume_dpo``)."""
        return resume_dpo(cls, config, pairs)

    def evaluate_policy(self) -> list:
        """The reference and the trained policy on the same held-out prompts with the true reward: two ``EvalResult``s."""
        config = self.config
        results = []
        for name, bridge in (("reference", self.reference), ("dpo", self.bridge)):
            sampler = ModelSampler(name, bridge, self.reference, config.sampling)
            results.append(evaluate(sampler, self.eval_prompts, self.eval_reward, seed=config.seed,
                                    batch_size=config.eval_batch_size))
        return results

    def summary(self) -> dict:
        """summary.json: the loss settings, pair counts, the last 5 steps' loss, accuracy and margin, the last epoch's
        held-out accuracy and margin (the evaluation is added by ``finish``)."""
        config = self.config
        steps = [r for r in self.history if r["type"] == "step"]
        epochs = [r for r in self.history if r["type"] == "epoch"]
        last = steps[-min(5, len(steps)):]
        return {
            "loss": config.loss, "divergence": config.divergence, "alpha": config.alpha, "beta": config.beta,
            "n_pairs": len(self.pairs), "n_train_pairs": len(self.train_indices), "n_heldout_pairs": len(self.heldout_indices),
            "n_duplicates_dropped": self.n_duplicates,
            "steps": self.step, "epochs": self.epoch,
            "loss_final": sum(r["loss"] for r in last) / len(last),
            "accuracy_final": sum(r["rewards/accuracy"] for r in last) / len(last),
            "margin_final": sum(r["rewards/margin"] for r in last) / len(last),
            "heldout_accuracy": epochs[-1].get("heldout/accuracy") if epochs else None,
            "heldout_margin": epochs[-1].get("heldout/margin") if epochs else None,
            "seconds_training": self.elapsed_seconds,
        }

    def finish(self, console, outputs, start) -> dict:
        """The curves, the evaluation of the reference and the policy on held-out prompts, summary.json."""
        config, summary, out = self.config, self.summary(), outputs.out
        clock = time.time()
        main = distributed.is_main()
        if out is not None and main:
            plot_dpo_curves([r for r in self.history if r["type"] == "step"],
                            [r for r in self.history if r["type"] == "epoch"], out / "curves.png")
        if config.reward is not None and main:
            with console.status(f"evaluating the reference and the DPO policy on {config.n_eval_prompts} held-out prompts"):
                results = self.evaluate_policy()
            if config.table_rows:
                print_sample_table(console, results, config.table_rows)
            print_metrics_table(console, [r.metrics for r in results], title=f"DPO ({config.divergence}) vs reference, "
                                                                              f"reward {config.reward}")
            reference_row, dpo_row = (r.metrics for r in results)
            summary["evaluation"] = {"reward": config.reward, "n_prompts": config.n_eval_prompts,
                                     "reference": reference_row, "dpo": dpo_row}
            for key in EVAL_KEYS:
                summary[key] = dpo_row[key]
                summary[f"reference_{key}"] = reference_row[key]
        summary["seconds"] = self.elapsed_seconds + time.time() - clock
        outputs.finish(summary)
        if out is not None:
            console.print(f"outputs in {out} (checkpoint: {out / 'checkpoint'})")
        heldout = summary["heldout_accuracy"]
        console.print(
            f"DPO: loss {summary['loss_final']:.3f}, train accuracy {summary['accuracy_final']:.2f}"
            + (f", held-out accuracy {heldout:.2f}" if heldout is not None else "")
            + (f", reward {summary['reference_reward_mean']:+.3f} → {summary['reward_mean']:+.3f}, KL {summary['kl']:.2f}"
               if "reward_mean" in summary else "")
            + f" ({summary['seconds']:.0f} s)"
        )
        return summary


def dpo_resume_state(trainer: DPOTrainer) -> dict:
    """Everything the next step depends on: the optimiser and schedule, the shuffle generator, the current epoch's
    remaining batches, the step and epoch counters and the history."""
    return {"format": FORMAT_VERSION, "kind": trainer.kind, "phase": trainer.step, "epoch": trainer.epoch,
            "config": to_jsonable(trainer.config), "reference": {"source": trainer.reference_source},
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "rng": {"generator": trainer.generator.get_state()}, "pending": trainer.pending,
            "history": trainer.history, "elapsed_seconds": trainer.elapsed_seconds}


def resume_dpo(cls, config: DPOConfig, pairs: list[PreferencePair] | None = None) -> DPOTrainer:
    """A trainer that continues the run whose checkpoint is ``config.resume`` exactly where it stopped: the trained
    policy from the checkpoint, the reference (and its log-probs) from the run's starting model."""
    distributed.init_from_env(config.device)
    checkpoint = find_checkpoint(config.resume)
    state = read_resume_state(checkpoint)
    if state["kind"] != cls.kind:
        raise ValueError(f"{checkpoint} is a {state['kind']} checkpoint; resume it with "
                         f"`rlhf-scratch {state['kind']} --resume {config.resume}`.")
    config = resumed_config(config, state["config"], checkpoint)
    source = state["reference"]["source"]
    if source is None:
        raise ValueError("This run started from an in-memory model (bridge=), so the checkpoint cannot reload its "
                         "reference; start a new run from the checkpoint's weights with --model.")
    device = distributed.rank_device(config.device)
    trainer = cls(dataclasses.replace(config, resume=None), pairs=pairs,
                  bridge=load_bridge(checkpoint, device=device), reference=load_bridge(source, device=device))
    trainer.config = config
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.generator.set_state(state["rng"]["generator"])
    trainer.step, trainer.epoch, trainer.pending = state["phase"], state["epoch"], [list(b) for b in state["pending"]]
    trainer.history, trainer.elapsed_seconds = list(state["history"]), state["elapsed_seconds"]
    return trainer


EVAL_KEYS = ("reward_mean", "kl", "token_entropy", "distinct_1", "distinct_2", "length", "eos_rate")
"""Evaluation metrics copied to the top of summary.json (the trained policy's; ``reference_*`` the reference's)."""


def step_metrics(terms: dict[str, Tensor]) -> dict[str, float]:
    """The fixed metric names of one step (TRL's names, singular): means over the step's pairs."""
    return {
        "loss": terms["loss"].item(),
        "rewards/chosen": terms["chosen_rewards"].mean().item(),
        "rewards/rejected": terms["rejected_rewards"].mean().item(),
        "rewards/accuracy": terms["accuracy"].item(),
        "rewards/margin": terms["margin"].mean().item(),
        "rewards/f_margin": terms["f_margin"].mean().item(),
        "logps/chosen": terms["policy_chosen_logps"].mean().item(),
        "logps/rejected": terms["policy_rejected_logps"].mean().item(),
        "grad_norm": terms["grad_norm"].item(),
        "lr": terms["lr"].item(),
    }


def plot_dpo_curves(history: list[dict], epoch_rows: list[dict], path: Path) -> Path:
    """``curves.png``: loss, pair accuracy (train per step, held-out per epoch) and implicit rewards per step."""

    plt = pyplot()

    steps = [row["step"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(steps, [row["loss"] for row in history])
    axes[0].set_title("loss")
    axes[1].plot(steps, [row["rewards/accuracy"] for row in history], label="train batch")
    heldout = [row for row in epoch_rows if "heldout/accuracy" in row]
    if heldout:
        axes[1].plot([r["step"] for r in heldout], [r["heldout/accuracy"] for r in heldout], "o-", label="held-out pairs")
    axes[1].set_title("pair accuracy (u_w > u_l)")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [row["rewards/chosen"] for row in history], label="chosen β·u_w")
    axes[2].plot(steps, [row["rewards/rejected"] for row in history], label="rejected β·u_l")
    axes[2].plot(steps, [row["rewards/margin"] for row in history], label="margin")
    axes[2].set_title("implicit rewards")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_dpo(config: DPOConfig) -> dict:
    """The command: a new run, or the continuation of ``config.resume``."""
    trainer = DPOTrainer.resume(config) if config.resume is not None else DPOTrainer(config)
    return trainer.train()
