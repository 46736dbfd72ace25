"""Exact resume: a run stopped after phase k and resumed from its checkpoint by a new trainer logs the
same metrics for the remaining phases as an uninterrupted run; what may and may not change on resume."""

import json
import shutil

import pytest
import torch
from conftest import TINY_TEXTS

from rlhf_scratch.checkpoint import RESUME_STATE_JSON, find_checkpoint, join_tensors, split_tensors
from rlhf_scratch.models import PolicyWithValueHead, load_bridge
from rlhf_scratch.ppo import PPOConfig, PPOTrainer
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer
from rlhf_scratch.sampling import SamplingConfig

PHASES, STOP = 4, 2


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(dict.fromkeys(TINY_TEXTS)) + "\n")
    return path


def ppo_config(model_dir, prompts_file, **overrides) -> PPOConfig:
    # Every piece of state that resume must restore is exercised: warmup + decay (scheduler),
    # adaptive KL (controller), reward normalisation (running moments), several prompts (Python RNG),
    # sampling and minibatch shuffles (torch generator), several epochs (AdamW moments).
    base = dict(model=str(model_dir), data=str(prompts_file), reward="chars:e", phases=PHASES, batch_size=8,
                minibatch_size=4, ppo_epochs=2, warmup_phases=1, lr=1e-3, head_lr=1e-2, adaptive_kl=True,
                kl_horizon=100, normalize_rewards=True, sampling=SamplingConfig(max_new_tokens=6), table_rows=2)
    base.update(overrides)
    return PPOConfig(**base)


def reinforce_config(model_dir, prompts_file, **overrides) -> REINFORCEConfig:
    base = dict(model=str(model_dir), data=str(prompts_file), reward="chars:e", phases=PHASES, batch_size=8,
                minibatch_size=4, warmup_phases=1, lr=1e-2, kl_coef=0.1, baseline="ema",
                sampling=SamplingConfig(max_new_tokens=6), table_rows=2)
    base.update(overrides)
    return REINFORCEConfig(**base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: list[dict], expected: list[dict]):
    """Every logged value equal (to float32 rounding) except wall-clock timings."""
    assert [row["phase"] for row in got] == [row["phase"] for row in expected]
    for a, b in zip(got, expected):
        keys = {k for k in b if not k.startswith("time/") and k != "seconds"}
        assert keys <= set(a)
        for key in sorted(keys):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (b["phase"], key, a[key], b[key])


@pytest.mark.parametrize("trainer_class, make_config", [(PPOTrainer, ppo_config), (REINFORCETrainer, reinforce_config)])
def test_stopped_and_resumed_run_equals_uninterrupted_run(tiny_model_dir, prompts_file, tmp_path, trainer_class, make_config):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    trainer_class(make_config(tiny_model_dir, prompts_file, out=full_dir)).train()
    expected = read_metrics(full_dir)
    assert len(expected) == PHASES

    trainer_class(make_config(tiny_model_dir, prompts_file, out=split_dir, checkpoint_every=1)).train(stop_after=STOP)
    assert [row["phase"] for row in read_metrics(split_dir)] == list(range(1, STOP + 1))
    # A run killed after logging phase 3 but before its next checkpoint: that row must not survive resume.
    with (split_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"phase": STOP + 1, "reward/mean": 123.0}) + "\n")

    # A new trainer, built from nothing but the checkpoint (its config is the run's).
    resumed = trainer_class.resume(type(make_config(tiny_model_dir, prompts_file))(resume=split_dir / "checkpoint"))
    assert resumed.phase == STOP and resumed.config.out == split_dir and resumed.config.batch_size == 8
    summary = resumed.train()
    got = read_metrics(split_dir)
    assert_same_metrics(got, expected)  # phases 1..k kept from the first run, k+1..N recomputed
    assert summary["phases"] == PHASES and summary["reward_first"] == expected[0]["reward/mean"]
    assert json.loads((split_dir / "summary.json").read_text())["phases"] == PHASES
    samples = [json.loads(line)["phase"] for line in (split_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and set(samples) == set(range(1, PHASES + 1))


def test_resumed_reference_is_the_starting_model_not_the_checkpoint(tiny_model_dir, prompts_file, tmp_path):
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)).train(stop_after=1)
    resumed = PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"))  # the run directory works as well as checkpoint/
    tokens = torch.tensor([[0, 5, 9, 17, 30]])
    start = load_bridge(tiny_model_dir)
    torch.testing.assert_close(resumed.reference(tokens), start(tokens), rtol=0, atol=0)
    assert not torch.allclose(resumed.policy.bridge(tokens), start(tokens))  # the policy is the trained one


