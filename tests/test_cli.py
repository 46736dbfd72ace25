"""The command line as a new user meets it: earlier runs are never overwritten silently, booleans
take a bare flag or a value, and a bad --out fails before anything is loaded."""

import json
import re

import pytest

from rlhf_scratch.cli import explicit_booleans, main
from rlhf_scratch.outputs import RunDirectoryError, check_run_dir
from rlhf_scratch.ppo import PPOConfig


def sample_args(model_dir, out):
    return ["sample", "--model", str(model_dir), "-n", "2", "--max-new-tokens", "3", "--out", str(out)]


def test_a_second_run_into_the_same_out_is_refused_and_loses_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sample_args(tiny_model_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(sample_args(tiny_model_dir, out)) == 1
    error = capsys.readouterr().err
    assert "already holds an earlier run" in error and "--overwrite" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the run: one run's rows, not two runs' appended.
    assert main(sample_args(tiny_model_dir, out) + ["--overwrite"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_trainers_offer_resume_in_the_refusal(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match=rf"rlhf-scratch ppo --resume {out}"):
        check_run_dir(out, "ppo")
    check_run_dir(out, "ppo", resuming=True)  # continuing the run into its own directory is fine


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(RunDirectoryError, match="not an rlhf-scratch run"):
        check_run_dir(tmp_path, "sample", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_out_that_is_a_file_or_under_a_file_fails_before_loading(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        # The model does not exist: the --out check must come first, so the error is about --out.
        assert main(["sample", "--model", str(tmp_path / "no_model"), "--out", str(out)]) == 1
        assert "--out" in capsys.readouterr().err
    with pytest.raises(RunDirectoryError, match="cannot write in /proc"):
        check_run_dir("/proc/rlhf_scratch_out", "sample")  # root passes os.access there, but a write fails
    check_run_dir(tmp_path / "new" / "deeper", "sample")  # a path still to be created is fine
    assert not (tmp_path / "new").exists()  # and checking it creates nothing


def test_booleans_take_a_bare_flag_or_a_value():
    flags = ["--debug", "--no-stop-at-eos", "--adaptive-kl", "True", "--normalize-rewards=false", "--wandb", "no"]
    assert explicit_booleans(flags, PPOConfig) == [
        "--debug", "--no-stop-at-eos", "--adaptive-kl", "--no-normalize-rewards", "--no-wandb"]
    with pytest.raises(SystemExit, match="takes no value"):
        explicit_booleans(["--debug=maybe"], PPOConfig)
    # Numbers after a non-boolean flag are values, untouched.
    assert explicit_booleans(["--phases", "1"], PPOConfig) == ["--phases", "1"]


@pytest.mark.parametrize("args, expected", [
    (["--debug"], True), (["--debug", "True"], True), (["--debug=False"], False), (["--no-debug"], False), ([], False)])
def test_every_boolean_form_parses_to_the_same_config(args, expected):
    import tyro

    from rlhf_scratch.cli import TYRO_CONFIG

    config = tyro.cli(PPOConfig, args=explicit_booleans(args, PPOConfig), config=TYRO_CONFIG)
    assert config.debug is expected


def test_sample_writes_what_it_printed(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(sample_args(tiny_model_dir, out)) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and json.loads((out / "summary.json").read_text())["n"] == 2


def test_overwrite_keeps_the_earlier_run_when_the_new_one_fails(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sample_args(tiny_model_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The new run fails (no such model) after --overwrite moved the old one aside: it comes back intact.
    assert main(["sample", "--model", str(tmp_path / "missing"), "--out", str(out), "--overwrite"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not any(p.name.endswith(".replaced") for p in tmp_path.iterdir())
    capsys.readouterr()


def test_overwrite_refuses_to_delete_an_input_that_lives_in_the_run(tiny_model_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    assert main(sample_args(tiny_model_dir, out)) == 0
    shutil.copytree(tiny_model_dir, out / "model")
    assert main(["sample", "--model", str(out / "model"), "--out", str(out), "--overwrite"]) == 1
    assert "would delete" in capsys.readouterr().err and (out / "model" / "config.json").is_file()


def test_a_new_run_that_fails_leaves_no_half_written_directory(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    long_prompt = "word " * 300  # longer than the tiny model's 64-token context
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", long_prompt, "--out", str(out)]) == 1
    assert "exceeds the model's context" in capsys.readouterr().err
    assert not out.exists()
    assert main(sample_args(tiny_model_dir, out)) == 0  # so the same --out works at once


def test_overwrite_and_booleans_accept_a_value_and_reject_nonsense(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(sample_args(tiny_model_dir, out)) == 0
    assert main(sample_args(tiny_model_dir, out) + ["--overwrite", "True"]) == 0
    with pytest.raises(SystemExit, match="takes no value"):
        explicit_booleans(["--prepend-bos", "maybe"], PPOConfig)


def test_a_trainer_that_fails_before_its_first_phase_leaves_no_config_behind(tiny_model_dir, tmp_path, capsys):
    """ppo writes config.json first; a prompt too long for the context then fails: the directory goes too,
    so the corrected command can use the same --out (instead of being told to resume a run that never ran)."""
    out = tmp_path / "run"
    args = ["ppo", "--model", str(tiny_model_dir), "--reward", "chars:e", "--phases", "1", "--warmup-phases", "0",
            "--batch-size", "2", "--minibatch-size", "2", "--out", str(out)]
    assert main(args + ["--prompt", "word " * 300]) == 1
    assert "exceeds the model's context" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--reward", "banana"], "Unknown reward spec 'banana'"),
    (["--reward", "rm:missing_rm_dir"], "No such reward model directory"),
    (["--reward", "hf:./missing_classifier:POSITIVE"], "No such directory: ./missing_classifier"),
    (["--data", "missing_prompts.txt"], "No such file: missing_prompts.txt"),
    (["--device", "banana"], "Unknown --device 'banana'"),
    (["--model", "runs/nonexist"], "No such model directory: runs/nonexist"),
    (["--reference", "./nope"], "No such model directory: ./nope"),
    (["--resume", "no_such_run"], "No checkpoint at no_such_run"),
])
def test_bad_input_fails_before_any_model_loads_or_the_builtin_model_is_pretrained(args, message, tmp_path, monkeypatch,
                                                                                     capsys):
    from transformer_lens.model_bridge import TransformerBridge

    import rlhf_scratch.pretrain

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(rlhf_scratch.pretrain, "ensure_builtin_model", must_not_load)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", must_not_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["ppo", *args, "--out", "out"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_flag_has_help_text_and_no_section_comment_is_taken_for_one(capsys):
    from rlhf_scratch.cli import _commands

    for name in _commands():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "--- run ---" not in text, name
        bare = [line.strip() for line in text.splitlines()
                if re.match(r"^(-\w, )?--[\w.-]+( \S+)?\s+\(default: [^)]*\)$", line.strip())]
        assert not bare, f"{name}: flags without help text: {bare}"


def test_ctrl_c_in_a_run_that_overwrites_keeps_the_new_checkpoint_and_prints_the_resume_command(tiny_model_dir, tmp_path,
                                                                                                monkeypatch, capsys, sigint_default):
    import signal

    import rlhf_scratch.rollout as rollout

    out = tmp_path / "run"
    args = ["ppo", "--model", str(tiny_model_dir), "--reward", "chars:e", "--prompt", "The", "--phases", "3",
            "--warmup-phases", "0", "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4",
            "--table-rows", "1", "--out", str(out)]
    assert main(args) == 0
    first_run_metrics = (out / "metrics.jsonl").read_text()

    score_texts, calls = rollout.score_texts, []

    def score_pressing_ctrl_c(reward, texts, prompts=None):
        calls.append(1)
        if len(calls) == 1:  # the rollout of phase 1 (the before-table scores outside the rollout): Ctrl-C there
            signal.raise_signal(signal.SIGINT)
        return score_texts(reward, texts, prompts)

    monkeypatch.setattr(rollout, "score_texts", score_pressing_ctrl_c)
    assert main([*args, "--overwrite", "--seed", "1"]) == 130
    err = capsys.readouterr().err
    assert f"after phase 1 of 3; checkpoint saved in {out / 'checkpoint'}" in err
    assert f"rlhf-scratch ppo --resume {out}" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text().count("\n") == 1 != first_run_metrics.count("\n")
    assert not list(tmp_path.glob(".*replaced"))  # the earlier run was replaced, as a finished run would replace it
    monkeypatch.undo()
    assert main(["ppo", "--resume", str(out)]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == 3


def test_commands_print_no_library_progress_bars(tiny_model_dir, tmp_path, capsys):
    assert main(sample_args(tiny_model_dir, tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out


def test_ctrl_c_in_a_command_without_resume_ends_with_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    import rlhf_scratch.reward_model_training as reward_model_training

    def interrupted(config):
        (config.out / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (config.out / "metrics.jsonl").write_text('{"epoch": 1}\n')
        raise KeyboardInterrupt

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "good", "rejected": "bad"}) + "\n")
    monkeypatch.setattr(reward_model_training, "train_reward_model", interrupted)
    assert main(["rm", "--pairs", str(pairs), "--out", str(tmp_path / "rm")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted (Ctrl-C); what it had written is in {tmp_path / 'rm'}" in err and "Traceback" not in err
    assert (tmp_path / "rm" / "metrics.jsonl").is_file()  # kept


USER_REWARD = '''
def exclamations(texts):
    return [text.count("!") for text in texts]


def fails_in_phase_2(texts, prompts=None):
    fails_in_phase_2.calls = getattr(fails_in_phase_2, "calls", 0) + 1
    if fails_in_phase_2.calls == 3:  # the before-table, phase 1, then phase 2
        raise KeyError("no score for this text")
    return [0.0 for _ in texts]
'''


def test_ppo_trains_on_a_reward_function_from_a_python_file(tiny_model_dir, tmp_path, capsys):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(USER_REWARD)
    args = ["ppo", "--model", str(tiny_model_dir), "--prompt", "The", "--phases", "2", "--warmup-phases", "0",
            "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4", "--table-rows", "1"]
    assert main([*args, "--reward", f"py:{rewards}:exclamations", "--out", str(tmp_path / "ok")]) == 0
    assert len((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()) == 2

    # A reward that raises in phase 2 stops the run with the file and function named; the checkpoint of phase 1 stays.
    out = tmp_path / "failing"
    assert main([*args, "--reward", f"py:{rewards}:fails_in_phase_2", "--checkpoint-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"The reward function fails_in_phase_2 in {rewards} raised KeyError: 'no score for this text'" in err
    assert "Traceback" not in err and f"continue with `rlhf-scratch ppo --resume {out}`" in err
    assert (out / "checkpoint").is_dir() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_threads_flag_sets_torch_threads_and_a_busy_machine_gets_a_note(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import os

    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls = []
    assert main([*sample_args(tiny_model_dir, tmp_path / "a"), "--threads", "1"]) == 0
    assert calls == [1] and "busy" not in capsys.readouterr().err

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    assert main(sample_args(tiny_model_dir, tmp_path / "b")) == 0
    assert "this machine is busy (load 8.0" in capsys.readouterr().err and calls == [1]
    with pytest.raises(SystemExit, match="--threads takes a positive whole number"):
        main([*sample_args(tiny_model_dir, tmp_path / "c"), "--threads", "0"])


def test_ctrl_c_while_the_console_script_is_still_importing_prints_one_line(monkeypatch, capsys):
    import sys

    from rlhf_scratch import entry

    class InterruptedImport:  # Ctrl-C lands inside `import torch`, seconds into start-up on a busy machine
        def find_spec(self, name, path=None, target=None):
            if name == "rlhf_scratch.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "rlhf_scratch.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    assert entry.main() == 130
    assert capsys.readouterr().err == "rlhf-scratch: interrupted (Ctrl-C) while starting; nothing was written.\n"


def test_help_into_a_closed_pipe_ends_without_a_traceback():
    import subprocess
    import sys

    # `rlhf-scratch ppo --help | head -1`: the reader is gone before the help is written.
    child = subprocess.Popen([sys.executable, "-c", "import sys; from rlhf_scratch.entry import main; "
                              "sys.argv = ['rlhf-scratch', 'ppo', '--help']; raise SystemExit(main())"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    _, err = child.communicate(timeout=300)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_help_and_a_config_error_import_no_heavy_library():
    """`rlhf-scratch --help`, `rlhf-scratch ppo --help` and a configuration error answer before torch, transformers
    or TransformerLens load (7-8 s on an idle 2-core machine, a minute on a busy one): the configs import none of them."""
    import subprocess
    import sys

    probe = ("import sys\nfrom rlhf_scratch.cli import main\nfor argv in {argv!r}:\n    try:\n        main(argv)\n"
             "    except SystemExit:\n        pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules))")
    for argv in ([["--help"]], [["ppo", "--help"]], [["ppo", "--phases", "0"]], [["dpo", "--beta", "0"]], [["diff", "--help"]], [["patch", "--help"]], [["lens", "--help"]], [["crosscode", "--help"]], [["sae", "--help"]]):
        child = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in child.stdout, (argv, child.stdout[-500:], child.stderr[-2000:])
    child = subprocess.run([sys.executable, "-m", "rlhf_scratch", "ppo", "--phases", "0"], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 2 and "phases must be >= 1, got 0" in child.stderr
