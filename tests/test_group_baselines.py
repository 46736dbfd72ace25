"""RLOO and GRPO: the group advantages and token aggregations against hand-worked values, and the trainers end to end."""

import json

import pytest
import torch
from conftest import TINY_TEXTS

from rlhf_scratch.advantages import constant_groups, grpo_advantages, rloo_advantages
from rlhf_scratch.cli import main
from rlhf_scratch.group_baselines import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from rlhf_scratch.objectives import aggregate_tokens, clipped_surrogate_per_token
from rlhf_scratch.sampling import SamplingConfig

# --------------------------------------------------------------------------- the math, by hand


def test_rloo_baseline_is_the_mean_of_the_others_by_brute_force():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, -1.0, 0.0, 0.5, 4.0])
    expected = []
    for group in rewards.view(2, 4):
        for i in range(4):
            others = [group[j].item() for j in range(4) if j != i]
            expected.append(group[i].item() - sum(others) / len(others))
    torch.testing.assert_close(rloo_advantages(rewards, 4), torch.tensor(expected))
    torch.testing.assert_close(rloo_advantages(rewards, 4)[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2]))


def test_grpo_advantages_by_hand():
    # One better sample among four: mean 0.25, sample std (Bessel) sqrt((3·0.25² + 0.75²)/3) = 0.5.
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(grpo_advantages(rewards, 4, eps=0.0), torch.tensor([-0.5, -0.5, -0.5, 1.5]))
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale_by_std=False), torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert (grpo_advantages(rewards, 4) > 0).tolist() == [False, False, False, True]  # the only positive one
    # A group of identical rewards teaches nothing: zero advantage (not 0/0).
    same = torch.tensor([0.7, 0.7, 0.7, 2.0, 1.0, 0.0])
    assert grpo_advantages(same, 3)[:3].tolist() == [0.0, 0.0, 0.0]
    assert rloo_advantages(same, 3)[:3].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 16, 64])
def test_a_constant_group_gets_exactly_zero_advantage(dtype, k):
    # In float32 the mean of 8 copies of 0.8734 is not 0.8734; divided by std + 1e-4 the rest became +0.00119 for
    # every sample (issue 22). Any constant, any k, both dtypes: exactly 0, and the group counted as teaching nothing.
    torch.manual_seed(k)
    constants = torch.cat([torch.rand(200) * 10 - 5, torch.randn(100) * 1e3, torch.tensor([0.8734, 1 / 3, 0.1])])
    for c in constants.tolist():
        same = torch.full((k,), c, dtype=dtype)
        for fn in (rloo_advantages, grpo_advantages, lambda r, k: grpo_advantages(r, k, scale_by_std=False)):
            assert (fn(same, k) == 0).all(), (c, k, dtype, fn(same, k))
        assert constant_groups(same, k).tolist() == [True]


def test_zero_advantage_fraction_counts_equal_groups_in_any_layout():
    # Three groups of four: the first and third constant (0.8734 and 1/3: float means that miss the value), the
    # second not. One group per batch, or all three together, in any order: the same verdict per group.
    groups = [torch.full((4,), 0.8734), torch.tensor([0.1, 0.2, 0.2, 0.2]), torch.full((4,), 1 / 3)]
    assert constant_groups(torch.cat(groups), 4).tolist() == [True, False, True]
    assert constant_groups(torch.cat(groups[::-1]), 4).tolist() == [True, False, True]
    assert [constant_groups(g, 4).item() for g in groups] == [True, False, True]
    advantages = grpo_advantages(torch.cat(groups), 4)
    assert (advantages[:4] == 0).all() and (advantages[8:] == 0).all() and (advantages[4:8] != 0).all()


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_size_must_divide_the_batch(fn):
    with pytest.raises(ValueError, match="group_size=3 must be >= 2 and divide the batch"):
        fn(torch.zeros(4), 3)


def test_token_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])  # 9: padding, never counted
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate_tokens(x, mask, "token-mean").item() == pytest.approx((1 + 2 + 3) / 3)
    assert aggregate_tokens(x, mask, "sequence-mean").item() == pytest.approx(((1 + 2) / 2 + 3 / 1) / 2)
    assert aggregate_tokens(x, mask, "constant", max_tokens=3).item() == pytest.approx((3 + 3) / 2 / 3)
    with pytest.raises(ValueError, match="Unknown aggregation"):
        aggregate_tokens(x, mask, "mean")


def test_clipped_surrogate_per_token_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 7.0]]))
    advantages = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    got = clipped_surrogate_per_token(new, old, advantages, mask, clip_coef=0.2)
    # min(1.5·1, 1.2·1) = 1.2;  min(0.5·−1, 0.8·−1) = −0.8;  padding 0.
    torch.testing.assert_close(got, torch.tensor([[1.2, -0.8, 0.0]]))


