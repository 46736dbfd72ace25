"""REINFORCE: the baseline against hand computations, the loss gradient by hand, the direction of
an update on a real model, and the trainer's outputs (the same as PPO's)."""

import json

import pytest
import torch

from rlhf_scratch.models import VALUE_HEAD_FILE, PolicyWithValueHead, load_policy
from rlhf_scratch.objectives import masked_sequence_sum
from rlhf_scratch.reinforce import (
    MovingAverageBaseline,
    REINFORCEConfig,
    REINFORCETrainer,
    reinforce_loss,
)
from rlhf_scratch.sampling import SamplingConfig


class ScriptedReward:
    """Returns the given rewards, one list per call."""

    name = "scripted"

    def __init__(self, *batches):
        self.batches = list(batches)

    def __call__(self, texts):
        values = self.batches.pop(0)
        assert len(values) == len(texts)
        return torch.tensor(values, dtype=torch.float32)


def small_config(**overrides) -> REINFORCEConfig:
    base = dict(prompt="The movie", reward="chars:.", phases=2, batch_size=4, warmup_phases=0, kl_coef=0.0,
                sampling=SamplingConfig(max_new_tokens=6))
    base.update(overrides)
    return REINFORCEConfig(**base)


def test_moving_average_by_hand():
    mean = MovingAverageBaseline("mean")
    assert mean.value is None
    assert mean.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2.0)
    assert mean.update(torch.tensor([4.0, 5.0])) == pytest.approx(3.0)  # (1+2+3+4+5)/5
    assert mean.update(torch.tensor([-15.0])) == pytest.approx(0.0)  # (15 − 15)/6
    ema = MovingAverageBaseline("ema", decay=0.5)
    assert ema.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)  # first batch: its mean
    assert ema.update(torch.tensor([6.0])) == pytest.approx(4.0)  # 0.5·2 + 0.5·6
    assert ema.update(torch.tensor([0.0, 2.0])) == pytest.approx(2.5)  # 0.5·4 + 0.5·1
    with pytest.raises(ValueError, match="mode"):
        MovingAverageBaseline("median")


def test_loss_and_its_gradient_by_hand():
    seq_logprobs = torch.tensor([-3.0, -5.0], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss = reinforce_loss(seq_logprobs, advantages)
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -5.0) / 2)  # 0.5
    loss.backward()
    # ∂loss/∂log π(y_b) = −A_b / B: descent raises the above-baseline sample, lowers the other.
    torch.testing.assert_close(seq_logprobs.grad, torch.tensor([-1.0, 0.5]))
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    assert masked_sequence_sum(logprobs, torch.tensor([[True, True, False]])).item() == pytest.approx(-3.0)


def test_advantages_are_reward_minus_the_earlier_baseline(tiny_bridge):
    trainer = REINFORCETrainer(small_config(batch_size=2), policy=PolicyWithValueHead(tiny_bridge),
                               reward=ScriptedReward([1.0, 3.0], [5.0, 7.0]))
    first = trainer.rollout_phase()
    # First batch: no earlier rewards, b = its own mean 2.
    assert first.advantages[first.gen_mask].tolist() == pytest.approx(
        [-1.0] * int(first.gen_mask[0].sum()) + [1.0] * int(first.gen_mask[1].sum()))
    assert (first.advantages[~first.gen_mask] == 0).all()
    second = trainer.rollout_phase()
    assert second.advantages[:, 0].tolist() == pytest.approx([3.0, 5.0])  # b = 2 from the first batch
    assert trainer.algorithm.baseline.value == pytest.approx(4.0)  # (1 + 3 + 5 + 7) / 4


def test_kl_penalty_shapes_the_reward(tiny_bridge):
    trainer = REINFORCETrainer(small_config(batch_size=2, kl_coef=0.5), policy=PolicyWithValueHead(tiny_bridge),
                               reward=ScriptedReward([0.0, 0.0], [1.0, 1.0]))
    trainer.algorithm.baseline.update(torch.tensor([0.25]))  # a known baseline
    with torch.no_grad():  # move the policy away from the reference
        for param in trainer.policy.trunk_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    memory = trainer.rollout_phase()
    k1_sum = torch.where(memory.gen_mask, memory.logprobs - memory.ref_logprobs, 0.0).sum(1)
    assert k1_sum.abs().max() > 0.01
    torch.testing.assert_close(memory.advantages[:, 0], 0.0 - 0.5 * k1_sum - 0.25)


