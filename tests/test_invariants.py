"""--debug invariants: each check passes on a real rollout and fires, by name, on a planted violation;
the checks by hand on small tensors; the trainer stops before the bad step and adds no forward pass."""

import math

import pytest
import torch

from rlhf_scratch import invariants
from rlhf_scratch.invariants import InvariantError
from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
from rlhf_scratch.sampling import SamplingConfig


def make_trainer(tiny_bridge, trainer_class=PPOTrainer, **overrides):
    base = dict(prompt="The movie", reward="chars:e", phases=2, batch_size=8, warmup_phases=0, debug=True,
                sampling=SamplingConfig(max_new_tokens=6))
    if trainer_class is PPOTrainer:
        base.update(minibatch_size=4, ppo_epochs=2)
        config_class = PPOConfig
    else:
        base.update(minibatch_size=4)
        config_class = REINFORCEConfig
    base.update(overrides)
    return trainer_class(config_class(**base), policy=PolicyWithValueHead(tiny_bridge))


def check(trainer, memory):
    tokenizer = trainer.policy.tokenizer
    invariants.check_memory(memory, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)


def real_row(memory, min_real: int = 3) -> int:
    """A row with at least ``min_real`` real generated tokens (a random model rarely says EOS)."""
    rows = torch.nonzero(memory.gen_mask.sum(1) >= min_real).flatten()
    assert len(rows) > 0
    return int(rows[0])


@pytest.mark.parametrize("trainer_class", [PPOTrainer, REINFORCETrainer])
def test_every_check_passes_on_a_real_phase(tiny_bridge, trainer_class):
    trainer = make_trainer(tiny_bridge, trainer_class)
    for _ in range(2):  # the second phase starts from an updated policy: ratio = 1 must hold again
        memory = trainer.rollout_phase()
        check(trainer, memory)
        trainer.learning_phase(memory)


def test_eos_and_padding_of_a_real_rollout_pass(tiny_bridge):
    """A rollout in which responses end early (EOS forced by a hook) still passes the mask checks."""
    eos = tiny_bridge.tokenizer.eos_token_id

    def force_eos_at_step_2(logits, hook):  # unembed output: make EOS certain at the third new token
        if logits.shape[1] == 1 and force_eos_at_step_2.calls == 2:
            logits[::2, -1, :] = -1e4
            logits[::2, -1, eos] = 1e4
        force_eos_at_step_2.calls += logits.shape[1] == 1 or 0
        return logits

    force_eos_at_step_2.calls = 0
    trainer = make_trainer(tiny_bridge)
    from rlhf_scratch.sampling import generate

    generation = generate(trainer.policy.bridge, [trainer.encode_text("The movie")] * 4, trainer.config.sampling,
                          generator=torch.Generator().manual_seed(0), fwd_hooks=[("unembed.hook_out", force_eos_at_step_2)])
    assert generation.ended_with_eos.any() and not generation.gen_mask.all()
    invariants.check_padding_after_first_eos(generation.sequences, generation.gen_mask, generation.prompt_len, eos,
                                             tiny_bridge.tokenizer.pad_token_id)
    invariants.check_gen_mask_is_prefix(generation.gen_mask)


