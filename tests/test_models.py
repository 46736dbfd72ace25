"""Models: value-head placement, gradients, padding, loading and saving."""

import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from rlhf_scratch.models import (
    FINAL_RESIDUAL_HOOK,
    VALUE_HEAD_FILE,
    ModelLoadError,
    PolicyWithValueHead,
    check_model_source,
    complete_checkpoint_dir,
    load_bridge,
    load_policy,
    make_reference,
    save_model_dir,
)
from rlhf_scratch.sampling import encode, left_pad


def test_value_head_reads_exactly_the_unembedding_input(tiny_bridge):
    policy = PolicyWithValueHead(tiny_bridge)
    torch.nn.init.normal_(policy.value_head.out.weight)  # the head starts at zero; make it informative
    tokens = torch.tensor([[0, 5, 9, 17, 3]])
    _, cache = tiny_bridge.run_with_cache(tokens)
    resid = cache[FINAL_RESIDUAL_HOOK]
    out = policy(tokens)
    # The captured residual is the exact input to the unembedding ...
    unembedded = resid @ tiny_bridge.original_model.lm_head.weight.T
    torch.testing.assert_close(unembedded, out.logits, atol=1e-5, rtol=1e-5)
    # ... and the values are the head applied to it.
    torch.testing.assert_close(policy.value_head(resid), out.values)
    assert out.values.shape == (1, 5)


def test_gradients_reach_trunk_and_head(tiny_bridge):
    policy = PolicyWithValueHead(tiny_bridge)
    tokens = torch.tensor([[0, 5, 9, 17, 3], [0, 7, 7, 2, 1]])
    out = policy(tokens)
    (out.values - 1.0).pow(2).mean().backward()
    # The output layer starts at zero, so the value loss first moves the head's output
    # layer; the gradient w.r.t. the hidden layer and trunk flows through it once nonzero.
    assert policy.value_head.out.weight.grad.abs().sum() > 0
    policy.zero_grad()
    torch.nn.init.normal_(policy.value_head.out.weight)
    out = policy(tokens)
    out.values.sum().backward()
    assert policy.value_head.hidden.weight.grad.abs().sum() > 0
    trunk_grads = [p.grad for p in policy.trunk_parameters() if p.grad is not None]
    assert trunk_grads and sum(g.abs().sum() for g in trunk_grads) > 0
    # Logit loss alone also reaches the trunk.
    policy.zero_grad()
    policy(tokens).logits[:, -1].logsumexp(-1).sum().backward()
    assert sum(p.grad.abs().sum() for p in policy.trunk_parameters() if p.grad is not None) > 0


