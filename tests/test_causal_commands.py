"""``rlhf-scratch patch`` and ``rlhf-scratch lens`` on tiny random models of all ten families, through the CLI.

The policy is a copy of each model with every weight of its last block (block 1) moved and nothing else, so the
patch command has a known answer on every family: no layer-0 component recovers anything, and the last residual
stream (final norm and unembedding unchanged) recovers everything. The lens's Δ is 0 at layer 0.
"""

import json

import pytest
import torch
from model_families import FAMILIES, build_family_model

from rlhf_scratch.cli import main
from rlhf_scratch.models import load_bridge, save_model_dir

TEXTS = "The movie was great and I loved it.\nThe acting was not bad at all.\nThe plot was dull.\nA slow drama.\n"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {family: build_family_model(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def last_block_moved(directory, out, scale=0.3, seed=1):
    """A copy with every parameter of block 1 moved (the HF decoder layer's own parameters), saved to ``out``."""
    bridge = load_bridge(directory)
    original = bridge.original_model
    layers = original.transformer.h if hasattr(original, "transformer") else (
        original.gpt_neox.layers if hasattr(original, "gpt_neox") else original.model.layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layers[1].parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return save_model_dir(bridge, out, meta={"kind": "ppo", "phase": 1})


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_and_lens_commands_run_on_every_family(name, family_dirs, tmp_path):
    policy = last_block_moved(family_dirs[name], tmp_path / "policy")
    (tmp_path / "texts.txt").write_text(TEXTS)
    common = ["--policy", str(policy), "--reference", str(family_dirs[name]), "--threads", "1"]
    assert main(["patch", *common, "--prompts", str(tmp_path / "texts.txt"), "--n-texts", "3", "--max-new-tokens", "3",
                 "--reward", "chars:e", "--top-k", "2", "--out", str(tmp_path / "patch")]) == 0
    summary = json.loads((tmp_path / "patch" / "summary.json").read_text())
    assert set(summary["scans"]) == {"policy_into_reference", "reference_into_policy"}
    for scan in summary["scans"].values():
        rows = {row["component"]: row for row in scan["rows"]}
        assert len(rows) == 2 * (4 + 2)
        assert all(abs(row["kl"]) < 1e-4 for row in scan["rows"] if row["layer"] == 0), name
        assert rows["L1.resid"]["kl"] == pytest.approx(1.0, abs=1e-4)
    sets = {row["component"]: row for row in summary["transplant"]}
    assert list(sets) == ["top 1", "random 1", "top 2", "random 2"]  # a quarter of 8 heads + 2 MLPs is 2
    assert sets["top 2"]["kl"] > 0.2 and all(member.startswith("L1.") for member in sets["top 2"]["members"])
    assert (tmp_path / "patch" / "report.md").read_text().startswith("# Activation patching")
    assert (tmp_path / "patch" / "patch_policy_into_reference.png").is_file()

    assert main(["lens", *common, "--texts", str(tmp_path / "texts.txt"), "--n-texts", "3", "--first-k", "3",
                 "--alphas", "0,1", "--n-prompts", "2", "--max-new-tokens", "3", "--reward", "chars:e", "--top-k", "3",
                 "--out", str(tmp_path / "lens")]) == 0
    summary = json.loads((tmp_path / "lens" / "summary.json").read_text())
    assert summary["lens"][0]["delta_norm"] < 1e-4 < summary["lens"][1]["delta_norm"]
    assert [row["alpha"] for row in summary["sweep"]] == [0.0, 1.0] and summary["sweep"][0]["delta_token_logprob"] == 0
    assert (tmp_path / "lens" / "steering.png").is_file()
    assert all(len(row["top_z"]) == 3 and all(abs(z) < 1e3 for z in row["top_z"]) for row in summary["lens"])
    assert "their z" in (tmp_path / "lens" / "report.md").read_text()


def test_patch_greedy_selects_last_block_components_and_beats_or_ties_the_singles(family_dirs, tmp_path):
    policy = last_block_moved(family_dirs["gpt2"], tmp_path / "policy")
    (tmp_path / "texts.txt").write_text(TEXTS)
    assert main(["patch", "--policy", str(policy), "--reference", str(family_dirs["gpt2"]), "--threads", "1",
                 "--prompts", str(tmp_path / "texts.txt"), "--n-texts", "3", "--max-new-tokens", "3", "--reward", "none",
                 "--direction", "policy_into_reference", "--greedy", "2", "--out", str(tmp_path / "patch")]) == 0
    greedy = json.loads((tmp_path / "patch" / "summary.json").read_text())["greedy"]
    rows = {row["component"]: row for row in greedy["rows"]}
    assert greedy["metric"] == "kl" and len(greedy["order"]) == 2 and all(c.startswith("L1.") for c in greedy["order"])
    # step 1 is the best single; step 2 maximises over every pair that contains it, the singles' top 2 among them
    assert greedy["order"][0] == greedy["singles"][0]
    assert rows["greedy 1"]["kl"] == pytest.approx(rows["singles 1"]["kl"], abs=1e-9)
    assert rows["greedy 2"]["kl"] >= rows["singles 2"]["kl"] - 1e-9 and rows["greedy 2"]["kl"] > rows["greedy 1"]["kl"]
    assert "## Greedy forward selection" in (tmp_path / "patch" / "report.md").read_text()


def test_bad_flags_are_refused_with_one_line(family_dirs, capsys, tmp_path):
    with pytest.raises(SystemExit):  # tyro reports a config's ValueError and exits 2
        main(["patch", "--policy", str(family_dirs["gpt2"]), "--direction", "sideways"])
    assert "reference_into_policy or both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["patch", "--policy", str(family_dirs["gpt2"]), "--greedy", "-1"])
    assert "--greedy must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lens", "--policy", str(family_dirs["gpt2"]), "--alphas", "1,x"])
    assert "give comma-separated numbers" in capsys.readouterr().err
    assert main(["lens", "--policy", str(family_dirs["gpt2"]), "--reference", str(family_dirs["gpt2"]), "--layer", "7",
                 "--reward", "none", "--out", str(tmp_path / "lens")]) == 1
    assert "--layer 7: the model has 2 layers" in capsys.readouterr().err
