"""Forward hooks during training: applied to the policy in generation, rollout and learning, never to the
reference, and gone from the bridge after each call; a misspelt hook name is reported with close names."""

import pytest
import torch

from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.objectives import taken_logprobs
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
from rlhf_scratch.sampling import SamplingConfig

HEAD = 0


def ablate_head(z, hook):
    """blocks.0.attn.hook_z is [batch, pos, head, d_head]: zero one head's output."""
    z = z.clone()
    z[:, :, HEAD, :] = 0.0
    return z


ABLATION = [("blocks.0.attn.hook_z", ablate_head)]


def make_trainer(tiny_bridge, trainer_class=PPOTrainer, fwd_hooks=ABLATION, **overrides):
    base = dict(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=4, warmup_phases=0,
                sampling=SamplingConfig(max_new_tokens=6, temperature=1.5), debug=True)
    base.update(overrides)
    config = (PPOConfig if trainer_class is PPOTrainer else REINFORCEConfig)(**base)
    return trainer_class(config, policy=PolicyWithValueHead(tiny_bridge), fwd_hooks=fwd_hooks)


def no_hooks_left(bridge) -> bool:
    return not any(point.has_hooks() for point in bridge.hook_dict.values())


def test_hook_names_used_here_exist_with_the_documented_shapes(tiny_bridge):
    shapes = {}

    def record(x, hook):
        shapes[hook.name] = tuple(x.shape)

    tiny_bridge.run_with_hooks(torch.tensor([[0, 5, 9]]), fwd_hooks=[("blocks.0.attn.hook_z", record),
                                                                     ("blocks.0.hook_mlp_out", record)])
    cfg = tiny_bridge.cfg
    # hook_z is an alias of the output projection's input: [batch, pos, head, d_head].
    assert sorted(shapes.values()) == sorted([(1, 3, cfg.n_heads, cfg.d_head), (1, 3, cfg.d_model)])


