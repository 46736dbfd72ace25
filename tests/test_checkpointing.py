"""--gradient-checkpointing: the same gradients as the plain pass, with nothing inside a block kept for backward."""

import copy

import pytest
import torch

from model_families import left_padded_batch

from rlhf_scratch.config import ConfigError
from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.plain_forward import plain_forward_for
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.sampling import SamplingConfig


def tensor_bytes(values) -> int:
    """Bytes of the tensors among ``values`` (tuples searched too)."""
    return sum(tensor_bytes(v) if isinstance(v, (tuple, list)) else v.numel() * v.element_size()
               for v in values if isinstance(v, (torch.Tensor, tuple, list)))


def backward_pass(policy, checkpointing: bool) -> tuple[dict, dict]:
    """One loss's gradients with or without checkpointing; and bytes: saved for backward inside the plain module's
    blocks and outside them (counted by a saved-tensors hook, "inside" told by hooks on the blocks), and of the
    tensors the blocks were called with (positionally)."""
    from rlhf_scratch.checkpointing import decoder_blocks

    tokens, mask = left_padded_batch()
    real = mask.bool()
    policy.gradient_checkpointing = checkpointing
    policy.zero_grad()
    depth, saved = [0], {"inside": 0, "outside": 0, "block inputs": 0}

    def enter(block, args, kwargs):
        depth[0] += 1
        saved["block inputs"] += tensor_bytes(args)  # the checkpoint saves these; keyword tensors it holds as they are

    blocks = [block for _, block in decoder_blocks(plain_forward_for(policy.bridge).module)]
    handles = [hook for block in blocks for hook in (
        block.register_forward_pre_hook(enter, with_kwargs=True),
        block.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)))]

    def pack(tensor):
        saved["inside" if depth[0] else "outside"] += tensor.numel() * tensor.element_size()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = policy(tokens, mask)
    finally:
        for handle in handles:
            handle.remove()
    # A loss over real positions only, through both heads.
    (output.logits.log_softmax(-1)[real].mean() + output.values[real].square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return grads, saved


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpointed_gradients_equal_the_plain_pass_and_nothing_inside_a_block_is_kept(family, lora, tiny_bridge,
                                                                                       llama_bridge):
    from rlhf_scratch.lora import apply_lora

    bridge = copy.deepcopy(tiny_bridge if family == "gpt2" else llama_bridge)
    policy = PolicyWithValueHead(bridge)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the head's output layer starts at 0: give it weights so the value loss reaches the trunk
        policy.value_head.out.weight.normal_(generator=generator)
        if lora:  # adapters start at B = 0 (no gradient for A): move them off it
            apply_lora(policy, rank=2)
            for param in policy.lora.parameters():
                param.normal_(0, 0.1, generator=generator)
    plain_grads, plain_saved = backward_pass(policy, checkpointing=False)
    grads, saved = backward_pass(policy, checkpointing=True)
    trained = [name for name in grads if name.startswith("lora." if lora else "bridge.")]
    assert grads.keys() == plain_grads.keys() and len(trained) >= 8  # every trained weight (4+ per block)
    assert lora == all(name.startswith(("lora.", "value_head.")) for name in grads)  # LoRA: the base is frozen
    for name, grad in grads.items():  # the same kernels run again: equal up to float rounding
        scale = plain_grads[name].abs().max().item()
        assert (grad - plain_grads[name]).abs().max().item() <= 1e-6 * scale + 1e-9, name
    # With checkpointing, all a block saves for backward is what it was called with (hidden states, attention mask);
    # without, every intermediate, several times more. Outside the blocks nothing changes.
    assert saved["inside"] == saved["block inputs"] > 0
    assert plain_saved["inside"] > 3 * saved["inside"]
    assert saved["outside"] == plain_saved["outside"]


def test_checkpointing_does_nothing_without_gradients(tiny_bridge):
    policy = PolicyWithValueHead(tiny_bridge)
    policy.gradient_checkpointing = True
    tokens, mask = left_padded_batch()
    with torch.no_grad():
        checkpointed = policy(tokens, mask)
    policy.gradient_checkpointing = False
    with torch.no_grad():
        plain = policy(tokens, mask)
    assert torch.equal(checkpointed.logits, plain.logits) and torch.equal(checkpointed.values, plain.values)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the recompute runs under the same autocast
def test_a_ppo_phase_with_checkpointing_learns_the_same_weights(tiny_bridge, dtype):
    def one_phase(checkpointing: bool):
        config = PPOConfig(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=4,
                           ppo_epochs=2, warmup_phases=0, lr=1e-3, sampling=SamplingConfig(max_new_tokens=6),
                           gradient_checkpointing=checkpointing, dtype=dtype)
        torch.manual_seed(0)  # the same value head in both runs
        trainer = PPOTrainer(config, policy=PolicyWithValueHead(copy.deepcopy(tiny_bridge)))
        assert trainer.policy.gradient_checkpointing is checkpointing
        memory, _ = trainer.build_memory(trainer.sample_and_score())
        metrics = trainer.learning_metrics(trainer.learning_phase(memory))
        return metrics, trainer.policy.state_dict()

    (metrics, weights), (plain_metrics, plain_weights) = one_phase(True), one_phase(False)
    for name, value in plain_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6)


def test_a_hooked_learning_pass_warns_that_it_is_not_checkpointed(tiny_bridge):
    policy = PolicyWithValueHead(tiny_bridge)
    policy.gradient_checkpointing = True
    tokens, mask = left_padded_batch()
    with pytest.warns(UserWarning, match="Gradient checkpointing applies to the plain forward only"):
        policy(tokens, mask, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x)])


def test_checkpointing_without_the_plain_forward_is_refused():
    with pytest.raises((ValueError, ConfigError), match="gradient_checkpointing needs the plain forward"):
        PPOConfig(gradient_checkpointing=True, plain_forward=False)
