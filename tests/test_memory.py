"""Tests for rlhf_scratch.memory.ReplayMemory."""

import dataclasses

import pytest
import torch

from rlhf_scratch.memory import ReplayMemory

BATCH, PROMPT_LEN, GEN, VOCAB = 6, 3, 4, 5


def make_memory(batch=BATCH, prompt_len=PROMPT_LEN, gen=GEN, vocab=VOCAB, with_logits=True) -> ReplayMemory:
    """A memory in which every field of row b encodes b, so misaligned rows are easy to spot."""
    seq = prompt_len + gen
    rows = torch.arange(batch)
    lengths = 1 + rows % gen  # 1 .. gen real generated tokens
    gen_mask = torch.arange(gen) < lengths.unsqueeze(1)
    attention_mask = torch.cat([torch.ones(batch, prompt_len, dtype=torch.long), gen_mask.long()], dim=1)
    attention_mask[0, 0] = 0  # row 0's prompt is left-padded
    per_row = rows.float().unsqueeze(1).expand(batch, gen)
    return ReplayMemory(
        sequences=100 * rows.unsqueeze(1) + torch.arange(seq),
        attention_mask=attention_mask,
        gen_mask=gen_mask,
        logprobs=-per_row,
        ref_logprobs=-per_row - 0.5,
        values=per_row + 0.25,
        advantages=per_row * 2,
        returns=per_row * 3,
        rewards=rows.float(),
        prompt_len=prompt_len,
        ref_logits_gen=per_row.unsqueeze(-1).expand(batch, gen, vocab).clone() if with_logits else None,
    )


def assert_rows_aligned(memory: ReplayMemory):
    b = memory.sequences[:, 0] // 100  # the original row index of each row
    assert torch.equal(memory.rewards, b.float())
    assert torch.equal(memory.logprobs[:, 0], -b.float())
    assert torch.equal(memory.ref_logprobs[:, 0], -b.float() - 0.5)
    assert torch.equal(memory.values[:, 0], b.float() + 0.25)
    assert torch.equal(memory.advantages[:, 0], 2 * b.float())
    assert torch.equal(memory.returns[:, 0], 3 * b.float())
    assert torch.equal(memory.ref_logits_gen[:, 0, 0], b.float())
    assert torch.equal(memory.gen_mask.sum(1), 1 + b % GEN)
    assert torch.equal(memory.attention_mask[:, PROMPT_LEN:].bool(), memory.gen_mask)


