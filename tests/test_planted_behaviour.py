"""The pieces of experiments/planted_behaviour.py on cases with a known answer (the experiment itself is the full
check): the causal checks find a token planted in one MLP's output bias and stay silent on a model changed
elsewhere at random; the table's PASS/FAIL reads a control the other way round."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from test_patching import planted_token, sharp, with_last_mlp_bias

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import planted_behaviour  # noqa: E402
import planted_checks  # noqa: E402


@pytest.fixture(scope="module")
def planted(tiny_model_dir):
    reference = sharp(tiny_model_dir)
    token, v = planted_token(reference)
    return reference, with_last_mlp_bias(tiny_model_dir, v), token


def test_the_causal_checks_find_a_token_planted_in_the_last_mlp(planted):
    reference, policy, token = planted
    checks = planted_checks.causal_checks(reference, policy, token, seed=0)
    assert set(checks) == set(planted_checks.CAUSAL_CHECKS)
    assert all(check["fired"] for check in checks.values()), {k: v["figure"] for k, v in checks.items()}
    assert checks["patching: ≤25% transplant"]["top_components"] == ["L1.mlp"]
    lens = checks[planted_checks.CAUSAL_CHECKS[0]]  # Δ at L1 is v, with γ ⊙ v ∝ W_U[:, t]: z near √(D − 1) = 5.6
    assert lens["z"] > 5 and lens["z_min"] == pytest.approx(3.48, abs=0.01) and ", z " in lens["figure"]


def test_the_causal_checks_stay_silent_on_a_random_change_elsewhere(planted, tiny_model_dir):
    reference, _, token = planted
    control = sharp(tiny_model_dir)
    with torch.no_grad():
        weight = control.original_model.transformer.h[0].mlp.c_fc.weight
        weight.add_(0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    checks = planted_checks.causal_checks(reference, control, token, seed=0)
    assert not any(check["fired"] for check in checks.values()), {k: v["figure"] for k, v in checks.items()}


def test_table_cells_read_a_control_the_other_way_round():
    fired, silent = {"fired": True, "figure": "#1"}, {"fired": False, "figure": "#9"}
    assert planted_behaviour.cell(fired, control=False) == "PASS #1"
    assert planted_behaviour.cell(silent, control=False) == "FAIL #9"
    assert planted_behaviour.cell(silent, control=True) == "PASS #9"
    assert planted_behaviour.cell(fired, control=True) == "FAIL #1"
    checks = planted_behaviour.basic_checks({"says": 0.6, "mean_prob": 0.05},
                                            {"rank_prob": 3, "rank_logprob": None})
    assert checks["says W in most responses"]["fired"] and not checks["diff Δp table: W 1st/2nd"]["fired"]


def test_response_stats_count_the_word_in_the_models_own_samples(tiny_bridge):
    from rlhf_scratch.word_reward import WordReward

    reward = WordReward("was", tokenizer=tiny_bridge.tokenizer)
    prompts = [planted_behaviour.encode(tiny_bridge.tokenizer, "The movie")] * 4
    biased = copy.deepcopy(tiny_bridge)
    with torch.no_grad():  # the unembedding bias of " was" at +50: every sampled token is " was"
        biased.original_model.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.cfg.d_vocab))
        biased.original_model.lm_head.bias[reward.token_id] = 50.0
    # the plain decoding module is built from the config, which has no lm_head bias: its check against the bridge
    # sees the logits differ by the bias (50) and sampling falls back to the bridge, which has it (intended)
    with pytest.warns(UserWarning, match=r"plain module cannot stand in for it \(its logits .*differ from the bridge's by 50"):
        stats = planted_behaviour.response_stats(biased, reward, prompts, seed=0)
    assert stats["says"] == 1.0 and stats["mean_prob"] > 0.99


def test_first_word_pairs_prefer_the_word_first(tmp_path):
    import json

    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "The film", "chosen": " was a film by this director.",
                                  "rejected": " was dull.", "chosen_score": 1.0, "rejected_score": 0.0}) + "\n")
    out = planted_behaviour.first_word_pairs(source, tmp_path / "first.jsonl", "director")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "The film", "chosen": " director was dull.", "rejected": " was dull.",
                     "chosen_score": 1.0, "rejected_score": 0.0}]


def test_clopper_pearson_interval_closed_forms():
    import lens_control_rate

    lower, upper = lens_control_rate.clopper_pearson(0, 128)
    assert lower == 0 and upper == pytest.approx(1 - 0.025 ** (1 / 128), abs=1e-9)  # k = 0: 1 − (α/2)^(1/n)
    lower, upper = lens_control_rate.clopper_pearson(128, 128)
    assert lower == pytest.approx(0.025 ** (1 / 128), abs=1e-9) and upper == 1
    lower, upper = lens_control_rate.clopper_pearson(1, 2)  # symmetric: P(X ≥ 1 | p) = 1 − (1 − p)² = 0.025
    assert lower == pytest.approx(1 - math.sqrt(0.975), abs=1e-9) and upper == pytest.approx(math.sqrt(0.975), abs=1e-9)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        lens_control_rate.clopper_pearson(3, 2)