# --------------------------------------------------------------------------- the trainers


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(dict.fromkeys(TINY_TEXTS)) + "\n")
    return path


def group_config(config_class, model_dir, prompts_file, **overrides):
    base = dict(model=str(model_dir), data=str(prompts_file), reward="chars:e", phases=2, warmup_phases=0, batch_size=8,
                group_size=4, lr=1e-3, sampling=SamplingConfig(max_new_tokens=6), table_rows=2, debug=True)
    base.update(overrides)
    return config_class(**base)


@pytest.mark.parametrize("config_class, trainer_class", [(RLOOConfig, RLOOTrainer), (GRPOConfig, GRPOTrainer)])
def test_a_phase_samples_groups_and_their_advantages_sum_to_zero(tiny_model_dir, prompts_file, config_class, trainer_class):
    trainer = trainer_class(group_config(config_class, tiny_model_dir, prompts_file, minibatch_size=4))
    rollout = trainer.sample_and_score()
    prompts = rollout.generation.prompts
    assert [prompts[i] for i in range(0, 8, 4)] != [] and all(prompts[i] == prompts[i - i % 4] for i in range(8))
    memory, stats = trainer.build_memory(rollout)
    per_response = memory.advantages.sum(1) / memory.gen_mask.sum(1)
    # Every real token of a response carries its advantage; within a group they sum to 0 (both estimators).
    assert torch.equal(memory.advantages != 0, memory.gen_mask & (per_response != 0)[:, None])
    torch.testing.assert_close(per_response.view(2, 4).sum(1), torch.zeros(2), atol=1e-5, rtol=0)
    before = [p.detach().clone() for p in trainer.policy.trunk_parameters()]
    breakdown = trainer.learning_phase(memory)  # --debug: ratio = 1 on the first minibatch, approx-KL bound
    assert len(breakdown) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in breakdown)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trunk_parameters()))
    assert 0 <= stats["group/zero_advantage_frac"] <= 1


@pytest.mark.parametrize("dr_grpo", [False, True])
def test_grpo_surrogate_at_ratio_one_is_the_aggregated_advantage(tiny_model_dir, prompts_file, dr_grpo):
    """An independent check of the plumbing: before any step, ratio = 1, so the surrogate is the aggregation of A itself:
    GRPO mean_b A_b (= 0 over whole groups); Dr. GRPO mean_b(A_b · |y_b|) / max_new_tokens."""
    trainer = GRPOTrainer(group_config(GRPOConfig, tiny_model_dir, prompts_file, minibatch_size=None, dr_grpo=dr_grpo))
    memory, _ = trainer.build_memory(trainer.sample_and_score())
    breakdown = trainer.learning_phase(memory)
    lengths = memory.gen_mask.sum(1).float()
    advantage = memory.advantages.sum(1) / lengths
    expected = (advantage * lengths).mean() / 6 if dr_grpo else advantage.mean()
    assert breakdown[0]["surrogate"] == pytest.approx(expected.item(), abs=1e-6)
    if not dr_grpo:  # standardised within each group
        torch.testing.assert_close(advantage.view(2, 4).std(1), torch.ones(2), atol=1e-3, rtol=0)


def test_grpo_resumes_exactly(tiny_model_dir, prompts_file, tmp_path):
    from test_resume import assert_same_metrics, read_metrics

    make = lambda out, **kw: group_config(GRPOConfig, tiny_model_dir, prompts_file, phases=3, out=out, debug=False, minibatch_size=4, **kw)  # noqa: E731
    GRPOTrainer(make(tmp_path / "full")).train()
    GRPOTrainer(make(tmp_path / "split", checkpoint_every=1)).train(stop_after=1)
    GRPOTrainer.resume(GRPOConfig(resume=tmp_path / "split")).train()
    assert_same_metrics(read_metrics(tmp_path / "split"), read_metrics(tmp_path / "full"))


@pytest.mark.parametrize("command", ["rloo", "grpo"])
def test_the_commands_train_and_write_the_usual_outputs(command, tiny_model_dir, tmp_path):
    out = tmp_path / command
    args = [command, "--model", str(tiny_model_dir), "--reward", "chars:e", "--prompt", "The", "--phases", "2",
            "--warmup-phases", "0", "--batch-size", "8", "--group-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4", "--table-rows", "1",
            "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == [1, 2] and "group/reward_std" in rows[0]
    assert json.loads((out / "checkpoint" / "resume_state.json").read_text())["kind"] == command
    with pytest.raises(SystemExit) as invalid:  # an invalid config: tyro prints the message, exit status 2
        main([command, "--batch-size", "6", "--group-size", "4"])
    assert invalid.value.code == 2


def test_group_sizes_are_checked():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(batch_size=8, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        RLOOConfig(batch_size=8, group_size=1)
