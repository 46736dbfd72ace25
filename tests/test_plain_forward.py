"""The hook-free forward pass (``rlhf_scratch.plain_forward``) against the TransformerLens bridge it stands in for."""

import copy
import warnings

import pytest
import torch

from model_families import left_padded_batch

from rlhf_scratch import plain_forward
from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.plain_forward import plain_forward_for, plain_forward_if_unhooked, reference_logits
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.sampling import SamplingConfig


def policy_with_a_trained_looking_head(bridge) -> PolicyWithValueHead:
    policy = PolicyWithValueHead(bridge)
    with torch.no_grad():  # the head's output layer starts at 0: give it weights so the values say something
        policy.value_head.out.weight.normal_(generator=torch.Generator().manual_seed(1))
    return policy


def test_plain_and_hooked_passes_give_the_same_logits_values_and_gradients(tiny_bridge):
    policy = policy_with_a_trained_looking_head(tiny_bridge)
    tokens, mask = left_padded_batch()
    real = mask.bool()
    results = {}
    for plain in (True, False):
        policy.plain_forward = plain
        policy.zero_grad()
        output = policy(tokens, mask)
        # A loss over real positions only (padded positions' outputs are never read).
        (output.logits.log_softmax(-1)[real].mean() + output.values[real].square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
        results[plain] = (output.logits.detach(), output.values.detach(), grads)
    (logits, values, grads), (hooked_logits, hooked_values, hooked_grads) = results[True], results[False]
    assert plain_forward_for(tiny_bridge) is not None
    torch.testing.assert_close(logits[real], hooked_logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[real], hooked_values[real], rtol=0, atol=1e-5)
    assert grads.keys() == hooked_grads.keys() and len(grads) > 10  # every trained weight, q/k/v split ones included
    for name, grad in grads.items():  # float rounding of different kernels: small next to each gradient's scale
        scale = hooked_grads[name].abs().max().item()
        assert (grad - hooked_grads[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name
    torch.testing.assert_close(reference_logits(tiny_bridge, tokens, mask)[real], hooked_logits[real], rtol=0, atol=1e-5)


def test_a_hook_anywhere_sends_the_pass_through_the_bridge(tiny_bridge):
    policy = PolicyWithValueHead(tiny_bridge)
    tokens, mask = left_padded_batch()
    seen = []

    def zero_the_mlp(x, hook):
        seen.append(hook.name)
        return torch.zeros_like(x)

    with torch.no_grad():
        plain = policy(tokens, mask).logits
        hooked = policy(tokens, mask, fwd_hooks=[("blocks.0.hook_mlp_out", zero_the_mlp)]).logits
        assert len(seen) == 1 and not torch.allclose(hooked, plain, atol=1e-3)
        with tiny_bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", zero_the_mlp)]):  # attached, not passed
            assert plain_forward_if_unhooked(tiny_bridge) is None
            torch.testing.assert_close(policy(tokens, mask).logits, hooked)
            torch.testing.assert_close(reference_logits(tiny_bridge, tokens, mask), hooked)
        assert len(seen) == 3
        assert plain_forward_if_unhooked(tiny_bridge) is not None  # detached again: back to the plain module
        torch.testing.assert_close(policy(tokens, mask).logits, plain)


def test_the_plain_module_follows_the_bridges_weights_even_when_they_are_replaced(tiny_bridge):
    tokens, mask = left_padded_batch()
    real = mask.bool()
    other = copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
        before = reference_logits(tiny_bridge, tokens, mask)
        tiny_bridge.load_state_dict(other.state_dict())  # (the bridge may assign new tensors: the cache must notice)
        after, expected = reference_logits(tiny_bridge, tokens, mask), other(tokens, attention_mask=mask)
    assert not torch.allclose(after[real], before[real], atol=1e-3)
    torch.testing.assert_close(after[real], expected[real], rtol=0, atol=1e-5)


def test_where_the_plain_module_disagrees_every_pass_goes_through_the_bridge_with_a_warning(tiny_bridge, monkeypatch):
    monkeypatch.setattr(plain_forward, "TOLERANCE", -1.0)  # no difference is small enough: the check must fail
    with pytest.warns(UserWarning, match="go through the TransformerLens bridge"):
        assert plain_forward_for(tiny_bridge) is None
    tokens, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(PolicyWithValueHead(tiny_bridge)(tokens, mask).logits, tiny_bridge(tokens, attention_mask=mask))


def test_a_ppo_phase_logs_the_same_figures_with_and_without_the_plain_module(tiny_bridge):
    def one_phase(plain):
        config = PPOConfig(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=4, ppo_epochs=2,
                           warmup_phases=0, sampling=SamplingConfig(max_new_tokens=6), plain_forward=plain)
        torch.manual_seed(0)  # the same value head (its hidden layer starts random) in both runs
        trainer = PPOTrainer(config, policy=PolicyWithValueHead(copy.deepcopy(tiny_bridge)))
        rollout = trainer.sample_and_score()
        memory, _ = trainer.build_memory(rollout)
        return rollout, trainer.learning_metrics(trainer.learning_phase(memory))

    (plain_rollout, plain_metrics), (hooked_rollout, hooked_metrics) = one_phase(True), one_phase(False)
    assert torch.equal(plain_rollout.sequences, hooked_rollout.sequences)  # sampling is the same path either way
    torch.testing.assert_close(plain_rollout.logprobs, hooked_rollout.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain_rollout.ref_logprobs, hooked_rollout.ref_logprobs, rtol=0, atol=1e-5)
    for name, value in hooked_metrics.items():
        assert plain_metrics[name] == pytest.approx(value, rel=1e-3, abs=1e-6), name


# Every family of tests/model_families.py: rotary positions (inv_freq buffers), RMSNorm, grouped-query attention,
# Gemma's embedding scale and soft-capping. Their non-persistent buffers have no bridge tensor: the plain module
# takes them from the wrapped Hugging Face module.

@pytest.fixture(scope="module")
def family_bridges(tmp_path_factory):
    from model_families import FAMILIES, build_family_model

    from rlhf_scratch.models import load_bridge

    return {family: load_bridge(build_family_model(family, tmp_path_factory.mktemp(family))) for family in FAMILIES}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3",
                                    "olmo2", "phi3"])
def test_every_family_runs_the_plain_module_with_the_bridges_logits_and_no_warning(family_bridges, family):
    bridge = family_bridges[family]
    tokens, mask = left_padded_batch()
    real = mask.bool()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*go through the TransformerLens bridge.*")
        runner = plain_forward_if_unhooked(bridge)
    assert runner is not None
    with torch.no_grad():
        logits, resid = runner(tokens, mask)
        hooked = bridge(tokens, attention_mask=mask)
    assert logits.shape == hooked.shape == (3, 9, bridge.cfg.d_vocab) and resid.shape == (3, 9, bridge.cfg.d_model)
    torch.testing.assert_close(logits[real], hooked[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_optimizer_step_is_seen_by_the_plain_module_on_a_rotary_family(family_bridges, family):
    bridge = copy.deepcopy(family_bridges[family])
    policy = policy_with_a_trained_looking_head(bridge)
    tokens, mask = left_padded_batch()
    real = mask.bool()
    runner = plain_forward_for(bridge)
    assert runner is not None
    with torch.no_grad():
        before = runner(tokens, mask)[0]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    output = policy(tokens, mask)  # the plain path: the gradients must land on the bridge's own parameters
    (output.logits.log_softmax(-1)[real].mean() + output.values[real].square().mean()).backward()
    trunk_grads = [p.grad for p in bridge.parameters()]
    assert all(grad is not None for grad in trunk_grads) and sum(grad.abs().sum() for grad in trunk_grads) > 0
    optimizer.step()
    with torch.no_grad():
        after = runner(tokens, mask)[0]  # the same PlainForward object, built before the step: live weights
        hooked_after = bridge(tokens, attention_mask=mask)
    assert (after[real] - before[real]).abs().max() > 1e-2
    torch.testing.assert_close(after[real], hooked_after[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_hook_sends_a_rotary_familys_pass_through_the_bridge(family_bridges, family):
    bridge = family_bridges[family]
    policy = PolicyWithValueHead(bridge)
    tokens, mask = left_padded_batch()
    seen = []

    def zero_the_mlp(x, hook):
        seen.append(hook.name)
        return torch.zeros_like(x)

    with torch.no_grad():
        plain = policy(tokens, mask).logits
        hooked = policy(tokens, mask, fwd_hooks=[("blocks.0.hook_mlp_out", zero_the_mlp)]).logits
        assert len(seen) == 1 and not torch.allclose(hooked, plain, atol=1e-3)
        with bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", zero_the_mlp)]):
            assert plain_forward_if_unhooked(bridge) is None
            torch.testing.assert_close(reference_logits(bridge, tokens, mask), hooked)
        assert len(seen) == 2 and plain_forward_if_unhooked(bridge) is not None


def test_a_replaced_rotary_buffer_is_followed_by_the_plain_module(family_bridges):
    # ``.to(device)`` or ``.to(dtype)`` gives a module new buffer tensors (parameters keep theirs): the plain path
    # must notice. Halving the rotary frequencies (a different model) shows which buffer each path read.
    bridge = copy.deepcopy(family_bridges["llama"])
    tokens, mask = left_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        before = reference_logits(bridge, tokens, mask)  # builds and caches the plain module
        (rotary,) = [m for m in bridge.original_model.modules() if "inv_freq" in m._buffers]
        rotary._buffers["inv_freq"] = rotary._buffers["inv_freq"] / 2
        after, hooked = reference_logits(bridge, tokens, mask), bridge(tokens, attention_mask=mask)
    assert (hooked[real] - before[real]).abs().max() > 1e-3
    torch.testing.assert_close(after[real], hooked[real], rtol=0, atol=1e-5)
