"""`rlhf-scratch inspect`: the value lens, the per-token table, and clear errors for checkpoints without a value head."""

import copy
import csv
import json
import math

import pytest
import torch

from rlhf_scratch.models import PolicyWithValueHead, ValueHead, save_model_dir
from rlhf_scratch.anatomy import apply_norm
from rlhf_scratch.value_lens import lens_values

TOKENS = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def random_head(d_model: int) -> ValueHead:
    """A value head with a non-zero output layer (a fresh one outputs exactly 0 everywhere)."""
    head = ValueHead(d_model)
    torch.nn.init.normal_(head.out.weight, std=0.5)
    torch.nn.init.normal_(head.out.bias, std=0.5)
    return head


def test_final_norm_matches_the_layernorm_and_rmsnorm_formulas_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    weight, bias = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.0, 0.5, -1.0])
    # mean 2, variance (1 + 0 + 1)/3 = 2/3: normalised (−√1.5, 0, √1.5), then γ and β.
    s = math.sqrt(1.5)
    assert torch.allclose(apply_norm(x, weight, bias, eps=0.0, center=True), torch.tensor([[-s, 0.5, s - 1.0]]))
    # RMS: x / sqrt((1 + 4 + 9)/3), times γ, no centering.
    r = math.sqrt(14 / 3)
    assert torch.allclose(apply_norm(x, weight, None, eps=0.0, center=False), torch.tensor([[1 / r, 4 / r, 3 / r]]))


def test_value_lens_has_one_row_per_residual_stream_and_its_last_row_is_the_value_head(tiny_bridge):
    with torch.no_grad():  # a non-trivial final LayerNorm, so applying it by hand is really tested
        for param in (tiny_bridge.ln_final.original_component.weight, tiny_bridge.ln_final.original_component.bias):
            param.add_(0.3 * torch.randn_like(param))
    policy = PolicyWithValueHead(tiny_bridge, random_head(tiny_bridge.cfg.d_model))
    values, logits, lens = lens_values(policy, TOKENS, MASK)
    assert lens.shape == (tiny_bridge.cfg.n_layers + 1, 2, 6)
    assert values.shape == (2, 6) and logits.shape[:2] == (2, 6)
    assert values.abs().max() > 0.1
    real = MASK.bool()
    torch.testing.assert_close(lens[-1][real], values[real], atol=1e-5, rtol=1e-5)
    # Earlier rows read other residual streams: they differ from the head's output.
    assert (lens[0][real] - values[real]).abs().max() > 1e-3


@pytest.fixture()
def ppo_run(tiny_bridge, tmp_path):
    """A fake PPO run: checkpoint/ with a (random) value head, and the run's config.json beside it."""
    policy = copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        policy.blocks[1].mlp.W_out.add_(0.2 * torch.randn_like(policy.blocks[1].mlp.W_out))
    checkpoint = save_model_dir(policy, tmp_path / "run" / "checkpoint", value_head=random_head(policy.cfg.d_model),
                                meta={"kind": "ppo", "phase": 3, "base_model": "builtin"})
    (tmp_path / "run" / "config.json").write_text(json.dumps({
        "reward": "chars:.", "gamma": 0.9, "lam": 0.5, "kl_coef": 0.25, "kl_mode": "reward", "kl_estimator": "k1",
        "sampling": {"temperature": 1.0},
    }))
    return checkpoint


def test_inspect_cli_writes_the_table_lens_and_plot(ppo_run, tiny_model_dir, tmp_path):
    from rlhf_scratch.cli import main

    out = tmp_path / "inspect"
    code = main(["inspect", "--checkpoint", str(ppo_run), "--prompt", "The acting", "--response", " was great. Not bad.",
                 "--reference", str(tiny_model_dir), "--out", str(out)])
    assert code == 0
    for name in ("value_lens.png", "tokens.csv", "summary.json", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_spec"] == "chars:." and summary["reward"] == 2.0  # two periods in prompt + response
    assert (summary["settings"]["gamma"], summary["settings"]["lam"]) == (0.9, 0.5)
    rows = summary["tokens"]
    G = len(rows)
    assert len(summary["lens"]) == 3 and all(len(layer) == G for layer in summary["lens"])
    assert summary["lens_last_equals_value_head"] < 1e-5
    with (out / "tokens.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == G
    # Token rewards: −kl_coef·KL_t everywhere, plus the task reward on the last token (kl_mode "reward").
    for row in rows[:-1]:
        assert row["reward"] == pytest.approx(-0.25 * row["kl"], abs=1e-5)
    assert rows[-1]["reward"] == pytest.approx(2.0 - 0.25 * rows[-1]["kl"], abs=1e-5)
    assert any(abs(row["kl"]) > 1e-4 for row in rows)  # the policy differs from the reference
    # GAE by hand from the table's own columns: δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, return = A + V.
    gamma, lam, next_value, next_advantage = 0.9, 0.5, 0.0, 0.0
    for row in reversed(rows):
        advantage = row["reward"] + gamma * next_value - row["value"] + gamma * lam * next_advantage
        assert row["advantage"] == pytest.approx(advantage, abs=1e-5)
        assert row["ret"] == pytest.approx(advantage + row["value"], abs=1e-5)
        next_value, next_advantage = row["value"], advantage


def test_inspect_samples_a_response_when_none_is_given(ppo_run, capsys):
    from rlhf_scratch.value_lens import InspectConfig, run_inspect

    summary = run_inspect(InspectConfig(checkpoint=str(ppo_run), prompt="The movie", max_new_tokens=5, reward="vader"))
    assert 1 <= len(summary["tokens"]) <= 5 and summary["reward_spec"] == "vader"
    assert "kl" not in summary["tokens"][0]  # no reference given: no KL term
    assert "Value lens" in capsys.readouterr().out


def test_inspect_says_it_needs_a_ppo_checkpoint(tiny_bridge, tmp_path, capsys):
    from rlhf_scratch.cli import main

    checkpoint = save_model_dir(tiny_bridge, tmp_path / "reinforce" / "checkpoint", meta={"kind": "reinforce"})
    assert main(["inspect", "--checkpoint", str(checkpoint), "--prompt", "The acting"]) == 1
    err = capsys.readouterr().err
    assert "a reinforce checkpoint" in err and "inspect needs a PPO checkpoint" in err
    assert main(["inspect", "--checkpoint", str(tmp_path / "missing"), "--prompt", "The acting"]) == 1
    assert f"No such model directory: {tmp_path / 'missing'} (given as --checkpoint" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", "builtin"]) == 1
    assert "built-in base model, which has no value head" in capsys.readouterr().err


def test_run_settings_prefer_the_config_saved_in_the_checkpoint(tmp_path):
    from rlhf_scratch.value_lens import run_settings

    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    assert run_settings(checkpoint)["source"] == "PPOConfig defaults"
    (tmp_path / "run" / "config.json").write_text(json.dumps({"reward": "chars:!", "gamma": 0.9}))
    assert (run_settings(checkpoint)["reward"], run_settings(checkpoint)["gamma"]) == ("chars:!", 0.9)
    (checkpoint / "resume_state.json").write_text(json.dumps({"config": {"reward": "vader", "lam": 0.3,
                                                                          "sampling": {"temperature": 0.7}}}))
    settings = run_settings(checkpoint)
    assert (settings["reward"], settings["lam"], settings["temperature"]) == ("vader", 0.3, 0.7)
    assert settings["gamma"] == 1.0  # not in the saved config: PPOConfig's default
