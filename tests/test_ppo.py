"""The PPO trainer end to end on a tiny random model, and its safety checks."""

import json

import pytest
import torch

from rlhf_scratch.models import PolicyWithValueHead, load_policy
from rlhf_scratch.ppo import NonFiniteLossError, PPOConfig, PPOTrainer, preset_configs
from rlhf_scratch.rewards import RewardError
from rlhf_scratch.sampling import SamplingConfig


def small_config(**overrides) -> PPOConfig:
    base = dict(prompt="The movie", reward="chars:.", phases=2, batch_size=8, minibatch_size=4, ppo_epochs=2,
                warmup_phases=0, sampling=SamplingConfig(max_new_tokens=6))
    base.update(overrides)
    return PPOConfig(**base)


def make_trainer(tiny_bridge, **overrides) -> PPOTrainer:
    return PPOTrainer(small_config(**overrides), policy=PolicyWithValueHead(tiny_bridge))


def test_rollout_logprobs_align_with_each_row_alone(tiny_bridge):
    """memory.logprobs[i] is log π(token at P+i | prefix), at the sampling temperature."""
    trainer = make_trainer(tiny_bridge, sampling=SamplingConfig(max_new_tokens=5, temperature=2.0))
    prompts = [trainer.encode_text("The movie"), trainer.encode_text("What a waste of two")]
    memory = trainer.rollout_phase(prompts=prompts * 4)
    P = memory.prompt_len
    for row in range(len(memory)):
        real = memory.attention_mask[row].bool()
        tokens = memory.sequences[row][real][None]  # the row without padding
        n_prompt = int(memory.attention_mask[row, :P].sum())
        logits = trainer.policy.bridge(tokens) / 2.0
        logprobs = torch.log_softmax(logits[0, :-1], -1).gather(-1, tokens[0, 1:, None])[:, 0]
        expected = logprobs[n_prompt - 1 :]
        got = memory.logprobs[row][memory.gen_mask[row]]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_first_phase_kl_is_zero_and_first_minibatch_ratio_is_one(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    rollout = trainer.sample_and_score()
    assert rollout.stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    memory, _ = trainer.build_memory(rollout)
    breakdown = trainer.learning_phase(memory)
    assert breakdown[0]["diag/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert breakdown[0]["diag/clipfrac"] == 0.0
    assert len(breakdown) == trainer.config.steps_per_phase == 4
    # Later minibatches see an updated policy.
    assert any(abs(row["diag/ratio_mean"] - 1) > 1e-7 for row in breakdown[1:])


def test_training_changes_policy_but_not_reference(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    tokens = torch.tensor([[0, 5, 9, 17]])
    before_policy, before_ref = trainer.policy.bridge(tokens).clone(), trainer.reference(tokens).clone()
    trainer.learning_phase(trainer.rollout_phase())
    assert not torch.allclose(trainer.policy.bridge(tokens), before_policy)
    torch.testing.assert_close(trainer.reference(tokens), before_ref)


def test_nan_reward_is_caught_with_the_reward_name(tiny_bridge):
    class BrokenReward:
        name = "broken"

        def __call__(self, texts):
            return torch.full((len(texts),), float("nan"))

    trainer = PPOTrainer(small_config(), policy=PolicyWithValueHead(tiny_bridge), reward=BrokenReward())
    with pytest.raises(RewardError, match="broken"):
        trainer.rollout_phase()


def test_non_finite_loss_names_the_term(tiny_bridge):
    trainer = make_trainer(tiny_bridge)
    memory = trainer.rollout_phase()
    memory.returns[memory.gen_mask] = float("inf")
    with pytest.raises(NonFiniteLossError, match="value_loss"):
        trainer.learning_phase(memory)


def test_kl_as_loss_term_keeps_only_generated_reference_logits(tiny_bridge):
    trainer = make_trainer(tiny_bridge, kl_mode="loss", kl_estimator="exact", kl_coef=0.5)
    memory = trainer.rollout_phase()
    vocab = tiny_bridge.cfg.d_vocab
    assert memory.ref_logits_gen.shape == (len(memory), memory.gen_mask.shape[1], vocab)
    breakdown = trainer.learning_phase(memory)
    assert breakdown[0]["kl_penalty"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at first
    assert breakdown[-1]["kl_penalty"] > 0
    # With KL in the reward (the default), no vocabulary-sized tensor is kept.
    assert make_trainer(tiny_bridge).rollout_phase().ref_logits_gen is None


def test_train_writes_every_output(tiny_bridge, tmp_path):
    out = tmp_path / "run"
    trainer = PPOTrainer(small_config(out=out, phases=3), policy=PolicyWithValueHead(tiny_bridge))
    summary = trainer.train()
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "reward.png", "kl.png", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == [1, 2, 3]
    required = {"phase", "reward/mean", "reward/std", "objective/kl", "objective/entropy", "losses/policy",
                "losses/value", "losses/clipfrac", "losses/approx_kl", "lr", "seconds"}
    assert required <= set(rows[0])
    assert set(summary) >= {"reward_first", "reward_last", "kl_last", "phases", "episodes", "seconds"}
    assert summary["episodes"] == 3 * 8 and summary["reward_first"] == rows[0]["reward/mean"]
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8
    # The checkpoint reloads to the same policy (trunk and value head).
    loaded = load_policy(out / "checkpoint")
    tokens = torch.tensor([[0, 5, 9, 17]])
    a, b = trainer.policy(tokens), loaded(tokens)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_schedule_steps_once_per_phase(tiny_bridge):
    trainer = make_trainer(tiny_bridge, phases=4, warmup_phases=2, lr=1e-4, final_lr_scale=0.5)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.learning_phase(trainer.rollout_phase())
    assert lrs == pytest.approx([0.5e-4, 1e-4, 1e-4, 0.5e-4])
    # The value head's group (last: fused_where_contiguous splits the trunk's group in two) has its own rate.
    assert trainer.optimizer.param_groups[-1]["lr"] != trainer.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"minibatch_size": 3}, "must divide batch_size"),
        ({"phases": 0}, "phases"),
        ({"clip_coef": 1.5}, "clip_coef"),
        ({"warmup_phases": 5, "phases": 5}, "warmup_phases"),
        ({"min_prompt_tokens": 5, "max_prompt_tokens": 2}, "min_prompt_tokens"),
    ],
)
def test_config_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_presets_are_valid_configs():
    presets = preset_configs()
    assert list(presets)[0] == "tiny-sentiment"
    assert {"tiny-sentiment", "tiny-periods", "gpt2-imdb", "arena-gpt2"} <= set(presets)
    for make in presets.values():
        assert isinstance(make(), PPOConfig)
    assert presets["arena-gpt2"]().prompt == "This is"
    assert presets["gpt2-imdb"]().reward == "hf:lvwerra/distilbert-imdb:POSITIVE"