def test_hole_in_gen_mask_is_named(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    row, P = real_row(memory), memory.prompt_len
    memory.gen_mask[row, 1] = False  # both masks agree on the hole, so the prefix check is the one to fail
    memory.attention_mask[row, P + 1] = 0
    memory.advantages[row, 0] = float("nan")  # a later check would fail too: the first one is named
    with pytest.raises(InvariantError, match=rf"'gen_mask_is_prefix' failed \(phase 1\).*row {row} is \[1 0 1.*a real token at column 2 after") as error:
        trainer.learning_phase(memory)
    assert error.value.check == "gen_mask_is_prefix"


def test_masks_that_disagree_are_named(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    row, P = real_row(memory), memory.prompt_len
    memory.attention_mask[row, P] = 0
    with pytest.raises(InvariantError, match=rf"gen_mask_matches_attention.*row {row}, generated column 0: attention_mask is 0"):
        check(trainer, memory)


def test_right_padded_prompt_is_named(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    P = memory.prompt_len
    memory.attention_mask[0, P - 1] = 0  # a hole at the end of the prompt
    with pytest.raises(InvariantError, match=rf"prompt_is_left_padded.*row 0 is \[{'1 ' * (P - 1)}0\]"):
        check(trainer, memory)


def test_real_token_after_eos_is_named(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    row, P = real_row(memory), memory.prompt_len
    memory.sequences[row, P + 1] = trainer.policy.tokenizer.eos_token_id  # an EOS the response did not stop at
    with pytest.raises(InvariantError, match=rf"padding_after_first_eos.*row {row}: its first EOS .* is at column 1"):
        check(trainer, memory)
    # With stop_at_eos=False an EOS mid-response is legitimate: the trainer skips this check (and the
    # next one to fail is the ratio: the planted token's log-prob is not the one the rollout recorded).
    trainer.config.sampling.stop_at_eos = False
    with pytest.raises(InvariantError, match="ratio_is_one"):
        trainer.learning_phase(memory)


def test_nan_advantage_is_named_with_its_position(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    memory.advantages[2, 0] = float("nan")
    memory.values[~memory.gen_mask] = float("inf")  # junk on padding is allowed: every loss masks it
    with pytest.raises(InvariantError, match=r"memory_is_finite.*memory.advantages has 1 non-finite value.*nan at index \[2, 0\]"):
        trainer.learning_phase(memory)


@pytest.mark.parametrize("trainer_class", [PPOTrainer, REINFORCETrainer])
def test_shifted_old_logprobs_fail_ratio_before_any_step(tiny_bridge, trainer_class):
    trainer = make_trainer(tiny_bridge, trainer_class)
    memory = trainer.rollout_phase()
    memory.logprobs[memory.gen_mask] += 0.05  # as if the rollout had read the tokens differently
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(InvariantError, match=r"'ratio_is_one' failed \(phase 1, minibatch 0\).*= 0\.0488 > tol 0\.001"):
        trainer.learning_phase(memory)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))  # stopped before the step


def test_approx_kl_bound_fires_once_the_policy_moves(tiny_bridge):
    trainer = make_trainer(tiny_bridge, lr=1e-2, debug_max_approx_kl=1e-9)
    memory = trainer.rollout_phase()
    # Minibatch 0 is before any step (approx-KL 0); minibatch 1 follows a large step.
    with pytest.raises(InvariantError, match=r"'approx_kl_bound' failed \(phase 1, minibatch 1\).*> bound 1e-09"):
        trainer.learning_phase(memory)


def test_debug_adds_no_forward_pass(tiny_bridge, monkeypatch):
    calls = []
    original = PolicyWithValueHead.forward
    monkeypatch.setattr(PolicyWithValueHead, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for debug in (False, True):
        trainer = make_trainer(tiny_bridge, debug=debug)
        memory = trainer.rollout_phase()
        calls.clear()
        breakdown = trainer.learning_phase(memory)
        assert len(calls) == len(breakdown) == 4


# ---------------------------------------------------------------- the pure checks, by hand
def test_prefix_check_by_hand():
    invariants.check_gen_mask_is_prefix(torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(InvariantError, match=r"row 1 is \[1 0 1\]: a real token at column 2 after padding \(1 of 2 rows"):
        invariants.check_gen_mask_is_prefix(torch.tensor([[True, True, False], [True, False, True]]))
    with pytest.raises(InvariantError, match=r"row 0 is \[1 0 1 1 0\]: a real token at column 2 after padding"):
        invariants.check_gen_mask_is_prefix(torch.tensor([[True, False, True, True, False]]))


def test_left_padding_check_by_hand():
    invariants.check_prompt_is_left_padded(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]), prompt_len=3)
    with pytest.raises(InvariantError, match=r"row 0 is \[0 0 0\]"):  # no prompt token at all
        invariants.check_prompt_is_left_padded(torch.tensor([[0, 0, 0, 1]]), prompt_len=3)
    with pytest.raises(InvariantError, match=r"row 0 is \[1 1 0\]"):  # right padding
        invariants.check_prompt_is_left_padded(torch.tensor([[1, 1, 0, 1]]), prompt_len=3)


def test_eos_check_by_hand():
    eos, pad, P = 7, 0, 1
    sequences = torch.tensor([[3, 5, 7, 0, 0], [3, 5, 6, 6, 6]])  # row 0 ends at its EOS (column 1), row 1 never ends
    gen_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    invariants.check_padding_after_first_eos(sequences, gen_mask, P, eos, pad)
    with pytest.raises(InvariantError, match=r"row 0: its first EOS \(id 7\) is at column 1, so gen_mask should be False at generated column 2"):
        invariants.check_padding_after_first_eos(sequences, torch.tensor([[True, True, True, False], [True] * 4]), P, eos, pad)
    with pytest.raises(InvariantError, match=r"row 0, generated column 3 holds token 9 after the first EOS"):
        invariants.check_padding_after_first_eos(torch.tensor([[3, 5, 7, 0, 9], [3, 5, 6, 6, 6]]), gen_mask, P, eos, pad)


def test_ratio_and_approx_kl_by_hand():
    mask = torch.tensor([[True, True, False]])
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    new = old + torch.tensor([[0.0, math.log(2.0), 5.0]])  # ratio 1, 2 and (padding, ignored) e^5
    invariants.check_ratio_is_one(old.clone(), old, mask)
    invariants.check_ratio_is_one(old + torch.tensor([[0.0, 0.0009, 0.0]]), old, mask)  # |e^0.0009 − 1| < 1e-3
    with pytest.raises(InvariantError, match=r"= 1 > tol 0.001, at row 0, generated column 1"):
        invariants.check_ratio_is_one(new, old, mask)
    # approx-KL = mean over real positions of (r − 1) − log r = (0 + (1 − log 2)) / 2 = 0.15343
    expected = (1 - math.log(2.0)) / 2
    invariants.check_approx_kl(new, old, mask, bound=expected + 1e-6)
    with pytest.raises(InvariantError, match=r"approx-KL\(π_old ‖ π\) of this minibatch is 0.1534 > bound 0.15"):
        invariants.check_approx_kl(new, old, mask, bound=0.15)


def test_values_check_by_hand():
    mask = torch.tensor([[True, True, False]])
    forward = torch.tensor([[0.5, -20.0, 1.0]])
    # relative to max(1, |V|): 9e-4 at |V| <= 1, 0.018 at |V| = 20; padding ignored
    invariants.check_values_match_rollout(forward + torch.tensor([[9e-4, 0.018, 5.0]]), forward, mask)
    with pytest.raises(InvariantError, match=r"'values_match_rollout' failed.*by 0.005 \(relative\) > tol 0.001, at row "
                                             r"0, generated column 1"):
        invariants.check_values_match_rollout(forward + torch.tensor([[0.0, 0.1, 0.0]]), forward, mask)


def test_sampling_check_by_hand():
    mask = torch.tensor([[True, True, False]])
    rollout = torch.tensor([[-1.0, -2.0, -3.0]])
    invariants.check_sampling_matches_rollout(rollout + torch.tensor([[0.0, 9e-4, 7.0]]), rollout, mask)  # padding ignored
    with pytest.raises(InvariantError, match=r"'sampling_matches_rollout' failed.*by 0.5 nats > tol 0.001, at row 0, "
                                             r"generated column 1"):
        invariants.check_sampling_matches_rollout(rollout + torch.tensor([[0.0, 0.5, 0.0]]), rollout, mask)


@pytest.mark.parametrize("trainer_class", [PPOTrainer, REINFORCETrainer])
def test_debug_rollout_catches_samples_from_another_distribution(tiny_bridge, trainer_class, monkeypatch):
    """A generator whose recorded log-probs are not the policy's (as a context-blind KV cache gives)
    stops the rollout under --debug, and only under --debug."""
    from rlhf_scratch import rollout, sampling

    honest = sampling.generate

    def drifting_generate(*args, **kwargs):
        generation = honest(*args, **kwargs)
        generation.sampled_logprobs = generation.sampled_logprobs - 0.3 * generation.gen_mask
        if generation.logp_gen is not None:  # the rollout reads the decoding steps' distributions (record=True)
            generation.logp_gen = generation.logp_gen - 0.3 * generation.gen_mask[..., None]
        return generation

    monkeypatch.setattr(rollout, "generate", drifting_generate)
    make_trainer(tiny_bridge, trainer_class, debug=False).rollout_phase()
    with pytest.raises(InvariantError, match=r"'sampling_matches_rollout' failed \(phase 1, rollout\).*0.3 nats"):
        make_trainer(tiny_bridge, trainer_class).rollout_phase()
