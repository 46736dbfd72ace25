"""DPO and f-DPO: each f′ against its closed form, the loss against hand values, its gradient's direction,
stability at extreme log-ratios, sequence log-probs (by hand, padding), the trainer and the command."""

import json
import math

import pytest
import torch

from rlhf_scratch.cli import main
from rlhf_scratch.dpo import (
    collate_responses,
    dpo_loss,
    f_prime,
    sequence_logprobs,
    tokenize_pairs,
)
from rlhf_scratch.dpo_trainer import DPOConfig, DPOTrainer
from rlhf_scratch.preferences import PreferencePair, split_heldout
from rlhf_scratch.sampling import SamplingConfig

DIVERGENCES = ("rkl", "fkl", "js", "alpha")

PAIRS = [
    PreferencePair("The movie", " was great and I loved it.", " was dull."),
    PreferencePair("The acting", " was not bad at all.", " was a waste of two hours!"),
    PreferencePair("A slow drama", " with a gorgeous soundtrack.", " I would not watch again."),
    PreferencePair("What a", " great film.", " waste."),
    PreferencePair("I would", " watch this film again.", " not watch this."),
    PreferencePair("The plot", " was great.", " was dull and slow."),
]


def sigmoid_loss(z: float) -> float:
    """−log σ(z) = log(1 + e^{−z})."""
    return math.log1p(math.exp(-z))


# --------------------------------------------------------------------------- f′ and the loss


@pytest.mark.parametrize("x", [0.5, 1.0, 3.0])
def test_f_prime_matches_closed_forms(x):
    u = torch.tensor([math.log(x)], dtype=torch.float64)
    expected = {
        ("rkl", 0.5): math.log(x) + 1,
        ("fkl", 0.5): -1 / x,
        ("js", 0.5): math.log(2 * x / (1 + x)),
        ("alpha", 0.3): (1 - x ** -0.3) / 0.3,
        ("alpha", 0.5): (1 - x ** -0.5) / 0.5,
        ("alpha", 1.0): 1 - 1 / x,  # α = 1: forward KL's f′ up to the constant 1
    }
    for (divergence, alpha), value in expected.items():
        assert f_prime(u, divergence, alpha).item() == pytest.approx(value, rel=1e-12, abs=1e-12), (divergence, alpha)
    # α → 0 tends to log x, reverse KL's f′ without its constant.
    assert f_prime(u, "alpha", 1e-6).item() == pytest.approx(math.log(x), abs=1e-5)


def test_rkl_is_standard_dpo_by_hand():
    policy_w, policy_l, ref_w, ref_l = [-3.0, -2.0], [-5.0, -1.0], [-4.0, -2.5], [-4.5, -1.5]
    beta = 0.5
    out = dpo_loss(torch.tensor(policy_w), torch.tensor(policy_l), torch.tensor(ref_w), torch.tensor(ref_l),
                   beta=beta, loss="sigmoid", divergence="rkl")
    # Pair 0: u_w = 1, u_l = −0.5, z = 0.5·1.5 = 0.75.  Pair 1: u_w = 0.5, u_l = 0.5, z = 0.
    assert out.losses.tolist() == pytest.approx([sigmoid_loss(0.75), math.log(2)], rel=1e-6)
    assert out.loss.item() == pytest.approx((sigmoid_loss(0.75) + math.log(2)) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.25])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    assert out.margin.tolist() == pytest.approx([0.75, 0.0])
    assert out.f_margin.tolist() == pytest.approx([0.75, 0.0])
    assert out.accuracy.item() == 0.5  # a tie (u_w = u_l) is not a win


