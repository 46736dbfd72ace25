"""Decoding steps through the plain module (``plain_decoding``) compute what the bridge's steps compute.

The same seed samples the same tokens through either path, and the recorded log-distributions and final residuals
agree to float rounding, on left-padded prompts of different lengths, for GPT-2 (learned positions, fused q/k/v) and
rotary / RMSNorm families (Llama, GPT-NeoX, Gemma 2 with soft-capping). Where a hook must see the steps, or the model
is in training mode, they go through the bridge.
"""

import pytest
import torch
from model_families import build_family_model

from rlhf_scratch.models import load_bridge
from rlhf_scratch.plain_decoding import PlainDecoder, plain_decoder_for, static_cache_length
from rlhf_scratch.plain_forward import plain_forward_for
from rlhf_scratch.sampling import SamplingConfig, check_cached_generation, encode, generate

PROMPTS = ["The movie was", "I", "What a waste of two hours! The plot"]
ATOL = 1e-4


def sample(bridge, plain=True, **config):
    prompts = [encode(bridge.tokenizer, text) for text in PROMPTS]
    config = SamplingConfig(**{"max_new_tokens": 10, "temperature": 0.8, **config})
    return generate(bridge, prompts, config, generator=torch.Generator().manual_seed(0), record=True, plain=plain)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt_neox", "gemma2"])
def family_bridge(request, tmp_path_factory):
    return load_bridge(build_family_model(request.param, tmp_path_factory.mktemp(request.param)))


def test_plain_steps_equal_the_bridge_steps(family_bridge):
    plain, bridged = sample(family_bridge), sample(family_bridge, plain=False)
    assert torch.equal(plain.sequences, bridged.sequences) and torch.equal(plain.gen_mask, bridged.gen_mask)
    real = plain.gen_mask
    assert (plain.logp_gen - bridged.logp_gen)[real].abs().max() < ATOL
    assert (plain.final_resid - bridged.final_resid)[real].abs().max() < ATOL
    assert (plain.sampled_logprobs - bridged.sampled_logprobs).abs().max() < ATOL


def test_plain_decoding_passes_the_self_check(family_bridge):
    assert check_cached_generation(family_bridge, plain=True) < ATOL


def test_generate_uses_the_plain_steps_only_where_no_hook_watches(tiny_bridge, monkeypatch):
    prompts = [encode(tiny_bridge.tokenizer, "The movie")]
    config = SamplingConfig(max_new_tokens=3, stop_at_eos=False)
    generate(tiny_bridge, prompts, config)  # the first call on a bridge also runs the self-check's steps
    calls = []
    original = PlainDecoder.__call__
    monkeypatch.setattr(PlainDecoder, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    generate(tiny_bridge, prompts, config)
    assert len(calls) == 3  # one per decoding step
    # The bridge's weights were swapped into the plain module for the generation only.
    assert all(tensor.is_meta for tensor in plain_forward_for(tiny_bridge).module.parameters())
    calls.clear()
    generate(tiny_bridge, prompts, config, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)])
    generate(tiny_bridge, prompts, config, plain=False)
    tiny_bridge.train()
    generate(tiny_bridge, prompts, config)
    tiny_bridge.eval()
    tiny_bridge.blocks[0].hook_resid_pre.add_hook(lambda x, hook: x)
    generate(tiny_bridge, prompts, config)
    assert calls == []


def test_compiled_decoding_is_ignored_with_a_warning_where_the_bridge_decodes(tiny_bridge):
    prompts = [encode(tiny_bridge.tokenizer, "The movie")]
    with pytest.warns(UserWarning, match="compiled_decoding is ignored"):
        generate(tiny_bridge, prompts, SamplingConfig(max_new_tokens=2, compiled_decoding=True), plain=False)


def test_a_mask_that_skips_the_cache_is_refused(tiny_bridge):
    decoder = plain_decoder_for(tiny_bridge, batch=1, max_len=8)
    tokens = torch.tensor([[1, 2, 3]])
    decoder(tokens, torch.ones_like(tokens))
    with pytest.raises(ValueError, match="covers 0 earlier positions but the cache holds 3"):
        decoder(tokens[:, :1], torch.ones(1, 1, dtype=torch.long))


def test_static_cache_length_rounds_up_to_a_power_of_two_within_the_context():
    assert [static_cache_length(n, 128) for n in (1, 16, 17, 27, 64, 65, 128)] == [16, 16, 32, 32, 64, 128, 128]
    assert static_cache_length(27, 20) == 27  # never shorter than what is needed (generate refuses longer first)
    assert static_cache_length(40, 48) == 48


def test_compiled_steps_equal_the_eager_steps(tiny_bridge):
    """The opt-in compiled step (static cache, torch.compile) samples the same tokens with the same log-probs;
    an in-place change of the weights (an optimiser step) is seen by the compiled graph, not baked in."""
    eager = sample(tiny_bridge, max_new_tokens=6, stop_at_eos=False)
    compiled = sample(tiny_bridge, max_new_tokens=6, stop_at_eos=False, compiled_decoding=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert (compiled.logp_gen - eager.logp_gen).abs().max() < ATOL
    assert (compiled.final_resid - eager.final_resid).abs().max() < ATOL
    with torch.no_grad():
        tiny_bridge.blocks[0].mlp.out.weight.mul_(3.0)
    eager = sample(tiny_bridge, max_new_tokens=6, stop_at_eos=False)
    compiled = sample(tiny_bridge, max_new_tokens=6, stop_at_eos=False, compiled_decoding=True)
    assert (compiled.logp_gen - eager.logp_gen).abs().max() < ATOL


def test_a_failed_compile_names_the_flag(tiny_bridge, monkeypatch):
    from rlhf_scratch import plain_decoding

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(plain_decoding, "_compiled_step", lambda plain: broken)
    with pytest.raises(plain_decoding.CompiledDecodingError, match="no working C.. compiler.*--compiled-decoding off"):
        sample(tiny_bridge, max_new_tokens=3, compiled_decoding=True)
