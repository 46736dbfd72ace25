"""--grad-accum-steps and --dtype bfloat16 in one process, and a plain run with no process group."""

import pytest
import torch
import torch.distributed as dist

from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
from rlhf_scratch.sampling import SamplingConfig

FIELDS = dict(prompt="The movie", reward="chars:.", phases=2, batch_size=8, warmup_phases=0,
              sampling=SamplingConfig(max_new_tokens=6))


def ppo(bridge, **overrides) -> PPOTrainer:
    torch.manual_seed(0)  # the same new value head every time
    config = PPOConfig(**{**FIELDS, "minibatch_size": 8, "ppo_epochs": 2, "lr": 1e-3, "head_lr": 1e-2, **overrides})
    return PPOTrainer(config, policy=PolicyWithValueHead(bridge))


def learn(trainer, memory, start: dict) -> tuple[dict, list[dict]]:
    trainer.policy.load_state_dict(start)
    minibatches = list(memory.minibatches(trainer.config.minibatch_size, getattr(trainer.config, "ppo_epochs", 1),
                                          generator=torch.Generator().manual_seed(0)))
    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}, breakdown


def test_a_plain_run_has_no_process_group(tiny_bridge):
    trainer = ppo(tiny_bridge)
    assert not dist.is_initialized()
    assert trainer.learner.module is trainer.policy
    assert trainer.shuffle_generator is trainer.generator  # one generator samples and shuffles, as before


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_equals_the_big_minibatch(tiny_bridge, steps):
    """K micro-batches, one backward each, one step = one backward on the whole minibatch (same update and losses)."""
    base = ppo(tiny_bridge)
    start = {k: v.clone() for k, v in base.policy.state_dict().items()}
    memory = base.rollout_phase()
    big, big_breakdown = learn(base, memory, start)
    accum = ppo(tiny_bridge, grad_accum_steps=steps)
    small, small_breakdown = learn(accum, memory, start)
    lr = base.config.lr
    worst = max((small[k] - big[k]).abs().max().item() for k in big)
    assert worst <= 0.01 * lr * base.config.steps_per_phase
    assert max((big[k] - start[k]).abs().max().item() for k in big) > 0.5 * lr
    for a, b in zip(small_breakdown, big_breakdown):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_gradient_accumulation_reinforce(tiny_bridge):
    config = REINFORCEConfig(**{**FIELDS, "lr": 1e-3, "minibatch_size": 8})
    torch.manual_seed(0)
    base = REINFORCETrainer(config, policy=PolicyWithValueHead(tiny_bridge))
    start = {k: v.clone() for k, v in base.policy.state_dict().items()}
    memory = base.rollout_phase()
    big, big_breakdown = learn(base, memory, start)
    accum = REINFORCETrainer(REINFORCEConfig(**{**FIELDS, "lr": 1e-3, "minibatch_size": 8, "grad_accum_steps": 4}),
                             policy=PolicyWithValueHead(tiny_bridge))
    small, small_breakdown = learn(accum, memory, start)
    assert max((small[k] - big[k]).abs().max().item() for k in big) <= 0.01 * config.lr
    assert small_breakdown[0]["loss"] == pytest.approx(big_breakdown[0]["loss"], rel=1e-4, abs=1e-6)


def test_grad_accum_steps_must_divide_the_minibatch(tiny_bridge):
    with pytest.raises(ValueError, match="grad_accum_steps"):
        ppo(tiny_bridge, minibatch_size=4, grad_accum_steps=3)


def test_bfloat16_losses_are_finite_and_close_to_float32(tiny_bridge):
    """Autocast forward in bfloat16; the loss terms stay finite and near float32's; weights and AdamW state stay float32."""
    fp32 = ppo(tiny_bridge)
    memory = fp32.rollout_phase()
    minibatch = next(iter(memory.minibatches(8, 1, generator=torch.Generator().manual_seed(0))))
    terms32, _ = fp32.compute_losses(minibatch)
    bf16 = ppo(tiny_bridge, dtype="bfloat16")
    terms16, logprobs16 = bf16.compute_losses(minibatch)
    assert logprobs16.dtype == torch.float32
    for name in ("value_loss", "entropy_bonus", "loss"):
        assert torch.isfinite(terms16[name])
        assert terms16[name].dtype == torch.float32
        assert terms16[name].item() == pytest.approx(terms32[name].item(), rel=0.05, abs=1e-3), name
    breakdown = bf16.learning_phase(bf16.rollout_phase())
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in breakdown)
    assert all(p.dtype == torch.float32 for p in bf16.policy.parameters())
    moments = [s["exp_avg"] for s in bf16.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
