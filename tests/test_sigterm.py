"""SIGTERM (what Slurm, Kubernetes and torchrun send before a kill) is handled like the first Ctrl-C: the run finishes
its phase, writes the checkpoint, prints the --resume command and exits with 143; resumed, it logs what an
uninterrupted run logs. And a time-based checkpoint (--checkpoint-minutes) bounds what even `kill -9` can lose."""

import json
import os
import signal

import pytest

from rlhf_scratch.cli import main

# A reward from a Python file that sends this process a real SIGTERM while phase 2 is being scored (the before-table
# scores first, then each phase once), once per marker file: a resumed run is not stopped again.
SIGTERM_REWARD = '''
import os
import signal


def terminated_in_phase_2(texts, prompts=None):
    terminated_in_phase_2.calls = getattr(terminated_in_phase_2, "calls", 0) + 1
    marker = os.environ["SIGTERM_MARKER"]
    if terminated_in_phase_2.calls == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(text.count("e")) for text in texts]
'''


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "seconds"} for row in rows]


@pytest.fixture()
def sigterm_reward(tmp_path, monkeypatch):
    rewards = tmp_path / "terminating_rewards.py"
    rewards.write_text(SIGTERM_REWARD)
    monkeypatch.setenv("SIGTERM_MARKER", str(tmp_path / "terminated"))
    # The handler the test runner had is put back by the trainer; the default (die) must never be reached here.
    previous = signal.getsignal(signal.SIGTERM)
    yield f"py:{rewards}:terminated_in_phase_2", tmp_path / "terminated"
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize("command, flags", [
    ("ppo", ["--minibatch-size", "2", "--ppo-epochs", "2", "--adaptive-kl", "--kl-horizon", "100"]),
    ("grpo", ["--group-size", "2", "--minibatch-size", "2"]),
    ("grpo", ["--group-size", "2", "--minibatch-size", "2", "--lora-rank", "4", "--lr", "1e-2"]),  # LoRA: adapters resume
])
def test_sigterm_checkpoints_exits_143_and_the_resumed_run_equals_an_uninterrupted_one(
        tiny_model_dir, tmp_path, sigterm_reward, capsys, command, flags):
    reward, marker = sigterm_reward
    args = [command, "--model", str(tiny_model_dir), "--reward", reward, "--prompt", "The", "--phases", "4",
            "--warmup-phases", "1", "--batch-size", "4", "--max-new-tokens", "4", "--table-rows", "1", *flags]
    marker.touch()  # no signal: the uninterrupted run
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    expected = read_rows(tmp_path / "full" / "metrics.jsonl")

    marker.unlink()
    out = tmp_path / "stopped"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"Stopped by SIGTERM after phase 2 of 4; checkpoint saved in {out / 'checkpoint'}" in err
    assert f"rlhf-scratch {command} --resume {out}" in err and "Traceback" not in err
    assert marker.exists() and [row["phase"] for row in read_rows(out / "metrics.jsonl")] == [1, 2]
    assert not [p.name for p in out.iterdir() if "partial" in p.name or p.name.endswith(".old")]  # written atomically

    assert main([command, "--resume", str(out)]) == 0
    assert without_times(read_rows(out / "metrics.jsonl")) == without_times(expected)


def test_time_based_checkpoint(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.sampling import SamplingConfig

    saved = []
    original = PPOTrainer.save_checkpoint
    monkeypatch.setattr(PPOTrainer, "save_checkpoint", lambda self, d: saved.append(self.phase) or original(self, d))
    base = dict(model=str(tiny_model_dir), data=str(prompts_file), reward="chars:e", phases=3, batch_size=4,
                minibatch_size=4, warmup_phases=0, sampling=SamplingConfig(max_new_tokens=4), table_rows=1)
    PPOTrainer(PPOConfig(**base, out=tmp_path / "a", checkpoint_minutes=1e-9)).train()
    assert saved == [1, 2, 3]  # every phase takes longer than 1e-9 minutes
    saved.clear()
    PPOTrainer(PPOConfig(**base, out=tmp_path / "b", checkpoint_minutes=0)).train()
    assert saved == [3]  # off: only at the end
    assert PPOConfig().checkpoint_minutes == 10.0
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0"):
        PPOConfig(checkpoint_minutes=-1.0)


@pytest.fixture()
def prompts_file(tmp_path):
    from conftest import TINY_TEXTS

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(dict.fromkeys(TINY_TEXTS)) + "\n")
    return path


def test_a_process_that_ignores_sigterm_keeps_ignoring_it():
    from rlhf_scratch.interrupts import StopRequest

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGTERM, previous)
