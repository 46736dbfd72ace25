"""Issue 22, item 6: messages that were contradictory, cut mid-word or missing, each against the case that showed it.

An incomplete PPO checkpoint or a run directory given to inspect; a model saved without its tokenizer; a held-out
count or a token limit reduced without a word; duplicate pairs written and counted by ``pairs``; texts of only
invisible characters taken for texts.
"""

import json
import shutil

import pytest

from rlhf_scratch.models import ModelLoadError, brief, load_bridge


# --------------------------------------------------------------------------- inspect --checkpoint


def write_meta(directory, kind):
    directory.mkdir(parents=True)
    (directory / "rlhf_scratch.json").write_text(json.dumps({"kind": kind}))


def test_inspect_says_what_a_checkpoint_without_a_value_head_is(tmp_path):
    from rlhf_scratch.value_lens import check_ppo_checkpoint

    # A PPO checkpoint whose value head is missing used to be called "a ppo checkpoint (no value_head...): inspect
    # needs a PPO checkpoint". It is an incomplete one.
    write_meta(tmp_path / "ppo", "ppo")
    (tmp_path / "ppo" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is an incomplete PPO checkpoint: value_head.safetensors missing.*checkpoint.old"):
        check_ppo_checkpoint(str(tmp_path / "ppo"))
    # A run directory with no checkpoint/ yet (the run stopped first) used to be "a model without a value head".
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"run is a run directory without a checkpoint/: that run stopped before"):
        check_ppo_checkpoint(str(tmp_path / "run"))
    # Other kinds: named, with what to pass instead.
    write_meta(tmp_path / "dpo", "dpo")
    (tmp_path / "dpo" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"dpo is a dpo checkpoint, which has no value head: .*`rlhf-scratch ppo` run"):
        check_ppo_checkpoint(str(tmp_path / "dpo"))


# --------------------------------------------------------------------------- a model without its tokenizer


def test_a_model_saved_without_its_tokenizer_is_named_in_one_whole_sentence(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_bridge(model)
    message = str(info.value)
    assert "has no tokenizer (none of tokenizer.json" in message and "tokenizer.save_pretrained" in message
    assert "sentencepiece" not in message and "\n" not in message  # it used to end "...class to instanti)"


def test_brief_cuts_a_library_message_at_a_word():
    text = brief(ValueError("Couldn't instantiate the backend tokenizer from one of:\n(1) a file " + "word " * 60))
    assert text.endswith("word …") and len(text) <= 202 and "\n" not in text
    assert brief(ValueError("short\nmessage")) == "short message"


# --------------------------------------------------------------------------- reductions that are said


def test_pretrain_says_when_it_holds_out_fewer_texts_than_asked(tmp_path):
    from rlhf_scratch.pretrain import PretrainConfig, heldout_warnings, load_training_texts

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"text number {i}" for i in range(30)) + "\n")
    config = PretrainConfig(data=data, n_heldout=1000)
    train, heldout = load_training_texts(config)
    assert (len(train), len(heldout)) == (27, 3)
    (warning,) = heldout_warnings(config, len(train), len(heldout))
    assert warning.startswith(f"--n-heldout 1000 is more than a tenth of the 30 texts of --data {data}: 3 are held out")
    assert heldout_warnings(PretrainConfig(data=data, n_heldout=3), 27, 3) == []


def test_diff_says_when_texts_are_cut_to_the_context(tiny_model_dir, tmp_path):
    from rlhf_scratch.model_diff_report import DiffConfig, run_diff

    texts = tmp_path / "long.txt"
    texts.write_text("the movie was great and I loved it " * 30 + "\n")
    run_diff(DiffConfig(policy=str(tiny_model_dir), reference=str(tiny_model_dir), prompts=str(texts),
                        from_samples=False, n_texts=1, max_tokens=100, top_k=2, out=tmp_path / "diff"))
    assert "--max-tokens 100 is above the model's context of 64 tokens: texts were cut to 64" in (
        (tmp_path / "diff" / "report.md").read_text())


# --------------------------------------------------------------------------- pairs


