"""What every trainer of a policy by sampling shares (PPO, REINFORCE): the rollout record and the loop.

Their shared config is ``config.PolicyTrainingConfig``; the forward-hook check is ``models.check_fwd_hooks``.

One phase, as ``PolicyTrainer.run_phase`` calls it (each a plain call returning what the next needs)::

    rollout = sample_and_score()            ScoredRollout: the generation, log-probs, values, KL, rewards, stats
    memory, stats = build_memory(rollout)   ReplayMemory with advantages and returns   (the subclass: PPO, REINFORCE)
    breakdown = learning_phase(memory)      one optimiser step per minibatch           (losses: the subclass)
                                            then end_phase: scheduler step, KL controller update, phase += 1
    metrics = {rollout.stats, stats, learning_metrics(breakdown), lr, timings}  ─► PhaseRecord

``train()`` runs the phases left with a progress bar and writes the outputs: ``open_outputs``, then
``run_phase`` / ``log_phase`` / ``maybe_checkpoint`` per phase, then ``finish`` (checkpoint, sample
table, plots, summary). A run continues from its checkpoint through ``Trainer.resume(config)``.

A subclass supplies ``build_memory``, ``minibatches``, ``compute_losses`` and ``learning_metrics``
(abstract methods), and may keep state of its own in checkpoints through ``init_algorithm_state`` /
``algorithm_state`` / ``load_algorithm_state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from rlhf_scratch import distributed, invariants
from rlhf_scratch.checkpoint import (
    FORMAT_VERSION,
    find_checkpoint,
    read_resume_state,
    resumed_config,
    same_fingerprint,
    weights_fingerprint,
    write_resume_state,
)
from rlhf_scratch.config import PolicyTrainingConfig, TaskConfig
from rlhf_scratch.data import fixed_prefix_prompts, load_texts, prompts_from_texts
from rlhf_scratch.evaluation import EvalConfig, ModelSampler, evaluate, evaluation_prompts, plot_curves, print_before_after
from rlhf_scratch.interrupts import StopRequest, TrainingInterrupted
from rlhf_scratch.kl_control import AdaptiveKLController, FixedKLController
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.models import (
    VALUE_HEAD_FILE,
    PolicyOutput,
    PolicyWithValueHead,
    check_fwd_hooks,
    load_bridge,
    load_policy,
    make_reference,
    save_model_dir,
)
from rlhf_scratch.objectives import (
    calc_kl_penalty,
    entropy_from_logprobs,
    gather_taken,
    generated_logits,
    kl_exact,
    kl_exact_from_logprobs,
    kl_k1,
    kl_k3,
    masked_mean,
)
from rlhf_scratch.optimization import clip_and_step, fused_where_contiguous, regroup_optimizer_state
from rlhf_scratch.outputs import append_jsonl, atomic_dir, filter_jsonl, to_jsonable, write_json
from rlhf_scratch.plain_forward import reference_logits
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import Generation, encode, generate, padding_id
from rlhf_scratch.schedule import warmup_decay_lambda

SNAPSHOTS_DIR = "snapshots"
"""Where ``--snapshot-every`` writes, inside ``--out``."""


@dataclass(eq=False, repr=False)
class ScoredRollout:
    """One sampled batch, read by the policy and the reference (no grad) and scored by the reward.

    generation      Generation        the sampled batch (prompts, responses, masks, decoded texts)
    sequences       Int   [B, S]      prompt (left-padded to P) then the G generated tokens
    attention_mask  Int   [B, S]      1 on real tokens
    gen_mask        Bool  [B, G]      True on real generated tokens (through the first EOS)
    logprobs        Float [B, G]      log π(token) at the sampling temperature
    values          Float [B, G]      value head at each state (unused by trainers without a critic)
    ref_logprobs    Float [B, G]      log π_ref(token) at the sampling temperature
    ref_logits_gen  Float [B, G, V]   reference logits at the generated positions (temperature-scaled)
    kl_per_token    Float [B, G]      KL_t with the configured estimator, 0 on padding
    sequence_kl     Float [B]         Σ_t KL_t (the configured estimator): logged as objective/kl, read by the KL controller
    rewards         Float [B]         the task reward of each response
    stats           dict              reward, KL, entropy, length, EOS rate and timings, by metric name
    exact_sequence_kl Float [B]       Σ_t of the exact KL_t (objective/kl_exact), or None: computed only with
                                      kl_estimator="exact" or log_exact_kl (a vocabulary-wide pass)
    """

    generation: Generation
    sequences: Tensor
    attention_mask: Tensor
    gen_mask: Tensor
    logprobs: Tensor
    values: Tensor
    ref_logprobs: Tensor
    ref_logits_gen: Tensor
    kl_per_token: Tensor
    sequence_kl: Tensor
    rewards: Tensor
    stats: dict[str, float]
    exact_sequence_kl: Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.generation.prompt_len

    def to_memory(self, values: Tensor, advantages: Tensor, returns: Tensor, keep_ref_logits: bool) -> ReplayMemory:
        """The replay memory a trainer learns from: this rollout plus its values, advantages and returns.

        ``ref_logits_gen`` [B, G, V] is kept only when ``keep_ref_logits`` (an exact KL loss term needs it).
        """
        return ReplayMemory(
            sequences=self.sequences, attention_mask=self.attention_mask, gen_mask=self.gen_mask,
            logprobs=self.logprobs, ref_logprobs=self.ref_logprobs, values=values, advantages=advantages,
            returns=returns, rewards=self.rewards, prompt_len=self.prompt_len,
            ref_logits_gen=self.ref_logits_gen if keep_ref_logits else None, sequence_kl=self.sequence_kl,
        )

    def __repr__(self) -> str:
        return f"ScoredRollout({self.generation!r}, mean reward {self.rewards.mean().item():+.3f})"


def _pad_columns(x: Tensor, left: int, right: int, value) -> Tensor:
    """``x`` [B, n, ...] with ``left`` columns of ``value`` before dim 1 and ``right`` after it."""
    if left == 0 and right == 0:
        return x
    shape = list(x.shape)
    parts = []
    if left:
        parts.append(x.new_full([shape[0], left, *shape[2:]], value))
    parts.append(x)
    if right:
        parts.append(x.new_full([shape[0], right, *shape[2:]], value))
    return torch.cat(parts, dim=1)


def concat_rollouts(pieces: list[dict], pad_id: int) -> dict:
    """The ranks' rollouts (``PolicyTrainer.gather_rollout``'s pieces) as one batch, rank 0's rows first.

    Rank r's rows have its own prompt length P_r and generated length G_r; the batch takes P = max P_r and
    G = max G_r: prompts are left-padded (``pad_id``, attention 0), generated columns right-padded (``pad_id``,
    mask False, 0 in every float field), exactly as ``sampling.generate`` pads within one batch.
    """
    P = max(piece["prompt_len"] for piece in pieces)
    G = max(piece["gen_mask"].shape[1] for piece in pieces)
    joined: dict = {"prompt_len": P}
    for name in pieces[0]:
        values = [piece[name] for piece in pieces]
        if name == "prompt_len":
            continue
        if values[0] is None:  # a field that does not travel (the reference logits, unless kept)
            joined[name] = None
        elif isinstance(values[0], list):
            joined[name] = [item for value in values for item in value]
        elif name in ("sequences", "attention_mask"):
            fill = pad_id if name == "sequences" else 0
            joined[name] = torch.cat([
                torch.cat([_pad_columns(value[:, : piece["prompt_len"]], P - piece["prompt_len"], 0, fill),
                           _pad_columns(value[:, piece["prompt_len"]:], 0, G - piece["gen_mask"].shape[1], fill)], dim=1)
                for value, piece in zip(values, pieces)
            ])
        elif values[0].ndim == 1:
            joined[name] = torch.cat(values)
        else:  # [B, G_r] or [B, G_r, V]: right-pad the generated columns
            fill = False if values[0].dtype == torch.bool else 0
            joined[name] = torch.cat([_pad_columns(value, 0, G - value.shape[1], fill) for value in values])
    return joined


@dataclass(eq=False)
class PhaseRecord:
    """What one phase produced: the scored rollout, the replay memory it learned from, one loss
    breakdown per minibatch (in order), and the metrics row logged for it."""

    rollout: ScoredRollout
    memory: ReplayMemory
    breakdown: list[dict[str, float]]
    metrics: dict


class PolicyTrainer(ABC):
    """The policy, a frozen reference, the reward, the prompt pool, the optimiser, the learning-rate
    schedule and the KL controller, and the phase loop over them (module docstring).

    ``fwd_hooks`` — TransformerLens hooks ``(name, fn)`` — are applied to every pass of the
    policy: generation, the rollout's forward pass and the learning forward pass; never to the
    reference. They live only for the duration of each pass (nothing stays attached to the bridge).
    ``reference`` (a bridge) replaces the default reference (a frozen copy of the starting policy,
    or ``config.reference``). To continue a run, use ``Trainer.resume(config)``.

    Data-parallel (launched by ``torchrun``, see ``rlhf_scratch.distributed``): each rank samples
    ``batch_size / W`` episodes with its own generator and prompts, ``sample_and_score`` gathers them into
    the global batch on every rank (so ``build_memory``, the statistics and the KL controller see what
    one process would see), and each rank learns on its slice of every global minibatch through
    ``self.learner`` (the policy in ``DistributedDataParallel``). Only rank 0 prints and writes outputs.
    """

    title = "policy"
    """Name in progress bars and messages."""
    kind = "policy"
    """Written to the checkpoint's metadata."""
    saves_value_head = False
    """Whether the checkpoint includes the value head."""

    def __init__(self, config: PolicyTrainingConfig, policy: PolicyWithValueHead | None = None, reward=None,
                 fwd_hooks: list | tuple = (), reference=None):
        if config.resume is not None:
            raise ValueError(f"config.resume is set: continue a run with {type(self).__name__}.resume(config).")
        distributed.init_from_env(config.device)
        if distributed.is_distributed():
            config = dataclasses.replace(config, device=distributed.rank_device(config.device))
        self.check_batch_split(config)
        self.config = config
        # Sampling (generator, prompts) is per rank, seeded from (seed, rank); the minibatch shuffle and
        # model initialisation (torch's global RNG: a new value head) are the same on every rank. In one
        # process all are config.seed, and the sampling generator also shuffles, as always.
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(config.seed))
        self.shuffle_generator = (torch.Generator().manual_seed(config.seed) if distributed.is_distributed()
                                  else self.generator)
        self.prompt_rng = random.Random(distributed.rank_seed(config.seed))
        self.policy = (policy or load_policy(config.model, device=config.device)).to(config.device)
        self.policy.eval()  # dropout off: log-probs must be reproducible between passes
        if reference is not None:
            reference_bridge, self.reference_source = reference, None
        elif config.reference:
            reference_bridge, self.reference_source = load_bridge(config.reference, device=config.device), config.reference
        else:  # a copy of the starting policy; reloadable by name only if it was loaded by name
            reference_bridge, self.reference_source = self.policy.bridge, (config.model if policy is None else None)
        self.reference = make_reference(reference_bridge)
        self.policy.plain_forward = config.plain_forward
        self.reference_fingerprint = weights_fingerprint(self.reference)
        self.reward = reward or make_reward(config.reward)
        self.fwd_hooks = check_fwd_hooks(self.policy.bridge, fwd_hooks)
        self.prompt_pool = self._build_prompt_pool()

        self.optimizer = torch.optim.AdamW(fused_where_contiguous(self.param_groups(), config.device),
                                           weight_decay=config.weight_decay)
        self.learner = distributed.wrap_ddp(self.policy, [p for group in self.optimizer.param_groups for p in group["params"]])
        """The policy the learning passes run through: ``self.policy`` itself, or wrapped in DDP (data-parallel)."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_decay_lambda(config.phases, config.effective_warmup_phases, config.final_lr_scale)
        )
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.phase = 0
        """Phases completed (the next phase is ``phase + 1``); checkpoints record it."""
        self.history: list[dict] = []
        """The metrics of every completed phase logged by ``train`` (restored on resume)."""
        self.table_prompts: list[list[int]] | None = None
        """The prompts of the before/after sample table, drawn once per run."""
        self.elapsed_seconds = 0.0
        self.eval_prompt_ids: list[list[int]] | None = None
        """The held-out prompts of ``--eval-every``, drawn at the first evaluation."""
        self.init_algorithm_state()

    def check_batch_split(self, config: PolicyTrainingConfig) -> None:
        """The global batch and minibatch must split evenly over the ranks, and each rank's share of a
        minibatch over the micro-batches (``grad_accum_steps``)."""
        distributed.check_divisible(config.batch_size, "batch_size", "--batch-size")
        minibatch = self.global_minibatch_size(config)
        distributed.check_divisible(minibatch, "minibatch_size", "--minibatch-size")
        local = minibatch // distributed.world_size()
        if local % config.grad_accum_steps != 0:
            raise ValueError(f"Each rank's share of a minibatch ({local} = {minibatch} / {distributed.world_size()} "
                             f"processes) must be divisible by grad_accum_steps ({config.grad_accum_steps}).")

    def global_minibatch_size(self, config: PolicyTrainingConfig) -> int:
        """Episodes per optimiser step (over every rank): the subclass's minibatch size, else the whole batch."""
        return getattr(config, "minibatch_size", None) or config.batch_size

    # ------------------------------------------------------------------ resuming a run
    @classmethod
    def resume(cls, config: PolicyTrainingConfig, reward=None, fwd_hooks: list | tuple = (), reference=None):
        """A trainer that continues the run whose checkpoint is ``config.resume`` exactly where it stopped.

        Reads the checkpoint, merges ``config`` into the run's saved config (``checkpoint.resumed_config``:
        flags that change what is computed must agree), loads the trained policy, reloads the run's
        reference (``reference`` if given) and checks it is the one the run started with (weights
        fingerprint), then restores the optimiser, schedule, KL controller, RNGs and history.
        """
        distributed.init_from_env(config.device)  # the world size decides whether the checkpoint fits
        checkpoint = find_checkpoint(config.resume)
        state = read_resume_state(checkpoint)
        if state["kind"] != cls.kind:
            raise ValueError(f"{checkpoint} is a {state['kind']} checkpoint; resume it with "
                             f"`rlhf-scratch {state['kind']} --resume {config.resume}`.")
        config = resumed_config(config, state["config"], checkpoint)
        saved_world = state["rng"].get("world_size", 1)
        if saved_world != distributed.world_size():
            raise ValueError(
                f"{checkpoint} was written by a run on {saved_world} process(es) and this one has "
                f"{distributed.world_size()}: each rank's sampling stream is in the checkpoint, so the run continues "
                f"exactly only on {saved_world}. Resume with `torchrun --nproc-per-node {saved_world}` (or plain "
                "`python -m rlhf_scratch` for 1), or start a new run from the checkpoint's weights with --model."
            )
        if not isinstance(state.get("phase"), int) or not 0 <= state["phase"] <= config.phases:
            raise ValueError(f"{checkpoint}: its resume state says phase {state.get('phase')!r} of {config.phases}; the "
                             "file is damaged. Resume from an intact copy of the run (checkpoint.old).")
        if cls.saves_value_head and not (checkpoint / VALUE_HEAD_FILE).is_file():
            raise ValueError(f"{checkpoint} has no {VALUE_HEAD_FILE}: a {cls.kind} checkpoint needs its value head to "
                             "continue exactly. Resume from an intact copy of the run (checkpoint.old).")
        source = state["reference"]["source"]
        if reference is None:
            if source is None:
                raise ValueError(
                    "This run's reference was an in-memory model (the trainer was given policy= or reference=), so "
                    "the checkpoint cannot reload it: pass reference=<the starting model's bridge> to resume()."
                )
            reference = load_bridge(source, device=config.device)
        trainer = cls(dataclasses.replace(config, resume=None), policy=load_policy(checkpoint, device=config.device),
                      reward=reward, fwd_hooks=fwd_hooks, reference=reference)
        if not same_fingerprint(trainer.reference_fingerprint, state["reference"]["fingerprint"]):
            raise ValueError(
                f"The reference model ({source or 'passed in'}) is not the one this run started with (its weights "
                "differ). A resumed run must keep the original reference: pass the run's starting model."
            )
        trainer.config, trainer.reference_source = config, source
        trainer.load_resume_state(state)
        return trainer

    # ------------------------------------------------------------------ state kept in checkpoints
    def init_algorithm_state(self) -> None:
        """Create the subclass's own state (PPO: reward statistics; REINFORCE: the baseline)."""

    def algorithm_state(self) -> dict:
        """The subclass's own state, for the checkpoint (JSON values and tensors)."""
        return {}

    def load_algorithm_state(self, state: dict) -> None:
        """Restore ``algorithm_state()``."""

    def resume_state(self) -> dict:
        """Everything beyond the weights that the next phase depends on, for ``save_checkpoint``.

        Data-parallel: ``rng`` holds every rank's streams (``ranks``, gathered: a collective, so every rank
        calls this), the shared shuffle generator and the world size.
        """
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "python": self.prompt_rng.getstate()}
        if torch.cuda.is_available() and str(self.config.device).startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if distributed.is_distributed():
            cpu = {k: (v.cpu() if isinstance(v, Tensor) else [t.cpu() for t in v] if k == "cuda" else v) for k, v in rng.items()}
            rng = {"world_size": distributed.world_size(), "ranks": distributed.all_gather_objects(cpu),
                   "shuffle": self.shuffle_generator.get_state()}
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "phase": self.phase,
            "config": to_jsonable(self.config),
            "reference": {"source": self.reference_source, "fingerprint": self.reference_fingerprint},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "algorithm": self.algorithm_state(),
            "rng": rng,
            "table_prompts": self.table_prompts,
            "history": self.history,
            "elapsed_seconds": self.elapsed_seconds,
        }

    def load_resume_state(self, state: dict) -> None:
        """Restore ``resume_state()`` into this freshly built trainer (same model and config)."""
        saved, scheduler = state["optimizer"], state["scheduler"]
        if len(saved["param_groups"]) != len(self.optimizer.param_groups):  # written before the fused/plain split
            saved = regroup_optimizer_state(saved, self.param_groups(), self.optimizer)
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
        self.scheduler.load_state_dict(scheduler)
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.load_algorithm_state(state["algorithm"])
        self.phase, self.history = state["phase"], list(state["history"])
        self.table_prompts, self.elapsed_seconds = state["table_prompts"], state["elapsed_seconds"]
        rng = state["rng"]
        if "ranks" in rng:  # a data-parallel run (resume() checked the world size)
            self.shuffle_generator.set_state(rng["shuffle"])
            rng = rng["ranks"][distributed.rank()]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.prompt_rng.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: the trunk at ``lr``."""
        return [{"params": self.policy.trunk_parameters(), "lr": self.config.lr}]

    # ------------------------------------------------------------------ prompts
    def encode_text(self, text: str) -> list[int]:
        return encode(self.policy.tokenizer, text, prepend_bos=self.config.prepend_bos)

    def _build_prompt_pool(self) -> list[list[int]]:
        """Token-id prompts to draw each phase's batch from."""
        if self.config.prompt is not None:
            return fixed_prefix_prompts(self.config.prompt, self.encode_text, 1)
        texts = load_texts(self.config.data, column=self.config.column, seed=self.config.seed)
        return prompts_from_texts(
            texts, self.encode_text, n=max(len(texts), self.config.batch_size),
            min_tokens=self.config.min_prompt_tokens, max_tokens=self.config.max_prompt_tokens, seed=self.config.seed,
            decode=self.policy.tokenizer.decode,
        )

    def sample_prompts(self, n: int) -> list[list[int]]:
        return [self.prompt_pool[self.prompt_rng.randrange(len(self.prompt_pool))] for _ in range(n)]

    def rollout_prompts(self) -> list[list[int]]:
        """This rank's prompts of one phase's batch: ``batch_size / W`` draws from the pool (W processes; group
        trainers: k copies of each)."""
        return self.sample_prompts(self.config.batch_size // distributed.world_size())

    # ------------------------------------------------------------------ rollout
    def per_token_kl(self, logprobs: Tensor, ref_logprobs: Tensor, logits_gen: Tensor | None = None,
                     ref_logits_gen: Tensor | None = None) -> Tensor:
        """KL_t [B, G] with the configured estimator."""
        if self.config.kl_estimator == "exact":
            return kl_exact(logits_gen, ref_logits_gen)
        if self.config.kl_estimator == "k3":
            return kl_k3(logprobs, ref_logprobs)
        return kl_k1(logprobs, ref_logprobs)

    @property
    def keeps_ref_logits(self) -> bool:
        """Whether the replay memory keeps reference logits [B, G, V]: only for an exact KL loss term."""
        return self.config.kl_mode == "loss" and self.config.kl_estimator == "exact"

    def kl_loss_term(self, logprobs: Tensor, logits_gen: Tensor, minibatch: ReplayMemory) -> Tensor:
        """``calc_kl_penalty`` (kl_coef · masked_mean(KL_t), with grad) with kl_mode="loss", else 0;
        KL_t by the configured estimator."""
        if self.config.kl_mode != "loss":
            return torch.zeros((), device=logprobs.device)
        kl = self.per_token_kl(logprobs, minibatch.ref_logprobs, logits_gen, minibatch.ref_logits_gen)
        return calc_kl_penalty(kl, minibatch.gen_mask, self.kl_controller.value)

    def autocast(self):
        """``torch.autocast`` in ``config.dtype`` for a forward pass (nothing in float32). Its outputs are cast
        back to float32 by the caller: log-softmax, KL, losses, weights and optimiser state stay float32."""
        if self.config.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.config.device).type, dtype=getattr(torch, self.config.dtype))

    def learning_forward(self, minibatch: ReplayMemory) -> PolicyOutput:
        """The policy's logits [B, S, V] and values [B, S] on a minibatch, with grad, in float32: through
        ``self.learner`` (DDP in a data-parallel run), under ``autocast`` for ``--dtype bfloat16``."""
        with self.autocast():
            output = self.learner(minibatch.sequences, minibatch.attention_mask, fwd_hooks=self.fwd_hooks)
        return PolicyOutput(logits=output.logits.float(), values=output.values.float())

    def generated_logprobs(self, logits: Tensor, sequences: Tensor, prompt_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """A pass's logits [B, S, V] over ``sequences`` [B, S] → ``(logits_gen, logp_gen, logprobs)``: the logits that
        predict the generated tokens at the sampling temperature [B, G, V], their log-softmax [B, G, V] and the taken
        tokens' log-probs [B, G]. One vocabulary-wide log-softmax per pass serves the taken log-probs, the entropy and
        the exact KL; only the generated positions are scaled, and nothing is copied at T = 1. The rollout's policy
        and reference passes and every learning pass read their logits through it."""
        temperature = self.config.sampling.temperature
        logits_gen = generated_logits(logits, prompt_len)
        if temperature != 1:
            logits_gen = logits_gen / temperature
        logp_gen = F.log_softmax(logits_gen, dim=-1)
        return logits_gen, logp_gen, gather_taken(logp_gen, sequences[:, prompt_len:])

    def token_share(self, value: Tensor, piece: ReplayMemory) -> Tensor:
        """A mean over ``piece``'s real generated tokens → its share of the mean over the whole minibatch
        (``distributed.share``); ``value`` itself when the piece is whole (one process, no accumulation)."""
        if piece.part_of is None:
            return value
        return distributed.share(value, piece.gen_mask.sum().item(), piece.part_of.gen_mask.sum().item())

    def row_share(self, value: Tensor, piece: ReplayMemory) -> Tensor:
        """A mean over ``piece``'s rows → its share of the mean over the whole minibatch's rows."""
        if piece.part_of is None:
            return value
        return distributed.share(value, len(piece), len(piece.part_of))

    @torch.no_grad()
    def sample_and_score(self, prompts: list[list[int]] | None = None) -> ScoredRollout:
        """Sample a batch, read it with the policy and the reference, and score it; ``stats`` holds the
        rollout's metrics (reward, sequence KL, entropy, response length, EOS rate, timings).

        Data-parallel: each rank samples ``batch_size / W`` episodes (``prompts``: this rank's), then the
        rollouts are gathered (``gather_rollout``): every rank returns the same global batch, rank 0's rows
        first, with the statistics of the global batch.
        """
        with distributed.shared_failures(f"phase {self.phase + 1}, rollout"):
            rollout, entropy_sum = self.local_rollout(prompts)
        if distributed.is_distributed():
            rollout = self.gather_rollout(rollout, entropy_sum)
        return rollout

    @torch.no_grad()
    def local_rollout(self, prompts: list[list[int]] | None = None) -> tuple[ScoredRollout, Tensor]:
        """This rank's rollout (the whole one in a single process) and Σ of its per-token entropy over real tokens."""
        config = self.config
        prompts = prompts if prompts is not None else self.rollout_prompts()
        clock = time.perf_counter()
        timings = {}
        generation = generate(self.policy.bridge, prompts, config.sampling, generator=self.generator, fwd_hooks=self.fwd_hooks)
        sequences = generation.sequences.to(config.device)
        attention_mask = generation.attention_mask.to(config.device)
        gen_mask = generation.gen_mask.to(config.device)
        P = generation.prompt_len
        timings["time/generate"], clock = time.perf_counter() - clock, time.perf_counter()

        # Old policy: log-probs at the sampling temperature and values of each state. One log-softmax over the
        # generated positions [B, G, V] gives the taken log-probs, the entropy and (when asked for) the exact KL;
        # no [B, S, V] copy when T = 1. At GPT-2 size each vocabulary-wide pass costs a good part of a forward.
        with self.autocast():
            output = self.policy(sequences, attention_mask, fwd_hooks=self.fwd_hooks)
        _, logp_gen, logprobs = self.generated_logprobs(output.logits.float(), sequences, P)
        values = output.values.float()[:, P - 1 : -1]
        if config.debug:
            invariants.check_sampling_matches_rollout(generation.sampled_logprobs, logprobs, generation.gen_mask,
                                                      where=f"phase {self.phase + 1}, rollout")
        timings["time/policy_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Reference: the same tokens under the frozen starting model.
        with self.autocast():
            ref_logits = reference_logits(self.reference, sequences, attention_mask, plain=config.plain_forward).float()
        ref_logits_gen, ref_logp_gen, ref_logprobs = self.generated_logprobs(ref_logits, sequences, P)
        # The exact KL needs one more pass over [B, G, V]: only for the exact estimator or --log-exact-kl.
        exact_kl = None
        if config.kl_estimator == "exact" or config.log_exact_kl:
            exact_kl = torch.where(gen_mask, kl_exact_from_logprobs(logp_gen, ref_logp_gen), 0.0)
        kl_per_token = exact_kl if config.kl_estimator == "exact" else torch.where(
            gen_mask, self.per_token_kl(logprobs, ref_logprobs), 0.0)
        timings["time/reference_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Task reward on the decoded text.
        rewards = score_texts(self.reward, generation.texts, generation.prompts).to(config.device)
        timings["time/reward"] = time.perf_counter() - clock

        sequence_kl = kl_per_token.sum(1)  # Σ over a response's generated tokens
        exact_sequence_kl = None if exact_kl is None else exact_kl.sum(1)
        entropy = entropy_from_logprobs(logp_gen)
        stats = self.rollout_stats(rewards, sequence_kl, exact_sequence_kl, gen_mask, generation.ended_with_eos,
                                   masked_mean(entropy, gen_mask).item(), timings)
        rollout = ScoredRollout(
            generation=generation, sequences=sequences, attention_mask=attention_mask, gen_mask=gen_mask,
            logprobs=logprobs, values=values, ref_logprobs=ref_logprobs, ref_logits_gen=ref_logits_gen,
            kl_per_token=kl_per_token, sequence_kl=sequence_kl, rewards=rewards, stats=stats,
            exact_sequence_kl=exact_sequence_kl,
        )
        return rollout, torch.where(gen_mask, entropy, 0.0).sum()

    def rollout_stats(self, rewards: Tensor, sequence_kl: Tensor, exact_sequence_kl: Tensor | None, gen_mask: Tensor,
                      ended_with_eos: Tensor, entropy: float, timings: dict[str, float]) -> dict[str, float]:
        """The rollout's logged metrics (``ScoredRollout.stats``) from its tensors (the batch's, or the global batch's).

        ``objective/kl`` is the mean over responses of Σ_t KL_t by the configured estimator (what TRL logs);
        ``objective/kl_exact`` the same with the exact KL, when it was computed.
        """
        exact = {} if exact_sequence_kl is None else {"objective/kl_exact": exact_sequence_kl.mean().item()}
        return {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "objective/kl": sequence_kl.mean().item(),
            **exact,
            "objective/kl_coef": self.kl_controller.value,
            "objective/entropy": entropy,
            "response/length": gen_mask.sum(1).float().mean().item(),
            "response/eos_rate": ended_with_eos.float().mean().item(),
            **timings,
        }

    def gather_rollout(self, rollout: ScoredRollout, entropy_sum: Tensor) -> ScoredRollout:
        """Every rank's rollout joined into the global batch (``concat_rollouts``), the same on every rank.

        The reference logits [B, G, V] travel only when the memory keeps them (an exact KL loss term); otherwise
        the global rollout's ``ref_logits_gen`` is None. The entropy is Σ over ranks of the per-token entropy
        over Σ of the real tokens; the timings are this rank's.
        """
        generation = rollout.generation
        tensors = {
            "sequences": rollout.sequences, "attention_mask": rollout.attention_mask, "gen_mask": rollout.gen_mask,
            "logprobs": rollout.logprobs, "values": rollout.values, "ref_logprobs": rollout.ref_logprobs,
            "ref_logits_gen": rollout.ref_logits_gen if self.keeps_ref_logits else None,
            "kl_per_token": rollout.kl_per_token, "sequence_kl": rollout.sequence_kl, "rewards": rollout.rewards,
            "exact_sequence_kl": rollout.exact_sequence_kl,
            "ended_with_eos": generation.ended_with_eos, "sampled_logprobs": generation.sampled_logprobs,
        }
        piece = {name: None if value is None else value.detach().cpu() for name, value in tensors.items()}
        piece.update(prompt_len=rollout.prompt_len, prompts=list(generation.prompts), responses=list(generation.responses))
        joined = concat_rollouts(distributed.all_gather_objects(piece), padding_id(self.policy.tokenizer))
        device = self.config.device
        on = {name: (value.to(device) if isinstance(value, Tensor) else value) for name, value in joined.items()}
        totals = distributed.all_reduce_sum(torch.stack([entropy_sum.double(), rollout.gen_mask.sum().double()]))
        entropy = (totals[0] / totals[1].clamp(min=1)).item()
        global_generation = Generation(
            sequences=joined["sequences"], attention_mask=joined["attention_mask"], gen_mask=joined["gen_mask"],
            prompt_len=joined["prompt_len"], ended_with_eos=joined["ended_with_eos"],
            sampled_logprobs=joined["sampled_logprobs"], prompts=joined["prompts"], responses=joined["responses"],
        )
        timings = {k: v for k, v in rollout.stats.items() if k.startswith("time/")}
        stats = self.rollout_stats(on["rewards"], on["sequence_kl"], on["exact_sequence_kl"], on["gen_mask"],
                                   joined["ended_with_eos"], entropy, timings)
        return ScoredRollout(
            generation=global_generation, sequences=on["sequences"], attention_mask=on["attention_mask"],
            gen_mask=on["gen_mask"], logprobs=on["logprobs"], values=on["values"], ref_logprobs=on["ref_logprobs"],
            ref_logits_gen=on["ref_logits_gen"], kl_per_token=on["kl_per_token"], sequence_kl=on["sequence_kl"],
            rewards=on["rewards"], stats=stats, exact_sequence_kl=on["exact_sequence_kl"],
        )

    def sequence_rewards(self, rollout: ScoredRollout) -> Tensor:
        """One reward per response for the trainers without a critic:  r' = r − kl_coef · Σ_t KL_t  with
        kl_mode="reward" (the KL to the reference as a cost), else r (the KL is then a loss term).      [B]"""
        if self.config.kl_mode == "reward":
            return rollout.rewards - self.kl_controller.value * rollout.kl_per_token.sum(dim=1)
        return rollout.rewards

    def memory_with_sequence_advantages(self, rollout: ScoredRollout, advantage: Tensor) -> ReplayMemory:
        """The replay memory of a trainer without a critic: one advantage per response [B], copied onto each of its
        real tokens ([B, G], 0 on padding); values and returns are zeros."""
        zeros = torch.zeros_like(rollout.logprobs)
        advantages = torch.where(rollout.gen_mask, advantage[:, None].expand_as(zeros), zeros)
        return rollout.to_memory(zeros, advantages, zeros, keep_ref_logits=self.keeps_ref_logits)

    @abstractmethod
    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        """The replay memory (advantages, returns) for a scored rollout, and metrics of its own."""

    def rollout_phase(self, prompts: list[list[int]] | None = None) -> ReplayMemory:
        """Sample, score and build the replay memory in one call (for stepping through by hand)."""
        memory, _ = self.build_memory(self.sample_and_score(prompts))
        return memory

    # ------------------------------------------------------------------ learning
    @abstractmethod
    def minibatches(self, memory: ReplayMemory):
        """The shuffled minibatches one learning phase steps on."""

    def shuffled_minibatches(self, memory: ReplayMemory, minibatch_size: int, epochs: int):
        """``epochs`` passes over ``memory``, each a fresh shuffle cut into ``minibatch_size`` episodes (this rank's
        slice of each in a data-parallel run): what ``minibatches`` returns in every trainer here."""
        return memory.minibatches(minibatch_size, epochs, generator=self.shuffle_generator, rank=distributed.rank(),
                                  world_size=distributed.world_size())

    @abstractmethod
    def compute_losses(self, minibatch: ReplayMemory) -> tuple[dict[str, Tensor], Tensor]:
        """Every loss term on one minibatch (with grad), by name, ``"loss"`` the one to minimise; and the
        new log-probs of the generated tokens [B, G] (detached), which ``--debug`` compares with the rollout's."""

    @abstractmethod
    def learning_metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """The phase's loss metrics (losses/*) from the per-minibatch breakdowns."""

    def learning_phase(self, memory: ReplayMemory, minibatches: list[ReplayMemory] | None = None) -> list[dict[str, float]]:
        """One AdamW step per minibatch, then ``end_phase``; returns each minibatch's loss breakdown (and grad norm).

        ``minibatches`` (default: ``self.minibatches(memory)``, drawn now) lets you draw them first and
        look at them: ``breakdown[i]`` is computed on ``minibatches[i]`` before its own step, so
        ``breakdown[0]`` is what the objectives give on ``minibatches[0]`` with the policy as it was
        before this call. With ``config.debug`` the invariants (``rlhf_scratch.invariants``) are
        checked first on the memory, then on each minibatch before its step.
        """
        if self.config.debug:
            tokenizer = self.policy.tokenizer
            eos = tokenizer.eos_token_id if self.config.sampling.stop_at_eos else None
            with distributed.shared_failures(f"phase {self.phase + 1}, --debug checks of the memory"):
                invariants.check_memory(memory, eos_id=eos, pad_id=padding_id(tokenizer), where=f"phase {self.phase + 1}")
        breakdown = []
        for index, minibatch in enumerate(minibatches if minibatches is not None else self.minibatches(memory)):
            breakdown.append(self.learning_step(index, minibatch))
        self.end_phase(memory)
        return breakdown

    def learning_step(self, index: int, minibatch: ReplayMemory) -> dict[str, float]:
        """One optimiser step on a minibatch; returns its loss breakdown (and grad norm).

        The minibatch (this rank's slice in a data-parallel run) is cut into ``grad_accum_steps`` micro-batches;
        each has its forward pass and backward, and the gradients add up: every loss term is a micro-batch's
        share of the whole minibatch's mean (``token_share``, ``row_share``), so the sum is the whole one's
        gradient. DDP all-reduces only on the last backward. Then clip, check and step (``clip_and_step``).
        The breakdown holds each term of the whole (global) minibatch: the sum of the shares, averaged over
        the ranks (``distributed.reduce_means``); ``*_max`` terms are maxima.
        """
        self.optimizer.zero_grad(set_to_none=True)
        pieces = minibatch.split(self.config.grad_accum_steps)
        totals: dict[str, float] = {}
        for k, piece in enumerate(pieces):
            with distributed.shared_failures(f"phase {self.phase + 1}, minibatch {index}"):
                terms, logprobs = self.compute_losses(piece)
                if self.config.debug:
                    self.check_minibatch(index, piece, logprobs)
            with distributed.maybe_no_sync(self.learner, sync=k == len(pieces) - 1):
                terms["loss"].backward()
            for name, value in terms.items():
                value = value.item()
                if name not in totals:
                    totals[name] = value
                else:
                    totals[name] = max(totals[name], value) if name.endswith("_max") else totals[name] + value
        grad_norm = clip_and_step(self.optimizer, self.config.max_grad_norm, self.nonfinite_hint).item()
        return distributed.reduce_means({**totals, "grad_norm": grad_norm})

    nonfinite_hint = "Lower the learning rate or check the reward for extreme values."
    """What a NaN or inf loss tells the user to try (``optimization.check_finite``)."""

    def check_minibatch(self, index: int, minibatch: ReplayMemory, logprobs: Tensor) -> None:
        """--debug checks on a minibatch after ``compute_losses``, before its step (no extra forward pass):
        ratio = 1 on the phase's first minibatch, approx-KL below the bound on every one."""
        where = f"phase {self.phase + 1}, minibatch {index}"
        if index == 0:
            invariants.check_ratio_is_one(logprobs, minibatch.logprobs, minibatch.gen_mask, where=where)
        invariants.check_approx_kl(logprobs, minibatch.logprobs, minibatch.gen_mask,
                                   self.config.debug_max_approx_kl, where=where)

    def end_phase(self, memory: ReplayMemory) -> None:
        """One scheduler step and one KL-controller update (with the rollout's mean sequence KL) per phase."""
        self.scheduler.step()
        self.kl_controller.update(memory.sequence_kl.mean().item(), self.config.batch_size)
        self.phase += 1

    # ------------------------------------------------------------------ one phase
    def run_phase(self) -> PhaseRecord:
        """Rollout, memory, learning, metrics: one whole phase (module docstring)."""
        phase_start = time.time()
        lr = self.optimizer.param_groups[0]["lr"]
        rollout = self.sample_and_score()
        memory, memory_stats = self.build_memory(rollout)
        learning_start = time.perf_counter()
        breakdown = self.learning_phase(memory)
        learning_seconds = time.perf_counter() - learning_start
        metrics = {
            "phase": self.phase, **rollout.stats, **memory_stats, **self.learning_metrics(breakdown),
            "lr": lr, "time/learning": learning_seconds, "seconds": time.time() - phase_start,
        }
        return PhaseRecord(rollout, memory, breakdown, metrics)

    # ------------------------------------------------------------------ evaluation during training
    EVAL_METRICS = ("reward_mean", "reward_median", "reward_std", "kl", "kl_se", "token_entropy", "distinct_1",
                    "distinct_2", "length")

    def should_evaluate(self) -> bool:
        """Whether ``--eval-every`` asks for an evaluation after the phase just completed (and always after the last)."""
        every = self.config.eval_every
        return bool(every) and (self.phase % every == 0 or self.phase == self.config.phases)

    @torch.no_grad()
    def evaluate_policy(self) -> dict[str, float]:
        """The shared evaluation (``evaluation.evaluate``) of the current policy on ``eval_prompts`` held-out prompts:
        ``eval/reward_mean``, ``eval/kl`` (Σ_t log π − log π_ref of its own samples, per response), ... and its cost
        ``time/eval``. Sampled with its own generator (seed + 1, the same at every evaluation): the trainer's random
        state, and so the training itself, is untouched."""
        config = self.config
        if self.eval_prompt_ids is None:
            task = {f.name: getattr(config, f.name) for f in dataclasses.fields(TaskConfig)}
            eval_config = EvalConfig(**task, n_prompts=config.eval_prompts, seed=config.seed)
            self.eval_prompt_ids = evaluation_prompts(eval_config, self.policy.tokenizer)
        clock = time.perf_counter()
        sampler = ModelSampler("policy", self.policy.bridge, self.reference, config.sampling, fwd_hooks=self.fwd_hooks)
        result = evaluate(sampler, self.eval_prompt_ids, self.reward, seed=config.seed + 1, batch_size=config.batch_size)
        metrics = {f"eval/{key}": result.metrics[key] for key in self.EVAL_METRICS if result.metrics.get(key) is not None}
        return {**metrics, "time/eval": time.perf_counter() - clock}

    # ------------------------------------------------------------------ outputs
    def sample_table(self, model_bridge, prompts: list[list[int]], seed: int) -> tuple[Generation, list[float]]:
        """Samples from ``model_bridge`` on fixed prompts with a fixed seed, and their rewards."""
        generation = generate(model_bridge, prompts, self.config.sampling, generator=torch.Generator().manual_seed(seed))
        return generation, score_texts(self.reward, generation.texts, generation.prompts).tolist()

    def save_checkpoint(self, directory: Path) -> Path:
        """A resumable checkpoint, written atomically (``outputs.atomic_dir``; layout in ``rlhf_scratch.checkpoint``):
        the policy (save_pretrained layout, safetensors), the value head if any, and ``resume_state()``."""
        meta = {"kind": self.kind, "phase": self.phase, "base_model": self.config.model, "reference": self.reference_source}
        state = self.resume_state()  # data-parallel: gathers every rank's RNG streams, so every rank calls this
        with distributed.shared_failures(f"phase {self.phase}, writing the checkpoint"):
            if distributed.is_main():  # the weights are the same on every rank
                with atomic_dir(directory) as staging:
                    save_model_dir(self.policy.bridge, staging,
                                   value_head=self.policy.value_head if self.saves_value_head else None, meta=meta)
                    write_resume_state(staging, state)
        return Path(directory)

    def open_outputs(self, console=None) -> Path | None:
        """Create the output directory and write config.json. metrics.jsonl and samples.jsonl keep their rows up to
        the phase this trainer has completed (none for a new run; those before the checkpoint when resuming)."""
        if self.config.out is None:
            return None
        out = Path(self.config.out)
        with distributed.shared_failures("opening the outputs"):
            if distributed.is_main():
                if self.phase > 0 and not (out / "metrics.jsonl").is_file() and console is not None:
                    # `--resume RUN --out OTHER`: the history (summary, plots) is whole, the row files are not.
                    console.print(f"note: continuing from phase {self.phase} in {out}: its metrics.jsonl and "
                                  f"samples.jsonl start at phase {self.phase + 1}; the rows of phases 1–{self.phase} "
                                  "stay in the run the checkpoint came from (summary.json and the plots cover all).")
                out.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.jsonl", "samples.jsonl"):
                    filter_jsonl(out / name, lambda row: row.get("phase", 0) <= self.phase)
                write_json(out / "config.json", self.config)
        return out

    def log_phase(self, record: PhaseRecord, out: Path | None, run) -> None:
        """Append the phase's metrics and first sample rows to the run's files (rank 0), and to W&B if on."""
        self.history.append(record.metrics)
        if out is not None and distributed.is_main():
            append_jsonl(out / "metrics.jsonl", record.metrics)
            generation = record.rollout.generation
            for row in range(min(self.config.samples_per_phase, len(generation.prompts))):
                append_jsonl(out / "samples.jsonl", {
                    "phase": self.phase, "prompt": generation.prompts[row],
                    "response": generation.responses[row], "reward": record.memory.rewards[row].item(),
                })
        if run is not None:
            run.log(record.metrics, step=self.phase)

    def maybe_snapshot(self, out: Path | None) -> Path | None:
        """With ``snapshot_every``, the policy's weights after this phase in ``OUT/snapshots/phase_NNNN/``: a model
        directory (config, tokenizer, safetensors weights; no optimiser or value head), for ``diff --timeline``."""
        every = self.config.snapshot_every
        if out is None or not every or self.phase % every != 0 or not distributed.is_main():
            return None
        meta = {"kind": "snapshot", "trainer": self.kind, "phase": self.phase, "base_model": self.config.model,
                "reference": self.reference_source}
        directory = out / SNAPSHOTS_DIR / f"phase_{self.phase:04d}"
        with atomic_dir(directory) as staging:
            save_model_dir(self.policy.bridge, staging, meta=meta)
        return directory

    def maybe_checkpoint(self, out: Path | None) -> bool:
        """Write the checkpoint if ``checkpoint_every`` says this phase should have one; returns whether it did."""
        every = self.config.checkpoint_every
        if out is None or not every or self.phase % every != 0:
            return False
        self.save_checkpoint(out / "checkpoint")
        return True

    def train(self, console=None, stop_after: int | None = None) -> dict:
        """Run the phases left (all of them for a new trainer) with progress bar, logging and outputs; returns the summary.

        A trainer that has completed phases (resumed from a checkpoint, or stepped by hand)
        continues from phase ``self.phase + 1``: metrics.jsonl and samples.jsonl keep their rows
        up to that phase and grow from there. ``stop_after=k`` stops after phase k (as if the run
        were interrupted there), with the checkpoint and outputs written. Ctrl-C stops at the end of
        the current phase: the checkpoint is written and ``TrainingInterrupted`` raised, its message
        giving the ``--resume`` command (``rlhf_scratch.interrupts``).
        """
        config = self.config
        console = console or Console()
        last_phase = config.phases if stop_after is None else min(stop_after, config.phases)
        if last_phase < 1:
            raise ValueError(f"stop_after must be >= 1, got {stop_after}.")
        if self.history and self.phase >= config.phases:  # e.g. --resume of a finished run: nothing to do, say so
            console.print(f"{self.title}: this run is already complete ({self.phase} of {config.phases} phases); nothing "
                          f"was trained. To train further, start a new run from its weights: rlhf-scratch {self.kind} "
                          f"--model {config.out or 'RUN'}/checkpoint --out NEW_DIR.")
            return self.summary()
        out = self.open_outputs(console)
        main = distributed.is_main()  # only rank 0 prints, samples the table and writes
        run = start_wandb(config) if config.wandb and main else None
        if self.table_prompts is None:
            self.table_prompts = self.sample_prompts(config.table_rows)
        before = self.sample_table(self.reference, self.table_prompts, seed=config.seed + 1) if main else None
        start, elapsed_before = time.time(), self.elapsed_seconds
        saved_phase, first_phase = None, self.phase
        columns = [TextColumn(f"[bold]{self.title}[/] phase {{task.completed}}/{{task.total}}"), BarColumn(),
                   TextColumn("reward {task.fields[reward]:+.3f}  kl {task.fields[kl]:.3f}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with (Progress(*columns, console=console, disable=not main) as progress,
              StopRequest(console if main else None, "this phase") as stop):
            task = progress.add_task(self.kind, total=config.phases, completed=self.phase, reward=float("nan"), kl=float("nan"))
            # Every rank stops at the same phase boundary if Ctrl-C reached any of them (torchrun forwards it to all).
            while self.phase < last_phase and not distributed.any_rank(stop.requested):
                record = self.run_phase()
                if main and self.should_evaluate():
                    record.metrics.update(self.evaluate_policy())
                progress.update(task, advance=1, reward=record.metrics["reward/mean"], kl=record.metrics["objective/kl"])
                with distributed.shared_failures(f"phase {self.phase}, writing the outputs"):
                    self.log_phase(record, out, run)
                self.elapsed_seconds = elapsed_before + time.time() - start
                self.maybe_snapshot(out)
                if self.maybe_checkpoint(out):
                    saved_phase = self.phase
        interrupted = self.phase < last_phase  # only Ctrl-C (stop.requested) ends the loop early
        if not self.history and not interrupted:
            raise ValueError(f"No phase to run or summarise: the trainer has completed {self.phase} of {config.phases} phases.")
        self.elapsed_seconds = elapsed_before + time.time() - start
        # Rank 0's file system decides (a checkpoint is a collective: every rank must agree to write it).
        if out is not None and saved_phase != self.phase and distributed.broadcast_object(
                self.phase > first_phase or not (out / "checkpoint").exists()):
            self.save_checkpoint(out / "checkpoint")  # before the sample table: the state is the phase's end
        if interrupted:
            if run is not None:
                run.finish()
            raise TrainingInterrupted(self.interrupted_message(out))
        return self.finish(console, out, run, before)

    def interrupted_message(self, out: Path | None) -> str:
        """What a run stopped by Ctrl-C at a phase boundary kept, and the command that continues it."""
        stopped = f"Stopped by Ctrl-C after phase {self.phase} of {self.config.phases}"
        if out is None:
            return f"{stopped}; without --out nothing was saved."
        return f"{stopped}; checkpoint saved in {out / 'checkpoint'}. Continue with: {resume_command(self.kind, out)}"

    def summary(self) -> dict:
        """summary.json: the first phase's reward, the reward and KL over the last 5 phases, phases, episodes, seconds."""
        history, last = self.history, self.history[-5:]
        return {
            "reward_first": history[0]["reward/mean"],
            "reward_last": sum(m["reward/mean"] for m in last) / len(last),
            "kl_last": sum(m["objective/kl"] for m in last) / len(last),
            "phases": len(history),
            "episodes": len(history) * self.config.batch_size,
            "seconds": self.elapsed_seconds,
        }

    def finish(self, console, out: Path | None, run, before: tuple[Generation, list[float]] | None) -> dict:
        """The before/after sample table, the summary (written with the plots), and the closing line (rank 0 only)."""
        config, summary = self.config, self.summary()
        if not distributed.is_main():
            return summary
        after = self.sample_table(self.policy.bridge, self.table_prompts, seed=config.seed + 1)
        print_before_after(console, *before, *after, self.reward)
        if out is not None:
            plot_curves(self.history, out)
            write_json(out / "summary.json", summary)
            console.print(f"outputs in {out} (checkpoint: {out / 'checkpoint'})")
        if run is not None:
            run.summary.update(summary)
            run.finish()
        stopped = f", stopped after phase {self.phase} of {config.phases}" if self.phase < config.phases else ""
        console.print(
            f"{self.title}: reward {summary['reward_first']:+.3f} → {summary['reward_last']:+.3f} "
            f"(mean of last {min(len(self.history), 5)} phases), "
            f"KL {summary['kl_last']:.3f} nats, {summary['episodes']} episodes in {summary['seconds']:.0f} s{stopped}"
        )
        return summary


def resume_command(kind: str, out: Path | str) -> str:
    """The command that continues the run in ``out`` (a data-parallel run resumes on as many processes)."""
    launcher = (f"torchrun --nproc-per-node {distributed.world_size()} -m rlhf_scratch" if distributed.is_distributed()
                else "rlhf-scratch")
    return f"{launcher} {kind} --resume {out}"


def breakdown_means(breakdown: list[dict[str, float]], names: dict[str, str]) -> dict[str, float]:
    """``{metric: mean over the phase's minibatches of breakdown[key]}`` for each ``metric: key`` of ``names``."""
    return {metric: sum(row[key] for row in breakdown) / len(breakdown) for metric, key in names.items()}


def start_wandb(config: PolicyTrainingConfig):
    """A wandb run; offline mode unless WANDB_MODE says otherwise (no network here)."""
    import wandb  # heavy and optional: only a run with --wandb pays for the import

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=config.wandb_project, config=to_jsonable(config), mode=mode,
                      dir=str(config.out) if config.out is not None else None)


def run_trainer(trainer_class: type[PolicyTrainer], config: PolicyTrainingConfig) -> dict:
    """The command: a new run, or the continuation of ``config.resume``."""
    trainer = trainer_class.resume(config) if config.resume is not None else trainer_class(config)
    summary = trainer.train(stop_after=config.stop_after_phase)
    if trainer.phase < trainer.config.phases and distributed.is_main():  # --stop-after-phase: say how to go on
        print(f"Stopped after phase {trainer.phase} of {trainer.config.phases} (--stop-after-phase). Continue with: "
              f"{resume_command(trainer.kind, trainer.config.out) if trainer.config.out else 'nothing was saved without --out'}")
    return summary
