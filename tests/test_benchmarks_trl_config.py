"""benchmarks/trl_side_by_side.py maps the project's PPO shapes onto TRL 1.12 PPOConfig fields (no TRL needed)."""

import pytest
from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("trl_side_by_side")


def trl_loop_steps(fields: dict) -> tuple[int, list[int]]:
    """Optimizer steps and micro-batch sizes of one update, following TRL 1.12's loops literally."""
    local_batch = fields["per_device_train_batch_size"] * fields["gradient_accumulation_steps"]
    local_mini = local_batch // fields["num_mini_batches"]
    steps, calls, sizes = 0, 0, []
    for _ in range(fields["num_ppo_epochs"]):
        order = list(range(local_batch))
        for mini_start in range(0, local_batch, local_mini):
            mini = order[mini_start : mini_start + local_mini]
            for micro_start in range(0, local_mini, fields["per_device_train_batch_size"]):
                sizes.append(len(mini[micro_start : micro_start + fields["per_device_train_batch_size"]]))
                calls += 1  # accelerator.accumulate: steps every gradient_accumulation_steps calls
                steps += calls % fields["gradient_accumulation_steps"] == 0
    return steps, sizes


@pytest.mark.parametrize("batch, minibatch, epochs", [(64, 16, 4), (16, 8, 1), (16, 16, 2), (12, 3, 3), (8, 1, 1)])
def test_one_trl_update_is_one_project_phase(bench, batch, minibatch, epochs):
    fields = bench.trl_batch_fields(batch, minibatch, epochs)
    assert fields["per_device_train_batch_size"] * fields["gradient_accumulation_steps"] == batch  # rollout batch
    assert batch // fields["num_mini_batches"] == minibatch
    assert fields["local_rollout_forward_batch_size"] == batch
    steps, sizes = trl_loop_steps(fields)
    assert steps == bench.trl_optimizer_steps(fields) == epochs * batch // minibatch
    assert sizes == [minibatch] * steps  # each step sees one whole minibatch


def test_default_shapes_and_config(bench):
    # The project's values come from rlhf_scratch.ppo.PPOConfig at run time; literals here keep the test light.
    hp = {"lr": 3e-5, "kl_coef": 0.05, "kl_estimator": "k1", "clip_coef": 0.2, "vf_coef": 0.5, "clip_range_value": None,
          "gamma": 1.0, "lam": 0.95, "weight_decay": 0.0, "max_grad_norm": 1.0, "ent_coef": 0.001}
    kwargs = bench.trl_config_kwargs(16, 8, 1, 24, updates=3, hp=hp, seed=0, output_dir="/tmp/x")
    assert kwargs["per_device_train_batch_size"] == 16 and kwargs["num_mini_batches"] == 2
    assert kwargs["total_episodes"] == 48 and kwargs["response_length"] == 24
    assert kwargs["stop_token"] is None and kwargs["stop_token_id"] is None and kwargs["missing_eos_penalty"] is None
    assert kwargs["temperature"] == 1.0 and kwargs["learning_rate"] == hp["lr"]
    assert kwargs["bf16"] is False and kwargs["gradient_checkpointing"] is False and kwargs["use_cpu"] is True
    assert kwargs["report_to"] == "none" and kwargs["num_sample_generations"] == 0
    assert kwargs["cliprange_value"] == 1e9  # the project does not clip values: TRL's clip made a no-op
    assert bench.trl_config_kwargs(16, 8, 1, 24, 3, {**hp, "clip_range_value": 0.3}, 0, "/tmp/x")["cliprange_value"] == 0.3
    with pytest.raises(ValueError, match="k1 or k3"):
        bench.trl_config_kwargs(16, 8, 1, 24, 3, {**hp, "kl_estimator": "exact"}, 0, "/tmp/x")


def test_bad_shapes_are_refused(bench):
    with pytest.raises(ValueError, match="must divide"):
        bench.trl_batch_fields(16, 5, 1)
    with pytest.raises(ValueError):
        bench.trl_batch_fields(16, 8, 0)


def test_a_missing_trl_python_is_one_line_not_a_traceback(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"--trl-python .*nope/python: no such Python\. .*--make-trl-venv"):
        bench.main(["--trl-python", str(tmp_path / "nope" / "python"), "--models", "tiny", "--workdir", str(tmp_path / "w")])
