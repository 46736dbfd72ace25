"""Activation patching and the Activation Difference Lens on cases with a known answer.

Two models that differ in one block only: a planted direction v added to the last MLP's output bias (so the
policy's last residual stream is the reference's + v at every position, and it says the planted token t), or one
attention head's W_O moved. Patching the changed component recovers 100 % of the change, every component that does
not read it 0 %; the lens of the activation difference reads t; steering the reference by 1·Δ gives the policy.
"""

import re

import pytest
import torch
from model_families import build_family_model

from rlhf_scratch.anatomy import anatomy
from rlhf_scratch.diff_lens import activation_difference, first_positions, lens_top_tokens, steered_logits
from rlhf_scratch.models import load_bridge
from rlhf_scratch.patching import (
    components,
    parse_component,
    patch_scan,
    patched_logits,
    recovered_fraction,
    scored_positions,
)

TOKENS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
                       [0, 23, 24, 25, 26, 27, 28, 29, 30, 31]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10, [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
RESPONSE = torch.zeros_like(MASK, dtype=torch.bool)
RESPONSE[:, 6:] = True


def planted_token(bridge) -> tuple[int, torch.Tensor]:
    """(t, v): the token whose unembedding column stands out most from the others, and the residual direction v
    with γ ⊙ v ∝ W_U[:, t] (centred, for LayerNorm), so that the final norm of v reads t first. Plain matrix algebra."""
    W_U = bridge.W_U.detach().double()  # [D, V]
    gram = W_U.T @ W_U  # [V, V]
    self_score = gram.diagonal()
    others = gram - torch.diag(torch.full_like(self_score, float("inf")))
    margin = self_score - others.max(dim=1).values
    margin[:5] = -float("inf")  # not a special token
    t = int(margin.argmax())
    gamma = bridge.ln_final.original_component.weight.detach().double() + anatomy(bridge).norm_weight_offset
    v = W_U[:, t] / gamma
    if anatomy(bridge).norm == "LayerNorm":
        v = v - v.mean()
    with torch.no_grad():  # large next to the residual stream, so that the final norm of h + v reads mostly v
        _, cache = bridge.run_with_cache(TOKENS, attention_mask=MASK, names_filter=[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"])
    size = next(iter(cache.values()))[MASK.bool()].norm(dim=-1).mean().double()
    return t, (5 * size * v / v.norm()).float()


def sharp(directory):
    """The tiny GPT-2 with its final norm's γ × 40: a random GPT-2's logits are nearly flat (W_U entries ~0.02), so a
    planted token would hardly be sampled; with larger logits the policy says it."""
    bridge = load_bridge(directory)
    with torch.no_grad():
        bridge.original_model.transformer.ln_f.weight.mul_(40)
    return bridge


def with_last_mlp_bias(directory, v):
    """A copy of the (sharp) GPT-2 model whose last MLP output bias is moved by v: its last residual stream is + v
    everywhere."""
    bridge = sharp(directory)
    with torch.no_grad():
        bridge.original_model.transformer.h[-1].mlp.c_proj.bias.add_(v)
    return bridge


def with_head_w_o_moved(directory, layer, head, scale=0.5, seed=3):
    """A copy with only W_O of one head changed (its rows/columns of the attention output projection)."""
    bridge = load_bridge(directory)
    d_head = bridge.cfg.d_head
    generator = torch.Generator().manual_seed(seed)
    original = bridge.original_model
    cut = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        if hasattr(original, "transformer"):  # GPT-2 Conv1D c_proj: weight [in = H·d_head, out = D]
            weight = original.transformer.h[layer].attn.c_proj.weight
            weight[cut].add_(scale * torch.randn(weight[cut].shape, generator=generator))
        else:  # nn.Linear o_proj: weight [out = D, in = H·d_head]
            weight = original.model.layers[layer].self_attn.o_proj.weight
            weight[:, cut].add_(scale * torch.randn(weight[:, cut].shape, generator=generator))
    return bridge


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_family_model("llama", tmp_path_factory.mktemp("llama"))


def test_components_and_their_names(tiny_bridge):
    names = components(tiny_bridge)
    assert names[:6] == ["L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.mlp", "L0.resid"] and len(names) == 12
    assert parse_component("L1.H3") == ("head", 1, 3) and parse_component("L0.resid") == ("resid", 0, None)
    with pytest.raises(ValueError, match="is not one of"):
        parse_component("L1.attn")
    with pytest.raises(ValueError, match="has 4 heads"):
        patched_logits(tiny_bridge, tiny_bridge, TOKENS, MASK, ["L0.H7"])


def test_recovered_fraction_closed_form_and_none_without_a_gap():
    assert recovered_fraction(0.75, 0.5, 1.5, 1e-6) == pytest.approx(0.25)
    assert recovered_fraction(1.0, 1.0, 1.0 + 1e-9, 1e-6) is None
    # scored positions: the distribution predicting response token t sits at t − 1
    assert scored_positions(torch.tensor([[False, False, True, True]])).tolist() == [[False, True, True, False]]


def test_patching_every_component_of_a_model_into_itself_changes_nothing(tiny_bridge):
    torch.testing.assert_close(patched_logits(tiny_bridge, tiny_bridge, TOKENS, MASK, components(tiny_bridge)),
                               tiny_bridge(TOKENS, attention_mask=MASK))


@pytest.mark.parametrize("direction", ["policy_into_reference", "reference_into_policy"])
def test_the_one_changed_mlp_recovers_all_of_kl_tokens_and_reward_and_nothing_else_does(tiny_model_dir, direction):
    reference = sharp(tiny_model_dir)
    t, v = planted_token(reference)
    policy = with_last_mlp_bias(tiny_model_dir, v)
    word = reference.tokenizer.decode([t])

    def count_word(texts):
        return torch.tensor([float(text.count(word)) for text in texts])

    scan = patch_scan(reference, policy, TOKENS, MASK, RESPONSE, token_ids=[t], rewards_fn=count_word,
                      direction=direction)
    assert scan.baselines["kl_gap"] > 1.0 and scan.baselines["tokens_pol"] > scan.baselines["tokens_ref"] + 1
    assert scan.baselines["reward_pol"] > scan.baselines["reward_ref"]
    for metric in ("kl", "tokens", "reward"):
        for row in scan.rows:
            expected = 1.0 if row["component"] in ("L1.mlp", "L1.resid") else 0.0
            assert row[metric] == pytest.approx(expected, abs=1e-4), (metric, row["component"])
        assert scan.ranked(metric)[:2] == ["L1.mlp", "L1.resid"] or scan.ranked(metric)[:2] == ["L1.resid", "L1.mlp"]
    assert scan.ranked("kl", kinds=("head", "mlp"))[0] == "L1.mlp"
    assert scan.head_grid("kl").abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_one_changed_head_recovers_all_and_the_other_heads_none(family, tiny_model_dir, llama_dir):
    directory = tiny_model_dir if family == "gpt2" else llama_dir
    reference, policy = load_bridge(directory), with_head_w_o_moved(directory, layer=1, head=2)
    w_change = (policy.blocks[1].attn.W_O - reference.blocks[1].attn.W_O).detach().flatten(1).norm(dim=1)
    assert w_change[2] > 0 and w_change[[0, 1, 3]].abs().max() == 0  # only that head's W_O moved
    scan = patch_scan(reference, policy, TOKENS, MASK, RESPONSE, token_ids=[3, 7, 11])
    assert scan.baselines["kl_gap"] > 1e-4
    for row in scan.rows:
        if row["component"] in ("L1.H2", "L1.resid"):
            assert row["kl"] == pytest.approx(1.0, abs=1e-4) and row["tokens"] == pytest.approx(1.0, abs=1e-3)
        elif row["component"] != "L1.mlp":  # the MLP after the head reads the changed residual: partly downstream
            assert row["kl"] == pytest.approx(0.0, abs=1e-5), row["component"]
    assert scan.ranked("kl", kinds=("head",))[0] == "L1.H2"


def test_a_set_patched_together_recovers_what_its_members_carry(tiny_model_dir):
    reference, policy = load_bridge(tiny_model_dir), with_head_w_o_moved(tiny_model_dir, layer=1, head=2)
    heads = [f"L{layer}.H{head}" for layer in range(2) for head in range(4)]
    scan = patch_scan(reference, policy, TOKENS, MASK, RESPONSE, sets={
        "changed head": ["L1.H2"], "changed head + mlp": ["L1.H2", "L1.mlp"], "other heads": [h for h in heads if h != "L1.H2"],
    })
    values = {row["component"]: row["kl"] for row in scan.rows}
    assert values["changed head"] == pytest.approx(1.0, abs=1e-4) and values["other heads"] == pytest.approx(0.0, abs=1e-5)
    # the MLP after the head, taken from the policy on top of the policy's head: still exactly the policy
    assert values["changed head + mlp"] == pytest.approx(1.0, abs=1e-4)
    assert scan.ranked("kl", kinds=("set",))[-1] == "other heads" and scan.rows[1]["members"] == ["L1.H2", "L1.mlp"]
    with pytest.raises(ValueError, match="either names"):
        patch_scan(reference, policy, TOKENS, MASK, RESPONSE, names=["L0.mlp"], sets={"a": ["L0.mlp"]})


def test_no_gap_gives_none_never_a_division(tiny_bridge):
    scan = patch_scan(tiny_bridge, tiny_bridge, TOKENS, MASK, RESPONSE, token_ids=[3])
    assert all(row["kl"] is None and row["tokens"] is None for row in scan.rows)
    assert scan.ranked("kl") == components(tiny_bridge)


def test_bad_input_is_refused_with_one_line(tiny_bridge):
    with pytest.raises(ValueError, match="direction"):
        patch_scan(tiny_bridge, tiny_bridge, TOKENS, MASK, RESPONSE, direction="sideways")
    with pytest.raises(ValueError, match="response_mask marks no response"):
        patch_scan(tiny_bridge, tiny_bridge, TOKENS, MASK, torch.zeros_like(RESPONSE))
    with pytest.raises(ValueError, match="token_ids"):
        patch_scan(tiny_bridge, tiny_bridge, TOKENS, MASK, RESPONSE, token_ids=[10**6])


# --------------------------------------------------------------------------- Activation Difference Lens, steering


def test_first_positions_of_left_padded_rows():
    assert first_positions(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 2).tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_the_lens_of_a_planted_difference_reads_the_planted_token(tiny_model_dir):
    reference = sharp(tiny_model_dir)
    t, v = planted_token(reference)
    policy = with_last_mlp_bias(tiny_model_dir, v)
    delta = activation_difference(reference, policy, TOKENS, MASK, first_k=3)
    assert delta.shape == (2, reference.cfg.d_model)
    assert delta[0].abs().max() < 1e-5  # block 0 is unchanged
    torch.testing.assert_close(delta[1], v, atol=1e-4, rtol=1e-4)  # Δ at the last layer is exactly v
    assert lens_top_tokens(reference, delta, k=5)[1][0] == t


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_lens_reads_the_planted_token_through_rmsnorm_families(family, tmp_path):
    """The policy adds v to the last block's output (a torch hook on its hook point: resid_post + v everywhere)."""
    directory = build_family_model(family, tmp_path / family)
    reference, policy = load_bridge(directory), load_bridge(directory)
    t, v = planted_token(reference)
    last = policy.hook_dict[f"blocks.{policy.cfg.n_layers - 1}.hook_resid_post"]
    last.register_forward_hook(lambda module, inputs, output: output + v)
    delta = activation_difference(reference, policy, TOKENS, MASK, first_k=4)
    torch.testing.assert_close(delta[-1], v, atol=1e-4, rtol=1e-4)
    assert lens_top_tokens(reference, delta, k=3)[-1][0] == t


def test_steering_with_alpha_zero_is_the_plain_forward_and_one_delta_gives_the_policy(tiny_model_dir):
    reference = sharp(tiny_model_dir)
    t, v = planted_token(reference)
    policy = with_last_mlp_bias(tiny_model_dir, v)
    plain = reference(TOKENS, attention_mask=MASK)
    torch.testing.assert_close(steered_logits(reference, TOKENS, MASK, 1, v, 0.0), plain)
    delta = activation_difference(reference, policy, TOKENS, MASK)
    torch.testing.assert_close(steered_logits(reference, TOKENS, MASK, 1, delta[1], 1.0),
                               policy(TOKENS, attention_mask=MASK), atol=1e-4, rtol=1e-4)
    steered = steered_logits(reference, TOKENS, MASK, 1, delta[1], 2.0).log_softmax(-1)[..., t]
    assert (steered > plain.log_softmax(-1)[..., t] + 1).all()
    with pytest.raises(ValueError, match="steering vector has shape"):
        steered_logits(reference, TOKENS, MASK, 1, delta, 1.0)
