"""Reward models: losses against hand values, the model on a tiny trunk, save/load, rm:DIR, the rm/score commands."""

import json
import math

import pytest
import torch

from rlhf_scratch.cli import main
from rlhf_scratch.preferences import PairDataError, PreferencePair, load_pairs, write_pairs
from rlhf_scratch.reward_model import (
    RewardModel,
    bradley_terry_loss,
    distributional_preference_loss,
    expected_rating,
    load_reward_model,
    pairwise_accuracy,
    preference_probability,
    rating_entropy,
    save_reward_model,
)
from rlhf_scratch.reward_model_training import RewardModelConfig, fit_reward_model, pair_loss, split_pairs
from rlhf_scratch.rewards import RewardError, RewardModelReward, make_reward, score_texts


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------- losses by hand


def test_bradley_terry_by_hand():
    # −log σ(2 − 0.5) = log(1 + e^{−1.5})
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.2014132779827524, abs=1e-6)
    # with margin 1: −log σ(0.5) = log(1 + e^{−0.5}) = 0.4740769841801067
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.4740769841801067, abs=1e-6)
    # a batch is averaged: pairs with differences 0 (log 2) and −1 (log(1 + e)) 
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2, abs=1e-6)
    # far apart: finite, ≈ the difference itself when the rejected one wins
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


def test_distributional_loss_by_hand_double_sum():
    alpha = 2.0
    logits_w, logits_l = [0.5, -1.0, 2.0], [1.0, 0.0, -0.5]

    def softmax(xs):
        exps = [math.exp(x) for x in xs]
        return [e / sum(exps) for e in exps]

    p_w, p_l = softmax(logits_w), softmax(logits_l)
    probability = sum(p_w[i] * p_l[j] * sigmoid(alpha * (i - j)) for i in range(3) for j in range(3))
    got = distributional_preference_loss(torch.tensor([logits_w]), torch.tensor([logits_l]), alpha)
    assert got.item() == pytest.approx(-math.log(probability), abs=1e-6)
    assert preference_probability(torch.tensor([logits_w]), torch.tensor([logits_l]), alpha).item() == pytest.approx(probability, abs=1e-6)


def test_distributional_loss_k2_closed_form():
    # p_w = (1/4, 3/4), p_l = (3/4, 1/4), α = 1:
    # P = 2·(3/16)·½ + (1/16)·σ(−1) + (9/16)·σ(1)
    logits_w = torch.tensor([[0.0, math.log(3)]])
    logits_l = torch.tensor([[math.log(3), 0.0]])
    expected = 3 / 16 + sigmoid(-1) / 16 + 9 * sigmoid(1) / 16
    assert preference_probability(logits_w, logits_l, 1.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("i, j, alpha", [(7, 2, 0.5), (0, 9, 1.0), (4, 4, 3.0)])
def test_one_hot_distributions_give_sigmoid_of_rating_difference(i, j, alpha):
    one_hot = lambda k: torch.full((1, 10), -1e4).index_fill(1, torch.tensor([k]), 0.0)  # noqa: E731
    probability = preference_probability(one_hot(i), one_hot(j), alpha)
    assert probability.item() == pytest.approx(sigmoid(alpha * (i - j)), abs=1e-6)
    loss = distributional_preference_loss(one_hot(i), one_hot(j), alpha)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(sigmoid(alpha * (i - j))), abs=1e-5)


def test_equal_distributions_are_a_coin_flip():
    logits = torch.randn(4, 10)
    assert torch.allclose(preference_probability(logits, logits, 1.7), torch.full((4,), 0.5), atol=1e-6)