def test_in_memory_reference_must_be_passed_back_and_must_match(tiny_bridge, tiny_model_dir, prompts_file, tmp_path):
    config = ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)
    PPOTrainer(config, policy=PolicyWithValueHead(tiny_bridge)).train(stop_after=1)
    with pytest.raises(ValueError, match=r"in-memory model.*pass reference=.* to resume\(\)"):
        PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"))
    start = load_bridge(tiny_model_dir)
    assert PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"), reference=start).phase == 1
    with torch.no_grad():
        start.blocks[0].mlp.out.weight.add_(0.01)  # some other model
    with pytest.raises(ValueError, match="not the one this run started with"):
        PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"), reference=start)


def test_incompatible_config_says_what_differs(tiny_model_dir, prompts_file, tmp_path):
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)).train(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoint"
    with pytest.raises(ValueError, match=r"phases: the run used 2, this call gives 10.*batch_size: the run used 8, this call gives 16"):
        PPOTrainer.resume(PPOConfig(resume=checkpoint, phases=10, batch_size=16))
    with pytest.raises(ValueError, match=r"sampling.max_new_tokens: the run used 6"):
        PPOTrainer.resume(PPOConfig(resume=checkpoint, sampling=SamplingConfig(max_new_tokens=9)))
    # Run fields may change; flags equal to the run's are accepted.
    trainer = PPOTrainer.resume(PPOConfig(resume=checkpoint, out=tmp_path / "elsewhere", debug=True, lr=1e-3))
    assert trainer.config.out == tmp_path / "elsewhere" and trainer.config.debug and trainer.config.phases == 2
    with pytest.raises(ValueError, match="is a ppo checkpoint; resume it with `rlhf-scratch ppo"):
        REINFORCETrainer.resume(REINFORCEConfig(resume=checkpoint))
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        PPOTrainer.resume(PPOConfig(resume=tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"continue a run with PPOTrainer.resume\(config\)"):
        PPOTrainer(PPOConfig(resume=checkpoint))  # the constructor starts runs; it never resumes one silently
    (checkpoint / RESUME_STATE_JSON).unlink()
    with pytest.raises(ValueError, match="no resume_state.json.*can start a new run"):
        find_checkpoint(checkpoint)


def test_checkpoint_holds_no_pickles_and_state_round_trips(tiny_model_dir, prompts_file, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2))
    trainer.train(stop_after=1)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    assert {"model.safetensors", "value_head.safetensors", "resume_state.safetensors", "resume_state.json"} <= set(files)
    # split/join keep tuples, int keys, None and tensors as they were (random.getstate, optimizer state).
    state = {"rng": (3, (1, 2), None), "optimizer": {0: {"step": torch.tensor(2.0)}}, "x": [1.5, "a", True]}
    skeleton, tensors = split_tensors(state)
    json.dumps(skeleton)
    back = join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert back["rng"] == (3, (1, 2), None) and back["x"] == [1.5, "a", True]
    assert list(back["optimizer"]) == [0] and back["optimizer"][0]["step"].item() == 2.0


def test_checkpoint_every_writes_checkpoints_during_the_run(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    saved = []
    original = PPOTrainer.save_checkpoint
    monkeypatch.setattr(PPOTrainer, "save_checkpoint", lambda self, d: saved.append(self.phase) or original(self, d))
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=3, checkpoint_every=2)).train()
    assert saved == [2, 3]  # every 2 phases, and at the end
    shutil.rmtree(tmp_path / "run")
    saved.clear()
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=3)).train()
    assert saved == [3]  # checkpoint_every=0: only at the end


# ---------------------------------------------------------------- atomic checkpoints
def test_failed_save_leaves_the_previous_checkpoint_intact(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import rlhf_scratch.checkpoint as checkpoint_module
    from rlhf_scratch.checkpoint import read_resume_state
    from rlhf_scratch.models import load_policy

    trainer = PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=3))
    trainer.train(stop_after=1)
    target = tmp_path / "run" / "checkpoint"
    tokens = torch.tensor([[0, 5, 9, 17]])
    phase_1_logits = load_policy(target)(tokens).logits
    trainer.learning_phase(trainer.rollout_phase())  # phase 2: the weights change

    def full_disk(*args, **kwargs):  # fails after the model weights are already in the staging directory
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(target)
    assert sorted(p.name for p in target.parent.iterdir() if "checkpoint" in p.name) == ["checkpoint"]  # no .partial, no .old
    assert read_resume_state(target)["phase"] == 1
    torch.testing.assert_close(load_policy(target)(tokens).logits, phase_1_logits, rtol=0, atol=0)
    assert PPOTrainer.resume(PPOConfig(resume=target)).phase == 1