def test_len_and_indexing_keep_rows_aligned():
    memory = make_memory()
    assert len(memory) == BATCH
    sub = memory[torch.tensor([4, 1, 1])]
    assert len(sub) == 3 and sub.prompt_len == PROMPT_LEN and sub.gen_len == GEN
    assert (sub.sequences[:, 0] // 100).tolist() == [4, 1, 1]
    assert_rows_aligned(sub)


def test_minibatches_partition_every_epoch():
    memory = make_memory()
    generator = torch.Generator().manual_seed(0)
    epochs = 3
    minibatches = list(memory.minibatches(minibatch_size=2, epochs=epochs, generator=generator))
    assert len(minibatches) == epochs * BATCH // 2
    orders = []
    for epoch in range(epochs):
        chunk = minibatches[epoch * 3 : (epoch + 1) * 3]
        for mb in chunk:
            assert len(mb) == 2
            assert_rows_aligned(mb)
        order = torch.cat([mb.sequences[:, 0] // 100 for mb in chunk]).tolist()
        assert sorted(order) == list(range(BATCH))  # every row exactly once per epoch
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # a fresh permutation each epoch


def test_minibatches_are_reproducible_with_a_seeded_generator():
    memory = make_memory()

    def order(seed):
        mbs = memory.minibatches(3, epochs=2, generator=torch.Generator().manual_seed(seed))
        return [(mb.sequences[:, 0] // 100).tolist() for mb in mbs]

    assert order(7) == order(7)
    assert order(7) != order(8)


def test_minibatch_size_must_divide_the_batch():
    memory = make_memory()
    with pytest.raises(ValueError, match=r"must divide the batch size 6.*\[1, 2, 3, 6\]"):
        next(memory.minibatches(4))
    with pytest.raises(ValueError, match="epochs"):
        next(memory.minibatches(2, epochs=0))


def test_whole_batch_minibatch_and_missing_ref_logits():
    memory = make_memory(with_logits=False)
    (mb,) = memory.minibatches(BATCH)
    assert mb.ref_logits_gen is None and len(mb) == BATCH


@pytest.mark.parametrize(
    "field, bad, message",
    [
        (
            "advantages",
            torch.zeros(BATCH - 1, GEN),
            r"advantages must be a Float tensor of shape \[batch, gen\] = \[6, 4\].*\[5, 4\]",
        ),
        ("rewards", torch.zeros(BATCH, 1), r"rewards must be a Float tensor of shape \[batch\] = \[6\].*\[6, 1\]"),
        ("logprobs", torch.zeros(BATCH, GEN, dtype=torch.long), r"logprobs must be a Float tensor.*int64"),
        ("values", torch.zeros(BATCH, GEN + 1), r"values .* \[6, 5\].*gen = seq - prompt_len = 7 - 3 = 4"),
        ("ref_logits_gen", torch.zeros(BATCH, GEN - 1, VOCAB), r"ref_logits_gen .*\[batch, gen, vocab\] = \[6, 4, 5\]"),
        ("sequences", torch.zeros(BATCH, PROMPT_LEN + GEN), r"sequences must be an integer tensor"),
    ],
)
def test_validation_names_the_wrong_field_and_its_shape(field, bad, message):
    fields = {f.name: getattr(make_memory(), f.name) for f in dataclasses.fields(ReplayMemory)}
    fields[field] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        ReplayMemory(**fields)


def test_validation_of_prompt_len_and_masks():
    memory = make_memory()
    with pytest.raises(ValueError, match=r"prompt_len=7 must be an int with 1 <= prompt_len < seq=7"):
        dataclasses.replace(memory, prompt_len=7)
    # prompt_len 2 makes seq = 7 imply gen = 5, which the [B, 4] fields contradict
    with pytest.raises(ValueError, match=r"gen_mask .*gen = seq - prompt_len = 7 - 2 = 5"):
        dataclasses.replace(memory, prompt_len=2)
    attention_mask = memory.attention_mask.clone()
    attention_mask[:, -1] = 1  # claims the post-EOS padding is real
    with pytest.raises(ValueError, match=r"gen_mask must equal attention_mask\[:, prompt_len:\]"):
        dataclasses.replace(memory, attention_mask=attention_mask)


def test_repr_shows_names_shapes_and_stats_not_numbers():
    memory = make_memory(batch=64, gen=20, vocab=1000)
    text = repr(memory)
    assert text == memory.summary()
    lines = text.splitlines()
    assert len(lines) == 12 and len(text) < 1500  # a header and one line per field
    assert lines[0].startswith("ReplayMemory(batch=64, prompt_len=3, gen=20, seq=23")
    for name, shape in [
        ("sequences", "[64, 23]"),
        ("attention_mask", "[64, 23]"),
        ("gen_mask", "[64, 20]"),
        ("logprobs", "[64, 20]"),
        ("rewards", "[64]"),
        ("ref_logits_gen", "[64, 20, 1000]"),
    ]:
        assert any(line.split()[0] == name and shape in line for line in lines[1:]), name
    assert "tensor(" not in text
    # stats are over real positions: rewards are 0..63, mean 31.5, unbiased std sqrt(64·65/12) = 18.6
    assert "mean +31.5  min +0  max +63  std 18.6" in text
    # row b has 1 + b % 20 real generated tokens: 3 cycles of 1..20 and 1..4, mean (3·210 + 10)/64 = 10
    assert "response lengths 1..20, mean 10.0" in text
    assert "prompt tokens per row 2..3, left-padded" in text  # row 0's prompt is left-padded by one
    # token ids 100·b + column, all distinct: 64·3 − 1 prompt + 640 generated = 831 real tokens; lowest real id is row 0,
    # column 1; highest is row 63 (4 generated tokens, last at column 3 + 3 = 6): 6306
    assert "token ids 1..6306, 831 distinct" in text
    assert "ref_logits_gen  None" in repr(make_memory(with_logits=False))
