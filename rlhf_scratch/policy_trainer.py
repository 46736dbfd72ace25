"""A policy trainer (PPO, REINFORCE, RLOO, GRPO): the pieces put together, one phase, and its outputs.

The pieces, each a small object with one job (``docs/architecture.md``)::

    rollout    RolloutMaker (rollout.py)     sample, score, policy/reference passes, the global-batch gather
    learner    Learner (learner.py)          AdamW, schedule, DDP, autocast, accumulation, the clipped step
    algorithm  PPO | REINFORCE | RLOO | GRPO advantages, a pure loss returning named terms, metrics, own state
    loop       run_loop (run.py)             stop requests (Ctrl-C, SIGTERM), eval-every, snapshots, checkpoints
    outputs    RunOutputs (run_outputs.py)   --out, config.json, metrics.jsonl, samples.jsonl, summary.json, W&B

One phase (``run_phase``), each a plain call returning what the next needs::

    rollout = sample_and_score()            ScoredRollout: the generation, log-probs, values, KL, rewards, stats
    memory, stats = build_memory(rollout)   ReplayMemory with advantages and returns   (the algorithm)
    breakdown = learning_phase(memory)      one learner step per minibatch; losses: the algorithm's, through
                                            algorithm.learning_losses; then end_phase: schedule, KL controller
    metrics = {rollout.stats, stats, algorithm.metrics(breakdown), lr, timings}  ─► PhaseRecord

``PPOTrainer`` and the others are this class with their algorithm named (``algorithm_class``); a run continues
from its checkpoint through ``Trainer.resume(config)`` (``policy_resume.py``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhf_scratch import distributed, invariants, policy_resume
from rlhf_scratch.algorithm import learning_losses
from rlhf_scratch.checkpoint import weights_fingerprint
from rlhf_scratch.config import PolicyTrainingConfig, TaskConfig
from rlhf_scratch.evaluation import EvalConfig, ModelSampler, evaluate, evaluation_prompts, plot_curves, print_before_after
from rlhf_scratch.kl_control import AdaptiveKLController, FixedKLController
from rlhf_scratch.learner import Learner, check_batch_split
from rlhf_scratch.lora import adapter_free_view, apply_lora
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.models import PolicyWithValueHead, check_fwd_hooks, load_bridge, load_policy, make_reference
from rlhf_scratch.policy_resume import SNAPSHOTS_DIR  # noqa: F401 (re-exported)
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.rollout import PromptPool, RolloutMaker, ScoredRollout, concat_rollouts  # noqa: F401 (concat_rollouts re-exported)
from rlhf_scratch.run import resume_command, run_loop  # noqa: F401 (resume_command re-exported)
from rlhf_scratch.sampling import Generation, generate, padding_id
from rlhf_scratch.typecheck import shape_checks


@dataclass(eq=False)
class PhaseRecord:
    """What one phase produced: the scored rollout, the replay memory it learned from, one loss
    breakdown per minibatch (in order), and the metrics row logged for it."""

    rollout: ScoredRollout
    memory: ReplayMemory
    breakdown: list[dict[str, float]]
    metrics: dict


def build_reference(config: PolicyTrainingConfig, policy: PolicyWithValueHead, reference, policy_given: bool):
    """The frozen reference model and its source name (None where it cannot be reloaded by name): ``reference`` if
    given, else ``config.reference`` loaded, else the starting policy. Under LoRA the starting policy's reference is
    the base model, i.e. the policy's own frozen weights without the adapters: a view over the same tensors, not a
    copy. Otherwise a frozen deep copy (in ``config.reference_dtype``)."""
    if reference is not None:
        bridge, source = reference, None
    elif config.reference:
        bridge, source = load_bridge(config.reference, device=config.device), config.reference
    else:  # a copy of the starting policy; reloadable by name only if it was loaded by name
        bridge, source = policy.bridge, (None if policy_given else config.model)
    if policy.lora is not None and bridge is policy.bridge:
        return adapter_free_view(bridge), source
    return make_reference(bridge, config.reference_dtype), source


class PolicyTrainer:
    """The policy, a frozen reference, the reward, the prompt pool, and the pieces that train it: ``rollout``,
    ``learner``, ``algorithm`` (``algorithm_class(config)``) and the KL controller (module docstring).

    ``fwd_hooks`` — TransformerLens hooks ``(name, fn)`` — are applied to every pass of the policy: generation, the
    rollout's forward pass and the learning forward pass; never to the reference. They live only for the duration
    of each pass. ``reference`` (a bridge) replaces the default reference (a frozen copy of the starting policy, or
    ``config.reference``). To continue a run, use ``Trainer.resume(config)``.

    Data-parallel (``torchrun``, ``rlhf_scratch.distributed``): each rank samples ``batch_size / W`` episodes with its
    own generator and prompts, ``sample_and_score`` gathers them into the global batch on every rank (so
    ``build_memory``, the statistics and the KL controller see what one process would see), and each rank learns on
    its slice of every global minibatch through the learner (the policy in DDP). Only rank 0 prints and writes.
    """

    algorithm_class = None
    """The algorithm this trainer runs (``ppo.PPO``, ...): a class taking the config."""
    unit = "phase"
    progress_text = "reward {task.fields[reward]:+.3f}  kl {task.fields[kl]:.3f}"

    def __init__(self, config: PolicyTrainingConfig, policy: PolicyWithValueHead | None = None, reward=None,
                 fwd_hooks: list | tuple = (), reference=None):
        if config.resume is not None:
            raise ValueError(f"config.resume is set: continue a run with {type(self).__name__}.resume(config).")
        distributed.init_from_env(config.device)
        if distributed.is_distributed():
            config = dataclasses.replace(config, device=distributed.rank_device(config.device))
        self.algorithm = self.algorithm_class(config)
        check_batch_split(config, self.algorithm.group_size)
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
        if config.lora_rank and self.policy.lora is None:  # (a resumed LoRA policy has its adapters already)
            apply_lora(self.policy, config.lora_rank, config.lora_alpha, config.lora_targets)
        self.policy.eval()  # dropout off (adapters included): log-probs must be reproducible between passes
        reference_model, self.reference_source = build_reference(config, self.policy, reference, policy is not None)
        self.policy.plain_forward = config.plain_forward
        self.policy.gradient_checkpointing = config.gradient_checkpointing
        self.reference_fingerprint = weights_fingerprint(reference_model)
        reward = reward or make_reward(config.reward)
        fwd_hooks = check_fwd_hooks(self.policy.bridge, fwd_hooks)
        self.prompts = PromptPool(config, self.policy.tokenizer, self.prompt_rng)
        self.prompt_pool = self.prompts.prompts
        self.rollout = RolloutMaker(config, self.policy, reference_model, reward, self.generator, fwd_hooks)
        self.learner = Learner(self.policy, self.algorithm.param_groups(self.policy), config, fwd_hooks,
                               self.algorithm.nonfinite_hint)
        self.kl_controller = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                              if config.adaptive_kl else FixedKLController(config.kl_coef))
        self.phase = 0
        """Phases completed (the next phase is ``phase + 1``); checkpoints record it."""
        self.history: list[dict] = []
        """The metrics of every completed phase logged by ``train`` (restored on resume)."""
        self.table_prompts: list[list[int]] | None = None
        """The prompts of the before/after sample table, drawn once per run."""
        self.elapsed_seconds = 0.0
        self.eval_prompt_ids: list[list[int]] | None = None
        """The held-out prompts of ``--eval-every``, drawn at the first evaluation."""

    # the algorithm's identity, and the learner's parts under their usual names
    title = property(lambda self: self.algorithm.title)
    kind = property(lambda self: self.algorithm.kind)
    saves_value_head = property(lambda self: self.algorithm.saves_value_head)
    optimizer = property(lambda self: self.learner.optimizer)
    scheduler = property(lambda self: self.learner.scheduler)
    completed = property(lambda self: self.phase)

    @property
    def reference(self):
        """The frozen reference model (a bridge), which the rollout reads."""
        return self.rollout.reference

    @reference.setter
    def reference(self, bridge) -> None:
        self.rollout.reference = bridge

    @property
    def fwd_hooks(self) -> list:
        """The hooks on every policy pass (the rollout's and the learner's)."""
        return self.rollout.fwd_hooks

    @fwd_hooks.setter
    def fwd_hooks(self, hooks: list) -> None:
        self.rollout.fwd_hooks = self.learner.fwd_hooks = hooks

    @property
    def reward(self):
        """The reward the rollout scores with."""
        return self.rollout.reward

    @reward.setter
    def reward(self, reward) -> None:
        self.rollout.reward = reward
    total = property(lambda self: self.config.phases)

    # ------------------------------------------------------------------ prompts, checkpoints (rollout.PromptPool, policy_resume)
    def encode_text(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def sample_prompts(self, n: int) -> list[list[int]]:
        return self.prompts.sample(n)

    def rollout_prompts(self) -> list[list[int]]:
        return self.prompts.for_rollout(self.algorithm.group_size)

    @classmethod
    def resume(cls, config: PolicyTrainingConfig, reward=None, fwd_hooks: list | tuple = (), reference=None):
        """A trainer that continues the run whose checkpoint is ``config.resume`` exactly where it stopped."""
        return policy_resume.resume_trainer(cls, config, reward, fwd_hooks, reference)

    def resume_state(self) -> dict:
        return policy_resume.resume_state(self)

    def load_resume_state(self, state: dict) -> None:
        policy_resume.load_resume_state(self, state)

    def save_checkpoint(self, directory: Path) -> Path:
        return policy_resume.save_checkpoint(self, directory)

    def save_snapshot(self, out: Path) -> Path | None:
        return policy_resume.save_snapshot(self, out)

    # ------------------------------------------------------------------ one phase, call by call
    def sample_and_score(self, prompts: list[list[int]] | None = None) -> ScoredRollout:
        """Sample a batch (``prompts``: this rank's; default ``rollout_prompts()``), read it with the policy and the
        reference, and score it (``RolloutMaker``); data-parallel, every rank returns the global batch."""
        prompts = prompts if prompts is not None else self.rollout_prompts()
        return self.rollout(prompts, self.kl_controller.value, self.phase)

    def build_memory(self, rollout: ScoredRollout) -> tuple[ReplayMemory, dict[str, float]]:
        """The replay memory (advantages, returns) of a scored rollout, and the algorithm's metrics of it."""
        return self.algorithm.build_memory(rollout, self.kl_controller.value)

    def rollout_phase(self, prompts: list[list[int]] | None = None) -> ReplayMemory:
        """Sample, score and build the replay memory in one call (for stepping through by hand)."""
        memory, _ = self.build_memory(self.sample_and_score(prompts))
        return memory

    def minibatches(self, memory: ReplayMemory):
        """The shuffled minibatches one learning phase steps on (this rank's slice of each, data-parallel)."""
        return self.algorithm.minibatches(memory, self.shuffle_generator)

    def compute_losses(self, minibatch: ReplayMemory) -> tuple[dict[str, Tensor], Tensor]:
        """Every loss term on one minibatch (with grad), by name, ``"loss"`` the one to minimise; and the new
        log-probs of the generated tokens [B, G] (detached), which ``--debug`` compares with the rollout's."""
        output = self.learner.forward(minibatch)
        return learning_losses(self.algorithm, output, minibatch, self.kl_controller.value,
                               self.config.sampling.temperature)

    def learning_metrics(self, breakdown: list[dict[str, float]]) -> dict[str, float]:
        """The phase's loss metrics (losses/*) from the per-minibatch breakdowns."""
        return self.algorithm.metrics(breakdown)

    def learning_phase(self, memory: ReplayMemory, minibatches: list[ReplayMemory] | None = None) -> list[dict[str, float]]:
        """One AdamW step per minibatch, then ``end_phase``; returns each minibatch's loss breakdown (and grad norm).

        ``minibatches`` (default: ``self.minibatches(memory)``, drawn now) lets you draw them first and look at
        them: ``breakdown[i]`` is computed on ``minibatches[i]`` before its own step, so ``breakdown[0]`` is what the
        objectives give on ``minibatches[0]`` with the policy as it was before this call. With ``config.debug`` the
        invariants (``rlhf_scratch.invariants``) are checked first on the memory, then on each minibatch before its
        step, and the shape annotations are checked on every call (without it they are off in this loop).
        """
        config, where = self.config, f"phase {self.phase + 1}"
        if config.debug:
            tokenizer = self.policy.tokenizer
            eos = tokenizer.eos_token_id if config.sampling.stop_at_eos else None
            with distributed.shared_failures(f"{where}, --debug checks of the memory"):
                invariants.check_memory(memory, eos_id=eos, pad_id=padding_id(tokenizer), where=where)
        breakdown = []
        with shape_checks(config.debug):  # the jaxtyping checks cost ~5 % of a tiny model's step: --debug only
            for index, minibatch in enumerate(minibatches if minibatches is not None else self.minibatches(memory)):
                def loss_fn(piece: ReplayMemory, index=index) -> dict[str, Tensor]:
                    terms, logprobs = self.compute_losses(piece)
                    if config.debug:
                        invariants.check_minibatch(index, piece, logprobs, config.debug_max_approx_kl,
                                                   where=f"{where}, minibatch {index}")
                    return terms

                breakdown.append(self.learner.step(minibatch, loss_fn, where=f"{where}, minibatch {index}"))
        self.end_phase(memory)
        return breakdown

    def end_phase(self, memory: ReplayMemory) -> None:
        """One scheduler step and one KL-controller update (with the rollout's mean sequence KL) per phase."""
        self.learner.end_phase()
        self.kl_controller.update(memory.sequence_kl.mean().item(), self.config.batch_size)
        self.phase += 1

    def run_phase(self) -> PhaseRecord:
        """Rollout, memory, learning, metrics: one whole phase (module docstring)."""
        phase_start = time.time()
        lr = self.learner.lr
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

    # ------------------------------------------------------------------ what the run loop calls (run.py)
    def train(self, console=None, stop_after: int | None = None) -> dict:
        """Run the phases left with progress bar, logging and outputs (``run.run_loop``); returns the summary.
        ``stop_after=k`` stops after phase k; Ctrl-C or SIGTERM after the current phase, with the checkpoint written
        and ``TrainingInterrupted`` raised (its message gives the ``--resume`` command)."""
        return run_loop(self, console, stop_after)

    def run_unit(self) -> tuple[list[dict], list[dict]]:
        """One phase: its metrics row and its first ``samples_per_phase`` sample rows."""
        record = self.run_phase()
        generation = record.rollout.generation
        samples = [{"phase": self.phase, "prompt": generation.prompts[row], "response": generation.responses[row],
                    "reward": record.memory.rewards[row].item()}
                   for row in range(min(self.config.samples_per_phase, len(generation.prompts)))]
        return [record.metrics], samples

    def progress_fields(self, rows: list[dict] | None) -> dict[str, float]:
        if not rows:
            return {"reward": float("nan"), "kl": float("nan")}
        return {"reward": rows[-1]["reward/mean"], "kl": rows[-1]["objective/kl"]}

    def begin(self) -> tuple[Generation, list[float]] | None:
        """The "before" half of the sample table: the reference on the table's prompts (drawn once per run)."""
        if self.table_prompts is None:
            self.table_prompts = self.sample_prompts(self.config.table_rows)
        if not distributed.is_main():
            return None
        return self.sample_table(self.reference, self.table_prompts, seed=self.config.seed + 1)

    EVAL_METRICS = ("reward_mean", "reward_median", "reward_std", "kl", "kl_se", "token_entropy", "distinct_1",
                    "distinct_2", "length")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
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

    evaluate_policy = evaluate

    def sample_table(self, model_bridge, prompts: list[list[int]], seed: int) -> tuple[Generation, list[float]]:
        """Samples from ``model_bridge`` on fixed prompts with a fixed seed, and their rewards."""
        generation = generate(model_bridge, prompts, self.config.sampling, generator=torch.Generator().manual_seed(seed))
        return generation, score_texts(self.reward, generation.texts, generation.prompts).tolist()

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

    def finish(self, console, outputs, before: tuple[Generation, list[float]] | None) -> dict:
        """The before/after sample table, the plots and summary.json, and the closing line (rank 0 only)."""
        config, summary, out = self.config, self.summary(), outputs.out
        if not distributed.is_main():
            return summary
        after = self.sample_table(self.policy.bridge, self.table_prompts, seed=config.seed + 1)
        print_before_after(console, *before, *after, self.reward)
        if out is not None:
            plot_curves(self.history, out)
        outputs.finish(summary)
        if out is not None:
            console.print(f"outputs in {out} (checkpoint: {out / 'checkpoint'})")
        stopped = f", stopped after phase {self.phase} of {config.phases}" if self.phase < config.phases else ""
        console.print(
            f"{self.title}: reward {summary['reward_first']:+.3f} → {summary['reward_last']:+.3f} "
            f"(mean of last {min(len(self.history), 5)} phases), "
            f"KL {summary['kl_last']:.3f} nats, {summary['episodes']} episodes in {summary['seconds']:.0f} s{stopped}"
        )
        return summary


def run_trainer(trainer_class: type[PolicyTrainer], config: PolicyTrainingConfig) -> dict:
    """The command: a new run, or the continuation of ``config.resume``."""
    trainer = trainer_class.resume(config) if config.resume is not None else trainer_class(config)
    summary = trainer.train(stop_after=config.stop_after_phase)
    if trainer.phase < trainer.config.phases and distributed.is_main():  # --stop-after-phase: say how to go on
        print(f"Stopped after phase {trainer.phase} of {trainer.config.phases} (--stop-after-phase). Continue with: "
              f"{resume_command(trainer.kind, trainer.config.out) if trainer.config.out else 'nothing was saved without --out'}")
    return summary