def test_default_task_reward_rises(small_pretrained, tmp_path):
    """Regression: PPO on the built-in sentiment task (small model, few phases) raises VADER reward."""
    out, _ = small_pretrained
    config = PPOConfig(
        model=str(out / "model"), phases=30, batch_size=64, minibatch_size=16, ppo_epochs=4,
        lr=3e-4, head_lr=3e-3, warmup_phases=1, kl_coef=0.02, sampling=SamplingConfig(max_new_tokens=16),
        out=tmp_path / "run", table_rows=2,
    )
    trainer = PPOTrainer(config)
    summary = trainer.train()
    early = sum(m["reward/mean"] for m in trainer.history[:3]) / 3
    # Measured (seed 0): about 0.06 over the first phases, about 0.58 over the last five.
    assert summary["reward_last"] > early + 0.25, (early, summary["reward_last"])
    assert summary["kl_last"] > 0


def test_objective_kl_is_the_estimators_sum_and_the_exact_kl_is_logged_on_request(tiny_bridge):
    """``objective/kl`` is Σ_t of the configured estimator (k1 by default, as TRL logs it), with no vocabulary-wide
    exact KL unless asked for; ``--log-exact-kl`` adds ``objective/kl_exact``, checked here against
    torch.distributions' KL of a fresh forward pass of each model."""
    trainer = make_trainer(tiny_bridge, sampling=SamplingConfig(max_new_tokens=6, temperature=1.5))
    with torch.no_grad():  # move the policy away from the reference so the KL is not 0
        for param in trainer.policy.trunk_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    rollout = trainer.sample_and_score()
    mask, P = rollout.gen_mask, rollout.prompt_len
    k1 = torch.where(mask, rollout.logprobs - rollout.ref_logprobs, 0.0).sum(1)
    assert rollout.stats["objective/kl"] == pytest.approx(k1.mean().item(), abs=1e-6)
    assert "objective/kl_exact" not in rollout.stats and rollout.exact_sequence_kl is None
    torch.testing.assert_close(rollout.sequence_kl, k1, rtol=0, atol=1e-6)  # what the KL controller reads

    config = small_config(sampling=SamplingConfig(max_new_tokens=6, temperature=1.5), log_exact_kl=True)
    exact_trainer = PPOTrainer(config, policy=trainer.policy)  # the same moved policy; a fresh generator: the same samples
    exact_trainer.reference = trainer.reference  # (its own would be a copy of the moved policy)
    exact_rollout = exact_trainer.sample_and_score()
    assert torch.equal(exact_rollout.sequences, rollout.sequences)
    assert exact_rollout.stats["objective/kl"] == rollout.stats["objective/kl"]  # still the k1 sum
    with torch.no_grad():
        seq, attention = rollout.sequences, rollout.attention_mask
        policy = torch.distributions.Categorical(logits=trainer.policy.bridge(seq, attention_mask=attention)[:, P - 1 : -1] / 1.5)
        reference = torch.distributions.Categorical(logits=trainer.reference(seq, attention_mask=attention)[:, P - 1 : -1] / 1.5)
    expected = torch.where(mask, torch.distributions.kl_divergence(policy, reference), 0.0).sum(1)
    assert expected.mean() > 1e-3
    torch.testing.assert_close(exact_rollout.exact_sequence_kl, expected, rtol=1e-4, atol=1e-5)
    assert exact_rollout.stats["objective/kl_exact"] == pytest.approx(expected.mean().item(), rel=1e-4)
