"""`rlhf-scratch diff`: a model against itself is unchanged; a perturbed copy is caught where it was perturbed."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_scratch.anatomy import FinalNorm
from rlhf_scratch.model_diff import (
    cached_hook_names,
    check_same_architecture,
    collect,
    direct_logit_attribution,
    final_logit_difference,
    logit_direction,
    logprob_change_by_token,
    mean_probs,
    model_dla,
    parse_token_set,
    residual_stream_change,
    rose_and_fell,
    weight_change,
)

TOKENS = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 9, 10, 11, 12, 13, 14], [0, 20, 21, 22, 23, 24, 25]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])


def caches(reference, policy):
    names = cached_hook_names(reference.cfg.n_layers)
    logits = {}
    ref = collect(reference, TOKENS, MASK, names, batch_size=2, on_logits=lambda s, l: logits.setdefault(("ref", s), l))
    pol = collect(policy, TOKENS, MASK, names, batch_size=2, on_logits=lambda s, l: logits.setdefault(("pol", s), l))
    ref_logits = torch.cat([logits[("ref", s)] for s in (0, 2)])
    pol_logits = torch.cat([logits[("pol", s)] for s in (0, 2)])
    return ref, pol, ref_logits, pol_logits


def perturb(param_view, scale=0.5):
    with torch.no_grad():
        param_view.add_(scale * torch.randn_like(param_view))


def test_a_model_against_itself_changes_nothing(tiny_bridge):
    twin = copy.deepcopy(tiny_bridge)
    ref, pol, ref_logits, pol_logits = caches(tiny_bridge, twin)
    for row in residual_stream_change(ref, pol, MASK):
        assert row["rel_norm"] == 0.0
        assert row["cosine"] == pytest.approx(1.0, abs=1e-12)
    rows = weight_change(tiny_bridge, twin)
    assert len(rows) == 2 + 2 * (4 * 4 + 2 + 2) + 1 + 1  # W_E, W_pos; per layer 16 heads·QKVO, 2 MLP, 2 LN; ln_final; W_U
    assert all(row["rel_change"] == 0.0 and row["abs_change"] == 0.0 and row["rms_change"] == 0.0 for row in rows)
    assert torch.equal(logprob_change_by_token(ref_logits, pol_logits, MASK.bool()), torch.zeros(ref_logits.shape[-1]))


def test_a_perturbed_mlp_is_named_and_the_residual_changes_only_from_its_layer(tiny_bridge):
    policy = copy.deepcopy(tiny_bridge)
    perturb(policy.blocks[1].mlp.W_out, 0.1)
    rows = sorted(weight_change(tiny_bridge, policy), key=lambda r: -r["rel_change"])
    assert rows[0]["component"] == "L1 mlp W_out" and rows[0]["rel_change"] > 0
    assert all(r["rel_change"] == 0.0 for r in rows[1:])
    ref, pol, _, _ = caches(tiny_bridge, policy)
    change = {r["layer"]: r for r in residual_stream_change(ref, pol, MASK)}
    assert change["embed"]["rel_norm"] == 0.0 and change["L0"]["rel_norm"] == 0.0
    assert change["L1"]["rel_norm"] > 1e-3 and change["L1"]["cosine"] < 1.0


def test_a_perturbed_head_is_named_with_its_layer_and_head(tiny_bridge):
    policy = copy.deepcopy(tiny_bridge)
    perturb(policy.blocks[0].attn.W_V[2])  # a view of the live v weight: the forward pass uses it
    rows = sorted(weight_change(tiny_bridge, policy), key=lambda r: -r["rel_change"])
    assert (rows[0]["component"], rows[0]["layer"], rows[0]["head"], rows[0]["matrix"]) == ("L0.H2 W_V", 0, 2, "W_V")
    assert rows[1]["rel_change"] == 0.0
    ref, pol, _, _ = caches(tiny_bridge, policy)
    change = {r["layer"]: r["rel_norm"] for r in residual_stream_change(ref, pol, MASK)}
    assert change["embed"] == 0.0 and change["L0"] > 1e-3 and change["L1"] > 1e-3


def test_logprob_change_on_hand_built_logits_names_the_token_that_rose():
    # V = 5. Reference: uniform. Policy: token 3's logit +1 at both real positions. The third
    # position is padding with wild logits that must not count.
    ref = torch.zeros(1, 3, 5)
    pol = torch.zeros(1, 3, 5)
    pol[0, :2, 3] = 1.0
    pol[0, 2] = torch.tensor([50.0, -50.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[True, True, False]])
    delta = logprob_change_by_token(ref, pol, mask)
    # log π_pol(3) = 1 − log(4 + e), log π_pol(other) = −log(4 + e), log π_ref = −log 5
    assert delta[3].item() == pytest.approx(1 - math.log(4 + math.e) + math.log(5), abs=1e-6)
    assert delta[0].item() == pytest.approx(math.log(5) - math.log(4 + math.e), abs=1e-6)
    rose, fell = rose_and_fell(delta, k=2, decode=lambda i: f"tok{i}", columns={"double": 2 * delta})
    assert rose[0]["token_id"] == 3 and rose[0]["token"] == "tok3" and rose[0]["double"] == pytest.approx(2 * rose[0]["score"])
    assert fell[0]["token_id"] != 3 and fell[0]["score"] < 0
    # Probability mass: π_pol(3) = e/(4 + e) against 1/5, averaged over the two real positions.
    gained = mean_probs(pol, mask) - mean_probs(ref, mask)
    assert gained[3].item() == pytest.approx(math.e / (4 + math.e) - 0.2, abs=1e-6)


def test_logit_direction_is_the_token_mean_minus_the_vocabulary_mean():
    W_U = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 4.0, 0.0, 0.0]])  # D = 2, V = 4
    # columns 1 and 3: mean (4, 2); vocabulary mean (3, 1)
    assert torch.equal(logit_direction(W_U, [1, 3]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        logit_direction(W_U, [4])


def test_dla_contributions_sum_to_the_models_logit_difference(tiny_bridge):
    # Non-trivial final LayerNorm (γ ≠ 1, β ≠ 0) and unembedding bias, so the σ and bias bookkeeping is exercised.
    with torch.no_grad():
        for param in (tiny_bridge.ln_final.original_component.weight, tiny_bridge.ln_final.original_component.bias,
                      tiny_bridge.unembed.original_component.bias):
            param.add_(0.3 * torch.randn_like(param))
    state = tiny_bridge.state_dict()
    token_ids = [3, 7, 11]
    cache, _, logits, _ = caches(tiny_bridge, tiny_bridge)
    # Closed form from the model's actual logits: mean over real positions of mean_T logit_t − mean_v logit_v.
    real = logits[MASK.bool()].double()
    expected = (real[:, token_ids].mean(-1) - real.mean(-1)).mean().item()

    result = model_dla(tiny_bridge, cache, MASK.bool(), token_ids)
    assert [r["component"] for r in result["rows"]] == ["embed", "L0 attn", "L0 mlp", "L1 attn", "L1 mlp", "bias"]
    assert sum(r["contribution"] for r in result["rows"]) == pytest.approx(expected, abs=1e-4)
    assert result["logit_difference"] == pytest.approx(expected, abs=1e-4)

    # The pure function without the unembedding bias: the rows sum to the difference of the bias-free logits.
    b_U = tiny_bridge.b_U.detach()
    direction = logit_direction(tiny_bridge.W_U.detach(), token_ids)
    norm = FinalNorm(state["ln_final.weight"], state["ln_final.bias"], tiny_bridge.cfg.eps, center=True)
    rows = direct_logit_attribution(cache, MASK.bool(), direction, norm)
    bias_free = expected - (b_U[token_ids].mean() - b_U.mean()).item()
    assert abs(b_U[token_ids].mean() - b_U.mean()) > 1e-3
    assert sum(r["contribution"] for r in rows) == pytest.approx(bias_free, abs=1e-4)
    assert final_logit_difference(cache, MASK, direction) == pytest.approx(bias_free, abs=1e-4)


def test_different_architectures_are_refused():
    def fake(n_layers):
        return SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers, n_heads=4, d_model=32, d_head=8, d_mlp=128,
                                                   d_vocab=100, n_ctx=64, normalization_type="LN"))

    check_same_architecture(fake(2), fake(2))
    with pytest.raises(ValueError, match="different architectures.*n_layers 2 vs 3.*--reference"):
        check_same_architecture(fake(2), fake(3))


def test_token_set_words_must_be_single_tokens(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    ids = parse_token_set("was, was", tokenizer)
    assert len(ids) == 1 and tokenizer.decode(ids) == " was"
    with pytest.raises(ValueError, match="not a single token"):
        parse_token_set("xylophonequartz", tokenizer)


@pytest.fixture()
def perturbed_policy_dir(tiny_bridge, tmp_path):
    from rlhf_scratch.models import save_model_dir

    policy = copy.deepcopy(tiny_bridge)
    perturb(policy.blocks[1].mlp.W_out, 0.2)
    return save_model_dir(policy, tmp_path / "policy", meta={"kind": "ppo", "base_model": "builtin"})


def test_diff_cli_writes_report_plots_and_summary(tiny_model_dir, perturbed_policy_dir, tmp_path):
    from rlhf_scratch.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("The movie was great and I loved it.\nThe acting was not bad at all.\nThe plot was dull.\n")
    out = tmp_path / "diff"
    code = main(["diff", "--policy", str(perturbed_policy_dir), "--reference", str(tiny_model_dir), "--prompts", str(texts),
                 "--n-texts", "5", "--max-new-tokens", "4", "--top-k", "3", "--out", str(out)])
    assert code == 0
    for name in ("report.md", "residual.png", "weight_change.png", "dla.png", "summary.json", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_top"][0]["component"] == "L1 mlp W_out"
    assert [r["rel_norm"] for r in summary["residual"][:2]] == [0.0, 0.0] and summary["residual"][2]["rel_norm"] > 0
    assert summary["dla_check_max_error"] < 1e-4 and len(summary["logprob_rose"]) == 3
    report = (out / "report.md").read_text()
    assert "L1 mlp W_out" in report and "base_model" not in report and "trained from 'builtin'" in report

    # Teacher-forced texts and a named token set.
    code = main(["diff", "--policy", str(perturbed_policy_dir), "--reference", str(tiny_model_dir), "--prompts", str(texts),
                 "--from-samples", "False", "--n-texts", "3", "--tokens", "was,not", "--out", str(tmp_path / "diff2")])
    assert code == 0
    summary = json.loads((tmp_path / "diff2" / "summary.json").read_text())
    assert [t.strip() for t in summary["dla_tokens"]] == ["was", "not"] and summary["from_samples"] is False


def test_diff_cli_says_when_the_policy_directory_is_missing(tiny_model_dir, tmp_path, capsys):
    from rlhf_scratch.cli import main

    code = main(["diff", "--policy", str(tmp_path / "nope" / "checkpoint"), "--reference", str(tiny_model_dir),
                 "--out", str(tmp_path / "out")])
    assert code == 1
    assert f"No such model directory: {tmp_path / 'nope' / 'checkpoint'} (given as --policy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_snapshots_and_the_timeline_of_a_run(tiny_model_dir, tmp_path):
    """Snapshots hold the policy of their phase; each timeline row equals `diff` of that snapshot alone (same texts)."""
    from safetensors.torch import load_file

    from rlhf_scratch.model_diff_report import DiffConfig, run_diff
    from rlhf_scratch.model_diff_timeline import run_timeline, timeline_models
    from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
    from rlhf_scratch.sampling import SamplingConfig

    run = tmp_path / "run"
    config = REINFORCEConfig(model=str(tiny_model_dir), reward="chars:e", prompt="The", phases=3, warmup_phases=0,
                             batch_size=4, lr=1e-2, sampling=SamplingConfig(max_new_tokens=4), table_rows=1, out=run,
                             snapshot_every=2)
    REINFORCETrainer(config).train()
    assert [phase for phase, _ in timeline_models(run)] == [2, 3]  # snapshot at 2, then the final checkpoint (3)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["phase_0002"]
    final_weights = load_file(run / "checkpoint" / "model.safetensors")
    snapshot_weights = load_file(run / "snapshots" / "phase_0002" / "model.safetensors")
    assert any(not torch.equal(snapshot_weights[k], final_weights[k]) for k in final_weights)  # phase 3 moved on

    shared = dict(reference=str(tiny_model_dir), from_samples=False, n_texts=4, max_tokens=12, top_k=3)
    summary = run_timeline(DiffConfig(timeline=run, out=tmp_path / "timeline", **shared))
    alone = run_diff(DiffConfig(policy=str(run / "snapshots" / "phase_0002"), out=tmp_path / "alone", **shared))
    row = summary["rows"][0]
    assert [r["rel_norm"] for r in row["residual"]] == pytest.approx([r["rel_norm"] for r in alone["residual"]])
    assert row["logprob_rose"][0]["token_id"] == alone["logprob_rose"][0]["token_id"]
    head = [r["rel_change"] for r in alone["weights"] if r["layer"] == 0 and r["head"] == 0]  # W_Q, W_K, W_V, W_O
    assert len(head) == 4 and row["heads"]["L0.H0"] == pytest.approx(sum(head) / 4) and row["heads"]["L0.H0"] > 0
    for name in ("timeline.md", "timeline_residual.png", "timeline_heads.png", "timeline.json"):
        assert (tmp_path / "timeline" / name).is_file()
    with pytest.raises(FileNotFoundError, match="--snapshot-every"):
        timeline_models(tmp_path / "alone")
