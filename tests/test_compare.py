"""`compare` and `bon`: system syntax, the report files, summary.json rows, and the CLI."""

import csv
import json

import pytest
import torch

from rlhf_scratch.bon import best_of_n_kl_bound
from rlhf_scratch.cli import main
from rlhf_scratch.compare import BonConfig, CompareConfig, SystemSpec, parse_system, run_bon, run_compare
from rlhf_scratch.models import make_reference, save_model_dir
from rlhf_scratch.sampling import SamplingConfig

TABLE_KEYS = {"system", "reward_mean", "reward_median", "kl", "token_entropy", "distinct_2", "length"}


def test_parse_system(tmp_path):
    assert parse_system("reference") == SystemSpec("reference", "reference")
    assert parse_system("bon:4") == SystemSpec("best-of-4", "bon", n=4)
    assert parse_system("bon:16:64") == SystemSpec("best-of-16", "bon", n=16, pool_size=64)
    run = tmp_path / "ppo_run" / "checkpoint"
    run.mkdir(parents=True)
    assert parse_system(f"ppo:{run}") == SystemSpec("ppo", "ppo", path=str(run))
    assert parse_system(f"model:{run}").label == "ppo_run"  # a run's checkpoint is named after its run
    assert parse_system(f"late=reinforce:{run}") == SystemSpec("late", "reinforce", path=str(run))
    assert parse_system(f"dpo:{run}") == SystemSpec("dpo", "dpo", path=str(run))
    for bad, message in [("bon:x", "integers"), ("bon:4:2", "POOL >= N"), ("ppo", "needs a directory"),
                         ("ppo:/no/such/dir", "no such directory"), ("sft:x", "Unknown system"),
                         ("reference:x", "takes no argument")]:
        with pytest.raises(ValueError, match=message):
            parse_system(bad)


def test_duplicate_names_need_labels():
    with pytest.raises(ValueError, match="LABEL="):
        CompareConfig(systems=["bon:4", "bon:4:32"])
    assert CompareConfig(systems=["bon:4", "big=bon:4:32"]).systems[1] == "big=bon:4:32"


@pytest.fixture()
def perturbed_checkpoint(tiny_bridge, tmp_path):
    other = make_reference(tiny_bridge)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    return save_model_dir(other, tmp_path / "trained" / "checkpoint")


def small(config_class, tiny_model_dir, out, **overrides):
    return config_class(model=str(tiny_model_dir), reward="vader", prompt="The movie", n_prompts=6, table_rows=2,
                        sampling=SamplingConfig(max_new_tokens=6), batch_size=24, out=out, **overrides)


def test_compare_writes_the_report(tiny_model_dir, perturbed_checkpoint, tmp_path):
    out = tmp_path / "cmp"
    config = small(CompareConfig, tiny_model_dir, out, systems=["reference", f"ppo:{perturbed_checkpoint}", "bon:2"])
    result = run_compare(config)
    for name in ("config.json", "report.md", "report.csv", "reward_vs_kl.png", "reward_vs_diversity.png",
                 "samples.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [row["system"] for row in rows] == ["reference", "ppo", "best-of-2"] == [r["system"] for r in result["rows"]]
    assert all(TABLE_KEYS <= set(row) for row in rows)
    reference, trained, bon = rows
    assert reference["kl"] == 0.0 and trained["kl"] != 0.0
    assert 0.0 <= bon["kl"] <= bon["kl_bound"] == pytest.approx(best_of_n_kl_bound(2))
    with (out / "report.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["system"] for r in csv_rows] == ["reference", "ppo", "best-of-2"]
    assert float(csv_rows[2]["reward_mean"]) == pytest.approx(bon["reward_mean"])
    report = (out / "report.md").read_text()
    assert "| system | reward mean | reward median | KL (nats) | token entropy | distinct-2 | length |" in report
    assert "## Samples" in report and "best-of-2" in report
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 6


def test_bon_command_summary(tiny_model_dir, tmp_path):
    out = tmp_path / "bon"
    summary = run_bon(small(BonConfig, tiny_model_dir, out, n=3))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["kl_bound"] == pytest.approx(best_of_n_kl_bound(3)) == summary["kl_bound"]
    assert [row["system"] for row in saved["rows"]] == ["reference", "best-of-3"]
    assert saved["reward_gain"] == pytest.approx(saved["rows"][1]["reward_mean"] - saved["rows"][0]["reward_mean"])
    assert saved["reward_gain"] >= 0  # same prompts; best of 3 never loses on average here (vader ties at 0)
    assert (out / "config.json").is_file() and (out / "report.md").is_file()


def test_cli_commands(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--prompt", "The movie", "--n-prompts", "3", "--max-new-tokens", "4",
              "--table-rows", "1"]
    assert main(["compare", "--out", str(tmp_path / "c"), *common, "--systems", "reference", "bon:2"]) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["rows"][1]["system"] == "best-of-2"
    # Invalid configurations stop with exit status 2 and the validation message (tyro prints it).
    for argv, message in [(["compare", *common, "--systems", "reference", "bon:two"], "bon:N"),
                          (["bon", "--n", "0", *common], "n must be >= 1"),
                          (["reinforce", "--minibatch-size", "3"], "must divide batch_size")]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert message in " ".join(capsys.readouterr().err.split())


def test_a_checkpoint_named_with_the_wrong_kind_is_refused(tiny_bridge, tiny_model_dir, tmp_path):
    """A REINFORCE checkpoint passed as ppo:DIR would be reported as PPO."""
    checkpoint = save_model_dir(make_reference(tiny_bridge), tmp_path / "rf" / "checkpoint", meta={"kind": "reinforce"})
    config = small(CompareConfig, tiny_model_dir, tmp_path / "cmp", systems=["reference", f"ppo:{checkpoint}"])
    with pytest.raises(ValueError, match=r"is a reinforce checkpoint .* name it reinforce:"):
        run_compare(config)