def test_trunk_parameters_have_no_aliased_storage(tiny_bridge, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = PolicyWithValueHead(tiny_bridge)
    params = policy.trunk_parameters()
    # q/k/v are strided views into the fused c_attn weight; they may share a storage
    # but no element may belong to two trainable parameters (double updates).
    counts_by_storage = {}
    for p in params:
        storage = p.untyped_storage()
        counts = counts_by_storage.setdefault(
            storage.data_ptr(), torch.zeros(storage.nbytes() // p.element_size())
        )
        counts.as_strided(p.shape, p.stride(), p.storage_offset()).add_(1)
    assert max(c.max().item() for c in counts_by_storage.values()) == 1
    # Every weight of the plain Hugging Face model is trained exactly once.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in plain.parameters())


def test_left_padded_batch_equals_each_row_alone(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    prompts = [encode(tokenizer, t) for t in ["The movie was great", "What", "I would not watch this film again"]]
    tokens, mask = left_pad(prompts, tokenizer.pad_token_id)
    policy = PolicyWithValueHead(tiny_bridge)
    torch.nn.init.normal_(policy.value_head.out.weight)
    batched = policy(tokens, attention_mask=mask)
    for row, ids in enumerate(prompts):
        alone = policy(torch.tensor([ids]))
        n = len(ids)
        torch.testing.assert_close(batched.logits[row, -n:], alone.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.values[row, -n:], alone.values[0], atol=1e-4, rtol=1e-4)


def test_reference_is_frozen_copy(tiny_bridge):
    reference = make_reference(tiny_bridge)
    tokens = torch.tensor([[0, 5, 9]])
    torch.testing.assert_close(reference(tokens), tiny_bridge(tokens))
    assert all(not p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        next(tiny_bridge.parameters()).add_(1.0)
    assert not torch.allclose(reference(tokens), tiny_bridge(tokens))


def test_save_and_load_round_trip(tiny_bridge, tmp_path):
    policy = PolicyWithValueHead(tiny_bridge)
    torch.nn.init.normal_(policy.value_head.out.weight)
    with torch.no_grad():  # change weights after bridging so the export must carry them
        for p in policy.trunk_parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model_dir(policy.bridge, tmp_path / "ckpt", value_head=policy.value_head, meta={"kind": "test"})
    loaded = load_policy(tmp_path / "ckpt")
    tokens = torch.tensor([[0, 5, 9, 17, 3]])
    a, b = policy(tokens), loaded(tokens)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=1e-6)


def test_saving_an_edited_deep_copy_keeps_its_query_key_value_edits(tiny_bridge, tmp_path):
    # After copy.deepcopy the bridge's split q/k/v weights no longer share memory with
    # GPT-2's fused c_attn; the export must write the edited split weights, not stale c_attn.
    copied = make_reference(tiny_bridge)
    with torch.no_grad():
        copied.blocks[0].attn.W_V[2] += torch.randn_like(copied.blocks[0].attn.W_V[2])
        copied.blocks[1].attn.W_Q[0] += torch.randn_like(copied.blocks[1].attn.W_Q[0])
    tokens = torch.tensor([[0, 5, 9, 17, 3]])
    assert not torch.allclose(copied(tokens), tiny_bridge(tokens))  # the edit changed the model
    save_model_dir(copied, tmp_path / "copy")
    torch.testing.assert_close(load_bridge(tmp_path / "copy")(tokens), copied(tokens), atol=1e-5, rtol=1e-5)


def test_local_directory_loads_and_plain_hf_matches(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    bridge = load_bridge(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = torch.tensor([[0, 5, 9, 17, 3]])
    torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    assert not bridge.training


def test_hub_name_fails_fast_offline():
    start = time.time()
    with pytest.raises(ModelLoadError, match="local|DIR"):
        load_bridge("gpt2")
    assert time.time() - start < 5


def test_missing_directory_and_non_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="No such model directory"):
        load_bridge(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_bridge(tmp_path)


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    import rlhf_scratch.data as data

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "hub_is_reachable", lambda timeout=3.0: False)
    start = time.time()
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_bridge("gpt2")
    assert time.time() - start < 5


def test_a_checkpoint_left_only_at_its_old_name_still_loads(tiny_bridge, tmp_path):
    # A run killed between the two renames of a checkpoint swap leaves only checkpoint.old.
    policy = PolicyWithValueHead(tiny_bridge)
    torch.nn.init.normal_(policy.value_head.out.weight)
    save_model_dir(policy.bridge, tmp_path / "checkpoint.old", value_head=policy.value_head)
    loaded = load_policy(tmp_path / "checkpoint")
    tokens = torch.tensor([[0, 5, 9, 17, 3]])
    torch.testing.assert_close(loaded(tokens).values, policy(tokens).values)


def test_nan_weights_are_refused_at_load(tiny_bridge, tmp_path):
    from rlhf_scratch.models import ModelLoadError, load_bridge, save_model_dir

    with torch.no_grad():
        tiny_bridge.blocks[1].mlp.out.weight[0, 0] = float("nan")
    save_model_dir(tiny_bridge, tmp_path / "model")
    with pytest.raises(ModelLoadError, match="NaN or inf weights .*blocks.1"):
        load_bridge(tmp_path / "model")


@pytest.mark.parametrize("damage", ["truncated_weights", "garbage_config", "truncated_value_head"])
def test_a_damaged_model_directory_is_a_clear_error(tiny_bridge, tmp_path, damage):
    from rlhf_scratch.models import ModelLoadError, PolicyWithValueHead, load_policy, save_model_dir

    directory = tmp_path / "checkpoint"
    save_model_dir(tiny_bridge, directory, value_head=PolicyWithValueHead(tiny_bridge).value_head)
    if damage == "truncated_weights":
        (directory / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes()[:100])
    elif damage == "garbage_config":
        (directory / "config.json").write_text("{not json")
    else:
        (directory / "value_head.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ModelLoadError, match=r"Could not load the model in .*checkpoint.*truncated or not what its name says"):
        load_policy(directory)


@pytest.mark.parametrize("device, message", [("foo", "Unknown --device 'foo'"), ("cuda:7", "cuda:7")])
def test_a_device_this_machine_lacks_fails_before_loading(tiny_model_dir, device, message):
    from rlhf_scratch.models import load_bridge

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    with pytest.raises(ValueError, match=message):
        load_bridge(tiny_model_dir, device=device)


def test_a_relative_path_under_an_existing_directory_is_a_missing_directory_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match=r"No such model directory: runs/nonexist .*resolved to") as caught:
        load_bridge("runs/nonexist")
    assert "huggingface-cli" not in str(caught.value)
    check_model_source("owner/name")  # a hub name (no local "owner/" directory) passes until it loads


def test_a_run_directory_loads_as_its_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "checkpoint")
    (run / "config.json").write_text('{"phases": 2}')  # a run's config.json is not a model config
    assert complete_checkpoint_dir(run) == run / "checkpoint"
    assert load_bridge(run).cfg.d_model == load_bridge(tiny_model_dir).cfg.d_model


def test_a_truncated_value_head_is_named_in_the_message(tiny_model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    save_file({"w": torch.zeros(3)}, directory / VALUE_HEAD_FILE)
    data = (directory / VALUE_HEAD_FILE).read_bytes()
    (directory / VALUE_HEAD_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"{VALUE_HEAD_FILE} in it is missing, truncated"):
        load_policy(directory)


def test_a_weights_file_or_a_missing_owner_name_path_says_what_to_pass(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=f"is a file; pass the folder that holds it \\({tiny_model_dir}\\)"):
        load_bridge(tiny_model_dir / "model.safetensors")
    monkeypatch.chdir(tmp_path)  # no runs/ here: "runs/nonexist" could be a hub name, but the local reading comes first
    with pytest.raises(ModelLoadError, match=r"^No such model directory: runs/nonexist \(resolved to .*check the path"):
        load_bridge("runs/nonexist")