def _write_version(directory, version: int):
    """A two-file payload whose files must agree: what a torn write would break."""
    from safetensors.torch import save_file

    (directory / "version.txt").write_text(str(version))
    save_file({"w": torch.full((64,), float(version))}, directory / "weights.safetensors")


def _read_version(directory) -> int:
    from safetensors.torch import load_file

    version = int((directory / "version.txt").read_text())
    assert torch.equal(load_file(directory / "weights.safetensors")["w"], torch.full((64,), float(version)))
    return version


@pytest.mark.parametrize("dies_at", ["rename old away", "rename new in", "delete old"])
def test_a_swap_interrupted_at_any_step_leaves_a_complete_directory(tmp_path, monkeypatch, dies_at):
    import os
    import shutil as shutil_module

    from rlhf_scratch import outputs

    target = tmp_path / "checkpoint"
    with outputs.atomic_dir(target) as staging:
        _write_version(staging, 1)

    class Killed(BaseException):
        pass

    calls = {"replace": 0}
    real_replace, real_rmtree = os.replace, shutil_module.rmtree

    def replace(src, dst):
        calls["replace"] += 1
        if (dies_at, calls["replace"]) in {("rename old away", 1), ("rename new in", 2)}:
            raise Killed
        return real_replace(src, dst)

    def rmtree(path, ignore_errors=False):
        if dies_at == "delete old" and str(path).endswith(".old"):
            raise Killed
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(outputs.os, "replace", replace)
    monkeypatch.setattr(outputs.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        with outputs.atomic_dir(target) as staging:
            _write_version(staging, 2)
    monkeypatch.undo()
    expected = {"rename old away": 1, "rename new in": 1, "delete old": 2}[dies_at]
    assert _read_version(outputs.existing_dir(target)) == expected
    # The next save recovers whatever state the dead one left.
    with outputs.atomic_dir(target) as staging:
        _write_version(staging, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"] and _read_version(target) == 3


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_sigkill_while_saving_checkpoints_leaves_a_loadable_one(tiny_model_dir, prompts_file, tmp_path):
    """A child process saves checkpoints in a loop and is SIGKILLed at a random moment (seeded), a few times."""
    import os
    import random
    import signal
    import time

    from rlhf_scratch.checkpoint import read_resume_state
    from rlhf_scratch.models import load_policy

    trainer = PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2))
    target = tmp_path / "run" / "checkpoint"
    tokens = torch.tensor([[0, 5, 9, 17]])
    expected_logits = trainer.policy(tokens).logits
    rng = random.Random(0)
    for attempt in range(4):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save forever, one byte down the pipe after each complete save
            try:
                os.close(read_end)
                # tqdm's write lock is a multiprocessing lock, shared with the parent across fork: a child killed
                # inside a progress bar (transformers' "Writing model shards") would leave it held forever and
                # the parent's next progress bar would deadlock. The child draws no progress bars, and any tqdm
                # class it might still use (tqdm.auto's subclass keeps a lock of its own) gets a fresh lock.
                import threading

                import tqdm
                import tqdm.auto
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                for bar_class in {tqdm.tqdm, tqdm.auto.tqdm, *tqdm.tqdm.__subclasses__()}:
                    bar_class.set_lock(threading.RLock())
                for i in range(10**6):
                    trainer.phase = 1000 * attempt + i
                    trainer.save_checkpoint(target)
                    os.write(write_end, b".")
            finally:
                os._exit(0)
        os.close(write_end)
        assert os.read(read_end, 1) == b".", "the child died before its first save"  # now there is one to protect
        started = time.perf_counter()
        assert os.read(read_end, 1) == b"."
        save_seconds = time.perf_counter() - started
        time.sleep(rng.uniform(0, 3 * save_seconds))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)

        directory = find_checkpoint(target)  # checkpoint/ or, if killed between the renames, checkpoint.old
        phase = read_resume_state(directory)["phase"]
        assert phase // 1000 == attempt  # a complete checkpoint of this attempt
        torch.testing.assert_close(load_policy(directory)(tokens).logits, expected_logits, rtol=0, atol=0)


