"""Every research tool on every model family: the final norm, unembedding and soft-cap of ``anatomy.py`` reproduce
each model's own logits; DLA sums to the logit difference; the value lens ends at the value head; ``diff`` finds the
one block that was changed; ``diff --timeline`` and ``inspect`` run; hooks during training reach the policy.

Each tiny random model of ``model_families.FAMILIES`` is built once for the module (GPT-2, GPT-NeoX, Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3, OLMo 2, Phi-3: LayerNorm and RMSNorm, Gemma's (1 + w) norm and √D embedding scale and
final soft-cap, grouped-query attention, rotary positions, tied and untied unembeddings).
"""

import copy
import json
import re

import pytest
import torch
from model_families import FAMILIES, build_family_model

from rlhf_scratch.anatomy import (
    UnsupportedModel,
    anatomy,
    final_norm,
    logit_lens,
    require_supported,
    unembed,
)
from rlhf_scratch.model_diff import cached_hook_names, collect, model_dla, weight_change
from rlhf_scratch.models import PolicyWithValueHead, ValueHead, check_fwd_hooks, load_bridge, save_model_dir

TOKENS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
TEXTS = "The movie was great and I loved it.\nThe acting was not bad at all.\nThe plot was dull.\n"

# What each family's config says (model_families.family_config): (final norm, γ offset, K/V heads, learned positions,
# tied unembedding, soft-cap, embedding scale). The anatomy is read from the model, so this is an independent answer.
EXPECTED = {
    "gpt2": ("LayerNorm", 0.0, 4, True, True, None, 1.0),
    "gpt_neox": ("LayerNorm", 0.0, 4, False, False, None, 1.0),
    "llama": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
    "mistral": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
    "qwen2": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
    "qwen3": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
    "gemma2": ("RMSNorm", 1.0, 2, False, True, 30.0, 32**0.5),
    "gemma3": ("RMSNorm", 1.0, 2, False, True, 30.0, 32**0.5),
    "olmo2": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
    "phi3": ("RMSNorm", 0.0, 2, False, False, None, 1.0),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {family: build_family_model(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_dirs):
    """(family, model directory, bridge, cache of every hook the tools read, logits) — shared: copy before changing."""
    name = request.param
    bridge = load_bridge(family_dirs[name])
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS, attention_mask=MASK)
    return name, family_dirs[name], bridge, cache, logits


def block_one_perturbed(directory, out, scale=0.05, seed=1):
    """A copy of the model in ``directory`` with every weight of block 1 (and nothing else) moved, saved to ``out``."""
    bridge = load_bridge(directory)
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, param in bridge.original_model.named_parameters():
            if re.search(r"\.(h|layers)\.1\.", name):
                param.add_(scale * torch.randn(param.shape, generator=generator))
                changed += 1
    assert changed > 0
    return save_model_dir(bridge, out, meta={"kind": "ppo", "phase": 1})


# --------------------------------------------------------------------------- the maths, all ten families


def test_anatomy_reads_each_familys_facts(family):
    name, _, bridge, _, _ = family
    facts = require_supported(bridge, "diff")
    got = (facts.norm, facts.norm_weight_offset, facts.n_kv_heads, facts.positional_embedding, facts.tied_unembed,
           facts.logit_soft_cap)
    assert got == EXPECTED[name][:6]
    assert facts.embed_scale == pytest.approx(EXPECTED[name][6], rel=1e-5)
    assert facts.n_heads == 4 and not facts.unembed_bias


def test_final_norm_and_unembed_reproduce_the_models_own_logits(family):
    _, _, bridge, cache, logits = family
    final = cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(final_norm(bridge, final), cache["ln_final.hook_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unembed(bridge, cache["ln_final.hook_out"]), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit_lens(bridge, final), logits, atol=1e-5, rtol=1e-5)
    # Any leading shape: [layer, batch, seq, D].
    stacked = torch.stack([cache["blocks.0.hook_resid_pre"], final])
    assert logit_lens(bridge, stacked).shape == (2, *logits.shape)
    # The lens at the embeddings is not the output (it reads another residual stream).
    assert (logit_lens(bridge, cache["blocks.0.hook_resid_pre"]) - logits).abs().max() > 1e-2


def test_the_soft_cap_is_applied_after_the_unembedding_where_the_family_has_one(family):
    name, _, bridge, cache, logits = family
    pre_cap = unembed(bridge, cache["ln_final.hook_out"], capped=False)
    cap = EXPECTED[name][5]
    if cap is None:
        torch.testing.assert_close(pre_cap, logits)
    else:  # the model's own output, un-capped by hand: z = c·atanh(logits / c)
        torch.testing.assert_close(pre_cap.double(), cap * torch.atanh(logits.double() / cap), atol=1e-4, rtol=1e-4)
        scaled = unembed(bridge, 4 * cache["ln_final.hook_out"])  # logits far beyond c are held below it
        assert scaled.abs().max() < cap


def test_dla_contributions_sum_to_the_models_logit_difference(family):
    """Σ components + bias = mean over positions of mean_T z_t − mean_v z_v, z the model's pre-cap logits."""
    name, _, bridge, cache, logits = family
    token_ids = [3, 7, 11]
    cap = EXPECTED[name][5]
    z = logits.double() if cap is None else cap * torch.atanh(logits.double() / cap)
    real = z[MASK.bool()]
    expected = (real[:, token_ids].mean(-1) - real.mean(-1)).mean().item()
    result = model_dla(bridge, {k: v.float() for k, v in cache.items()}, MASK.bool(), token_ids)
    assert [r["component"] for r in result["rows"]] == ["embed", "L0 attn", "L0 mlp", "L1 attn", "L1 mlp", "bias"]
    assert sum(r["contribution"] for r in result["rows"]) == pytest.approx(expected, abs=1e-4)
    assert result["check_error"] < 1e-5 and result["soft_cap"] == cap
    assert max(abs(r["contribution"]) for r in result["rows"][:-1]) > 1e-3  # the components carry it, not the bias


def test_value_lens_ends_at_the_value_head(family):
    from rlhf_scratch.value_lens import lens_values

    _, _, bridge, _, _ = family
    head = ValueHead(bridge.cfg.d_model)
    torch.nn.init.normal_(head.out.weight, std=0.5)
    policy = PolicyWithValueHead(bridge, head)
    values, _, lens = lens_values(policy, TOKENS, MASK)
    real = MASK.bool()
    assert lens.shape == (3, 2, TOKENS.shape[1])
    torch.testing.assert_close(lens[-1][real], values[real], atol=1e-5, rtol=1e-5)
    assert (lens[0][real] - values[real]).abs().max() > 1e-4


def test_an_attention_ablation_hook_changes_the_logits_and_silent_hooks_are_refused(family):
    _, _, bridge, _, logits = family

    def ablate(z, hook):  # [batch, pos, head, d_head] on every family, GQA included
        assert z.shape[2] == 4
        return torch.zeros_like(z)

    hooks = check_fwd_hooks(bridge, [("blocks.0.attn.hook_z", ablate)])
    with torch.no_grad():
        ablated = bridge.run_with_hooks(TOKENS, attention_mask=MASK, fwd_hooks=hooks)
    assert (ablated - logits)[MASK.bool()].abs().max() > 1e-3
    if not anatomy(bridge).positional_embedding and "hook_pos_embed" in bridge.hook_dict:
        with pytest.raises(ValueError, match="'hook_pos_embed' exists on this .* but it is an alias of .* never calls it"):
            check_fwd_hooks(bridge, [("hook_pos_embed", ablate)])
    if "blocks.0.attn.hook_result" in bridge.hook_dict:  # refused by TransformerLens while use_attn_result is off
        with pytest.raises(ValueError, match="hook_result' exists on this .* but TransformerLens refuses it"):
            check_fwd_hooks(bridge, [("blocks.0.attn.hook_result", ablate)])


PLOTTED = ("gpt2", "llama", "gemma2")
"""Families whose diff test draws the plots too (LayerNorm; RMSNorm with GQA; Gemma): drawing costs ~3 s a family."""


def test_diff_names_the_one_block_that_changed(family, tmp_path, monkeypatch):
    """Known answer: a copy with every weight of block 1 moved. The weight table ranks block-1 matrices first and
    every other matrix at 0; the residual stream is unchanged up to block 0; DLA still sums per model."""
    from rlhf_scratch import model_diff_report
    from rlhf_scratch.model_diff_report import DiffConfig, run_diff

    name, directory, _, _, _ = family
    if name not in PLOTTED:
        for plot in ("plot_residual", "plot_weight_change", "plot_dla"):
            monkeypatch.setattr(model_diff_report, plot, lambda *args, **kwargs: None)
    policy = block_one_perturbed(directory, tmp_path / "policy")
    (tmp_path / "texts.txt").write_text(TEXTS)
    summary = run_diff(DiffConfig(policy=str(policy), reference=str(directory), prompts=str(tmp_path / "texts.txt"),
                                  from_samples=False, n_texts=3, max_tokens=10, top_k=3, out=tmp_path / "diff"))
    rows = sorted(summary["weights"], key=lambda r: -r["rel_change"])
    in_block = [r for r in rows if r["layer"] == 1]
    assert all(r["layer"] == 1 for r in rows[: len(in_block)]) and all(r["rel_change"] > 1e-3 for r in in_block)
    assert all(r["rel_change"] < 1e-7 for r in rows[len(in_block):])
    kv_heads = {r["head"] for r in in_block if r["matrix"] == "W_K"}
    assert len(kv_heads) == EXPECTED[name][2]  # W_K per K/V head
    assert any(r["matrix"] == "W_gate" for r in in_block) == (name not in ("gpt2", "gpt_neox"))
    residual = {r["layer"]: r["rel_norm"] for r in summary["residual"]}
    assert residual["embed"] < 1e-6 and residual["L0"] < 1e-6 and residual["L1"] > 1e-3
    assert summary["dla_check_max_error"] < 1e-4 and summary["dla_soft_cap"] == EXPECTED[name][5]
    report = (tmp_path / "diff" / "report.md").read_text()
    assert ("pre-cap" in report) == (EXPECTED[name][5] is not None)
    if name in PLOTTED:
        assert (tmp_path / "diff" / "weight_change.png").stat().st_size > 0


def test_gqa_key_value_heads_are_charged_to_the_query_heads_that_read_them(family_dirs):
    """Llama: 4 query heads over 2 K/V heads. Move only K/V head 1 of layer 1 (k_proj rows 8..15): the table names
    L1.KV1 W_K alone, and the timeline's per-query-head change falls on query heads 2 and 3 (h // 2 = 1)."""
    from rlhf_scratch.model_diff_timeline import head_changes

    reference = load_bridge(family_dirs["llama"])
    policy = copy.deepcopy(reference)
    k_proj = policy.original_model.model.layers[1].self_attn.k_proj.weight
    with torch.no_grad():
        k_proj[8:16] += 0.1
    rows = [r for r in weight_change(reference, policy) if r["rel_change"] > 0]
    assert [r["component"] for r in rows] == ["L1.KV1 W_K"]
    heads = head_changes(weight_change(reference, policy))
    assert [h for h, change in heads.items() if change > 0] == ["L1.H2", "L1.H3"]


def test_a_model_whose_final_norm_is_unknown_is_refused_in_one_line(family_dirs):
    bridge = load_bridge(family_dirs["llama"])
    norm = bridge.ln_final.original_component
    norm.forward = lambda x: torch.tanh(x) * norm.weight  # neither LayerNorm nor RMSNorm
    with pytest.raises(UnsupportedModel) as caught:
        require_supported(bridge, "diff")
    message = str(caught.value)
    assert "\n" not in message and "llama (LlamaForCausalLM)" in message and "final norm" in message


# --------------------------------------------------------------------------- end to end on some families


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_diff_timeline_on_a_run_with_snapshots(name, family_dirs, tmp_path):
    """A run whose phase-1 snapshot and phase-2 checkpoint move block 1 only (the second further): every layer-0
    head is unchanged at both phases, every layer-1 head changed, and more at phase 2."""
    from rlhf_scratch.model_diff_report import DiffConfig
    from rlhf_scratch.model_diff_timeline import run_timeline

    run = tmp_path / "run"
    block_one_perturbed(family_dirs[name], run / "snapshots" / "phase_0001", scale=0.02)
    block_one_perturbed(family_dirs[name], run / "checkpoint", scale=0.08)
    meta = json.loads((run / "checkpoint" / "rlhf_scratch.json").read_text())
    (run / "checkpoint" / "rlhf_scratch.json").write_text(json.dumps({**meta, "phase": 2}))
    (tmp_path / "texts.txt").write_text(TEXTS)
    summary = run_timeline(DiffConfig(timeline=run, reference=str(family_dirs[name]), prompts=str(tmp_path / "texts.txt"),
                                      from_samples=False, n_texts=3, max_tokens=10, top_k=3, out=tmp_path / "timeline"))
    assert summary["phases"] == [1, 2]
    first, second = (row["heads"] for row in summary["rows"])
    assert sorted(first) == [f"L{layer}.H{head}" for layer in range(2) for head in range(4)]
    for head in range(4):
        assert first[f"L0.H{head}"] == 0.0 and 0 < first[f"L1.H{head}"] < second[f"L1.H{head}"]
    assert (tmp_path / "timeline" / "timeline_heads.png").is_file()


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "phi3"])
def test_inspect_a_ppo_checkpoint_of_the_family(name, family_dirs, tmp_path):
    """A 1-phase `ppo --model DIR` run, then `inspect` of its checkpoint: the lens's last row is the value head.
    (The value lens itself is checked on all ten families above; this is the command path on four.)"""
    from rlhf_scratch.cli import main
    from rlhf_scratch.value_lens import InspectConfig, run_inspect

    run = tmp_path / "ppo"
    assert main(["ppo", "--model", str(family_dirs[name]), "--reward", "chars:e", "--prompt", "The", "--phases", "1",
                 "--warmup-phases", "0", "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4",
                 "--table-rows", "1", "--out", str(run)]) == 0
    summary = run_inspect(InspectConfig(checkpoint=str(run / "checkpoint"), prompt="The", max_new_tokens=4))
    assert summary["lens_last_equals_value_head"] < 1e-5 and len(summary["lens"]) == 3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_ablation_hook_during_training_changes_the_policys_logprobs(name, family_dirs):
    from rlhf_scratch.objectives import taken_logprobs
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    def ablate_head(z, hook):
        z = z.clone()
        z[:, :, 0, :] = 0.0
        return z

    hooks = [("blocks.0.attn.hook_z", ablate_head)]
    config = PPOConfig(prompt="The movie", reward="chars:e", phases=1, batch_size=4, minibatch_size=4, warmup_phases=0,
                       sampling=SamplingConfig(max_new_tokens=4, temperature=1.5))
    bridge = load_bridge(family_dirs[name])
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(bridge), fwd_hooks=hooks)
    memory = trainer.rollout_phase()
    seq, mask, P = memory.sequences, memory.gen_mask, memory.prompt_len
    with torch.no_grad():
        plain = taken_logprobs(bridge(seq, attention_mask=memory.attention_mask) / 1.5, seq, P)
    assert (memory.logprobs[mask] - plain[mask]).abs().max() > 1e-3  # the rollout read the tokens with the head ablated
    torch.testing.assert_close(memory.ref_logprobs[mask], plain[mask], rtol=0, atol=1e-5)  # the reference did not
