"""Sampling: left padding, EOS masking, filters, context checks, decoding."""

import pytest
import torch
from conftest import first_difference, greedy_up_to_rounding

from rlhf_scratch.sampling import SamplingConfig, encode, filter_logits, generate, left_pad


def force_token_at_step(token_id: int, step: int):
    """A hook on the logits that makes ``token_id`` certain at generation step ``step``.

    With a KV cache, step 0 sees the whole prompt and each later call one new position,
    so counting calls counts generation steps.
    """
    calls = {"n": 0}

    def hook(logits, hook):
        if calls["n"] == step:
            logits = logits.clone()
            logits[:, -1, :] = -1e4
            logits[:, -1, token_id] = 1e4
        calls["n"] += 1
        return logits

    return ("unembed.hook_out", hook)


def test_left_pad_layout():
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="zero tokens"):
        left_pad([[1], []], pad_id=0)


def test_everything_after_first_eos_is_padding(tiny_bridge):
    eos = tiny_bridge.tokenizer.eos_token_id
    prompts = [encode(tiny_bridge.tokenizer, "The movie")] * 3
    generation = generate(
        tiny_bridge, prompts, SamplingConfig(max_new_tokens=8), generator=torch.Generator().manual_seed(0),
        fwd_hooks=[force_token_at_step(eos, 2)],
    )
    # Every row ends at step 2: G shrinks to 3, the EOS itself is a real (masked-in) token.
    assert generation.gen_mask.shape == (3, 3)
    assert generation.gen_mask.all()
    assert (generation.response_tokens[:, 2] == eos).all()
    assert generation.ended_with_eos.all()
    assert all(tiny_bridge.tokenizer.eos_token not in r for r in generation.responses)


def test_rows_end_at_different_times(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    eos = tokenizer.eos_token_id
    calls = {"n": 0}

    def end_row0_at_step1(logits, hook):
        if calls["n"] == 1:
            logits = logits.clone()
            logits[0, -1, :] = -1e4
            logits[0, -1, eos] = 1e4
        if calls["n"] >= 0:
            logits = logits.clone()
            logits[1:, -1, eos] = -1e4  # the other rows never end
        calls["n"] += 1
        return logits

    prompts = [encode(tokenizer, "The movie"), encode(tokenizer, "What a waste of")]
    generation = generate(tiny_bridge, prompts, SamplingConfig(max_new_tokens=5),
                          generator=torch.Generator().manual_seed(0), fwd_hooks=[("unembed.hook_out", end_row0_at_step1)])
    assert generation.gen_mask[0].tolist() == [True, True, False, False, False]
    assert generation.gen_mask[1].all()
    assert (generation.response_tokens[0, 2:] == tokenizer.pad_token_id).all()
    p = generation.prompt_len
    assert generation.attention_mask[0, p:].tolist() == [1, 1, 0, 0, 0]
    assert generation.ended_with_eos.tolist() == [True, False]


def test_greedy_batched_equals_each_prompt_alone(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    texts = ["The movie was", "What", "I would not watch this"]
    prompts = [encode(tokenizer, t) for t in texts]
    config = SamplingConfig(max_new_tokens=6, top_k=1, stop_at_eos=False)
    batched = generate(tiny_bridge, prompts, config)
    for row, ids in enumerate(prompts):
        alone = generate(tiny_bridge, [ids], config)
        # The same tokens; the two layouts (left padding in a batch, or none) round differently, so they may part
        # only where the alone run's two best logits tie within rounding (and every token after that differs).
        split = first_difference(batched.response_tokens[row].tolist(), alone.response_tokens[0].tolist())
        if split is not None:
            logits = tiny_bridge(alone.sequences)[0, alone.prompt_len - 1 + split]
            assert greedy_up_to_rounding(logits, batched.response_tokens[row, split]), (row, split)
        assert batched.prompts[row] == texts[row]


def test_kv_cache_matches_full_recompute(tiny_bridge):
    """The cached generation's tokens have the log-probs a full forward pass gives them."""
    tokenizer = tiny_bridge.tokenizer
    prompts = [encode(tokenizer, "The acting was"), encode(tokenizer, "A")]
    generation = generate(tiny_bridge, prompts, SamplingConfig(max_new_tokens=6, top_k=1, stop_at_eos=False))
    logits = tiny_bridge(generation.sequences, attention_mask=generation.attention_mask)
    p = generation.prompt_len
    assert greedy_up_to_rounding(logits[:, p - 1 : -1], generation.response_tokens).all()  # argmax up to a tie


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, top_k=2)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # Nucleus 0.7: 0.5 alone is below 0.7, so 0.3 is kept too; 0.15 comes after mass 0.8.
    nucleus = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    # Nucleus 0.5 exactly: the first token already has mass 0.5, the second is dropped.
    assert torch.isinf(filter_logits(logits, top_p=0.5)[0, 1:]).all()
    # Temperature divides the logits.
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_prompt_longer_than_context_is_a_clear_error(tiny_bridge):
    too_long = [[1] * 60]
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(tiny_bridge, too_long, SamplingConfig(max_new_tokens=10))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_tokenizer_round_trip(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    for text in ["The movie was great and I loved every minute of it.", "Not bad at all, honestly!", "zebra quux 42"]:
        ids = encode(tokenizer, text, prepend_bos=False)
        assert tokenizer.decode(ids) == text
    assert encode(tokenizer, "The", prepend_bos=True)[0] == tokenizer.bos_token_id


def test_sample_tokens_frequencies_and_zero_probability():
    from rlhf_scratch.sampling import sample_tokens

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    tokens = sample_tokens(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert counts[0] == 0 and counts[2] == 0  # probability-0 tokens never come out
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)  # ~3 standard errors
    # Same seed, same tokens.
    again = sample_tokens(probs, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