def test_pairs_writes_each_pair_once_and_counts_what_it_wrote(tiny_model_dir, tmp_path):
    from rlhf_scratch.preferences import PairsConfig, load_pairs, run_pairs
    from rlhf_scratch.sampling import SamplingConfig

    # One fixed prompt and one-token responses from the 8 likeliest: the same (prompt, chosen, rejected) comes out
    # many times.
    config = PairsConfig(model=str(tiny_model_dir), reward="chars:e", prompt="The", n=64, samples_per_prompt=4,
                         threshold=1.0, batch_size=64, out=tmp_path, sampling=SamplingConfig(max_new_tokens=1, top_k=8))
    summary = run_pairs(config)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(set(lines)) == len(lines) == summary["n_pairs"] == len(load_pairs(tmp_path / "pairs.jsonl")) > 0
    assert summary["n_duplicates_dropped"] > 0


# --------------------------------------------------------------------------- invisible texts


def test_texts_of_only_invisible_characters_are_blank(tmp_path):
    from rlhf_scratch.data import DataError, is_blank, load_texts
    from rlhf_scratch.preferences import PairDataError, load_pairs

    invisible = ["\u200b\u200b", "\ufeff", " \u2060\u00ad ", "\u3164", "\u200d\t"]
    assert all(is_blank(text) for text in invisible) and not is_blank("\u200bhi")
    path = tmp_path / "texts.txt"
    path.write_text("\n".join([*invisible, "a real text"]) + "\n", encoding="utf-8")
    assert load_texts(str(path)) == ["a real text"]
    path.write_text("\n".join(invisible) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="every text is blank or invisible characters"):
        load_texts(str(path))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "\u200b", "rejected": "no"}) + "\n", encoding="utf-8")
    with pytest.raises(PairDataError, match=r"'chosen' is empty \(only invisible characters\)"):
        load_pairs(pairs)


# --------------------------------------------------------------------------- a refused --out


def test_a_refused_out_does_not_say_a_run_failed(tiny_model_dir, tmp_path, capsys):
    """The refusal of an --out that holds a finished run used to add "The run's last checkpoint is kept in ...: once
    the cause is fixed, continue with ..." although nothing had failed."""
    from rlhf_scratch.cli import main

    args = ["ppo", "--model", str(tiny_model_dir), "--reward", "chars:e", "--prompt", "The", "--phases", "1",
            "--batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "2", "--table-rows", "1",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already holds an earlier run" in err and "--resume" in err
    assert "once the cause is fixed" not in err and err.count("\n") == 1


def test_fdpo_experiment_with_a_missing_pair_file_says_so_in_one_line(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "fdpo_tradeoff.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "out"), "--pairs", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match=r"--pairs .*missing.jsonl: no such file\. Give a pair file"):
        runpy.run_path(str(script), run_name="__main__")
    assert not (tmp_path / "out").exists()


def test_a_config_error_is_one_line_not_a_box(tmp_path, capsys):
    """tyro drew a multi-line box for a value a config's checks refuse (`pretrain --data missing.txt`)."""
    from rlhf_scratch.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--data", str(tmp_path / "missing.txt")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"rlhf-scratch pretrain: invalid configuration: --data {tmp_path / 'missing.txt'}: no such file. Give a .txt, .jsonl or .csv file of texts.\n"


@pytest.mark.parametrize("name", ["reinforce_vs_ppo.py", "reward_model_levels.py"])
def test_experiments_take_a_small_batch_and_refuse_a_bad_minibatch_before_training(tmp_path, capsys, name):
    """--batch-size 8 used to end in a ValueError traceback (PPO's default minibatch 16 > 8); reward_model_levels
    only found out after building pairs and training three reward models."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / name
    namespace = runpy.run_path(str(script))  # not __main__: only the definitions
    assert namespace["parse_args"]([str(tmp_path / "out"), "--batch-size", "8"]).minibatch_size == 8
    with pytest.raises(SystemExit) as stop:
        namespace["parse_args"]([str(tmp_path / "out"), "--batch-size", "24"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "minibatch_size (16) must divide batch_size (24); e.g. use --minibatch-size 12." in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
