"""Pretraining smoke test (a smaller config, a few hundred steps) and what it produces."""

import json
from pathlib import Path

import pytest
import torch

from rlhf_scratch.models import load_bridge
from rlhf_scratch.pretrain import PretrainConfig, encode_examples, make_batch
from rlhf_scratch.sampling import SamplingConfig, encode, generate


def test_pretrain_smoke_outputs_and_quality(small_pretrained):
    out, summary = small_pretrained
    assert set(json.loads((out / "summary.json").read_text())) >= {"train_loss", "heldout_perplexity", "english_word_share", "seconds"}
    assert json.loads((out / "config.json").read_text())["steps"] == summary["steps"]
    # A 250-step model is far from fluent, but it has learnt the corpus's words and
    # beats a uniform guess over its 512-token vocabulary by a wide margin.
    assert summary["heldout_perplexity"] < 60
    assert summary["english_word_share"] > 0.7
    bridge = load_bridge(out / "model")
    generation = generate(bridge, [encode(bridge.tokenizer, "The acting")] * 4, SamplingConfig(max_new_tokens=10),
                          generator=torch.Generator().manual_seed(0))
    assert all(isinstance(r, str) for r in generation.responses)


def test_make_batch_masks_padding_by_length_not_by_id():
    # The pad id equals EOS: the closing EOS must stay in the loss, the padding must not.
    input_ids, labels = make_batch([[0, 5, 6, 0], [0, 7, 0]], pad_id=0)
    assert input_ids.tolist() == [[0, 5, 6, 0], [0, 7, 0, 0]]
    assert labels.tolist() == [[0, 5, 6, 0], [0, 7, 0, -100]]


def test_examples_are_bos_text_eos(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    (example,) = encode_examples(tokenizer, ["The movie was great."], n_ctx=64)
    assert example[0] == example[-1] == tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(example[1:-1]) == "The movie was great."


@pytest.mark.parametrize(
    "overrides, message",
    [({"d_model": 30, "n_head": 4}, "divisible"), ({"steps": 0}, "steps"), ({"vocab_size": 100}, "vocab_size"),
     ({"data": "no/such/file.txt"}, "no such file")],
)
def test_pretrain_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**overrides)


def test_length_bucketed_batches_cover_every_example_once():
    import random

    from rlhf_scratch.pretrain import length_bucketed_batches

    lengths = [random.Random(i).randrange(5, 60) for i in range(1000)]
    batches = length_bucketed_batches(lengths, batch_size=32, rng=random.Random(0), window=5)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    # Sorting within windows keeps each batch's lengths close together: lengths are
    # uniform on [5, 60), so a random batch of 32 spans about 53; a bucketed one
    # spans about 55 / 5 (one window holds 5 batches).
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15


def test_a_low_english_word_share_is_a_warning_with_causes():
    from rlhf_scratch.pretrain import word_share_warnings

    assert word_share_warnings(0.995, 1.0) == []
    # The figure measured on the broken transformers 5.24 stack: 0.713 against the corpus's 1.0.
    (warning,) = word_share_warnings(0.713, 1.0)
    assert "0.713" in warning and "1.000" in warning and "transformers" in warning and "--steps" in warning


def test_pretrain_summary_compares_samples_with_the_corpus(small_pretrained):
    _, summary = small_pretrained
    assert summary["corpus_english_word_share"] > 0.95
    assert (summary["warnings"] == []) == (summary["english_word_share"] >= summary["corpus_english_word_share"] - 0.1)


# --------------------------------------------------------------------------- which model becomes the built-in one

TINY_PRETRAIN = dict(n_texts=60, n_heldout=6, vocab_size=300, n_layer=1, n_head=1, d_model=16, n_ctx=32, steps=2,
                     batch_size=8, n_samples=2)
"""A pretraining run of a second or two: enough to see where the model goes, not to learn anything."""


def quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=400)


def fake_builtin_model(cache: Path) -> Path:
    """A stand-in for an installed built-in model; a run that must not replace it leaves the marker."""
    from rlhf_scratch.pretrain import builtin_model_dir

    target = builtin_model_dir(cache)
    target.mkdir(parents=True)
    (target / "marker").write_text("the user's built-in model")
    return target


def test_only_default_settings_install_the_builtin_model():
    from rlhf_scratch.pretrain import changed_settings, installs_builtin

    assert installs_builtin(PretrainConfig()) and changed_settings(PretrainConfig()) == {}
    assert installs_builtin(PretrainConfig(out=Path("runs/pre"), n_samples=10, cache_dir=Path("c")))  # not model settings
    assert not installs_builtin(PretrainConfig(steps=150))
    assert changed_settings(PretrainConfig(steps=150, seed=1)) == {"steps": (150, 900), "seed": (1, 0)}
    assert installs_builtin(PretrainConfig(steps=150, install_builtin=True))
    assert not installs_builtin(PretrainConfig(install_builtin=False))


def test_nondefault_pretrain_keeps_the_builtin_model_and_says_where_its_model_went(tmp_path):
    from rlhf_scratch.pretrain import custom_model_dir, pretrain

    cache = tmp_path / "cache"
    builtin = fake_builtin_model(cache)
    console = quiet_console()
    config = PretrainConfig(cache_dir=cache, **TINY_PRETRAIN)
    summary = pretrain(config, console=console)
    printed = console.file.getvalue()
    assert (builtin / "marker").is_file() and not (builtin / "config.json").exists()  # untouched
    home = custom_model_dir(config)
    assert summary["model_dirs"] == [str(home)] and not summary["installed_builtin"]
    assert (home / "model.safetensors").is_file() and home.parent == cache
    assert f"model saved to {home}" in printed
    assert "not installed as the built-in model" in printed and "--steps 2 (default 900)" in printed
    assert "--install-builtin True" in printed
    load_bridge(home)  # a usable model directory

    # Asked for explicitly, it does replace the built-in model, and says so before training.
    console = quiet_console()
    summary = pretrain(PretrainConfig(cache_dir=cache, install_builtin=True, **TINY_PRETRAIN), console=console)
    assert summary["installed_builtin"] and summary["model_dirs"] == [str(builtin)]
    assert not (builtin / "marker").exists() and (builtin / "model.safetensors").is_file()
    assert "will replace the built-in model" in console.file.getvalue()


def test_pretrain_on_a_few_lines_warns_and_never_installs(tmp_path):
    from rlhf_scratch.pretrain import pretrain

    data = tmp_path / "three.txt"
    data.write_text("A fine film.\nA dull film.\nA long film.\n")
    cache = tmp_path / "cache"
    builtin = fake_builtin_model(cache)
    console = quiet_console()
    out = tmp_path / "out"
    summary = pretrain(PretrainConfig(data=data, out=out, cache_dir=cache, **TINY_PRETRAIN), console=console)
    printed = " ".join(console.file.getvalue().split())
    (warning,) = [w for w in summary["warnings"] if w.startswith("only")]
    assert warning.startswith(f"only 2 training texts (1 more held out for perplexity) from --data {data} (3 non-blank")
    assert "Add texts to the file" in warning and "warning: only 2 training texts" in printed
    assert summary["model_dirs"] == [str(out / "model")] and (builtin / "marker").is_file()
    assert f"trained on --data {data}" in printed
    with pytest.raises(ValueError, match="--install-builtin True installs a model of the built-in review corpus"):
        PretrainConfig(data=data, install_builtin=True)
