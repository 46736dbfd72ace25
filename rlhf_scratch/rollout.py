"""The rollout: sample a batch, read it with the policy and the reference (no grad), score it, gather the ranks.

``RolloutMaker(config, policy, reference, reward, generator, fwd_hooks)(prompts, kl_coef, phase)`` returns a
``ScoredRollout`` of named, shaped tensors::

    prompts ─► generate (KV cache, fwd_hooks) ─► sequences [B, S], attention_mask [B, S], gen_mask [B, G]
      ├─► old policy: logprobs [B, G] (at the sampling temperature), values [B, G], read from the decoding
      │   steps where that is exact (``reads_from_generation``), else by a policy forward (no grad)
      ├─► reference forward (no grad) ─► ref_logprobs [B, G], ref logits at the generated positions [B, G, V]
      ├─► KL_t [B, G] by the configured estimator ─► sequence_kl [B]
      └─► reward on the decoded text ─► rewards [B]
    data-parallel: every rank's rows gathered into the global batch, the same on every rank (``gather``)

Index convention: generated token i sits at column P + i, its log-prob comes from the logits at column P − 1 + i,
and ``values[:, i]`` (read at the same column) is the value of the state in which token i is chosen.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_scratch import distributed, invariants
from rlhf_scratch.data import fixed_prefix_prompts, load_texts, prompts_from_texts
from rlhf_scratch.learner import autocast
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import (
    entropy_from_logprobs,
    gather_taken,
    generated_logprobs,
    kl_exact_from_logprobs,
    masked_mean,
    per_token_kl,
)
from rlhf_scratch.plain_forward import any_hook_attached, reference_logits
from rlhf_scratch.rewards import score_texts
from rlhf_scratch.sampling import Generation, encode, generate, padding_id


def keeps_ref_logits(config) -> bool:
    """Whether the replay memory keeps reference logits [B, G, V]: only for an exact KL loss term."""
    return config.kl_mode == "loss" and config.kl_estimator == "exact"


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
    """The ranks' rollouts (``RolloutMaker.gather``'s pieces) as one batch, rank 0's rows first.

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