@pytest.mark.parametrize("reward, direction", [(1.0, +1), (-1.0, -1)])
def test_update_raises_above_baseline_and_lowers_below_baseline_samples(tiny_bridge, reward, direction):
    """Phase 1 (reward 0) sets b = 0; phase 2 gives one sample reward ±1: its log π(y) moves the same way."""
    trainer = REINFORCETrainer(small_config(batch_size=1, lr=1e-3), policy=PolicyWithValueHead(tiny_bridge),
                               reward=ScriptedReward([0.0], [reward]))
    trainer.learning_phase(trainer.rollout_phase())
    assert trainer.algorithm.baseline.value == 0.0
    memory = trainer.rollout_phase()
    assert memory.advantages[0, 0].item() == reward

    def seq_logprob() -> float:
        with torch.no_grad():
            logits = trainer.policy(memory.sequences, memory.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, memory.sequences[:, 1:, None])[..., 0]
        return logp[:, memory.prompt_len - 1 :][memory.gen_mask].sum().item()

    before = seq_logprob()
    breakdown = trainer.learning_phase(memory)
    after = seq_logprob()
    assert len(breakdown) == 1 and breakdown[0]["grad_norm"] > 0
    assert direction * (after - before) > 1e-3, (before, after)


def test_minibatches_give_several_steps_per_phase(tiny_bridge):
    trainer = REINFORCETrainer(small_config(batch_size=4, minibatch_size=2), policy=PolicyWithValueHead(tiny_bridge))
    assert len(trainer.learning_phase(trainer.rollout_phase())) == 2


def test_train_writes_the_same_outputs_as_ppo(tiny_bridge, tmp_path):
    out = tmp_path / "run"
    trainer = REINFORCETrainer(small_config(out=out, phases=3, table_rows=2), policy=PolicyWithValueHead(tiny_bridge))
    summary = trainer.train()
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "reward.png", "kl.png", "summary.json"):
        assert (out / name).is_file(), name
    assert set(summary) == {"reward_first", "reward_last", "kl_last", "phases", "episodes", "seconds"}
    assert summary["episodes"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == [1, 2, 3]
    assert {"reward/mean", "reward/std", "objective/kl", "objective/entropy", "losses/policy", "lr",
            "reinforce/baseline", "seconds"} <= set(rows[0])
    assert json.loads((out / "checkpoint" / "rlhf_scratch.json").read_text())["kind"] == "reinforce"
    assert not (out / "checkpoint" / VALUE_HEAD_FILE).exists()
    loaded = load_policy(out / "checkpoint")
    tokens = torch.tensor([[0, 5, 9, 17]])
    torch.testing.assert_close(loaded(tokens).logits, trainer.policy(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [({"minibatch_size": 3}, "must divide batch_size"),
                                                ({"baseline_decay": 1.0}, "baseline_decay"),
                                                ({"lr": 0.0}, "lr must be > 0"), ({"phases": 0}, "phases")])
def test_config_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_kl_as_a_loss_term(tiny_bridge):
    trainer = REINFORCETrainer(small_config(batch_size=2, kl_mode="loss", kl_estimator="exact", kl_coef=0.5, lr=1e-2),
                               policy=PolicyWithValueHead(tiny_bridge), reward=ScriptedReward([0.0, 1.0], [0.0, 1.0]))
    first = trainer.learning_phase(trainer.rollout_phase())
    assert first[0]["kl_penalty"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    second = trainer.learning_phase(trainer.rollout_phase())
    assert second[0]["kl_penalty"] > 0
    assert second[0]["loss"] == pytest.approx(second[0]["policy_loss"] + second[0]["kl_penalty"])