def test_ablation_changes_policy_logprobs_not_reference(tiny_bridge):
    trainer = make_trainer(tiny_bridge, log_exact_kl=True)
    memory = trainer.rollout_phase()
    seq, mask, P, T = memory.sequences, memory.gen_mask, memory.prompt_len, trainer.config.sampling.temperature
    bridge = trainer.policy.bridge
    with torch.no_grad():
        hooked = taken_logprobs(bridge.run_with_hooks(seq, attention_mask=memory.attention_mask, fwd_hooks=ABLATION) / T, seq, P)
        plain = taken_logprobs(bridge(seq, attention_mask=memory.attention_mask) / T, seq, P)
    # The rollout read the tokens with the head ablated...
    torch.testing.assert_close(memory.logprobs[mask], hooked[mask], rtol=0, atol=1e-6)
    assert (memory.logprobs[mask] - plain[mask]).abs().max() > 1e-3  # a random model: small, but far above rounding
    # ...and the reference without it: its log-probs are the unhooked starting model's.
    torch.testing.assert_close(memory.ref_logprobs[mask], plain[mask], rtol=0, atol=1e-6)
    # So the exact KL to the reference is already > 0 before any update (it is 0 without the hook).
    hooked_kl = trainer.sample_and_score().stats["objective/kl_exact"]
    unhooked_kl = make_trainer(tiny_bridge, fwd_hooks=(), log_exact_kl=True).sample_and_score().stats["objective/kl_exact"]
    assert hooked_kl > 1e-5 and unhooked_kl < 1e-7
    # Nothing stays attached: the bridge alone is the starting model again.
    assert no_hooks_left(bridge)
    tokens = torch.tensor([[0, 5, 9, 17]])
    torch.testing.assert_close(bridge(tokens), trainer.reference(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("trainer_class", [PPOTrainer, REINFORCETrainer])
def test_learning_pass_applies_the_same_hooks(tiny_bridge, trainer_class):
    """--debug checks ratio = 1 on the first minibatch: that holds only if learning sees the rollout's hooks."""
    trainer = make_trainer(tiny_bridge, trainer_class)
    trainer.learning_phase(trainer.rollout_phase())  # would raise InvariantError('ratio_is_one') otherwise
    assert no_hooks_left(trainer.policy.bridge)
    # Drop the hook between rollout and learning: the ratio check catches the mismatch.
    memory = trainer.rollout_phase()
    trainer.fwd_hooks = []
    with pytest.raises(AssertionError, match="ratio_is_one"):
        trainer.learning_phase(memory)


def test_generation_applies_the_hooks(tiny_bridge):
    """A steering hook on the unembedding output makes one token certain: every sampled token is it."""
    target = 42

    def always_target(logits, hook):
        logits = logits.clone()
        logits[..., target] = 1e4
        return logits

    trainer = make_trainer(tiny_bridge, fwd_hooks=[("unembed.hook_out", always_target)])
    memory = trainer.rollout_phase()
    assert (memory.sequences[:, memory.prompt_len :] == target).all()
    assert memory.logprobs[memory.gen_mask].abs().max() < 1e-4  # log π(target) ≈ 0 under the hooked policy
    assert memory.ref_logprobs[memory.gen_mask].max() < -1.0  # the reference finds it unlikely
    assert no_hooks_left(trainer.policy.bridge)


def test_misspelt_hook_name_lists_close_names(tiny_bridge):
    with pytest.raises(ValueError, match=r"No hook named 'blocks.0.hook_mlp_ot'.*Closest names: blocks.0.hook_mlp_out"):
        make_trainer(tiny_bridge, fwd_hooks=[("blocks.0.hook_mlp_ot", lambda x, hook: x)])
    with pytest.raises(ValueError, match=r"\(name, function\) pair"):
        make_trainer(tiny_bridge, fwd_hooks=[ablate_head])


def keep(x, hook):
    return x


@pytest.mark.parametrize("trainer_class", [PPOTrainer, REINFORCETrainer])
def test_a_hook_that_never_fires_stops_the_run_with_its_name_and_reason(tiny_bridge, trainer_class):
    """Issue 22: GPT-2's fused attn.qkv hook points exist in hook_dict but never run (q, k, v are computed apart), so an
    ablation there silently did nothing for a whole run. Now the trainer stops before its first phase, saying why."""
    never_called = r"'blocks.0.attn.qkv.hook_in' exists on this gpt2 .* its forward pass never calls it"
    with pytest.raises(ValueError, match=never_called):
        make_trainer(tiny_bridge, trainer_class, fwd_hooks=[("blocks.0.attn.qkv.hook_in", keep)])
    # An alias names what it stands for; a filter that selects only such hooks is refused too.
    alias = r"'blocks.0.hook_q_input' exists .* an alias of blocks.0.attn.hook_q_input, and TransformerLens refuses it"
    with pytest.raises(ValueError, match=alias):
        make_trainer(tiny_bridge, trainer_class, fwd_hooks=[("blocks.0.hook_q_input", keep)])
    with pytest.raises(ValueError, match=r"filter 'only_qkv' selects only hooks that never run \(blocks.0.attn.qkv"):
        def only_qkv(name):
            return ".qkv." in name
        make_trainer(tiny_bridge, trainer_class, fwd_hooks=[(only_qkv, keep)])
    with pytest.raises(ValueError, match="selects no hook on this model"):
        make_trainer(tiny_bridge, trainer_class, fwd_hooks=[(lambda name: False, keep)])
    assert no_hooks_left(tiny_bridge)
    # A filter that selects hooks that run is accepted (TransformerLens adds it where it runs).
    make_trainer(tiny_bridge, trainer_class, fwd_hooks=[(lambda name: name.endswith("hook_z"), keep)])


def test_sampling_and_evaluation_refuse_a_hook_that_never_fires(tiny_bridge):
    from rlhf_scratch.bon import BestOfNSampler
    from rlhf_scratch.evaluation import ModelSampler
    from rlhf_scratch.sampling import generate

    silent = [("blocks.1.attn.qkv.hook_out", keep)]
    message = "'blocks.1.attn.qkv.hook_out' exists on this gpt2 .* never calls it"
    with pytest.raises(ValueError, match=message):
        generate(tiny_bridge, [[0, 5]], SamplingConfig(max_new_tokens=2), fwd_hooks=silent)
    with pytest.raises(ValueError, match=message):
        ModelSampler("policy", tiny_bridge, tiny_bridge, fwd_hooks=silent)
    with pytest.raises(ValueError, match=message):
        BestOfNSampler(tiny_bridge, 2, fwd_hooks=silent)
