"""One rank of the data-parallel tests (``tests/test_distributed.py`` starts W of these as torchrun would:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python tests/distributed_worker.py SCENARIO MODEL_DIR PROMPTS_FILE OUT_DIR

Each scenario writes what the test compares into OUT_DIR (``rank{r}.pt`` per rank, plus whatever rank 0
writes); the test computes the one-process side itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from rlhf_scratch import distributed  # noqa: E402
from rlhf_scratch.models import PolicyWithValueHead, load_bridge  # noqa: E402
from rlhf_scratch.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlhf_scratch.reinforce import REINFORCEConfig, REINFORCETrainer  # noqa: E402
from rlhf_scratch.sampling import SamplingConfig  # noqa: E402

PPO_FIELDS = dict(reward="chars:e", batch_size=8, minibatch_size=4, ppo_epochs=2, warmup_phases=0, lr=1e-3, head_lr=1e-2,
                  normalize_rewards=True, adaptive_kl=True, kl_horizon=100, sampling=SamplingConfig(max_new_tokens=8),
                  table_rows=2, phases=3, debug=True, debug_max_approx_kl=100.0)
REINFORCE_FIELDS = dict(reward="chars:e", batch_size=8, minibatch_size=8, warmup_phases=0, lr=1e-3, kl_coef=0.1,
                        sampling=SamplingConfig(max_new_tokens=8), table_rows=2, phases=3)


GRPO_FIELDS = dict(reward="chars:e", batch_size=8, group_size=2, minibatch_size=4, epochs=2, warmup_phases=0, lr=1e-3,
                   sampling=SamplingConfig(max_new_tokens=8), table_rows=2, phases=3, debug=True, debug_max_approx_kl=100.0)


def grpo_config(model_dir, prompts, **overrides):
    from rlhf_scratch.group_baselines import GRPOConfig

    return GRPOConfig(model=str(model_dir), data=str(prompts), **{**GRPO_FIELDS, **overrides})


def ppo_config(model_dir, prompts, **overrides) -> PPOConfig:
    return PPOConfig(model=str(model_dir), data=str(prompts), **{**PPO_FIELDS, **overrides})


def reinforce_config(model_dir, prompts, **overrides) -> REINFORCEConfig:
    return REINFORCEConfig(model=str(model_dir), data=str(prompts), **{**REINFORCE_FIELDS, **overrides})


def build_eos_model(directory: Path, texts: list[str]) -> Path:
    """A random 2-layer GPT-2 (as ``conftest.tiny_model_dir``) that ends many responses early: the final
    LayerNorm's bias points along the EOS embedding, so responses have different lengths and ranks hold
    different numbers of real tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_scratch.pretrain import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=320, directory=directory)
    eos = tokenizer.bos_token_id
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[eos] = 2.5 * direction
    model.save_pretrained(directory)
    return directory


