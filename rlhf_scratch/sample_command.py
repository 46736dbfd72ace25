"""``rlhf-scratch sample``: print samples from a model, optionally scored by a reward (config: ``command_configs.SampleConfig``)."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from rlhf_scratch.command_configs import SampleConfig
from rlhf_scratch.data import fixed_prefix_prompts, load_texts, prompts_from_texts
from rlhf_scratch.models import load_bridge
from rlhf_scratch.outputs import append_jsonl, write_json
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import encode, generate


def run_sample(config: SampleConfig) -> list[dict]:


    console = Console()
    torch.manual_seed(config.seed)
    bridge = load_bridge(config.model)
    reward = make_reward(config.reward) if config.reward else None

    def encode_text(text: str) -> list[int]:
        return encode(bridge.tokenizer, text, prepend_bos=config.prepend_bos)

    if config.data is not None:
        prompts = prompts_from_texts(load_texts(config.data, column=config.column), encode_text, config.n, seed=config.seed,
                                     decode=bridge.tokenizer.decode)
    elif config.prompt:
        prompts = fixed_prefix_prompts(config.prompt, encode_text, config.n)
    else:
        prompts = [encode(bridge.tokenizer, "", prepend_bos=True)] * config.n
    generation = generate(bridge, prompts, config.sampling, generator=torch.Generator().manual_seed(config.seed))
    scores = score_texts(reward, generation.texts, generation.prompts).tolist() if reward else [None] * config.n
    rows = [
        {"prompt": p, "response": r, "reward": s}
        for p, r, s in zip(generation.prompts, generation.responses, scores)
    ]
    table = Table(title=f"{config.n} samples from {config.model}", show_lines=True)
    table.add_column("prompt", style="cyan")
    table.add_column("response")
    if reward:
        table.add_column(reward.name, justify="right")
    for row in rows:
        table.add_row(row["prompt"], row["response"], *([f"{row['reward']:.3f}"] if reward else []))
    console.print(table)
    if config.out is not None:
        write_json(config.out / "config.json", config)
        for row in rows:
            append_jsonl(config.out / "samples.jsonl", row)
        summary = {"n": config.n, "mean_response_tokens": generation.gen_mask.sum(1).float().mean().item()}
        if reward:
            summary["reward_mean"] = sum(scores) / len(scores)
        write_json(config.out / "summary.json", summary)
    return rows