def test_hinge_and_sigmoid_hand_values_for_every_divergence():
    # u_w = log 3, u_l = log 0.5 (x_w = 3, x_l = 0.5), β = 0.4; z = β·(f′(3) − f′(0.5)).
    beta = 0.4
    f = {"rkl": lambda x: math.log(x) + 1, "fkl": lambda x: -1 / x, "js": lambda x: math.log(2 * x / (1 + x)),
         "alpha": lambda x: (1 - x ** -0.5) / 0.5}
    for divergence, fp in f.items():
        z = beta * (fp(3.0) - fp(0.5))
        args = (torch.tensor([math.log(3.0)]), torch.tensor([math.log(0.5)]), torch.zeros(1), torch.zeros(1))
        sig = dpo_loss(*args, beta=beta, loss="sigmoid", divergence=divergence, alpha=0.5)
        hinge = dpo_loss(*args, beta=beta, loss="hinge", divergence=divergence, alpha=0.5)
        assert sig.loss.item() == pytest.approx(sigmoid_loss(z), rel=1e-5), divergence
        assert hinge.loss.item() == pytest.approx(max(0.0, 1 - z), rel=1e-5, abs=1e-6), divergence
        assert sig.f_margin.item() == pytest.approx(z, rel=1e-5)
        assert sig.margin.item() == pytest.approx(beta * (math.log(3.0) - math.log(0.5)), rel=1e-5)
    # The hinge is exactly 0 once z ≥ 1: rkl with β = 1 and u_w − u_l = 2.
    zero = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=1.0, loss="hinge")
    assert zero.loss.item() == 0.0


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_gradient_raises_chosen_and_lowers_rejected(divergence, loss):
    chosen = torch.tensor([-0.3, 0.2, 1.0], requires_grad=True)
    rejected = torch.tensor([0.1, -0.4, 0.5], requires_grad=True)
    out = dpo_loss(chosen, rejected, torch.zeros(3), torch.zeros(3), beta=0.5, loss=loss, divergence=divergence, alpha=0.5)
    out.loss.backward()
    # Gradient descent moves against the gradient: log π(chosen) up, log π(rejected) down.
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_stable_at_extreme_log_ratios(divergence, loss):
    # Every combination of u_w, u_l in {−50, 0, +50} (float32), reference log-probs nonzero.
    values = torch.tensor([-50.0, 0.0, 50.0])
    u_w, u_l = torch.cartesian_prod(values, values).unbind(1)
    ref_w, ref_l = torch.full((9,), -20.0), torch.full((9,), -30.0)
    chosen = (ref_w + u_w).requires_grad_()
    rejected = (ref_l + u_l).requires_grad_()
    for alpha in (0.1, 0.5, 1.0):
        chosen.grad = rejected.grad = None
        out = dpo_loss(chosen, rejected, ref_w, ref_l, beta=0.1, loss=loss, divergence=divergence, alpha=alpha)
        out.loss.backward()
        for name, tensor in (("losses", out.losses), ("grad chosen", chosen.grad), ("grad rejected", rejected.grad),
                             ("f_margin", out.f_margin)):
            assert torch.isfinite(tensor).all(), (name, alpha, tensor)


def test_shapes_and_names_are_checked():
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError, match="policy_rejected_logps"):  # [2] vs [3]: a mixed-up batch
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeCheckError, match="divergence"):
        f_prime(torch.zeros(2), "kl")


def test_alpha_must_be_positive():
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    for alpha in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="--divergence rkl"):
            dpo_loss(*args, divergence="alpha", alpha=alpha)
        with pytest.raises(ValueError, match="alpha must be a finite number" if alpha != alpha else "alpha must be > 0"):
            DPOConfig(pairs="p.jsonl", divergence="alpha", alpha=alpha)
    dpo_loss(*args, divergence="rkl", alpha=0.0)  # alpha is read only by the alpha divergence


