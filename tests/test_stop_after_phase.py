"""--stop-after-phase K: a planned stop after phase K with the checkpoint written (exit 0), and --resume continues to
the same metrics as an uninterrupted run; the flag is not carried over to the resumed call."""

import json

import pytest
from conftest import TINY_TEXTS

from rlhf_scratch.cli import main

FLAGS = ["--reward", "chars:e", "--phases", "3", "--warmup-phases", "1", "--batch-size", "8", "--minibatch-size", "4",
         "--max-new-tokens", "5", "--table-rows", "1", "--adaptive-kl", "--normalize-rewards"]


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stop_after_phase_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(dict.fromkeys(TINY_TEXTS)) + "\n")
    common = ["ppo", "--model", str(tiny_model_dir), "--data", str(prompts), *FLAGS]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "cut"), "--stop-after-phase", "1"]) == 0
    assert f"Stopped after phase 1 of 3 (--stop-after-phase). Continue with: rlhf-scratch ppo --resume {tmp_path / 'cut'}" in (
        capsys.readouterr().out)
    assert [row["phase"] for row in metrics(tmp_path / "cut")] == [1]
    assert main(["ppo", "--resume", str(tmp_path / "cut")]) == 0  # runs phases 2 and 3: the flag is not carried over
    got, expected = metrics(tmp_path / "cut"), metrics(tmp_path / "full")
    assert [row["phase"] for row in got] == [1, 2, 3] and all(row.keys() == e.keys() for row, e in zip(got, expected))
    for row, e in zip(got, expected):  # equal on one machine; approx so that no rounding-level case can fail it
        assert row == {k: pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in e.items()}
