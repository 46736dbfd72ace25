"""Data-parallel training (DDP on gloo, 2 CPU processes) computes what one process computes on the same global batch.

Each scenario of ``distributed_worker.py`` runs once on 2 ranks (started as torchrun would start them);
the one-process side is computed here, in the test process, from the same episodes and starting weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXTS
from distributed_worker import (
    build_eos_model,
    dpo_config,
    grpo_config,
    params,
    ppo_config,
    reinforce_config,
    rm_config,
    write_pair_file,
)

from rlhf_scratch.models import PolicyWithValueHead, load_bridge
from rlhf_scratch.objectives import entropy_per_token, generated_logits, masked_mean
from rlhf_scratch.ppo import PPOTrainer
from rlhf_scratch.reinforce import REINFORCETrainer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 150
"""Per scenario; a hang would end here instead of blocking the suite."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenario: str, model_dir: Path, prompts: Path, out: Path) -> list[subprocess.CompletedProcess]:
    """Start ``WORLD`` ranks of a worker scenario with torchrun's environment; wait for all (with a timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "RLHF_SCRATCH_DIST_TIMEOUT": "60"}
    processes = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"), scenario, str(model_dir),
                          str(prompts), str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    results = []
    try:
        for process in processes:
            stdout, _ = process.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


@pytest.fixture(scope="session")
def eos_model(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, prompts file): a tiny random GPT-2 bridge (fused qkv alias included) whose responses end at
    different lengths, and prompts of different lengths."""
    directory = tmp_path_factory.mktemp("eos_model")
    build_eos_model(directory, TINY_TEXTS)
    prompts = directory / "prompts.txt"
    prompts.write_text("\n".join(dict.fromkeys(TINY_TEXTS)) + "\n")
    write_pair_file(directory / "pairs.jsonl", TINY_TEXTS)  # the pairs scenario's
    return directory, prompts


