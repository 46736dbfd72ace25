"""KV-cached generation proves itself against an independent path: one full forward pass.

transformers 5.24 renamed the KV cache argument and TransformerLens 4.3 stopped seeing it
(``rlhf_scratch.compat``): every decoding step then attended to itself alone, the samples were
nonsense, and every other test passed. These tests compare what ``generate`` computed step by
step with what the model computes on the finished sequences in one pass, on tiny random models
of each architecture the loader handles (GPT-2, Llama), for left-padded prompts of different
lengths, with and without hooks. Each fails on the unpatched stack (see the README's
"Dependency versions").
"""

import pytest
import torch
from conftest import greedy_up_to_rounding

from rlhf_scratch import sampling
from rlhf_scratch.models import load_bridge
from rlhf_scratch.sampling import (
    GenerationStackError,
    SamplingConfig,
    check_cached_generation,
    encode,
    generate,
    new_kv_cache,
)

PROMPTS = ["The movie was", "I", "What a waste of two hours! The plot"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir, tmp_path_factory):
    """A random 2-layer Llama (rotary positions, grouped-query attention) with the tiny BPE tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(params=["gpt2", "llama"])
def bridge(request, tiny_model_dir, tiny_llama_dir):
    return load_bridge(tiny_model_dir if request.param == "gpt2" else tiny_llama_dir)


def encoded(bridge) -> list[list[int]]:
    prompts = [encode(bridge.tokenizer, text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "the test needs prompts of different lengths"
    return prompts


def capture_step_logits():
    """A hook recording the last position's logits at each forward pass (one per decoding step)."""
    steps = []

    def hook(logits, hook):
        steps.append(logits[:, -1].detach().clone())

    return steps, ("unembed.hook_out", hook)


def ablate_head(layer: int, head: int):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def full_forward_logits(bridge, generation, fwd_hooks=()):
    """Logits predicting each generated token, from one pass over the finished sequences: [B, G, V]."""
    with torch.no_grad():
        logits = bridge.run_with_hooks(generation.sequences, attention_mask=generation.attention_mask,
                                       fwd_hooks=list(fwd_hooks))
    P = generation.prompt_len
    return logits[:, P - 1 : -1].float()


def test_greedy_generation_is_the_argmax_of_a_full_forward_pass(bridge):
    generation = generate(bridge, encoded(bridge), SamplingConfig(max_new_tokens=12, top_k=1, stop_at_eos=False))
    full = full_forward_logits(bridge, generation)
    assert generation.gen_mask.all()
    # Each token is the full pass's argmax, or (where two logits tie within rounding, which a cached step and a
    # full pass break differently on different CPUs) within ARGMAX_ATOL of it; most are the exact argmax.
    assert greedy_up_to_rounding(full, generation.response_tokens).all()
    assert (generation.response_tokens == full.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("with_hooks", [False, True], ids=["no_hooks", "ablated_head"])
def test_each_sampling_step_has_the_full_forward_distribution(bridge, with_hooks):
    hooks = [ablate_head(0, 1)] if with_hooks else []
    steps, capture = capture_step_logits()
    config = SamplingConfig(max_new_tokens=10, temperature=0.7)
    generation = generate(bridge, encoded(bridge), config, generator=torch.Generator().manual_seed(0),
                          fwd_hooks=hooks + [capture])
    G = generation.gen_mask.shape[1]
    assert len(steps) == G
    step_logprobs = torch.log_softmax(torch.stack(steps, dim=1).float() / config.temperature, dim=-1)
    full_logprobs = torch.log_softmax(full_forward_logits(bridge, generation, hooks) / config.temperature, dim=-1)
    real = generation.gen_mask
    # Whole distributions, at every real generated position of every left-padded row.
    assert (step_logprobs - full_logprobs)[real].abs().max() < 1e-4
    # ...and the recorded log-prob of each sampled token is that distribution's.
    taken = full_logprobs.gather(-1, generation.response_tokens[..., None])[..., 0]
    assert (generation.sampled_logprobs - taken)[real].abs().max() < 1e-4
    assert (generation.sampled_logprobs[~real] == 0).all()


def test_hooks_change_generation_so_the_hooked_comparison_means_something(bridge):
    prompts = encoded(bridge)
    config = SamplingConfig(max_new_tokens=6, top_k=1, stop_at_eos=False)
    plain = generate(bridge, prompts, config)
    steps, capture = capture_step_logits()
    generate(bridge, prompts, config, fwd_hooks=[ablate_head(0, 1), capture])
    full = full_forward_logits(bridge, plain)
    assert (torch.stack(steps, 1)[:, 0] - full[:, 0]).abs().max() > 1e-3


def test_self_check_agrees_on_a_correct_stack(bridge):
    assert check_cached_generation(bridge) < 1e-4


def test_self_check_stops_a_decoder_that_loses_its_context(tiny_bridge, monkeypatch):
    """The failure mode of transformers 5.24 + TransformerLens 4.3: each step sees an empty cache."""
    honest_step = sampling.decode_step

    def forgetful_step(bridge, step_input, attention_mask, kv_cache):
        return honest_step(bridge, step_input, attention_mask[:, -step_input.shape[1]:], new_kv_cache())

    monkeypatch.setattr(sampling, "decode_step", forgetful_step)
    with pytest.raises(GenerationStackError, match=r"disagrees with a full forward pass .* transformers \d"):
        check_cached_generation(tiny_bridge)
    # generate() runs the check before sampling anything, once per bridge.
    with pytest.raises(GenerationStackError, match="constraints.txt"):
        generate(tiny_bridge, encoded(tiny_bridge), SamplingConfig(max_new_tokens=3))
    monkeypatch.setattr(sampling, "decode_step", honest_step)
    generate(tiny_bridge, encoded(tiny_bridge), SamplingConfig(max_new_tokens=3))
    monkeypatch.setattr(sampling, "decode_step", forgetful_step)
    generate(tiny_bridge, encoded(tiny_bridge), SamplingConfig(max_new_tokens=3))  # checked once: not again


def test_attention_reads_the_cache_under_its_new_name(tiny_bridge):
    """The root cause, directly: an attention bridge handed ``cache=`` (transformers >= 5.24) must
    write its keys and values there, as it does for ``past_key_values=``."""
    attention = tiny_bridge.blocks[0].attn
    k = torch.randn(1, 4, 3, 8)
    for name in ("cache", "past_key_values"):
        kv_cache = new_kv_cache()
        extended_k, _ = attention._update_kv_cache(k, k, **{name: kv_cache})
        assert kv_cache.get_seq_length() == 3, name
        extended_k, _ = attention._update_kv_cache(k, k, **{name: kv_cache})
        assert extended_k.shape[2] == 6 and kv_cache.get_seq_length() == 6, name


def test_self_check_fits_a_tiny_context(tmp_path, tiny_model_dir):
    """A model whose context holds only a few tokens is still checked (shorter prompts, fewer steps)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=4, n_embd=16, n_layer=1, n_head=2)).eval() \
        .save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert check_cached_generation(load_bridge(tmp_path)) < 1e-4


def test_self_check_blames_the_weights_not_the_stack_when_logits_are_nan(tiny_model_dir):
    from rlhf_scratch.sampling import NonFiniteModelError

    bridge = load_bridge(tiny_model_dir)
    with torch.no_grad():
        bridge.blocks[0].mlp.out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteModelError, match="weights are damaged"):
        check_cached_generation(bridge)
