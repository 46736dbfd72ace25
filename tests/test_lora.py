"""LoRA (rlhf_scratch/lora.py): the reference is the base model for free, hooks and the plain forward see the
adapters, checkpoints hold them and load merged, ΔW has rank ≤ r, and bad input is a one-line error."""

import pytest
import torch

from rlhf_scratch.config import ConfigError, parse_lora_targets
from rlhf_scratch.lora import (
    ADAPTER_FILE,
    LoRAError,
    adapter_free_view,
    adapters_disabled,
    apply_lora,
    lora_of,
    merged_copy,
)
from rlhf_scratch.models import PolicyWithValueHead, load_bridge, load_policy, save_model_dir
from rlhf_scratch.plain_forward import plain_forward_for
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.sampling import SamplingConfig

RANK = 4
FIELDS = dict(prompt="The movie", reward="chars:.", phases=2, batch_size=8, minibatch_size=4, ppo_epochs=2,
              warmup_phases=0, lr=3e-2, head_lr=1e-2, lora_rank=RANK, sampling=SamplingConfig(max_new_tokens=6))
TOKENS = torch.tensor([[1, 5, 9, 14, 20, 3], [2, 7, 3, 8, 11, 4]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # the second row left-padded


def lora_trainer(model_dir, **overrides) -> PPOTrainer:
    torch.manual_seed(0)
    return PPOTrainer(PPOConfig(**{**FIELDS, **overrides}), policy=PolicyWithValueHead(load_bridge(model_dir)))


def nudge_adapters(policy, seed: int = 0) -> None:
    """B ≠ 0 (as after training), deterministically."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.lora.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def real(x: torch.Tensor) -> torch.Tensor:
    return x[MASK.bool()]


@torch.no_grad()
def logits_of(bridge) -> torch.Tensor:
    return bridge(TOKENS, attention_mask=MASK)


def test_trainable_parameters_are_the_adapters_and_the_value_head(tiny_model_dir):
    """Tiny GPT-2 (D = 32, MLP 128, 2 layers), rank 4 on all six matrices: per layer q, k, v, o each r·(32 + 32) = 256,
    the MLP's in and out r·(32 + 128) = 640 each: 2 · (4·256 + 2·640) = 4608; the value head 32·128 + 128 + 128 + 1."""
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    n = apply_lora(policy, RANK, targets="all")
    assert n == 4608 + 32 * 128 + 128 + 128 + 1
    assert sum(p.numel() for p in policy.trunk_parameters()) == 4608
    assert not any(p.requires_grad for p in policy.bridge.parameters())
    assert lora_of(policy).targets == ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")  # no gate: GPT-2


def test_reference_is_the_base_model_before_and_after_training_and_shares_its_weights(tiny_model_dir):
    base = logits_of(load_bridge(tiny_model_dir))  # the pre-training model, loaded on its own
    trainer = lora_trainer(tiny_model_dir)
    with torch.no_grad():
        policy_logits = trainer.policy(TOKENS, MASK).logits
    torch.testing.assert_close(real(logits_of(trainer.reference)), real(base), rtol=0, atol=1e-5)
    torch.testing.assert_close(real(policy_logits), real(base), rtol=0, atol=1e-5)  # B = 0: policy = reference
    # No second copy: every reference parameter is the policy's own tensor.
    policy_ptrs = {p.data_ptr() for p in trainer.policy.bridge.parameters()}
    assert all(p.data_ptr() in policy_ptrs for p in trainer.reference.parameters())

    trainer.learning_phase(trainer.rollout_phase())  # a few AdamW steps on the adapters
    trainer.learning_phase(trainer.rollout_phase())
    assert any(d.B.abs().max() > 0 for d in trainer.policy.lora.deltas.values())
    torch.testing.assert_close(real(logits_of(trainer.reference)), real(base), rtol=0, atol=1e-5)
    with torch.no_grad():
        trained = trainer.policy(TOKENS, MASK).logits
        with adapters_disabled(trainer.policy):
            switched_off = trainer.policy(TOKENS, MASK).logits
    assert (real(trained) - real(base)).abs().max() > 1e-3
    torch.testing.assert_close(real(switched_off), real(base), rtol=0, atol=1e-5)


def test_hooks_see_the_adapted_activations(tiny_model_dir):
    """A hook on an adapted layer's output sees another value with the adapter on than off, once B ≠ 0."""
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    apply_lora(policy, RANK, targets="q,v")
    seen = []

    def record(activation, hook):
        seen.append(activation.detach().clone())

    hooks = [("blocks.0.attn.q.hook_out", record)]
    with torch.no_grad():
        policy(TOKENS, MASK, fwd_hooks=hooks)
        nudge_adapters(policy)
        policy(TOKENS, MASK, fwd_hooks=hooks)
        with adapters_disabled(policy):
            policy(TOKENS, MASK, fwd_hooks=hooks)
    at_zero, adapted, off = seen
    torch.testing.assert_close(at_zero, off)
    assert (adapted - off).abs().max() > 1e-2
    # It is exactly the low-rank term: q(x) + s·B A x.
    x = policy.bridge.run_with_cache(TOKENS, attention_mask=MASK)[1]["blocks.0.attn.q.hook_in"]
    delta = policy.lora.deltas["blocks_0_attn_q"](x)  # [B, S, D]; the hook sees it per head [B, S, H, d_head]
    torch.testing.assert_close(adapted - off, delta.reshape(adapted.shape), rtol=1e-4, atol=1e-5)


def test_kv_cached_generation_samples_from_the_adapted_policy(tiny_model_dir):
    """With B ≠ 0: the cached decoding's log-probs equal the (plain, adapted) rollout forward's (``--debug`` checks it
    and would raise), and they differ from the reference's."""
    trainer = lora_trainer(tiny_model_dir, debug=True)
    nudge_adapters(trainer.policy)
    rollout = trainer.sample_and_score()
    gap = (rollout.logprobs - rollout.ref_logprobs)[rollout.gen_mask]
    assert gap.abs().max() > 0.05
    torch.testing.assert_close(rollout.generation.sampled_logprobs[rollout.gen_mask], rollout.logprobs[rollout.gen_mask],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("targets", ["all", "q,k,o,in"])
def test_plain_forward_applies_the_adapters(tiny_model_dir, targets):
    """The fast path (GPT-2's fused c_attn gets the q|k|v deltas) equals the hooked bridge with B ≠ 0."""
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    apply_lora(policy, RANK, targets=targets)
    nudge_adapters(policy)
    with torch.no_grad():
        fast = policy(TOKENS, MASK)
        assert plain_forward_for(policy.bridge) is not None  # it ran (and passed its self-check)
        policy.plain_forward = False
        hooked = policy(TOKENS, MASK)
        with adapters_disabled(policy):
            base = policy(TOKENS, MASK).logits
    torch.testing.assert_close(real(fast.logits), real(hooked.logits), rtol=0, atol=1e-4)
    torch.testing.assert_close(real(fast.values), real(hooked.values), rtol=0, atol=1e-4)
    assert (real(fast.logits) - real(base)).abs().max() > 1e-2


def test_checkpoint_holds_the_adapters_and_loads_merged_with_rank_at_most_r(tiny_model_dir, tmp_path):
    from rlhf_scratch.update_sparsity import update_sparsity

    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    apply_lora(policy, RANK, alpha=8.0, targets="all")
    nudge_adapters(policy)
    with torch.no_grad():
        adapted = policy(TOKENS, MASK).logits
    save_model_dir(policy.bridge, tmp_path / "ckpt", value_head=policy.value_head)
    assert (tmp_path / "ckpt" / ADAPTER_FILE).is_file()

    merged = load_bridge(tmp_path / "ckpt")  # what diff, inspect and --model see: W + s·B A
    assert lora_of(merged) is None
    torch.testing.assert_close(real(logits_of(merged)), real(adapted), rtol=0, atol=1e-4)
    torch.testing.assert_close(real(logits_of(merged_copy(policy.bridge))), real(adapted), rtol=0, atol=1e-4)
    resumed = load_policy(tmp_path / "ckpt", keep_adapters=True)  # what --resume sees: base + the same adapters
    assert resumed.lora is not None and resumed.lora.scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(real(resumed(TOKENS, MASK).logits), real(adapted), rtol=0, atol=1e-5)
        with adapters_disabled(resumed):
            torch.testing.assert_close(real(resumed(TOKENS, MASK).logits), real(logits_of(load_bridge(tiny_model_dir))),
                                       rtol=0, atol=1e-5)

    rows = update_sparsity(load_bridge(tiny_model_dir), merged)
    adapted_rows = [r for r in rows if r["matrix"].split()[-1] in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")]
    assert len(adapted_rows) == 12
    for row in adapted_rows:  # ΔW = s·B A: rank ≤ r although the matrices have full rank 32
        assert row["rank_99"] <= RANK and row["effective_rank"] <= RANK + 1e-3 and row["full_rank"] == 32, row
    untouched = [r for r in rows if r["matrix"] in ("embed W_E", "pos_embed W_pos")]
    assert all(r["changed"]["exact"] == 0 for r in untouched)


def test_adapter_free_view_copies_no_weight_and_drops_no_hook_of_the_policy(tiny_model_dir):
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    apply_lora(policy, RANK)
    nudge_adapters(policy)
    view = adapter_free_view(policy.bridge)
    with torch.no_grad():
        with adapters_disabled(policy):
            base = policy(TOKENS, MASK).logits
        adapted = policy(TOKENS, MASK).logits
    torch.testing.assert_close(real(logits_of(view)), real(base), rtol=0, atol=1e-5)
    assert (real(adapted) - real(base)).abs().max() > 1e-2  # the policy keeps its adapters


def test_lora_with_gradient_accumulation_equals_the_big_minibatch(tiny_model_dir):
    base, accum = lora_trainer(tiny_model_dir), lora_trainer(tiny_model_dir, grad_accum_steps=2)
    start = {k: v.clone() for k, v in base.policy.state_dict().items()}
    memory = base.rollout_phase()
    results = []
    for trainer in (base, accum):
        trainer.policy.load_state_dict(start)
        minibatches = list(memory.minibatches(4, 2, generator=torch.Generator().manual_seed(0)))
        breakdown = trainer.learning_phase(memory, minibatches=minibatches)
        results.append(({k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}, breakdown))
    (big, big_rows), (small, small_rows) = results
    assert max((small[k] - big[k]).abs().max().item() for k in big) <= 0.01 * FIELDS["lr"] * 4
    lora_keys = [k for k in big if k.startswith("lora.")]
    assert lora_keys and max((big[k] - start[k]).abs().max().item() for k in lora_keys) > 0.5 * FIELDS["lr"]
    assert all(torch.equal(big[k], start[k]) for k in big if k.startswith("bridge."))  # the base never moves
    for a, b in zip(small_rows, big_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_lora_under_bfloat16_autocast(tiny_model_dir):
    trainer = lora_trainer(tiny_model_dir, dtype="bfloat16")
    breakdown = trainer.learning_phase(trainer.rollout_phase())
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in breakdown)
    assert all(p.dtype == torch.float32 for p in trainer.policy.lora.parameters())


def test_stopped_and_resumed_lora_run_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    from test_resume import PHASES, STOP, assert_same_metrics, ppo_config, read_metrics

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie\nA slow drama\nI would not\n")
    lora = dict(lora_rank=RANK, lora_alpha=8.0, lora_targets="attn", lr=1e-2)
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    PPOTrainer(ppo_config(tiny_model_dir, prompts, out=full_dir, **lora)).train()
    PPOTrainer(ppo_config(tiny_model_dir, prompts, out=split_dir, checkpoint_every=1, **lora)).train(stop_after=STOP)
    assert (split_dir / "checkpoint" / ADAPTER_FILE).is_file()
    resumed = PPOTrainer.resume(PPOConfig(resume=split_dir / "checkpoint"))
    assert resumed.policy.lora is not None and resumed.policy.lora.targets == ("attn.q", "attn.k", "attn.v", "attn.o")
    resumed.train()
    expected = read_metrics(full_dir)
    assert len(expected) == PHASES and expected[-1]["objective/kl"] > 0  # the adapters did move the policy
    assert_same_metrics(read_metrics(split_dir), expected)


def test_adapters_take_their_models_mode_so_fresh_and_resumed_lora_rollouts_take_one_path(tiny_model_dir, tmp_path):
    # Regression: adapters attached after policy.eval() stayed in nn.Module's default training mode, so a fresh LoRA
    # run read the old policy by a forward pass while its resumed run (adapters loaded onto an eval-mode bridge) read
    # the decoding steps: the two agree to ~5e-7 only, and the resumed run's KL drifted from the uninterrupted one's.
    trainer = lora_trainer(tiny_model_dir, debug=True)
    assert [name for name, module in trainer.policy.named_modules() if module.training] == []
    assert trainer.rollout.reads_from_generation()  # the adapters have no dropout: the shortcut is exact for them
    nudge_adapters(trainer.policy)  # B != 0; --debug then checks the decoding steps against the forward pass
    assert trainer.rollout_phase().gen_mask.any()
    save_model_dir(trainer.policy.bridge, tmp_path / "ckpt", value_head=trainer.policy.value_head)
    resumed = load_policy(tmp_path / "ckpt", keep_adapters=True)  # what --resume builds
    assert not any(module.training for module in resumed.lora.modules())  # the bridge's mode: eval
    in_training = PolicyWithValueHead(load_bridge(tiny_model_dir)).train()
    apply_lora(in_training, RANK)
    assert in_training.lora.training and all(delta.training for delta in in_training.lora.deltas.values())


def test_bad_lora_input_is_a_one_line_error(tiny_model_dir):
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    for rank in (0, -2):
        with pytest.raises(LoRAError, match="positive integer") as error:
            apply_lora(policy, rank)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown target 'qproj'.*attn.q"):
        parse_lora_targets("q,qproj")
    with pytest.raises(LoRAError, match="mlp.gate: GPT2LMHeadModel has no such matrix.*mlp.out") as error:
        apply_lora(policy, RANK, targets="q,gate")
    assert "\n" not in str(error.value)
    assert lora_of(policy) is None  # nothing was half-applied
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        PPOConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="without --lora-rank"):
        PPOConfig(lora_alpha=16.0)
    with pytest.raises(ValueError, match="unknown target"):
        PPOConfig(lora_rank=8, lora_targets="attn,ffn")
    assert parse_lora_targets("v,q,mlp") == ("attn.q", "attn.v", "mlp.in", "mlp.out", "mlp.gate")


def test_export_command_writes_merged_weights_plain_transformers_loads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_scratch.cli import main

    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    apply_lora(policy, RANK, targets="q,v,out")
    nudge_adapters(policy)
    with torch.no_grad():
        adapted = policy(TOKENS, MASK).logits
    save_model_dir(policy.bridge, tmp_path / "ckpt", value_head=policy.value_head)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / ADAPTER_FILE).exists() and (tmp_path / "merged" / "value_head.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no rlhf_scratch needed to read it
    with torch.no_grad():
        positions = (MASK.cumsum(-1) - 1).clamp(min=0)  # as the bridge counts them: left padding skipped
        exported = plain(TOKENS, attention_mask=MASK, position_ids=positions).logits
    torch.testing.assert_close(real(exported), real(adapted), rtol=0, atol=1e-4)


def test_lora_errors_on_the_command_line_are_one_line(tiny_model_dir, tmp_path, capsys):
    from rlhf_scratch.cli import main

    args = ["ppo", "--model", str(tiny_model_dir), "--prompt", "The", "--phases", "1", "--batch-size", "2", "--minibatch-size", "2"]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--lora-rank", "4", "--lora-targets", "q,ffn", "--out", str(tmp_path / "a")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown target 'ffn'" in err and err.count("\n") == 1
    assert main([*args, "--lora-rank", "4", "--lora-targets", "gate", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "mlp.gate: GPT2LMHeadModel has no such matrix" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "phi3"])
def test_lora_on_other_families(family, tmp_path):
    """Rotary/RMSNorm families: every matrix adapted (the gated MLP's gate too), hooked = plain = merged with B ≠ 0,
    off = base. GPT-NeoX and Phi-3 fuse q/k/v in their own layout: their LoRA passes go through the bridge, saying so."""
    import warnings

    from model_families import build_family_model

    directory = build_family_model(family, tmp_path / family)
    base = logits_of(load_bridge(directory))
    policy = PolicyWithValueHead(load_bridge(directory))
    apply_lora(policy, RANK)
    assert ("mlp.gate" in lora_of(policy).targets) == (family in ("llama", "gemma2", "phi3"))
    nudge_adapters(policy)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        fast = policy(TOKENS, MASK).logits
        policy.plain_forward = False
        hooked = policy(TOKENS, MASK).logits
        with adapters_disabled(policy):
            off = policy(TOKENS, MASK).logits
    fused = family in ("gpt_neox", "phi3")
    assert (plain_forward_for(policy.bridge) is None) == fused
    assert any("no plain-module matrix for the LoRA adapter" in str(w.message) for w in caught) == fused
    torch.testing.assert_close(real(fast), real(hooked), rtol=0, atol=1e-4)
    torch.testing.assert_close(real(off), real(base), rtol=0, atol=1e-5)
    torch.testing.assert_close(real(logits_of(merged_copy(policy.bridge))), real(hooked), rtol=0, atol=1e-4)
    assert (real(hooked) - real(base)).abs().max() > 1e-2


def test_a_group_takes_what_the_family_has_a_named_target_must_exist(tiny_model_dir):
    policy = PolicyWithValueHead(load_bridge(tiny_model_dir))
    with pytest.raises(LoRAError, match="mlp.gate"):
        apply_lora(policy, RANK, targets="attn,gate")  # gate named on its own: GPT-2 has none
    apply_lora(policy, RANK, targets="attn,mlp")
    assert lora_of(policy).targets == ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")


@pytest.mark.parametrize("kind", ["reinforce", "rloo"])
def test_reinforce_and_rloo_train_only_the_adapters(tiny_model_dir, kind):
    from rlhf_scratch.algorithm_configs import REINFORCEConfig, RLOOConfig
    from rlhf_scratch.group_baselines import RLOOTrainer
    from rlhf_scratch.reinforce import REINFORCETrainer

    fields = dict(prompt="The movie", reward="chars:e", phases=2, batch_size=8, minibatch_size=8, warmup_phases=0,
                  lr=3e-2, lora_rank=RANK, sampling=SamplingConfig(max_new_tokens=6))
    config = REINFORCEConfig(**fields) if kind == "reinforce" else RLOOConfig(**fields, group_size=2)
    trainer = (REINFORCETrainer if kind == "reinforce" else RLOOTrainer)(config,
                                                                          policy=PolicyWithValueHead(load_bridge(tiny_model_dir)))
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimised} == {id(p) for p in trainer.policy.lora.parameters()}  # no value head here
    start = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.learning_phase(trainer.rollout_phase())
    after = trainer.policy.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start if k.startswith("bridge."))
    assert max((after[k] - start[k]).abs().max().item() for k in start if k.startswith("lora.")) > 1e-3
    torch.testing.assert_close(real(logits_of(trainer.reference)), real(logits_of(load_bridge(tiny_model_dir))),
                               rtol=0, atol=1e-5)