def test_replace_dir_copies_or_moves_over_an_existing_directory(tmp_path):
    from rlhf_scratch.outputs import replace_dir

    target = tmp_path / "model"
    for version, copy in ((1, True), (2, False), (3, True)):
        source = tmp_path / f"build{version}"
        source.mkdir()
        _write_version(source, version)
        replace_dir(source, target, copy=copy)
        assert _read_version(target) == version and source.exists() == copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build1", "build3", "model"]


def test_cli_resume(tiny_model_dir, prompts_file, tmp_path, capsys):
    from rlhf_scratch.cli import main

    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)).train(stop_after=1)
    assert main(["ppo", "--resume", str(tmp_path / "run" / "checkpoint"), "--phases", "3", "--warmup-phases", "1"]) == 1
    assert "phases: the run used 2, this call gives 3" in capsys.readouterr().err
    assert main(["ppo", "--resume", str(tmp_path / "run")]) == 0
    assert [row["phase"] for row in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_garbled_resume_state_is_a_clear_error(tiny_model_dir, prompts_file, tmp_path):
    from rlhf_scratch.checkpoint import RESUME_STATE_TENSORS

    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)).train(stop_after=1)
    state = tmp_path / "run" / "checkpoint" / RESUME_STATE_TENSORS
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ValueError, match="Cannot read the resume state .* truncated or garbled.*checkpoint.old"):
        PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"))


@pytest.mark.parametrize("damage", ["no_value_head", "bad_phase"])
def test_a_checkpoint_missing_its_value_head_or_with_a_bad_phase_is_refused(tiny_model_dir, prompts_file, tmp_path, damage):
    from rlhf_scratch.checkpoint import RESUME_STATE_JSON
    from rlhf_scratch.models import VALUE_HEAD_FILE

    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", phases=2)).train(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoint"
    if damage == "no_value_head":  # would silently start a fresh value head
        (checkpoint / VALUE_HEAD_FILE).unlink()
        message = "no value_head.safetensors"
    else:  # would run phases -2..2
        state = json.loads((checkpoint / RESUME_STATE_JSON).read_text())
        state["phase"] = -3
        (checkpoint / RESUME_STATE_JSON).write_text(json.dumps(state))
        message = "phase -3 of 2; the file is damaged"
    with pytest.raises(ValueError, match=message):
        PPOTrainer.resume(PPOConfig(resume=tmp_path / "run"))


def test_ctrl_c_stops_at_the_phase_boundary_saves_and_resumes_exactly(tiny_model_dir, prompts_file, tmp_path, sigint_default):
    import signal

    from rlhf_scratch.interrupts import TrainingInterrupted
    from rlhf_scratch.rewards import make_reward

    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=full_dir)).train()
    expected = read_metrics(full_dir)

    chars = make_reward("chars:e")
    trainer = None

    def reward_pressing_ctrl_c_in_phase_2(texts):
        if trainer.phase == 1:  # phase 2 is running: Ctrl-C in its middle, as a user would press it
            signal.raise_signal(signal.SIGINT)
        return chars(texts)

    # checkpoint_every=0: without the interrupt handling, nothing would be saved before the end.
    trainer = PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=split_dir), reward=reward_pressing_ctrl_c_in_phase_2)
    with pytest.raises(TrainingInterrupted, match=f"after phase 2 of {PHASES}.*rlhf-scratch ppo --resume {split_dir}"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is removed again
    assert [row["phase"] for row in read_metrics(split_dir)] == [1, 2]
    assert json.loads((find_checkpoint(split_dir) / RESUME_STATE_JSON).read_text())["phase"] == 2

    PPOTrainer.resume(PPOConfig(resume=split_dir)).train()
    assert_same_metrics(read_metrics(split_dir), expected)


def test_eval_every_logs_held_out_metrics_and_leaves_training_unchanged(tiny_model_dir, prompts_file, tmp_path):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=plain)).train()
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=evaluated, eval_every=3, eval_prompts=6)).train()
    rows = read_metrics(evaluated)
    # Phases 3 and the last (4) are evaluated; every training metric equals the run without evaluation.
    assert [row["phase"] for row in rows if "eval/reward_mean" in row] == [3, 4]
    assert_same_metrics([{k: v for k, v in row.items() if not k.startswith("eval/")} for row in rows], read_metrics(plain))
    last = rows[-1]
    # eval/kl is a sampled estimate (Σ_t log π − log π_ref of its own samples): unbiased, so it may dip below 0.
    assert abs(last["eval/kl"]) < 5 and last["eval/kl_se"] >= 0 and 0 < last["eval/distinct_2"] <= 1 and last["time/eval"] > 0
    # eval/reward_mean is a mean of the task reward (chars:e, a count) over the 6 held-out responses.
    assert last["eval/reward_mean"] >= 0 and round(6 * last["eval/reward_mean"], 6).is_integer()
    assert (evaluated / "reward.png").is_file()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_model_dir, prompts_file, tmp_path):
    import io

    from rich.console import Console

    run = tmp_path / "run"
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=run, phases=2)).train()
    files = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "samples.jsonl", "summary.json")}
    output = io.StringIO()
    summary = PPOTrainer.resume(PPOConfig(resume=run)).train(console=Console(file=output, width=200))
    assert "already complete (2 of 2 phases); nothing was trained" in output.getvalue()
    saved = json.loads(files["summary.json"])
    assert {k: summary[k] for k in ("reward_first", "reward_last", "kl_last", "phases")} == \
        {k: saved[k] for k in ("reward_first", "reward_last", "kl_last", "phases")}
    assert {name: (run / name).read_bytes() for name in files} == files  # no row added, nothing rewritten