def test_expected_rating_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, math.log(2)]])  # p = (1/4, 1/4, 1/2), ratings 0, 1, 2
    assert expected_rating(logits).item() == pytest.approx(0 * 0.25 + 1 * 0.25 + 2 * 0.5)
    assert rating_entropy(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert rating_entropy(torch.zeros(1, 10)).item() == pytest.approx(math.log(10), abs=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert pairwise_accuracy(chosen, rejected) == 0.5  # right, tie, wrong, right
    with pytest.raises(ValueError, match="at least one pair"):
        pairwise_accuracy(torch.zeros(0), torch.zeros(0))


def test_split_pairs_holds_out_whole_prompts():
    # 10 prompts with 2 pairs each: 10% of 20 pairs = 2 pairs = one whole prompt.
    pairs = [PreferencePair(f"prompt {i // 2}", f" good {i}", f" bad {i}") for i in range(20)]
    train, heldout = split_pairs(pairs, 0.1, seed=3)
    assert len(heldout) == 2 and len(train) == 18
    assert {p.prompt for p in heldout}.isdisjoint({p.prompt for p in train})
    assert split_pairs(pairs, 0.1, seed=3) == (train, heldout)  # seeded
    assert split_pairs(pairs, 0.0, seed=3) == (pairs, [])
    # One prompt for every pair (fixed-prefix data): single pairs are held out instead.
    same = [PreferencePair("The movie", f" good {i}", f" bad {i}") for i in range(10)]
    train, heldout = split_pairs(same, 0.2, seed=0)
    assert len(heldout) == 2 and sorted(p.chosen for p in train + heldout) == sorted(p.chosen for p in same)
    with pytest.raises(PairDataError, match="cannot be split"):
        split_pairs(pairs[:1], 0.5, seed=0)


# --------------------------------------------------------------------------- the model on a tiny trunk


def random_head(model: RewardModel) -> RewardModel:
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head.bias)
    return model


def test_zero_head_starts_at_log_2(tiny_bridge):
    pairs = [PreferencePair("The movie was", " great.", " dull.")] * 2
    for loss, head in (("bt", "scalar"), ("dist", "dist")):
        model = RewardModel(tiny_bridge, head=head)
        value, r_w, r_l = pair_loss(model, pairs, loss, alpha=1.0)
        assert value.item() == pytest.approx(math.log(2), abs=1e-6)
    # a zero distributional head is uniform: expected rating (K − 1)/2, entropy log K
    model = RewardModel(tiny_bridge, head="dist", num_ratings=10)
    assert model.score(["The movie was great."]).item() == pytest.approx(4.5, abs=1e-5)
    assert model.rating_entropy(["The movie was great."]).item() == pytest.approx(math.log(10), abs=1e-5)


def test_padded_batch_scores_equal_single_scores(tiny_bridge):
    model = random_head(RewardModel(tiny_bridge, head="scalar"))
    texts = ["The movie was great and I loved every minute of it.", "Dull.", "What a waste of two hours!"]
    tokens, mask = model.tokenize(texts)
    assert mask[1].tolist().count(0) > 0  # the short text really is padded
    batched = model.score(texts)
    alone = torch.cat([model.score([t]) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert batched.dtype == torch.float32 and batched.shape == (3,)


def test_long_text_truncated_from_the_left_keeping_bos(tiny_bridge):
    model = RewardModel(tiny_bridge)
    text = "The movie was great and I loved every minute of it. " * 20  # far more than n_ctx = 64 tokens
    tokens, mask = model.tokenize([text])
    ids = tiny_bridge.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokens.shape == (1, 64) and mask.all()
    assert tokens[0, 0] == tiny_bridge.tokenizer.bos_token_id
    assert tokens[0, 1:].tolist() == ids[-63:]
    assert torch.isfinite(model.score([text])).all()


def test_gradients_reach_the_trunk(tiny_bridge):
    model = random_head(RewardModel(tiny_bridge))
    loss, _, _ = pair_loss(model, [PreferencePair("The movie was", " great.", " dull.")], "bt", alpha=1.0)
    loss.backward()
    grads = [p.grad for p in model.trunk_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


TOY = [PreferencePair(prompt, f" {good}.", f" {bad}.") for prompt in ("The movie was", "The plot was", "It was")
       for good, bad in (("great", "dull"), ("great and I loved it", "dull and a waste"))]


def test_training_separates_a_trivial_pair_set(tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "toy.jsonl", TOY)
    model, summary = fit_reward_model(RewardModelConfig(
        pairs=tmp_path / "toy.jsonl", model=str(tiny_model_dir), loss="bt", epochs=6, batch_size=3,
        lr=1e-3, head_lr=1e-2, heldout_fraction=0.0, out=None))
    assert summary["initial_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["final_loss"] < 0.5 * math.log(2)
    assert summary["train_pairwise_accuracy"] == 1.0 and summary["pairwise_accuracy"] is None
    losses = [row["loss"] for row in model.history]
    assert losses[-1] < losses[0]


def test_margin_loss_needs_margins(tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "toy.jsonl", TOY)
    config = RewardModelConfig(pairs=tmp_path / "toy.jsonl", model=str(tiny_model_dir), loss="margin", out=tmp_path / "rm")
    with pytest.raises(PairDataError, match="6 of 6 pairs.*or use --loss bt"):
        fit_reward_model(config)


def test_config_validation():
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        RewardModelConfig(pairs="p.jsonl", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        RewardModelConfig(pairs="p.jsonl", alpha=0.0)


@pytest.mark.parametrize("head", ["scalar", "dist"])
def test_save_load_round_trip_and_rm_spec(tiny_bridge, tmp_path, head):
    model = random_head(RewardModel(tiny_bridge, head=head, num_ratings=5))
    texts = ["The movie was great.", "It was dull and a waste.", "A slow drama."]
    expected = model.score(texts)
    save_reward_model(model, tmp_path / "run" / "reward_model", meta={"loss": "bt"})
    loaded = load_reward_model(tmp_path / "run" / "reward_model")
    assert (loaded.head_kind, loaded.num_ratings, loaded.meta["loss"]) == (head, 5 if head == "dist" else 1, "bt")
    assert torch.equal(loaded.score(texts), expected)
    for spec in (f"rm:{tmp_path / 'run'}", f"rm:{tmp_path / 'run' / 'reward_model'}"):  # the --out folder or the model
        reward = make_reward(spec)
        assert isinstance(reward, RewardModelReward) and reward.name == spec
        assert torch.equal(score_texts(reward, texts), expected)


def test_rm_spec_errors(tmp_path):
    with pytest.raises(RewardError, match="No such reward model directory"):
        make_reward(f"rm:{tmp_path / 'missing'}")
    with pytest.raises(RewardError, match="holds no reward model.*rlhf-scratch rm"):
        make_reward(f"rm:{tmp_path}")
    with pytest.raises(RewardError, match="expected rm:DIR"):
        make_reward("rm:")


# --------------------------------------------------------------------------- commands end to end


def test_pairs_rm_score_commands_end_to_end(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    assert main(["pairs", "--model", model, "--reward", "chars:e", "--n", "64", "--threshold", "2", "--batch-size", "32",
                 "--max-new-tokens", "12", "--out", str(tmp_path / "pairs")]) == 0
    pairs_file = tmp_path / "pairs" / "pairs.jsonl"
    n_pairs = json.loads((tmp_path / "pairs" / "summary.json").read_text())["n_pairs"]
    assert n_pairs >= 4
    for loss in ("margin", "dist"):
        assert main(["rm", "--loss", loss, "--pairs", str(pairs_file), "--model", model, "--epochs", "1",
                     "--heldout-fraction", "0.25", "--out", str(tmp_path / loss)]) == 0
        summary = json.loads((tmp_path / loss / "summary.json").read_text())
        assert 0 <= summary["pairwise_accuracy"] <= 1 and summary["n_train"] + summary["n_heldout"] == n_pairs
        assert (tmp_path / loss / "reward_model" / "reward_head.safetensors").is_file()
        assert len((tmp_path / loss / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["score", "--reward", f"rm:{tmp_path / 'dist'}", "--pairs", str(tmp_path / "dist" / "heldout_pairs.jsonl"),
                 "--out", str(tmp_path / "score")]) == 0
    scored = json.loads((tmp_path / "score" / "summary.json").read_text())
    rm_summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert scored["pairwise_accuracy"] == pytest.approx(rm_summary["pairwise_accuracy"])  # same model, same pairs
    # the reward the pairs were built from ranks every pair right
    assert main(["score", "--reward", "chars:e", "--pairs", str(pairs_file), "--out", str(tmp_path / "chars")]) == 0
    assert json.loads((tmp_path / "chars" / "summary.json").read_text())["pairwise_accuracy"] == 1.0


def test_commands_report_bad_input(tmp_path, capsys):
    assert main(["score", "--reward", "vader", "--pairs", str(tmp_path / "missing.jsonl")]) == 1
    assert "No such file" in capsys.readouterr().err
    assert main(["score", "--reward", f"rm:{tmp_path}", "--pairs", str(tmp_path / "missing.jsonl")]) == 1
    assert f"{tmp_path} holds no reward model" in capsys.readouterr().err  # checked first, before anything loads
    # tyro rejects bad flags (a loss that is not bt|margin|dist, a config check) with exit code 2
    for args, message in ((["--loss", "hinge"], "invalid choice 'hinge'"),
                          (["--heldout-fraction", "1"], "heldout_fraction must be in [0, 1)")):
        with pytest.raises(SystemExit) as info:
            main(["rm", "--pairs", "p.jsonl", *args])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_duplicate_pairs_are_dropped_before_the_split(tiny_model_dir, tmp_path, capsys):
    # Doubled fixed-prefix pairs: a copy of each held-out pair was trained on, and rm reported held-out accuracy 1.000.
    pairs = [PreferencePair("This is", f" good {i}.", f" bad {i}.") for i in range(10)]
    write_pairs(tmp_path / "doubled.jsonl", pairs + pairs)
    model, summary = fit_reward_model(RewardModelConfig(
        pairs=tmp_path / "doubled.jsonl", model=str(tiny_model_dir), epochs=1, batch_size=8, heldout_fraction=0.2,
        out=tmp_path / "rm"))
    assert summary["n_duplicates_dropped"] == 10 and summary["n_train"] + summary["n_heldout"] == 10
    heldout = load_pairs(tmp_path / "rm" / "heldout_pairs.jsonl")
    # Each of the 10 distinct pairs once: 8 trained on, 2 held out, none of the held-out ones among the trained.
    assert len(set(heldout)) == summary["n_heldout"] == 2 and set(heldout) <= set(pairs) and summary["n_train"] == 8
    printed = " ".join(capsys.readouterr().out.split())
    assert f"dropped 10 duplicate pairs (same prompt, chosen and rejected as an earlier row) of 20 in {tmp_path / 'doubled.jsonl'}" \
        in printed and "10 remain" in printed


def test_pairwise_accuracy_counts_a_rounding_level_tie_as_wrong_on_every_layout():
    # Rewards that differ by float32 rounding (what two CPUs or batch layouts give the same text) are a tie: wrong.
    # The tolerance is per pair, so a pair's verdict does not depend on the other pairs in its batch.
    chosen = torch.tensor([0.5, 40.0, 0.5, 3.0])
    rejected = torch.tensor([0.5 - 4e-8, 40.0 - 3e-6, 0.4, 3.0 - 1e-3])  # tie, tie (rel. 1e-7), win, win
    assert pairwise_accuracy(chosen, rejected) == 0.5
    assert [pairwise_accuracy(chosen[i : i + 1], rejected[i : i + 1]) for i in range(4)] == [0.0, 0.0, 1.0, 1.0]
