"""--reference-dtype: the frozen reference in bfloat16 / float16, half the memory, log-probs within rounding."""

import copy

import pytest
import torch

from model_families import left_padded_batch

from rlhf_scratch.models import PolicyWithValueHead, make_reference
from rlhf_scratch.plain_forward import reference_logits
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.sampling import SamplingConfig

# Largest |log p_ref(dtype) − log p_ref(float32)| over the vocabulary at real positions, on the tiny random models
# (logits of order 1). bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3), float16 11 (2^-12 ≈ 2.4e-4);
# measured here: 2.9e-3 and 4.2e-4. docs/memory.md gives the figures on the built-in model.
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_half_precision_reference_has_half_the_bytes_and_log_probs_within_rounding(family, dtype, tiny_bridge,
                                                                                   llama_bridge):
    bridge = tiny_bridge if family == "gpt2" else llama_bridge
    full, half = make_reference(bridge), make_reference(bridge, dtype)
    assert {p.dtype for p in half.parameters()} == {getattr(torch, dtype)}
    assert not any(p.requires_grad for p in half.parameters())
    assert weight_bytes(half) * 2 == weight_bytes(full)
    assert {p.dtype for p in bridge.parameters()} == {torch.float32}  # the policy is untouched
    if family == "llama":  # rotary frequencies are not weights: rounding them would move every position's angle
        buffers = dict(half.original_model.named_buffers())
        assert buffers["model.rotary_emb._original_component.inv_freq"].dtype == torch.float32
    tokens, mask = left_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = reference_logits(full, tokens, mask).log_softmax(-1)
        for plain in (True, False):  # the plain module and the bridge, both in the reference's dtype
            logits = reference_logits(half, tokens, mask, plain=plain)
            assert logits.dtype == getattr(torch, dtype)
            difference = (logits.float().log_softmax(-1) - expected)[real].abs().max().item()
            assert 0 < difference <= TOLERANCE[dtype], (plain, difference)


def test_the_plain_module_check_allows_a_half_precision_model_a_few_units_of_its_rounding(tiny_bridge):
    from rlhf_scratch.plain_forward import HALF_TOLERANCE_ULPS, TOLERANCE, plain_forward_for, tolerance

    logits = torch.tensor([[-3.0, 15.0]])
    assert tolerance(logits, torch.float32) == TOLERANCE
    assert tolerance(logits, torch.bfloat16) == HALF_TOLERANCE_ULPS * 2**-7 * 16  # bfloat16's eps is 2^-7
    assert tolerance(logits, torch.float16) == HALF_TOLERANCE_ULPS * 2**-10 * 16
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*go through the TransformerLens bridge.*")
        assert plain_forward_for(make_reference(tiny_bridge, "bfloat16")) is not None


def test_ppo_reads_the_bfloat16_reference_and_its_kl_at_the_start_is_rounding(tiny_bridge):
    config = PPOConfig(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=4, ppo_epochs=1,
                       warmup_phases=0, sampling=SamplingConfig(max_new_tokens=6), reference_dtype="bfloat16",
                       log_exact_kl=True)
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(copy.deepcopy(tiny_bridge)))
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    rollout = trainer.sample_and_score()
    assert rollout.ref_logprobs.dtype == torch.float32
    # Step 0: the policy is the reference, so the true KL is 0; what remains is the reference's rounding.
    gen = rollout.gen_mask
    gap = (rollout.logprobs - rollout.ref_logprobs)[gen].abs().max().item()
    assert 0 < gap <= TOLERANCE["bfloat16"]
    assert 0 <= rollout.stats["objective/kl_exact"] <= 1e-3
    memory, _ = trainer.build_memory(rollout)
    trainer.learning_phase(memory)  # and learning runs on it


def test_an_unknown_reference_dtype_is_refused(tiny_bridge):
    with pytest.raises(ValueError, match="Unknown reference dtype 'int8': use one of float32, bfloat16, float16"):
        make_reference(tiny_bridge, "int8")
