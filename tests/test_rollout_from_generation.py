"""The rollout reads the old policy's log-probs and values from the decoding steps (no second forward pass) when
that is exact, and they equal what a separate forward pass over the sampled batch gives, to float rounding.

Two trainers with the same seed sample the same tokens; one reads the old policy from the decoding steps, the
other (``separate_rollout_forward=True``) from a forward pass: log-probs, values, entropy and the memory agree to
1e-5 (measured: at most 1e-6 in log-prob and 2e-6 in value on the tests' tiny GPT-2; 5e-6 and 1.2e-5 at |V| ≈ 23
on the built-in model, batch 64 × 24 tokens). Where the shortcut is not exact (bfloat16 autocast, hooks, dropout)
the forward pass runs.
"""

import pytest
import torch

from rlhf_scratch import invariants
from rlhf_scratch.invariants import InvariantError
from rlhf_scratch.models import PolicyWithValueHead
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.sampling import SamplingConfig

ATOL = 1e-5


def make_trainer(bridge, **overrides):
    base = dict(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=4, warmup_phases=0,
                seed=3, sampling=SamplingConfig(max_new_tokens=8, temperature=0.8))
    base.update(overrides)
    torch.manual_seed(0)  # the value head's initialisation
    policy = PolicyWithValueHead(bridge)
    torch.nn.init.normal_(policy.value_head.out.weight, std=0.5)  # non-zero values to compare
    return PPOTrainer(PPOConfig(**base), policy=policy)


def counting_forward(monkeypatch) -> list:
    calls = []
    original = PolicyWithValueHead.forward
    monkeypatch.setattr(PolicyWithValueHead, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_decoding_steps_equal_a_separate_forward_pass(tiny_model_dir, monkeypatch):
    from rlhf_scratch.models import load_bridge

    calls = counting_forward(monkeypatch)
    shortcut = make_trainer(load_bridge(tiny_model_dir), log_exact_kl=True)
    separate = make_trainer(load_bridge(tiny_model_dir), log_exact_kl=True, separate_rollout_forward=True)
    assert shortcut.rollout.reads_from_generation() and not separate.rollout.reads_from_generation()
    for phase in range(2):  # the second phase starts from an updated policy
        calls.clear()
        a = shortcut.sample_and_score()
        assert calls == [], "the shortcut runs no policy forward pass in the rollout"
        b = separate.sample_and_score()
        assert calls == [1]
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.gen_mask, b.gen_mask)
        mask = a.gen_mask
        assert (a.values.abs() > 1e-2)[mask].any(), "the value head must give non-trivial values to compare"
        for name in ("logprobs", "values", "kl_per_token"):
            gap = (getattr(a, name) - getattr(b, name))[mask].abs().max().item()
            assert gap < ATOL, f"phase {phase}: {name} differ by {gap:.3g}"
        for name in ("objective/entropy", "objective/kl", "objective/kl_exact"):
            assert a.stats[name] == pytest.approx(b.stats[name], abs=ATOL)
        ma, _ = shortcut.build_memory(a)
        mb, _ = separate.build_memory(b)
        assert torch.allclose(ma.advantages, mb.advantages, atol=ATOL)
        shortcut.learning_phase(ma)
        separate.learning_phase(mb)
    for pa, pb in zip(shortcut.policy.parameters(), separate.policy.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_llama_decoding_steps_equal_a_separate_forward_pass(tiny_model_dir, tmp_path):
    """Rotary positions: the decoding step numbers left-padded rows as the forward pass does."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_scratch.models import load_bridge

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.bos_token_id)).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    shortcut = make_trainer(load_bridge(tmp_path))
    separate = make_trainer(load_bridge(tmp_path), separate_rollout_forward=True)
    prompts = [shortcut.encode_text(text) for text in ("The movie", "I", "What a waste of two hours")] * 2
    ra, rb = shortcut.sample_and_score(prompts), separate.sample_and_score(prompts)
    assert torch.equal(ra.sequences, rb.sequences)
    for name in ("logprobs", "values"):
        assert (getattr(ra, name) - getattr(rb, name))[ra.gen_mask].abs().max().item() < ATOL


def test_debug_runs_the_saved_pass_and_checks_it(tiny_bridge, monkeypatch):
    calls = counting_forward(monkeypatch)
    trainer = make_trainer(tiny_bridge, debug=True)
    trainer.sample_and_score()
    assert calls == [1]  # --debug runs the forward pass the shortcut saves, to compare


def test_debug_catches_a_final_residual_from_another_position(tiny_bridge, monkeypatch):
    from rlhf_scratch import rollout, sampling

    honest = sampling.generate

    def shifted_generate(*args, **kwargs):
        generation = honest(*args, **kwargs)
        if generation.final_resid is not None:  # the residual one step late: the value of the wrong state
            generation.final_resid = torch.roll(generation.final_resid, 1, dims=1)
        return generation

    monkeypatch.setattr(rollout, "generate", shifted_generate)
    make_trainer(tiny_bridge).sample_and_score()  # unchecked without --debug
    with pytest.raises(InvariantError, match=r"'values_match_rollout' failed \(phase 1, rollout\)"):
        make_trainer(tiny_bridge, debug=True).sample_and_score()


@pytest.mark.parametrize("case", ["bfloat16", "hooks", "attached hook", "dropout", "asked"])
def test_the_forward_pass_runs_where_the_shortcut_is_not_exact(tiny_bridge, monkeypatch, case):
    overrides = {"bfloat16": {"dtype": "bfloat16"}, "asked": {"separate_rollout_forward": True}}.get(case, {})
    trainer = make_trainer(tiny_bridge, **overrides)
    if case == "hooks":
        trainer.fwd_hooks = [("blocks.0.hook_resid_post", lambda resid, hook: resid * 1.0)]
    elif case == "attached hook":
        tiny_bridge.blocks[0].hook_resid_post.add_hook(lambda resid, hook: resid)
    elif case == "dropout":
        trainer.policy.value_head.train()  # any module in training mode (dropout would be live)
    assert not trainer.rollout.reads_from_generation()
    calls = counting_forward(monkeypatch)
    trainer.sample_and_score()
    assert calls == [1]
    tiny_bridge.reset_hooks()