def params(module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def one_phase(trainer, rank: int) -> dict:
    """Sample (each rank its own episodes), gather, learn once: what the test compares with one process."""
    before = params(trainer.policy)
    rollout = trainer.sample_and_score()
    memory, memory_stats = trainer.build_memory(rollout)
    minibatches = list(trainer.minibatches(memory))
    breakdown = trainer.learning_phase(memory, minibatches=minibatches)
    return {"before": before, "after": params(trainer.policy), "rollout_stats": rollout.stats, "memory": memory,
            "memory_stats": memory_stats, "breakdown": breakdown, "texts": rollout.generation.texts,
            "local_tokens": [int(mb.gen_mask.sum()) for mb in minibatches]}


def scenario_learn(model_dir, prompts, out: Path, rank: int) -> None:
    """PPO (with and without gradient accumulation), REINFORCE and GRPO: one phase each from the same start;
    then 2 more PPO phases (parameters must stay bit-identical across ranks). Then resume, DPO and the
    reward model (one launch: starting processes is the slow part)."""
    bridge = load_bridge(model_dir)
    result = {}
    ppo = PPOTrainer(ppo_config(model_dir, prompts), policy=PolicyWithValueHead(bridge), reference=bridge)
    result["ppo"] = one_phase(ppo, rank)
    ppo.run_phase()
    ppo.run_phase()
    result["ppo_after_3"] = params(ppo.policy)
    fresh = load_bridge(model_dir)
    accum = PPOTrainer(ppo_config(model_dir, prompts, grad_accum_steps=2), policy=PolicyWithValueHead(fresh), reference=fresh)
    result["ppo_accum"] = one_phase(accum, rank)
    fresh = load_bridge(model_dir)
    reinforce = REINFORCETrainer(reinforce_config(model_dir, prompts), policy=PolicyWithValueHead(fresh), reference=fresh)
    result["reinforce"] = one_phase(reinforce, rank)
    from rlhf_scratch.group_baselines import GRPOTrainer

    fresh = load_bridge(model_dir)  # groups of 2 per rank; response-mean loss shares
    result["grpo"] = one_phase(GRPOTrainer(grpo_config(model_dir, prompts), policy=PolicyWithValueHead(fresh), reference=fresh),
                               rank)
    result["ddp_parameters"] = [name for name, _ in ppo.learner.module.module.named_parameters()
                                if name not in ppo.learner.module.parameters_to_ignore]
    fresh = load_bridge(model_dir)  # LoRA: DDP over the adapters and the value head only; the reference is the base
    lora = PPOTrainer(ppo_config(model_dir, prompts, lora_rank=4, lr=1e-2), policy=PolicyWithValueHead(fresh), reference=fresh)
    result["ppo_lora"] = one_phase(lora, rank)
    result["ppo_lora"]["ddp_parameters"] = [name for name, _ in lora.learner.module.module.named_parameters()
                                            if name not in lora.learner.module.parameters_to_ignore]
    torch.save(result, out / f"rank{rank}.pt")
    scenario_resume(model_dir, prompts, out, rank)
    scenario_pairs(model_dir, prompts, out, rank)


def scenario_resume(model_dir, prompts, out: Path, rank: int) -> None:
    """An uninterrupted 2-phase run, and one stopped after phase 1 and resumed from its checkpoint."""
    torch.manual_seed(0)  # the same new value head in both runs
    bridge = load_bridge(model_dir)
    full = PPOTrainer(ppo_config(model_dir, prompts, out=out / "full", phases=2), policy=PolicyWithValueHead(bridge),
                      reference=bridge)
    full.train()
    torch.manual_seed(0)
    fresh = load_bridge(model_dir)
    first = PPOTrainer(ppo_config(model_dir, prompts, out=out / "stopped", phases=2), policy=PolicyWithValueHead(fresh),
                       reference=fresh)
    first.train(stop_after=1)
    resumed = PPOTrainer.resume(ppo_config(model_dir, prompts, resume=out / "stopped", phases=2),
                                reference=load_bridge(model_dir))
    resumed.train()
    torch.save({"full": params(full.policy), "resumed": params(resumed.policy)}, out / f"resume{rank}.pt")


class FailingReward:
    """chars:e on every rank but ``failing_rank``, where it returns NaN."""

    name = "nan-on-one-rank"

    def __init__(self, failing_rank: int):
        self.failing_rank = failing_rank

    def __call__(self, texts):
        value = float("nan") if distributed.rank() == self.failing_rank else 1.0
        return torch.full((len(texts),), value)


def scenario_fail(model_dir, prompts, out: Path, rank: int) -> None:
    """A NaN reward on rank 1 in the rollout, then a non-finite loss on rank 1 in the learning phase: every
    rank must raise RankFailedError naming rank 1 (and nothing may hang)."""
    bridge = load_bridge(model_dir)
    messages = {}
    trainer = PPOTrainer(ppo_config(model_dir, prompts, debug=False), policy=PolicyWithValueHead(bridge), reference=bridge,
                         reward=FailingReward(failing_rank=1))
    try:
        trainer.sample_and_score()
    except distributed.RankFailedError as error:
        messages["reward"] = str(error)
    fresh = load_bridge(model_dir)
    trainer = PPOTrainer(ppo_config(model_dir, prompts, debug=False), policy=PolicyWithValueHead(fresh), reference=fresh)
    memory, _ = trainer.build_memory(trainer.sample_and_score())
    if rank == 1:
        memory.returns[memory.gen_mask] = float("inf")
    try:
        trainer.learning_phase(memory)
    except distributed.RankFailedError as error:
        messages["loss"] = str(error)
    torch.save(messages, out / f"rank{rank}.pt")
    if rank == 1:
        os._exit(3)  # a killed rank: the others must not wait for it
    trainer.sample_and_score()  # rank 0 now waits for rank 1 in vain: gloo must fail, not hang


def write_pair_file(path: Path, texts: list[str]) -> Path:
    """16 preference pairs with distinct prompts, from the test texts."""
    from rlhf_scratch.preferences import PreferencePair, write_pairs

    texts = list(dict.fromkeys(texts))
    pairs = [PreferencePair(f"Review {i}:", " " + texts[i % len(texts)], " " + texts[(i + 2) % len(texts)],
                            margin=float(i % 3)) for i in range(16)]
    return write_pairs(path, pairs)


def dpo_config(model_dir, pairs):
    from rlhf_scratch.dpo_trainer import DPOConfig

    return DPOConfig(model=str(model_dir), pairs=pairs, reward=None, epochs=2, batch_size=4, lr=1e-3, warmup_steps=1,
                     heldout_fraction=0.0)


def rm_config(model_dir, pairs):
    from rlhf_scratch.reward_model_training import RewardModelConfig

    return RewardModelConfig(pairs=pairs, model=str(model_dir), loss="margin", epochs=2, batch_size=4, lr=1e-3,
                             heldout_fraction=0.0, out=None)


def scenario_pairs(model_dir, prompts, out: Path, rank: int) -> None:
    """DPO and a reward model trained on 2 ranks (the test trains them in one process)."""
    from rlhf_scratch.dpo_trainer import DPOTrainer
    from rlhf_scratch.reward_model_training import fit_reward_model

    pairs = Path(prompts).with_name("pairs.jsonl")  # the test wrote it
    trainer = DPOTrainer(dpo_config(model_dir, pairs), bridge=load_bridge(model_dir))
    trainer.train()
    model, _ = fit_reward_model(rm_config(model_dir, pairs))
    torch.save({"dpo": params(trainer.bridge), "dpo_history": trainer.history, "rm": params(model),
                "rm_history": model.history}, out / f"pairs{rank}.pt")


SCENARIOS = {"learn": scenario_learn, "fail": scenario_fail}


def main() -> None:
    torch.set_num_threads(1)
    name, model_dir, prompts, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    distributed.init_from_env()
    try:
        SCENARIOS[name](model_dir, prompts, out, distributed.rank())
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
