"""The notebook workflow: objectives computed by hand on a minibatch equal what learning_phase logs for it."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.objectives import (
    calc_clipped_surrogate,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_loss,
    generated_logits,
    kl_exact,
    masked_sequence_sum,
    taken_logprobs,
)
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer, reinforce_loss
from rlhf_scratch.sampling import SamplingConfig


def ppo_trainer(bridge, **overrides) -> PPOTrainer:
    base = dict(prompt="The movie", reward="chars:e", phases=3, batch_size=8, minibatch_size=4, ppo_epochs=2,
                warmup_phases=0, lr=1e-3, sampling=SamplingConfig(max_new_tokens=6, temperature=1.3))
    base.update(overrides)
    return PPOTrainer(PPOConfig(**base), policy=PolicyWithValueHead(bridge))


@pytest.mark.parametrize("overrides", [
    {"kl_mode": "loss", "kl_estimator": "exact", "kl_coef": 0.3, "clip_range_value": 0.05},
    {"normalize_advantages": False, "vf_coef": 1.0, "ent_coef": 0.01},
])
def test_objectives_by_hand_equal_the_logged_breakdown(tiny_bridge, overrides):
    trainer = ppo_trainer(tiny_bridge, **overrides)
    trainer.learning_phase(trainer.rollout_phase())  # move the policy away from the reference first
    config = trainer.config
    memory = trainer.rollout_phase()
    minibatches = list(trainer.minibatches(memory))
    mb = minibatches[0]
    P, mask, T = mb.prompt_len, mb.gen_mask, config.sampling.temperature
    with torch.no_grad():
        output = trainer.policy(mb.sequences, mb.attention_mask)
    logits = output.logits / T
    logprobs = taken_logprobs(logits, mb.sequences, P)
    logits_gen = generated_logits(logits, P)
    surrogate = calc_clipped_surrogate(logprobs, mb.logprobs, mb.advantages, mask, config.clip_coef, config.normalize_advantages)
    value_loss = calc_value_loss(output.values[:, P - 1 : -1], mb.returns, mask, config.vf_coef, mb.values, config.clip_range_value)
    entropy_bonus = calc_entropy_bonus(logits_gen, mask, config.ent_coef)
    if config.kl_mode == "loss":
        kl_penalty = calc_kl_penalty(kl_exact(logits_gen, mb.ref_logits_gen), mask, trainer.kl_controller.value)
    else:
        kl_penalty = torch.tensor(0.0)
    by_hand = {"surrogate": surrogate, "value_loss": value_loss, "entropy_bonus": entropy_bonus,
               "kl_penalty": kl_penalty, "loss": -(surrogate - value_loss + entropy_bonus - kl_penalty)}
    assert all(abs(by_hand[name].item()) > 1e-6 for name in ("value_loss", "entropy_bonus"))
    if config.kl_mode == "loss":
        assert kl_penalty.item() > 1e-6

    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    assert len(breakdown) == len(minibatches) == config.steps_per_phase
    for name, value in by_hand.items():
        assert breakdown[0][name] == pytest.approx(value.item(), rel=1e-6, abs=1e-8), name
    assert breakdown[0]["diag/ratio_mean"] == 1.0
    # The later minibatches were computed after steps: hand values with the old policy no longer match them.
    assert breakdown[1]["diag/ratio_mean"] != 1.0


def test_drawing_minibatches_first_changes_nothing(tiny_model_dir):
    """learning_phase(memory) and learning_phase(memory, minibatches=list(trainer.minibatches(memory))) are the same step."""
    results = []
    for draw_first in (False, True):
        trainer = PPOTrainer(PPOConfig(model=str(tiny_model_dir), prompt="The movie", reward="chars:e", phases=3,
                                       batch_size=8, minibatch_size=4, ppo_epochs=2, warmup_phases=0,
                                       sampling=SamplingConfig(max_new_tokens=6)))
        memory = trainer.rollout_phase()
        minibatches = list(trainer.minibatches(memory)) if draw_first else None
        results.append(trainer.learning_phase(memory, minibatches=minibatches) + trainer.learning_phase(trainer.rollout_phase()))
    assert results[0] == results[1]


def test_reinforce_loss_by_hand_equals_the_logged_one(tiny_bridge):
    trainer = REINFORCETrainer(REINFORCEConfig(prompt="The movie", reward="chars:e", phases=3, batch_size=8, minibatch_size=4,
                                               warmup_phases=0, sampling=SamplingConfig(max_new_tokens=6)),
                               policy=PolicyWithValueHead(tiny_bridge))
    memory = trainer.rollout_phase()
    minibatches = list(trainer.minibatches(memory))
    mb = minibatches[0]
    with torch.no_grad():
        logits = trainer.policy(mb.sequences, mb.attention_mask).logits
    logprobs = taken_logprobs(logits, mb.sequences, mb.prompt_len)
    advantage = mb.advantages[:, 0]  # every real token of a row carries the row's r' − b
    expected = reinforce_loss(masked_sequence_sum(logprobs, mb.gen_mask), advantage)
    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    assert breakdown[0]["policy_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_step_through_script_runs_and_agrees(tiny_model_dir):
    path = Path(__file__).parent.parent / "experiments" / "step_through.py"
    spec = importlib.util.spec_from_file_location("step_through", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(model=str(tiny_model_dir))
    assert result["worst_difference"] <= 1e-6


EXPERIMENTS = sorted(path for path in (Path(__file__).parent.parent / "experiments").glob("*.py")
                     if '__name__ == "__main__"' in path.read_text())  # scripts; helper modules (planted_checks.py) run none


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda path: path.name)
def test_every_experiment_script_answers_help_without_running(script, monkeypatch, capsys, tmp_path):
    # `python experiments/step_through.py --help` used to ignore the flag and run, pretraining first on a fresh cache.
    import runpy
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("RLHF_SCRATCH_CACHE", str(cache))  # a fresh cache: running would pretrain into it
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    # A mistyped flag stops it too (the output folder is a positional argument of the scripts that write one).
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "out"), "--no-such-flag"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 2 and "unrecognized arguments: " in capsys.readouterr().err
    assert list(cache.iterdir()) == [] and not (tmp_path / "out").exists()  # nothing was built or written
