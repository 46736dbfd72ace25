"""Tests for rlhf_scratch.schedule.warmup_decay_lambda."""

import pytest
import torch

from rlhf_scratch.schedule import warmup_decay_lambda


def test_values_by_hand():
    # N = 10, W = 4, f = 0.1: warmup 0.25, 0.5, 0.75, 1.0 at steps 0–3;
    # decay over steps 4..9 (5 intervals): 1 − 0.9·k/5 = 1.0, 0.82, 0.64, 0.46, 0.28, 0.1
    m = warmup_decay_lambda(total_steps=10, warmup_steps=4, final_scale=0.1)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1, 0.1, 0.1]
    assert [m(step) for step in range(12)] == pytest.approx(expected)
    assert m(0) > 0  # the first step must not be wasted at multiplier 0
    assert m(1000) == pytest.approx(0.1)


def test_no_warmup_starts_at_one():
    m = warmup_decay_lambda(total_steps=5, warmup_steps=0, final_scale=0.0)
    assert [m(step) for step in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_single_step_decay_and_single_step_run():
    m = warmup_decay_lambda(total_steps=3, warmup_steps=2, final_scale=0.5)
    assert [m(step) for step in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert warmup_decay_lambda(1, 0, 0.0)(0) == 1.0


def test_in_a_real_lambda_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay_lambda(6, 2, 0.5))
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr this step uses
        param.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    # multipliers: 0.5, 1.0 | 1.0, 0.8333, 0.6667, 0.5 (decay over steps 2..5) | 0.5
    assert seen == pytest.approx([0.1, 0.2, 0.2, 0.2 * 5 / 6, 0.2 * 4 / 6, 0.1, 0.1])


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 0.1), "total_steps=0 must be >= 1"),
        ((10, 10, 0.1), "warmup_steps=10 must satisfy 0 <= warmup_steps < total_steps=10"),
        ((10, -1, 0.1), "warmup_steps=-1"),
        ((10, 2, 1.5), r"final_scale=1.5 must lie in \[0, 1\]"),
        ((10, 2, -0.1), "final_scale=-0.1"),
    ],
)
def test_bad_arguments_are_rejected_with_a_message(args, message):
    with pytest.raises(ValueError, match=message):
        warmup_decay_lambda(*args)


@pytest.mark.parametrize("phases, warmup", [(1, 0), (2, 1), (3, 2), (40, 2)])
def test_the_default_warmup_fits_short_runs(phases, warmup):
    # `--phases 2` used to fail: "warmup_phases must be in [0, phases=2), got 2" (issue 22). The default now fits.
    from rlhf_scratch.ppo import PPOConfig

    config = PPOConfig(phases=phases)
    assert config.warmup_phases is None and config.effective_warmup_phases == warmup
    assert PPOConfig(phases=phases, warmup_phases=0).effective_warmup_phases == 0


def test_a_warmup_as_long_as_the_run_names_the_fix(tiny_model_dir, tmp_path, capsys):
    from rlhf_scratch.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["ppo", "--model", str(tiny_model_dir), "--phases", "2", "--warmup-phases", "2", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "got 2: pass --warmup-phases 0" in err and "at most 1" in err  # one line, no box