def test_resuming_into_another_directory_says_where_the_earlier_rows_are(tiny_model_dir, prompts_file, tmp_path):
    import io

    from rich.console import Console

    run, other = tmp_path / "run", tmp_path / "other"
    PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=run, checkpoint_every=1)).train(stop_after=1)
    output = io.StringIO()
    PPOTrainer.resume(PPOConfig(resume=run, out=other)).train(console=Console(file=output, width=300), stop_after=2)
    assert "continuing from phase 1 in" in output.getvalue() and "start at phase 2" in output.getvalue()
    assert [row["phase"] for row in read_metrics(other)] == [2]
    assert [row["phase"] for row in read_metrics(run)] == [1]  # the original run is untouched


def test_a_checkpoint_from_before_the_fused_optimizer_resumes_with_each_moment_on_its_parameter(
        tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """Checkpoints written before 2026-11-29 hold an AdamW with one group per learning rate; the trainer now splits each
    group into fused (contiguous) and plain (the bridge's strided q/k/v) parameters. Resuming such a checkpoint must put
    every saved moment on the same parameter and every group at its original learning rate."""
    import rlhf_scratch.learner as learner

    monkeypatch.setattr(learner, "fused_where_contiguous", lambda groups, device: groups)  # the old optimizer
    old = PPOTrainer(ppo_config(tiny_model_dir, prompts_file, out=tmp_path / "run", checkpoint_every=1))
    old.train(stop_after=STOP)
    assert len(old.optimizer.param_groups) == 2  # trunk at lr, value head at head_lr
    moments = {name: (old.optimizer.state[p]["exp_avg"].clone(), old.optimizer.state[p]["exp_avg_sq"].clone())
               for name, p in old.policy.named_parameters() if p in old.optimizer.state}
    lr, head_lr = (group["lr"] for group in old.optimizer.param_groups)
    monkeypatch.undo()

    resumed = PPOTrainer.resume(PPOConfig(resume=tmp_path / "run" / "checkpoint"))
    groups = resumed.optimizer.param_groups
    # the trunk's strided q/k/v keep their own group, made contiguous and fused since issue 24
    assert [(group["origin"], group["fused"]) for group in groups] == [(0, True), (0, True), (1, True)]
    assert [group["lr"] for group in groups] == [lr, lr, head_lr] and len(resumed.scheduler.base_lrs) == 3
    parameters = dict(resumed.policy.named_parameters())
    assert len(moments) == sum(len(group["params"]) for group in groups) > 0
    for name, (exp_avg, exp_avg_sq) in moments.items():
        state = resumed.optimizer.state[parameters[name]]
        assert torch.equal(state["exp_avg"], exp_avg) and torch.equal(state["exp_avg_sq"], exp_avg_sq), name
    resumed.train()
    assert [row["phase"] for row in read_metrics(tmp_path / "run")] == list(range(1, PHASES + 1))
    assert resumed.scheduler.get_last_lr()[1] == resumed.scheduler.get_last_lr()[0]  # the split trunk groups stay together
