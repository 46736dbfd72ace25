"""The trainers' AdamW: fused where torch's fused kernel is right, the plain one elsewhere."""

import copy

import torch

from rlhf_scratch.models import bridge_parameters
from rlhf_scratch.optimization import fused_where_contiguous


def one_step(bridge, groups_of):
    """One AdamW step (lr 0.1) on ``bridge`` with fixed random gradients; the parameters after it, by name."""
    params = bridge_parameters(bridge)
    optimizer = torch.optim.AdamW(groups_of(params), lr=0.1)
    for index, param in enumerate(params):
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(index))
    optimizer.step()
    return {name: p.detach().clone() for name, p in bridge.named_parameters() if ".qkv." not in name}


def test_the_split_groups_step_like_the_plain_adamw_and_the_fused_kernel_alone_would_not(tiny_bridge):
    fresh = [copy.deepcopy(tiny_bridge) for _ in range(3)]
    plain = one_step(fresh[0], lambda params: [{"params": params}])
    split = one_step(fresh[1], lambda params: fused_where_contiguous([{"params": params}], "cpu"))
    all_fused = one_step(fresh[2], lambda params: [{"params": params, "fused": True}])
    before = {name: p.detach() for name, p in tiny_bridge.named_parameters()}
    assert min((split[name] - before[name]).abs().max().item() for name in split) > 1e-2  # every parameter moved
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=0, atol=1e-6)
    # Why the split: torch 2.13's fused kernel steps the bridge's strided q/k/v weights wrongly.
    assert max((all_fused[name] - plain[name]).abs().max().item() for name in plain) > 1e-2


def test_strided_parameters_keep_the_plain_adamw_and_the_order_within_each_group_is_kept(tiny_bridge):
    params = bridge_parameters(tiny_bridge)
    head = [torch.nn.Parameter(torch.zeros(3, 4))]
    groups = fused_where_contiguous([{"params": params, "lr": 1.0}, {"params": head, "lr": 2.0}], "cpu")
    assert [(g["origin"], g["fused"], g["lr"]) for g in groups] == [(0, True, 1.0), (0, None, 1.0), (1, True, 2.0)]
    assert all(p.is_contiguous() for p in groups[0]["params"]) and not any(p.is_contiguous() for p in groups[1]["params"])
    assert len(groups[1]["params"]) == 3 * tiny_bridge.cfg.n_layers  # q, k and v of every layer
    position = {id(p): i for i, p in enumerate(params)}
    for group in groups[:2]:
        assert [position[id(p)] for p in group["params"]] == sorted(position[id(p)] for p in group["params"])
    assert [g["fused"] for g in fused_where_contiguous([{"params": params}], "mps")] == [None, None]


def test_strided_parameters_made_contiguous_step_like_the_plain_adamw_and_the_bridge_computes_the_same(tiny_bridge):
    """``fuse_strided_groups``: q/k/v get their own storage and the fused kernel; the bridge's forward pass is unchanged
    and one step equals the plain AdamW's on the strided originals."""
    from rlhf_scratch.optimization import copy_to_views, fuse_strided_groups

    tokens = torch.tensor([[1, 5, 9, 13, 17]])
    reference = copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        before_logits = tiny_bridge(tokens)
    plain = one_step(reference, lambda params: [{"params": params}])
    groups, views = fuse_strided_groups(fused_where_contiguous([{"params": bridge_parameters(tiny_bridge)}], "cpu"), "cpu")
    assert [g["fused"] for g in groups] == [True, True]
    assert all(p.is_contiguous() for g in groups for p in g["params"])
    with torch.no_grad():
        torch.testing.assert_close(tiny_bridge(tokens), before_logits, rtol=0, atol=0)
    fused = one_step(tiny_bridge, lambda params: groups)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=0, atol=1e-6)
    # The c_attn alias (Conv1D [in, 3·out]) holds the old q/k/v until copy_to_views writes the stepped ones back.
    parameters = dict(tiny_bridge.named_parameters())
    q = parameters["transformer.h.0._original_component.attn.q._original_component.weight"]
    alias = parameters["transformer.h.0._original_component.attn.qkv._original_component.weight"]
    d = q.shape[0]
    assert not torch.equal(alias[:, :d].T, q)
    copy_to_views(views)
    assert torch.equal(alias[:, :d].T, q)


def test_one_finite_check_on_the_total_still_names_the_first_bad_term():
    import math

    import pytest

    from rlhf_scratch.optimization import NonFiniteLossError, check_finite_terms

    def terms(a, b):
        a, b = torch.tensor(a), torch.tensor(b)
        return {"surrogate": a, "value_loss": b, "loss": -(a - b)}

    check_finite_terms(terms(1.0, 2.0))
    with pytest.raises(NonFiniteLossError, match=r"The value_loss is \[inf\]"):
        check_finite_terms(terms(1.0, math.inf))
    with pytest.raises(NonFiniteLossError, match=r"The surrogate is \[nan\]"):  # the first in order
        check_finite_terms(terms(math.nan, math.inf))
    with pytest.raises(NonFiniteLossError, match=r"The loss is \[nan\]"):  # a total that is bad on its own
        check_finite_terms({"surrogate": torch.tensor(1.0), "loss": torch.tensor(math.nan)})


def test_a_second_trainer_on_the_same_bridge_keeps_c_attn_in_step_and_its_state_dict_reloads(tiny_model_dir):
    """Two trainers on one bridge, one after the other (notebooks, experiments/step_through.py): the second groups
    q/k/v as the first did (its checkpoint fits a fresh trainer), writes its steps back into GPT-2's ``c_attn`` alias
    (Conv1D [in, 3·out] = [q | k | v] transposed), and its ``state_dict`` loaded into a fresh bridge, where q/k/v are
    views of ``c_attn`` loaded after them, gives the trained model back."""
    from rlhf_scratch.models import PolicyWithValueHead, load_bridge
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    def trainer(bridge):
        config = PPOConfig(prompt="The movie", reward="chars:.", phases=2, batch_size=8, minibatch_size=8, ppo_epochs=2,
                           warmup_phases=0, lr=1e-3, head_lr=1e-2, sampling=SamplingConfig(max_new_tokens=6))
        return PPOTrainer(config, policy=PolicyWithValueHead(bridge))

    def layout(learner):
        return [(group["fused"], [tuple(p.shape) for p in group["params"]]) for group in learner.optimizer.param_groups]

    bridge = load_bridge(tiny_model_dir)
    first = trainer(bridge)
    first.learning_phase(first.rollout_phase())
    second = trainer(bridge)
    assert layout(second.learner) == layout(first.learner)
    before = {k: v.clone() for k, v in second.policy.state_dict().items()}
    second.learning_phase(second.rollout_phase())
    state = {k: v.clone() for k, v in second.policy.state_dict().items()}
    q = "bridge.blocks.0.attn.q._original_component.weight"
    assert (state[q] - before[q]).abs().max().item() > 1e-3  # the second trainer moved q (two steps of lr 1e-3)
    for layer in range(bridge.cfg.n_layers):
        prefix = f"bridge.blocks.{layer}.attn."
        split = torch.cat([state[f"{prefix}{n}._original_component.weight"].T for n in "qkv"], dim=1)
        assert torch.equal(state[f"{prefix}_original_component.c_attn._original_component.weight"], split)
    tokens = torch.tensor([[1, 5, 9, 13, 17]])
    fresh = PolicyWithValueHead(load_bridge(tiny_model_dir))
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.bridge(tokens), bridge(tokens), rtol=0, atol=1e-6)
