"""What an algorithm is (PPO, REINFORCE, RLOO, GRPO), and the pieces several of them share.

An algorithm is a value plugged into the one phase loop (``policy_trainer.PolicyTrainer``), not a subclass of it.
It holds its config and its own state, and answers five questions::

    param_groups(policy)                      what the optimiser trains, at which learning rate
    build_memory(rollout, kl_coef)            advantages (and returns) of a scored rollout -> ReplayMemory, metrics
    minibatches(memory, generator)            the shuffled minibatches one learning phase steps on
    loss(learning_pass, minibatch, kl_coef)   a pure loss: named terms, each a mean over the minibatch, with grad
    metrics(breakdown)                        the phase's losses/* metrics from the per-minibatch terms

plus ``total(terms)`` (the scalar to minimise), ``share`` (whether each term is a mean over tokens or over
responses, so that a piece of a minibatch gives its share), ``group_size`` (samples per prompt) and
``state_dict`` / ``load_state_dict``. The generic skeleton around ``loss`` (forward, log-probs, shares, finite
checks, the total, the clipping diagnostics) is ``learning_losses`` below: written once, for every algorithm.
``CriticFree`` holds what the algorithms without a value head (REINFORCE, RLOO, GRPO) answer alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_scratch import distributed
from rlhf_scratch.learner import NONFINITE_HINT, row_share, token_share
from rlhf_scratch.memory import ReplayMemory
from rlhf_scratch.objectives import calc_kl_penalty, generated_logprobs, per_token_kl, ppo_diagnostics
from rlhf_scratch.optimization import check_finite_terms
from rlhf_scratch.rollout import ScoredRollout, keeps_ref_logits


class CriticFree:
    """What the algorithms without a value head share (REINFORCE, RLOO, GRPO): the optimiser trains the trunk alone,
    at ``config.lr``, and a checkpoint has no value head to save."""

    saves_value_head = False
    nonfinite_hint = NONFINITE_HINT

    def param_groups(self, policy) -> list[dict]:
        """The trunk at ``lr`` (no value head)."""
        return [{"params": policy.trunk_parameters(), "lr": self.config.lr}]


@dataclass(eq=False)
class LearningPass:
    """One learning forward pass over a minibatch, read at the generated positions (with grad).

    logits_gen  Float [B, G, V]   the logits that predict the generated tokens, at the sampling temperature
    logp_gen    Float [B, G, V]   their log-softmax
    logprobs    Float [B, G]      log π(token) of the taken tokens
    values      Float [B, G]      the value head at each state (used only by algorithms with a critic)
    """

    logits_gen: Tensor
    logp_gen: Tensor
    logprobs: Tensor
    values: Tensor


def kl_loss_term(config, kl_coef: float, learning_pass: LearningPass, minibatch: ReplayMemory) -> Tensor:
    """``calc_kl_penalty`` (kl_coef · masked_mean(KL_t), with grad) with kl_mode="loss", else 0; KL_t by the
    configured estimator."""
    if config.kl_mode != "loss":
        return torch.zeros((), device=learning_pass.logprobs.device)
    kl = per_token_kl(config.kl_estimator, learning_pass.logprobs, minibatch.ref_logprobs, learning_pass.logits_gen,
                      minibatch.ref_logits_gen)
    return calc_kl_penalty(kl, minibatch.gen_mask, kl_coef)


def sequence_rewards(config, kl_coef: float, rollout: ScoredRollout) -> Tensor:
    """One reward per response for the algorithms without a critic:  r' = r − kl_coef · Σ_t KL_t  with
    kl_mode="reward" (the KL to the reference as a cost), else r (the KL is then a loss term).      [B]"""
    if config.kl_mode == "reward":
        return rollout.rewards - kl_coef * rollout.kl_per_token.sum(dim=1)
    return rollout.rewards


def memory_with_sequence_advantages(config, rollout: ScoredRollout, advantage: Tensor) -> ReplayMemory:
    """The replay memory of an algorithm without a critic: one advantage per response [B], copied onto each of its
    real tokens ([B, G], 0 on padding); values and returns are zeros."""
    zeros = torch.zeros_like(rollout.logprobs)
    advantages = torch.where(rollout.gen_mask, advantage[:, None].expand_as(zeros), zeros)
    return rollout.to_memory(zeros, advantages, zeros, keep_ref_logits=keeps_ref_logits(config))


def shuffled_minibatches(memory: ReplayMemory, minibatch_size: int, epochs: int, generator: torch.Generator):
    """``epochs`` passes over ``memory``, each a fresh shuffle cut into ``minibatch_size`` episodes (this rank's
    slice of each in a data-parallel run): what ``minibatches`` returns in every algorithm here."""
    return memory.minibatches(minibatch_size, epochs, generator=generator, rank=distributed.rank(),
                              world_size=distributed.world_size())


def breakdown_means(breakdown: list[dict[str, float]], names: dict[str, str]) -> dict[str, float]:
    """``{metric: mean over the phase's minibatches of breakdown[key]}`` for each ``metric: key`` of ``names``."""
    return {metric: sum(row[key] for row in breakdown) / len(breakdown) for metric, key in names.items()}


def learning_losses(algorithm, output, minibatch: ReplayMemory, kl_coef: float, temperature: float) -> tuple[dict[str, Tensor], Tensor]:
    """The skeleton every algorithm's learning step shares, around its pure ``loss``::

        learning pass (logits at the generated positions, log-probs, values) ─► algorithm.loss ─► named terms
        ─► each term as this piece's share of the whole minibatch's mean (token or row mean: algorithm.share)
        ─► terms["loss"] = algorithm.total(terms) ─► finite check ─► clipping diagnostics (clipped algorithms)

    ``output`` is the learner's forward pass (``PolicyOutput``, float32, with grad). Returns the terms and the new
    log-probs of the generated tokens [B, G] (detached), which ``--debug`` compares with the rollout's.
    """
    P = minibatch.prompt_len
    logits_gen, logp_gen, logprobs = generated_logprobs(output.logits, minibatch.sequences, P, temperature)
    learning_pass = LearningPass(logits_gen, logp_gen, logprobs, output.values[:, P - 1 : -1])
    terms = algorithm.loss(learning_pass, minibatch, kl_coef)
    terms = {name: (token_share if algorithm.share[name] == "tokens" else row_share)(value, minibatch)
             for name, value in terms.items()}
    terms["loss"] = algorithm.total(terms)
    check_finite_terms(terms, algorithm.nonfinite_hint)
    clip_coef = getattr(algorithm.config, "clip_coef", None)
    if algorithm.clipped:
        diagnostics = ppo_diagnostics(logprobs.detach(), minibatch.logprobs, minibatch.gen_mask, clip_coef)
        terms.update({f"diag/{k}": v if k.endswith("_max") else token_share(v, minibatch) for k, v in diagnostics.items()})
    return terms, logprobs.detach()