def load_ranks(out: Path, stem: str, results: list[subprocess.CompletedProcess]) -> list[dict]:
    """Every rank's ``{stem}{rank}.pt``; a missing one fails with that rank's output."""
    for r, result in enumerate(results):
        assert (out / f"{stem}{r}.pt").is_file(), f"rank {r} wrote no {stem}{r}.pt:\n{result.stdout[-4000:]}"
    return [torch.load(out / f"{stem}{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="session")
def learn_run(eos_model, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """The "learn" scenario on 2 ranks, once for every test that reads it."""
    out = tmp_path_factory.mktemp("learn")
    results = run_ranks("learn", *eos_model, out)
    for r, result in enumerate(results):
        assert result.returncode == 0, f"rank {r} failed:\n{result.stdout[-4000:]}"
    return out, results


@pytest.fixture(scope="session")
def learned(learn_run):
    return load_ranks(learn_run[0], "rank", learn_run[1])


def one_process_phase(trainer, result: dict, minibatch_size: int, epochs: int) -> tuple[dict, list[dict]]:
    """The one-process learning phase on the ranks' global batch, from the ranks' starting weights and shuffle."""
    trainer.policy.load_state_dict(result["before"])
    memory = result["memory"]
    minibatches = list(memory.minibatches(minibatch_size, epochs, generator=torch.Generator().manual_seed(trainer.config.seed)))
    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}, breakdown


def assert_same_update(result: dict, one_process: dict, lr: float, steps: int) -> float:
    """The ranks' parameter update equals one process's, to 1% of what AdamW can move a weight (lr per step)."""
    worst = max((result["after"][k] - result["before"][k] - (one_process[k] - result["before"][k])).abs().max().item()
                for k in one_process)
    moved = max((one_process[k] - result["before"][k]).abs().max().item() for k in one_process)
    assert moved > 0.5 * lr  # the phase did move the weights
    assert worst <= 0.01 * lr * steps, (worst, lr)
    return worst


def assert_same_breakdown(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])


def test_ppo_phase_on_two_ranks_equals_one_process(learned, eos_model):
    """2 ranks × 4 episodes = 1 process × 8 (the same episodes): the same update and loss breakdown, although
    the ranks hold different numbers of real tokens in each minibatch."""
    rank0, rank1 = learned
    tokens0, tokens1 = rank0["ppo"]["local_tokens"], rank1["ppo"]["local_tokens"]
    assert any(a != b for a, b in zip(tokens0, tokens1)), (tokens0, tokens1)
    # Every rank holds the same global batch after the gather.
    assert torch.equal(rank0["ppo"]["memory"].sequences, rank1["ppo"]["memory"].sequences)
    model_dir, prompts = eos_model
    config = ppo_config(model_dir, prompts)
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    after, breakdown = one_process_phase(trainer, rank0["ppo"], config.minibatch_size, config.ppo_epochs)
    assert_same_update(rank0["ppo"], after, config.lr, config.steps_per_phase)
    assert_same_breakdown(rank0["ppo"]["breakdown"], breakdown)
    assert trainer.learning_metrics(breakdown)["losses/value"] == pytest.approx(
        trainer.learning_metrics(rank0["ppo"]["breakdown"])["losses/value"], rel=1e-5)


def test_lora_ppo_phase_on_two_ranks_equals_one_process(learned, eos_model):
    """LoRA under DDP: the same adapter update as one process on the global batch; DDP reduces only the adapters
    and the value head; the frozen base is untouched on every rank."""
    rank0, rank1 = learned
    model_dir, prompts = eos_model
    config = ppo_config(model_dir, prompts, lora_rank=4, lr=1e-2)
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    after, breakdown = one_process_phase(trainer, rank0["ppo_lora"], config.minibatch_size, config.ppo_epochs)
    assert_same_update(rank0["ppo_lora"], after, config.lr, config.steps_per_phase)
    assert_same_breakdown(rank0["ppo_lora"]["breakdown"], breakdown)
    reduced = rank0["ppo_lora"]["ddp_parameters"]
    assert reduced and all(name.startswith(("lora.", "value_head.")) for name in reduced), reduced
    for result in (rank0, rank1):
        frozen = [k for k in result["ppo_lora"]["before"] if k.startswith("bridge.")]
        assert frozen and all(torch.equal(result["ppo_lora"]["after"][k], result["ppo_lora"]["before"][k]) for k in frozen)
    assert all(torch.equal(rank0["ppo_lora"]["after"][k], rank1["ppo_lora"]["after"][k]) for k in rank0["ppo_lora"]["after"])


def test_weights_stay_bit_identical_across_ranks(learned):
    rank0, rank1 = learned
    for key in rank0["ppo_after_3"]:
        assert torch.equal(rank0["ppo_after_3"][key], rank1["ppo_after_3"][key]), key
    assert rank0["ppo"]["breakdown"] == rank1["ppo"]["breakdown"]


def test_rollout_metrics_are_those_of_the_global_batch(learned, eos_model):
    """What the ranks log for the rollout is what one process computes on the 8 episodes."""
    stats, memory = learned[0]["ppo"]["rollout_stats"], learned[0]["ppo"]["memory"]
    assert learned[1]["ppo"]["rollout_stats"]["reward/mean"] == stats["reward/mean"]
    assert stats["reward/mean"] == pytest.approx(memory.rewards.mean().item(), abs=1e-7)
    assert stats["reward/std"] == pytest.approx(memory.rewards.std().item(), abs=1e-7)
    assert stats["objective/kl"] == pytest.approx(memory.sequence_kl.mean().item(), abs=1e-7)
    assert stats["response/length"] == pytest.approx(memory.gen_mask.sum(1).float().mean().item())
    # The entropy, recomputed by one process from the global batch's tokens and the starting weights.
    policy = PolicyWithValueHead(load_bridge(eos_model[0]))
    policy.load_state_dict(learned[0]["ppo"]["before"])
    with torch.no_grad():
        logits = policy(memory.sequences, memory.attention_mask).logits
    entropy = masked_mean(entropy_per_token(generated_logits(logits, memory.prompt_len)), memory.gen_mask).item()
    assert stats["objective/entropy"] == pytest.approx(entropy, rel=1e-5)


def test_ranks_sample_different_episodes(learned):
    texts = learned[0]["ppo"]["texts"]
    half = len(texts) // WORLD
    assert texts[:half] != texts[half:]  # rank 0's rows, then rank 1's
    assert learned[1]["ppo"]["texts"] == texts


def test_gradient_accumulation_on_two_ranks_equals_one_big_minibatch(learned, eos_model):
    model_dir, prompts = eos_model
    config = ppo_config(model_dir, prompts)  # one process, no accumulation
    trainer = PPOTrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    after, breakdown = one_process_phase(trainer, learned[0]["ppo_accum"], config.minibatch_size, config.ppo_epochs)
    assert_same_update(learned[0]["ppo_accum"], after, config.lr, config.steps_per_phase)
    assert_same_breakdown(learned[0]["ppo_accum"]["breakdown"], breakdown)


def test_reinforce_phase_on_two_ranks_equals_one_process(learned, eos_model):
    model_dir, prompts = eos_model
    config = reinforce_config(model_dir, prompts)
    trainer = REINFORCETrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    result = learned[0]["reinforce"]
    after, breakdown = one_process_phase(trainer, result, config.minibatch_size, 1)
    trunk = {k: v for k, v in after.items() if k.startswith("bridge.")}  # REINFORCE trains no value head
    assert_same_update(result, trunk, config.lr, 1)
    assert_same_breakdown(result["breakdown"], breakdown)


def test_grpo_phase_on_two_ranks_equals_one_process(learned, eos_model):
    """Groups never span ranks; GRPO's response-mean losses give each rank its share of rows."""
    from rlhf_scratch.group_baselines import GRPOTrainer

    rank0, rank1 = learned
    prompts = rank0["grpo"]["memory"].sequences[:, : rank0["grpo"]["memory"].prompt_len]
    assert all(torch.equal(prompts[i], prompts[i + 1]) for i in range(0, 8, 2))  # contiguous groups of 2
    model_dir, prompts_file = eos_model
    config = grpo_config(model_dir, prompts_file)
    trainer = GRPOTrainer(config, policy=PolicyWithValueHead(load_bridge(model_dir)))
    after, breakdown = one_process_phase(trainer, rank0["grpo"], config.minibatch_size, config.epochs)
    assert_same_update(rank0["grpo"], after, config.lr, config.epochs * config.batch_size // config.minibatch_size)
    assert_same_breakdown(rank0["grpo"]["breakdown"], breakdown)


def test_ddp_reduces_exactly_the_optimised_parameters(learned, eos_model):
    """The GPT-2 bridge's fused qkv alias (no gradient) is left out of DDP, as it is out of the optimiser."""
    names = learned[0]["ddp_parameters"]
    assert not [n for n in names if ".qkv." in n]
    trainer = PPOTrainer(ppo_config(*eos_model), policy=PolicyWithValueHead(load_bridge(eos_model[0])))
    assert len(names) == sum(len(group["params"]) for group in trainer.optimizer.param_groups)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_on_two_ranks_continues_exactly_and_refuses_one(eos_model, learn_run):
    out = learn_run[0]
    rank0, rank1 = load_ranks(out, "resume", learn_run[1])
    full, resumed = read_metrics(out / "full"), read_metrics(out / "stopped")
    assert [row["phase"] for row in resumed] == [1, 2]
    for a, b in zip(resumed, full):
        for key in b:
            if not key.startswith("time/") and key != "seconds":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (b["phase"], key)
    for key in rank0["full"]:
        assert torch.equal(rank0["resumed"][key], rank0["full"][key]), key
        assert torch.equal(rank1["resumed"][key], rank0["resumed"][key]), key
    with pytest.raises(ValueError, match="2 process"):
        PPOTrainer.resume(ppo_config(*eos_model, resume=out / "stopped", phases=2), reference=load_bridge(eos_model[0]))


def test_a_failure_on_one_rank_ends_every_rank_naming_it(eos_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fail")
    results = run_ranks("fail", *eos_model, out)  # returns within the timeout: nothing hangs
    messages = load_ranks(out, "rank", results)
    for rank_messages in messages:
        assert "rank 1 of 2 failed in phase 1, rollout" in rank_messages["reward"]
        assert "RewardError" in rank_messages["reward"] and "nan-on-one-rank" in rank_messages["reward"]
        assert "rank 1 of 2 failed in phase 1, minibatch 0" in rank_messages["loss"]
        assert "NonFiniteLossError" in rank_messages["loss"]
    # Rank 1 then exits abruptly; rank 0, waiting for it in a collective, fails instead of hanging.
    assert results[1].returncode == 3
    assert results[0].returncode != 0


def test_dpo_and_reward_model_on_two_ranks_equal_one_process(eos_model, learn_run):
    """2 ranks × 2 pairs per step = 1 process × 4 pairs per step: the same weights after 8 steps and the same
    logged step metrics (DPO), the same weights and epoch losses (reward model, margin loss)."""
    from rlhf_scratch.dpo_trainer import DPOTrainer
    from rlhf_scratch.reward_model_training import fit_reward_model

    rank0, rank1 = load_ranks(learn_run[0], "pairs", learn_run[1])
    model_dir, pairs = eos_model[0], eos_model[0] / "pairs.jsonl"
    start = params(load_bridge(model_dir))
    trainer = DPOTrainer(dpo_config(model_dir, pairs), bridge=load_bridge(model_dir))
    trainer.train()
    lr = trainer.config.lr
    one = params(trainer.bridge)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.5 * lr
    assert max((rank0["dpo"][k] - one[k]).abs().max().item() for k in one) <= 0.01 * lr * trainer.step
    for key in one:
        assert torch.equal(rank0["dpo"][key], rank1["dpo"][key]), key
    for got, expected in zip(rank0["dpo_history"], trainer.history, strict=True):
        for key, value in expected.items():
            assert got[key] == (pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value), key

    model, _ = fit_reward_model(rm_config(model_dir, pairs))
    rm = params(model)
    assert max((rank0["rm"][k] - rm[k]).abs().max().item() for k in rm) <= 0.01 * 1e-3 * 8
    for got, expected in zip(rank0["rm_history"], model.history, strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["train_accuracy_running"] == expected["train_accuracy_running"]


def test_torchrun_command_writes_one_run_and_refuses_resume_on_one_process(eos_model, tmp_path):
    """The documented command form, end to end: torchrun ... -m rlhf_scratch ppo; rank 0 alone writes the run."""
    model_dir, prompts = eos_model
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = ["--model", str(model_dir), "--data", str(prompts), "--reward", "chars:e", "--phases", "2", "--warmup-phases", "0", "--batch-size", "8",
             "--minibatch-size", "4", "--max-new-tokens", "6", "--table-rows", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                           "--master-port", str(free_port()), "-m", "rlhf_scratch", "ppo", *flags],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [row["phase"] for row in read_metrics(out)] == [1, 2]
    assert (out / "checkpoint" / "resume_state.json").is_file() and (out / "summary.json").is_file()
    assert done.stdout.count("outputs in") == 1  # rank 0 alone prints
    state = json.loads((out / "checkpoint" / "resume_state.json").read_text())
    assert state["rng"]["world_size"] == WORLD and len(state["rng"]["ranks"]) == WORLD
    again = subprocess.run([sys.executable, "-m", "rlhf_scratch", "ppo", "--resume", str(out)],
                           env={k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK")},
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 1
    assert "written by a run on 2 process(es) and this one has 1" in again.stderr


def test_concat_rollouts_repads_prompts_left_and_responses_right():
    """Rank batches with different prompt (P) and generated (G) lengths join into one batch of max P, max G."""
    from rlhf_scratch.rollout import concat_rollouts

    def piece(P, G, token):
        rows = 2
        return {"prompt_len": P, "sequences": torch.full((rows, P + G), token), "attention_mask": torch.ones(rows, P + G, dtype=torch.long),
                "gen_mask": torch.ones(rows, G, dtype=torch.bool), "logprobs": torch.full((rows, G), -1.0),
                "rewards": torch.full((rows,), float(token)), "ref_logits_gen": None, "texts": [f"{token}"] * rows}

    joined = concat_rollouts([piece(2, 3, 7), piece(4, 1, 9)], pad_id=0)
    assert joined["prompt_len"] == 4 and joined["sequences"].shape == (4, 7)
    assert joined["sequences"][0].tolist() == [0, 0, 7, 7, 7, 7, 7]  # 2 prompt tokens left-padded to 4, G 3
    assert joined["sequences"][2].tolist() == [9, 9, 9, 9, 9, 0, 0]  # G 1 right-padded to 3
    assert joined["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert joined["gen_mask"][2].tolist() == [True, False, False]
    assert joined["logprobs"][2].tolist() == [-1.0, 0.0, 0.0]
    assert joined["rewards"].tolist() == [7.0, 7.0, 9.0, 9.0] and joined["texts"] == ["7", "7", "9", "9"]
    assert joined["ref_logits_gen"] is None


SIGTERM_ON_RANK_1 = '''
import os
import signal


def terminated_on_rank_1(texts, prompts=None):
    terminated_on_rank_1.calls = getattr(terminated_on_rank_1, "calls", 0) + 1
    if os.environ["RANK"] == "1" and terminated_on_rank_1.calls == 2 and not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").close()
        os.kill(os.getpid(), signal.SIGTERM)  # rank 1 alone, while it scores phase 2
    return [float(text.count("e")) for text in texts]
'''


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_phase_with_a_checkpoint(eos_model, tmp_path):
    """A scheduler's SIGTERM (here to rank 1 only) is the first Ctrl-C on every rank: both finish phase 2, the
    checkpoint holds both ranks' random streams, both exit 143, rank 0 prints the torchrun --resume command, and
    the resumed 2-rank run completes."""
    model_dir, prompts = eos_model
    rewards = tmp_path / "rank_rewards.py"
    rewards.write_text(SIGTERM_ON_RANK_1)
    out = tmp_path / "run"
    flags = ["ppo", "--model", str(model_dir), "--data", str(prompts), "--reward", f"py:{rewards}:terminated_on_rank_1",
             "--phases", "4", "--warmup-phases", "0", "--batch-size", "8", "--minibatch-size", "4", "--max-new-tokens",
             "6", "--table-rows", "2", "--out", str(out)]

    def ranks(args):
        env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RLHF_SCRATCH_DIST_TIMEOUT": "60",
               "MARKER": str(tmp_path / "terminated")}
        processes = [subprocess.Popen([sys.executable, "-m", "rlhf_scratch", *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
        try:
            return [(p.wait(timeout=TIMEOUT_S), p.stdout.read()) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()

    stopped = ranks(flags)
    assert [code for code, _ in stopped] == [143, 143], [text[-3000:] for _, text in stopped]
    assert f"Stopped by SIGTERM after phase 2 of 4; checkpoint saved in {out / 'checkpoint'}" in stopped[0][1]
    assert f"-m rlhf_scratch ppo --resume {out}" in stopped[0][1] and "Traceback" not in stopped[0][1] + stopped[1][1]
    state = json.loads((out / "checkpoint" / "resume_state.json").read_text())
    assert state["phase"] == 2 and len(state["rng"]["ranks"]) == WORLD
    resumed = ranks(["ppo", "--resume", str(out)])
    assert [code for code, _ in resumed] == [0, 0], [text[-3000:] for _, text in resumed]
    assert [row["phase"] for row in read_metrics(out)] == [1, 2, 3, 4]