def test_config_validation_messages():
    for kwargs, message in [({}, "--pairs FILE is required"),
                            ({"pairs": "p.jsonl", "beta": 0.0}, "beta must be > 0"),
                            ({"pairs": "p.jsonl", "heldout_fraction": 1.0}, "heldout_fraction must be in"),
                            ({"pairs": "p.jsonl", "epochs": 0}, "epochs must be >= 1"),
                            ({"pairs": "p.jsonl", "warmup_steps": -1}, "warmup_steps must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            DPOConfig(**kwargs)


# --------------------------------------------------------------------------- sequence log-probs


def test_tokenize_pairs_exact_boundary_and_eos(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    tokens = tokenize_pairs(tokenizer, PAIRS[:2], prepend_bos=True, n_ctx=64)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokens.prompts[0] == [bos] + tokenizer("The movie", add_special_tokens=False)["input_ids"]
    assert tokens.chosen[0] == tokenizer(" was great and I loved it.", add_special_tokens=False)["input_ids"] + [eos]
    batch = tokens.batch([1, 0], pad_id=eos)  # chosen of pairs 1, 0, then rejected of pairs 1, 0
    row = 2  # rejected of pair 1
    real = batch.tokens[row][batch.attention_mask[row].bool()].tolist()
    assert real == tokens.prompts[1] + tokens.rejected[1]
    assert batch.tokens[row][batch.response_mask[row]].tolist() == tokens.rejected[1]
    with pytest.raises(ValueError, match=r"Pair 1 is \d+ tokens long.*context of 8"):
        tokenize_pairs(tokenizer, [PreferencePair("A", "b", "c"), PAIRS[0]], prepend_bos=True, n_ctx=8)


def test_sequence_logprob_by_hand(tiny_bridge):
    prompt, response = [0, 5, 9], [17, 4, 0]
    batch = collate_responses([prompt], [response], pad_id=0)
    sequence = prompt + response
    logits = tiny_bridge(torch.tensor([sequence]))[0].double()
    expected = 0.0
    for t in range(len(prompt), len(sequence)):  # token t is predicted by the logits at t − 1
        row = logits[t - 1]
        expected += row[sequence[t]] - torch.logsumexp(row, 0)  # log_softmax(row)[token t]
    assert sequence_logprobs(tiny_bridge, batch).item() == pytest.approx(expected.item(), abs=1e-4)


def test_padded_batch_equals_each_row_alone(tiny_bridge):
    prompts = [[0, 5], [0, 7, 8, 9, 10], [0]]
    responses = [[11, 12, 13, 14, 15, 0], [3, 0], [20, 21, 0]]
    together = sequence_logprobs(tiny_bridge, collate_responses(prompts, responses, pad_id=0))
    alone = torch.cat([sequence_logprobs(tiny_bridge, collate_responses([p], [r], pad_id=0))
                       for p, r in zip(prompts, responses)])
    assert torch.allclose(together, alone, atol=1e-5)
    # A different padding id must not change anything either (padding is masked, not matched by id).
    assert torch.allclose(sequence_logprobs(tiny_bridge, collate_responses(prompts, responses, pad_id=7)), alone, atol=1e-5)


# --------------------------------------------------------------------------- the trainer


def small_config(tiny_model_dir, **overrides) -> DPOConfig:
    base = dict(pairs="unused.jsonl", model=str(tiny_model_dir), batch_size=2, epochs=1, warmup_steps=0, lr=1e-3,
                heldout_fraction=0.0, eval_batch_size=4, prompt="The movie", n_eval_prompts=4, table_rows=0,
                sampling=SamplingConfig(max_new_tokens=5))
    base.update(overrides)
    return DPOConfig(**base)


def test_reference_logprobs_computed_once_and_kept(tiny_model_dir):
    trainer = DPOTrainer(small_config(tiny_model_dir), pairs=PAIRS)
    stored = (trainer.ref_chosen_logps.clone(), trainer.ref_rejected_logps.clone())
    # Before any step the policy is the reference: its log-probs are the stored ones.
    with torch.no_grad():
        chosen, rejected = trainer.policy_logprobs(list(range(len(PAIRS))))
    assert torch.allclose(chosen, stored[0], atol=1e-5) and torch.allclose(rejected, stored[1], atol=1e-5)

    class NoForward(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the reference model was run during training")

    trainer.reference = NoForward()
    for _ in range(2):
        trainer.train_step([0, 1])
    assert torch.equal(trainer.ref_chosen_logps, stored[0]) and torch.equal(trainer.ref_rejected_logps, stored[1])


@pytest.mark.parametrize("divergence", ["rkl", "fkl"])
def test_one_step_raises_chosen_over_rejected(tiny_model_dir, divergence):
    trainer = DPOTrainer(small_config(tiny_model_dir, divergence=divergence, beta=0.5), pairs=PAIRS)
    indices = [0, 1, 2, 3]

    def preference() -> torch.Tensor:
        with torch.no_grad():
            chosen, rejected = trainer.policy_logprobs(indices)
        return chosen - rejected

    before = preference()
    terms = trainer.train_step(indices)
    after = preference()
    assert (after - before).mean() > 0
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-4)  # first step: π = π_ref, z = 0
    assert terms["accuracy"].item() == 0.0 and terms["chosen_rewards"].shape == (4,)


def test_split_and_warmup_checks(tiny_model_dir):
    pairs = [PreferencePair(f"p{i % 5}", " yes", " no") for i in range(10)]  # 5 prompts, 2 pairs each
    train, heldout = split_heldout(pairs, 0.2, seed=0)
    assert len(heldout) == 2 and sorted(train + heldout) == list(range(10))
    assert {pairs[i].prompt for i in heldout}.isdisjoint({pairs[i].prompt for i in train})
    assert split_heldout(pairs, 0.2, seed=0) == (train, heldout)
    assert split_heldout(pairs[:3], 0.0, seed=0) == ([0, 1, 2], [])
    with pytest.raises(ValueError, match="warmup_steps \\(3\\) must be less than the number of optimiser steps \\(3"):
        DPOTrainer(small_config(tiny_model_dir, warmup_steps=3), pairs=PAIRS)  # 6 pairs / 2 = 3 steps


def test_duplicate_pairs_are_dropped_and_reported(tiny_model_dir, capsys):
    trainer = DPOTrainer(small_config(tiny_model_dir, heldout_fraction=0.34), pairs=PAIRS + PAIRS[:4])
    assert trainer.pairs == PAIRS and trainer.n_duplicates == 4
    assert len(trainer.train_indices) + len(trainer.heldout_indices) == len(PAIRS)
    assert "dpo: dropped 4 duplicate pairs" in " ".join(capsys.readouterr().out.split())


def test_dpo_command_end_to_end(tiny_model_dir, tmp_path):
    from rlhf_scratch.models import CHECKPOINT_META_FILE, load_bridge

    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                  for p in PAIRS))
    out = tmp_path / "dpo"
    code = main(["dpo", "--pairs", str(pairs_file), "--model", str(tiny_model_dir), "--loss", "hinge",
                 "--divergence", "alpha", "--alpha", "0.3", "--beta", "0.2", "--epochs", "2", "--batch-size", "2",
                 "--warmup-steps", "1", "--heldout-fraction", "0.34", "--prompt", "The movie", "--n-eval-prompts", "3",
                 "--max-new-tokens", "4", "--table-rows", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train_pairs"] == 4 and summary["n_heldout_pairs"] == 2 and summary["steps"] == 4
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0
    assert summary["evaluation"]["reference"]["kl"] == 0.0  # the reference sampled against itself
    for key in ("reward_mean", "kl", "token_entropy", "distinct_1", "distinct_2", "reference_reward_mean"):
        assert math.isfinite(summary[key]), key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert len(steps) == 4 and len(rows) == 6
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "lr"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert "heldout/accuracy" in rows[-1]
    assert json.loads((out / "checkpoint" / CHECKPOINT_META_FILE).read_text())["kind"] == "dpo"
    assert (out / "curves.png").is_file() and (out / "config.json").is_file()
    load_bridge(out / "checkpoint")  # a plain model directory

    # A missing pair file is a one-line error (exit 1); a missing --pairs a configuration error (exit 2).
    assert main(["dpo", "--pairs", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)]) == 1
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--model", str(tiny_model_dir)])
    assert stop.value.code == 2


def test_accuracy_at_a_rounding_level_tie_is_zero_on_every_cpu():
    """At step 0 π_θ = π_ref, so u_w − u_l is rounding noise whose sign differs between CPUs and batch layouts;
    decided_accuracy counts such a pair as not correct, and a real margin as correct."""
    from rlhf_scratch.dpo import decided_accuracy

    logps = torch.tensor([-50.0, -61.25, -47.5, -55.0])
    noise = torch.tensor([3e-6, -2e-6, 4e-6, 1e-6])  # what float32 leaves of a tie at |log p| ≈ 50
    assert decided_accuracy(noise, torch.zeros(4), scale=logps).item() == 0.0
    assert decided_accuracy(torch.tensor([0.1, -0.1, 0.1, 0.1]), torch.zeros(4), scale=logps).item() == 0.75
    out = dpo_loss(logps + noise, logps - noise, logps, logps)  # u_w − u_l = 2·noise: still a tie
    assert out.accuracy.item() == 0.0


# ---------------------------------------------------------------- resume, Ctrl-C and SIGTERM, on the shared run loop
def resumable_config(tiny_model_dir, pairs_file, **overrides) -> DPOConfig:
    # 4 training pairs in batches of 2: 2 steps an epoch, 6 in all; warmup + decay (scheduler), AdamW moments, a new
    # shuffle each epoch (generator), held-out rows per epoch: every piece of state a resume must restore.
    base = dict(pairs=pairs_file, model=str(tiny_model_dir), batch_size=2, epochs=3, warmup_steps=1, lr=1e-3,
                heldout_fraction=0.34, reward=None)
    base.update(overrides)
    return DPOConfig(**base)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS))
    return path