class RolloutMaker:
    """Makes one phase's ``ScoredRollout``: the policy (``fwd_hooks`` on its passes, never on the reference's), the
    frozen reference, the reward and the sampling generator; ``config`` is a ``PolicyTrainingConfig``.

    Data-parallel (``torchrun``): each rank samples its own ``batch_size / W`` episodes with its own generator and
    prompts, and every rank returns the same global batch, rank 0's rows first, with the global batch's statistics.
    """

    def __init__(self, config, policy, reference, reward, generator: torch.Generator, fwd_hooks: list = ()):
        self.config, self.policy, self.reference, self.reward = config, policy, reference, reward
        self.generator, self.fwd_hooks = generator, fwd_hooks
        self.keep_ref_logits = keeps_ref_logits(config)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], kl_coef: float, phase: int) -> ScoredRollout:
        """Sample a batch, read it with the policy and the reference, and score it; ``stats`` holds the
        rollout's metrics (reward, sequence KL, entropy, response length, EOS rate, timings).

        Data-parallel: each rank samples ``batch_size / W`` episodes (``prompts``: this rank's), then the
        rollouts are gathered (``gather``): every rank returns the same global batch, rank 0's rows
        first, with the statistics of the global batch.
        """
        with distributed.shared_failures(f"phase {phase + 1}, rollout"):
            rollout, entropy_sum = self.local(prompts, kl_coef, phase)
        if distributed.is_distributed():
            rollout = self.gather(rollout, entropy_sum, kl_coef)
        return rollout

    @torch.no_grad()
    def local(self, prompts: list[list[int]], kl_coef: float, phase: int) -> tuple[ScoredRollout, Tensor]:
        """This rank's rollout (the whole one in a single process) and Σ of its per-token entropy over real tokens."""
        config = self.config
        clock = time.perf_counter()
        timings = {}
        from_generation = self.reads_from_generation()
        generation = generate(self.policy.bridge, prompts, config.sampling, generator=self.generator,
                              fwd_hooks=self.fwd_hooks, record=from_generation, plain=config.plain_forward)
        sequences = generation.sequences.to(config.device)
        attention_mask = generation.attention_mask.to(config.device)
        gen_mask = generation.gen_mask.to(config.device)
        P = generation.prompt_len
        timings["time/generate"], clock = time.perf_counter() - clock, time.perf_counter()

        # Old policy: log-probs at the sampling temperature and values of each state. One log-distribution over
        # the generated positions [B, G, V] gives the taken log-probs, the entropy and (when asked for) the exact
        # KL. Taken from the decoding steps when that is exact, else from a forward pass over the batch.
        if from_generation:
            logp_gen = generation.logp_gen
            logprobs = gather_taken(logp_gen, sequences[:, P:])
            values = self.policy.value_head(generation.final_resid).float()
            if config.debug:  # the pass the shortcut saves, run once more to prove it equal
                _, forward_logprobs, forward_values = self.policy_forward(sequences, attention_mask, P)
                where = f"phase {phase + 1}, rollout"
                invariants.check_sampling_matches_rollout(logprobs, forward_logprobs, gen_mask, where=where)
                invariants.check_values_match_rollout(values, forward_values, gen_mask, where=where)
        else:
            logp_gen, logprobs, values = self.policy_forward(sequences, attention_mask, P)
            if config.debug:
                invariants.check_sampling_matches_rollout(generation.sampled_logprobs, logprobs, generation.gen_mask,
                                                          where=f"phase {phase + 1}, rollout")
        timings["time/policy_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Reference: the same tokens under the frozen starting model.
        with autocast(config.device, config.dtype):
            ref_logits = reference_logits(self.reference, sequences, attention_mask, plain=config.plain_forward).float()
        ref_logits_gen, ref_logp_gen, ref_logprobs = generated_logprobs(ref_logits, sequences, P, config.sampling.temperature)
        # The exact KL needs one more pass over [B, G, V]: only for the exact estimator or --log-exact-kl.
        exact_kl = None
        if config.kl_estimator == "exact" or config.log_exact_kl:
            exact_kl = torch.where(gen_mask, kl_exact_from_logprobs(logp_gen, ref_logp_gen), 0.0)
        kl_per_token = exact_kl if config.kl_estimator == "exact" else torch.where(
            gen_mask, per_token_kl(config.kl_estimator, logprobs, ref_logprobs), 0.0)
        timings["time/reference_forward"], clock = time.perf_counter() - clock, time.perf_counter()

        # Task reward on the decoded text.
        rewards = score_texts(self.reward, generation.texts, generation.prompts).to(config.device)
        timings["time/reward"] = time.perf_counter() - clock

        sequence_kl = kl_per_token.sum(1)  # Σ over a response's generated tokens
        exact_sequence_kl = None if exact_kl is None else exact_kl.sum(1)
        entropy = entropy_from_logprobs(logp_gen)
        stats = self.stats(rewards, sequence_kl, exact_sequence_kl, gen_mask, generation.ended_with_eos,
                           masked_mean(entropy, gen_mask).item(), timings, kl_coef)
        rollout = ScoredRollout(
            generation=generation, sequences=sequences, attention_mask=attention_mask, gen_mask=gen_mask,
            logprobs=logprobs, values=values, ref_logprobs=ref_logprobs, ref_logits_gen=ref_logits_gen,
            kl_per_token=kl_per_token, sequence_kl=sequence_kl, rewards=rewards, stats=stats,
            exact_sequence_kl=exact_sequence_kl,
        )
        return rollout, torch.where(gen_mask, entropy, 0.0).sum()

    def reads_from_generation(self) -> bool:
        """Whether the old policy's log-probs and values can be read from the decoding steps (``generate(...,
        record=True)``) instead of a forward pass over the sampled batch: exactly when the two compute the same
        function (to float rounding): float32 passes (no autocast), no hooks (a hook may act on positions, which a
        cached step numbers differently), no dropout, and ``separate_rollout_forward`` not asked for."""
        config, policy = self.config, self.policy
        return (not config.separate_rollout_forward and config.dtype == "float32" and not self.fwd_hooks
                and not any(module.training for module in policy.modules())
                and not any_hook_attached(list(policy.bridge.hook_dict.values())))

    def policy_forward(self, sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """The old policy's forward pass over the batch (no grad, ``fwd_hooks``, autocast in ``config.dtype``):
        ``(logp_gen [B, G, V], logprobs [B, G], values [B, G])`` at the generated positions, float32."""
        config = self.config
        with autocast(config.device, config.dtype):
            output = self.policy(sequences, attention_mask, fwd_hooks=self.fwd_hooks)
        _, logp_gen, logprobs = generated_logprobs(output.logits.float(), sequences, prompt_len, config.sampling.temperature)
        return logp_gen, logprobs, output.values.float()[:, prompt_len - 1 : -1]

    def stats(self, rewards: Tensor, sequence_kl: Tensor, exact_sequence_kl: Tensor | None, gen_mask: Tensor,
              ended_with_eos: Tensor, entropy: float, timings: dict[str, float], kl_coef: float) -> dict[str, float]:
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
            "objective/kl_coef": kl_coef,
            "objective/entropy": entropy,
            "response/length": gen_mask.sum(1).float().mean().item(),
            "response/eos_rate": ended_with_eos.float().mean().item(),
            **timings,
        }

    def gather(self, rollout: ScoredRollout, entropy_sum: Tensor, kl_coef: float) -> ScoredRollout:
        """Every rank's rollout joined into the global batch (``concat_rollouts``), the same on every rank.

        The reference logits [B, G, V] travel only when the memory keeps them (an exact KL loss term); otherwise
        the global rollout's ``ref_logits_gen`` is None. The entropy is Σ over ranks of the per-token entropy
        over Σ of the real tokens; the timings are this rank's.
        """
        generation = rollout.generation
        tensors = {
            "sequences": rollout.sequences, "attention_mask": rollout.attention_mask, "gen_mask": rollout.gen_mask,
            "logprobs": rollout.logprobs, "values": rollout.values, "ref_logprobs": rollout.ref_logprobs,
            "ref_logits_gen": rollout.ref_logits_gen if self.keep_ref_logits else None,
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
        stats = self.stats(on["rewards"], on["sequence_kl"], on["exact_sequence_kl"], on["gen_mask"],
                           joined["ended_with_eos"], entropy, timings, kl_coef)
        return ScoredRollout(
            generation=global_generation, sequences=on["sequences"], attention_mask=on["attention_mask"],
            gen_mask=on["gen_mask"], logprobs=on["logprobs"], values=on["values"], ref_logprobs=on["ref_logprobs"],
            ref_logits_gen=on["ref_logits_gen"], kl_per_token=on["kl_per_token"], sequence_kl=on["sequence_kl"],
            rewards=on["rewards"], stats=stats, exact_sequence_kl=on["exact_sequence_kl"],
        )


class PromptPool:
    """The token-id prompts a policy trainer draws each phase's batch from (``prompts``), and the draws, made with
    ``rng`` (a ``random.Random``, kept in checkpoints): a fixed ``--prompt``, or the first 2–8 tokens of ``--data``'s
    texts."""

    def __init__(self, config, tokenizer, rng: random.Random):
        self.config, self.tokenizer, self.rng = config, tokenizer, rng
        if config.prompt is not None:
            self.prompts = fixed_prefix_prompts(config.prompt, self.encode, 1)
        else:
            texts = load_texts(config.data, column=config.column, seed=config.seed)
            self.prompts = prompts_from_texts(
                texts, self.encode, n=max(len(texts), config.batch_size), min_tokens=config.min_prompt_tokens,
                max_tokens=config.max_prompt_tokens, seed=config.seed, decode=tokenizer.decode)

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, prepend_bos=self.config.prepend_bos)

    def sample(self, n: int) -> list[list[int]]:
        """``n`` prompts drawn uniformly, with replacement."""
        return [self.prompts[self.rng.randrange(len(self.prompts))] for _ in range(n)]

    def for_rollout(self, group_size: int = 1) -> list[list[int]]:
        """This rank's prompts of one phase's batch: ``batch_size / W`` of them, as (batch_size / W) / k distinct draws
        each repeated k times (k = ``group_size``: 1 but for RLOO and GRPO), a prompt's samples contiguous."""
        k = group_size
        return [prompt for prompt in self.sample(self.config.batch_size // distributed.world_size() // k) for _ in range(k)]
