"""The benchmarked models and the engine's timed phases, shared by ``ppo_throughput.py``, ``ddp_scaling.py`` and
``trl_side_by_side.py``: ``ModelSpec`` (an architecture with random weights and a PPO phase shape), ``default_specs``
(the built-in tiny model's shape and GPT-2 small's), ``build_model_dir`` (a local model directory, no download) and
``bench_engine`` (the real ``PPOTrainer`` for warmup + timed phases, each split into its parts) and ``bench_raw``
(the plain Hugging Face module of any family on the same work)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import bench_common  # noqa: F401 (the offline environment and this checkout on sys.path, before rlhf_scratch)
from bench_common import mean, sync, timed

import torch  # noqa: E402 (after bench_common: the offline environment is set first)


GPT2_SMALL_VOCAB = 50257


@dataclass
class ModelSpec:
    """One benchmarked model: architecture (random weights) and PPO phase shape."""

    name: str
    n_layer: int
    n_head: int
    d_model: int
    n_ctx: int
    vocab: int  # 0: the tokenizer's size
    batch_size: int
    minibatch_size: int
    ppo_epochs: int
    new_tokens: int
    phases: int


def default_specs() -> dict[str, ModelSpec]:
    from rlhf_scratch.pretrain import PretrainConfig

    tiny = PretrainConfig()  # the built-in model's architecture
    return {
        "tiny": ModelSpec("tiny", tiny.n_layer, tiny.n_head, tiny.d_model, tiny.n_ctx, tiny.vocab_size,
                          batch_size=64, minibatch_size=16, ppo_epochs=4, new_tokens=24, phases=3),
        "gpt2": ModelSpec("gpt2", 12, 12, 768, 1024, GPT2_SMALL_VOCAB,
                          batch_size=16, minibatch_size=8, ppo_epochs=1, new_tokens=24, phases=3),
    }


def build_model_dir(spec: ModelSpec, directory: Path, texts: list[str], tokenizer_vocab: int, seed: int) -> dict:
    """A random GPT-2 of ``spec``'s shape with a BPE tokenizer, in save_pretrained layout.

    If the model's vocabulary is larger than the trained tokenizer's, dummy tokens
    ``<xN>`` are added to the tokenizer up to the model's size, so every id the random
    model samples decodes to some text (and the unembedding keeps its full cost).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_scratch.pretrain import train_tokenizer

    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, tokenizer_vocab, directory)
    bpe_size = len(tokenizer)
    vocab = spec.vocab or bpe_size
    if vocab > bpe_size:
        tokenizer.add_tokens([f"<x{i}>" for i in range(bpe_size, vocab)])
        tokenizer.save_pretrained(directory)
    special = tokenizer.bos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=spec.n_ctx, n_embd=spec.d_model, n_layer=spec.n_layer, n_head=spec.n_head,
        bos_token_id=special, eos_token_id=special, pad_token_id=special,
    )
    model = GPT2LMHeadModel(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    gc.collect()
    return {"vocab": vocab, "bpe_tokens": bpe_size, "dummy_tokens": max(0, vocab - bpe_size),
            "parameters": n_params, "build_seconds": time.perf_counter() - start}


def bench_engine(spec: ModelSpec, model_dir: Path, args) -> tuple[dict, dict]:
    """Mean per-phase timings of the real PPOTrainer; also returns the last batch for the raw baselines."""
    from rlhf_scratch.models import PolicyWithValueHead, load_bridge
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer
    from rlhf_scratch.rewards import make_reward, score_texts
    from rlhf_scratch.sampling import SamplingConfig

    start = time.perf_counter()
    bridge = load_bridge(model_dir, device=args.device)
    policy = PolicyWithValueHead(bridge)
    config = PPOConfig(
        model=str(model_dir), reward="chars:.", prompt=args.prompt,
        phases=args.warmup + spec.phases, warmup_phases=0,
        batch_size=spec.batch_size, minibatch_size=spec.minibatch_size, ppo_epochs=spec.ppo_epochs,
        sampling=SamplingConfig(max_new_tokens=spec.new_tokens, stop_at_eos=False),
        seed=args.seed, device=args.device,
    )
    trainer = PPOTrainer(config, policy=policy, reward=make_reward("chars:."))
    setup_seconds = time.perf_counter() - start
    vader = make_reward("vader") if args.vader else None

    rows = []
    for index in range(args.warmup + spec.phases):
        sync(args.device)
        t0 = time.perf_counter()
        try:
            rollout = trainer.sample_and_score()
            memory, _ = trainer.build_memory(rollout)
        except RuntimeError as error:
            if "generator" in str(error) and args.device != "cpu":
                raise RuntimeError(
                    f"The engine failed on {args.device}: {error}. PPOTrainer samples with a CPU torch.Generator; "
                    "sampling on an accelerator needs a generator on that device."
                ) from error
            raise
        sync(args.device)
        t1 = time.perf_counter()
        trainer.learning_phase(memory)
        sync(args.device)
        t2 = time.perf_counter()
        stats = rollout.stats
        row = {
            "generate": stats["time/generate"],
            "policy_forward": stats["time/policy_forward"],
            "reference_forward": stats["time/reference_forward"],
            "reward": stats["time/reward"],
            "learning": t2 - t1,
            "rollout": t1 - t0,
            "phase": t2 - t0,
        }
        row["other_rollout"] = row["rollout"] - sum(row[k] for k in ("generate", "policy_forward", "reference_forward", "reward"))
        if vader is not None:
            tv = time.perf_counter()
            score_texts(vader, rollout.generation.texts)
            row["vader"] = time.perf_counter() - tv
        if stats["response/length"] != spec.new_tokens:
            raise RuntimeError(f"expected {spec.new_tokens} tokens per response, got {stats['response/length']}")
        if index >= args.warmup:
            rows.append(row)
        if args.verbose:
            tag = "warmup" if index < args.warmup else "timed"
            print(f"  [{spec.name}] engine phase {index + 1}/{args.warmup + spec.phases} ({tag}): "
                  + ", ".join(f"{k} {v:.3f}s" for k, v in row.items()), flush=True)

    result = {key: mean([r[key] for r in rows]) for key in rows[0]}
    result["setup_seconds"] = setup_seconds
    result["phases_timed"] = len(rows)
    result["phase_min"] = min(r["phase"] for r in rows)
    result["phase_max"] = max(r["phase"] for r in rows)
    result["per_phase"] = rows
    # Since issue 24 the old policy's log-probs and values come from the decoding steps when exact: no second forward.
    result["old_policy_from_generation"] = bool(getattr(trainer.rollout, "reads_from_generation", lambda: False)())
    keep = {
        "prompt_ids": list(trainer.prompt_pool[0]),
        # On the CPU: this dict may travel back from a child process.
        "sequences": memory.sequences.detach().cpu().clone(),
        "attention_mask": memory.attention_mask.detach().cpu().clone(),
        "gen_mask": memory.gen_mask.detach().cpu().clone(),
        "prompt_len": memory.prompt_len,
        "trunk_parameters": sum(p.numel() for p in trainer.policy.trunk_parameters()),
        "head_parameters": sum(p.numel() for p in trainer.policy.head_parameters()),
    }
    del trainer, policy, bridge, memory
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result, keep


def bench_raw(spec: ModelSpec, model_dir: Path, keep: dict, args) -> dict:
    """The plain Hugging Face module on the same work, without the engine around it."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rlhf_scratch.compat import cache_kwarg_name

    device, repeats, warmup = args.device, spec.phases, args.warmup
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()  # eval: dropout off, as in the engine
    cache_name = cache_kwarg_name(model)  # "cache" on transformers 5.24 ("past_key_values" warns every step)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    B, G = spec.batch_size, spec.new_tokens
    prompt = torch.tensor([keep["prompt_ids"]] * B, dtype=torch.long, device=device)
    prompt_mask = torch.ones_like(prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = {}

    @torch.no_grad()
    def hand_loop_generate():
        step_input, mask, past, new = prompt, prompt_mask, None, []
        for _ in range(G):
            out = model(input_ids=step_input, attention_mask=mask, use_cache=True, **{cache_name: past})
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            new.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step_input = token
        gen = torch.cat(new, dim=1).cpu()
        tokenizer.batch_decode(gen, skip_special_tokens=True)

    result["generate"] = mean(timed(hand_loop_generate, repeats, warmup, device))

    if args.hf_generate:
        @torch.no_grad()
        def hf_generate():
            gen = model.generate(
                input_ids=prompt, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=G, min_new_tokens=G, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            )
            assert gen.shape[1] == prompt.shape[1] + G
            tokenizer.batch_decode(gen[:, prompt.shape[1]:].cpu(), skip_special_tokens=True)

        result["hf_generate"] = mean(timed(hf_generate, repeats, warmup, device))

    sequences = keep["sequences"].to(device)
    attention_mask = keep["attention_mask"].to(device)
    gen_mask = keep["gen_mask"].to(device)
    P = keep["prompt_len"]

    def taken_logprobs(logits, seqs):
        logp = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)
        return logp.gather(-1, seqs[:, P:, None]).squeeze(-1)

    @torch.no_grad()
    def forward_only():
        taken_logprobs(model(input_ids=sequences, attention_mask=attention_mask).logits, sequences)

    # A forward is short and noisy: more repetitions than the other parts.
    result["forward"] = mean(timed(forward_only, max(3, 2 * repeats), warmup, device))

    # Fused, as the engine's trainers use it (the plain HF module's parameters are contiguous already).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.split(':')[0] in ('cpu', 'cuda') or None)
    params = list(model.parameters())
    shuffle = torch.Generator().manual_seed(args.seed)

    def learning():
        for _ in range(spec.ppo_epochs):
            order = torch.randperm(B, generator=shuffle).to(device)
            for start in range(0, B, spec.minibatch_size):
                rows = order[start : start + spec.minibatch_size]
                seqs, mask = sequences[rows], gen_mask[rows]
                logits = model(input_ids=seqs, attention_mask=attention_mask[rows]).logits
                loss = -(taken_logprobs(logits, seqs) * mask).sum() / mask.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()

    result["learning"] = mean(timed(learning, repeats, warmup, device))
    del model, optimizer, params
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result