def test_dpo_stopped_and_resumed_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path):
    from rlhf_scratch.checkpoint import read_resume_state

    DPOTrainer(resumable_config(tiny_model_dir, pairs_file, out=tmp_path / "full")).train()
    expected = read_rows(tmp_path / "full" / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in expected] == [("step", 1), ("step", 2), ("epoch", 2), ("step", 3),
                                                          ("step", 4), ("epoch", 4), ("step", 5), ("step", 6), ("epoch", 6)]

    split = tmp_path / "split"
    DPOTrainer(resumable_config(tiny_model_dir, pairs_file, out=split)).train(stop_after=3)  # in the middle of epoch 2
    assert read_resume_state(split / "checkpoint")["phase"] == 3
    with (split / "metrics.jsonl").open("a") as handle:  # a row logged after the checkpoint must not survive resume
        handle.write(json.dumps({"type": "step", "step": 4, "loss": 123.0}) + "\n")
    resumed = DPOTrainer.resume(DPOConfig(resume=split))
    assert resumed.step == 3 and resumed.epoch == 1 and len(resumed.pending) == 1 and resumed.config.out == split
    summary = resumed.train()
    got = read_rows(split / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(got) == strip(expected)  # bit for bit: the same steps on the same state
    assert summary["steps"] == 6 and summary["epochs"] == 3
    assert json.loads((split / "summary.json").read_text())["loss_final"] == summary["loss_final"]
    with pytest.raises(ValueError, match="is a dpo checkpoint; resume it with `rlhf-scratch dpo"):
        from rlhf_scratch.ppo import PPOConfig, PPOTrainer

        PPOTrainer.resume(PPOConfig(resume=split))


def test_dpo_sigterm_stops_after_the_step_with_a_checkpoint_and_exit_143(tiny_model_dir, pairs_file, tmp_path,
                                                                         monkeypatch, capsys):
    import os
    import signal

    out = tmp_path / "run"
    args = ["dpo", "--pairs", str(pairs_file), "--model", str(tiny_model_dir), "--batch-size", "2", "--epochs", "3",
            "--warmup-steps", "1", "--lr", "1e-3", "--heldout-fraction", "0.34", "--reward", "None"]
    step = DPOTrainer.train_step

    def terminated_at_step_2(self, indices):
        if self.step == 1:  # a real SIGTERM while step 2 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, indices)

    monkeypatch.setattr(DPOTrainer, "train_step", terminated_at_step_2)
    assert main([*args, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"Stopped by SIGTERM after step 2 of 6; checkpoint saved in {out / 'checkpoint'}" in err
    assert f"rlhf-scratch dpo --resume {out}" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["dpo", "--resume", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_rows(out / "metrics.jsonl")) == strip(read_rows(tmp_path / "full" / "metrics.jsonl"))
