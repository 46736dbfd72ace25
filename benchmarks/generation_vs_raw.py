"""KV-cached generation of the engine against a raw decoding loop (issue 24, item 3), interleaved, one thread.

    OMP_NUM_THREADS=1 python benchmarks/generation_vs_raw.py --threads 1 --batch-size 16 --rounds 5     # built-in model
    OMP_NUM_THREADS=1 python benchmarks/generation_vs_raw.py --threads 1 --batch-size 64 --profile     # + cProfile
    OMP_NUM_THREADS=1 python benchmarks/generation_vs_raw.py --threads 1 --model gpt2 --batch-size 16 --rounds 3
    ... --variants engine,bridge,compiled,static,raw,raw_cdf,hf_generate                                   # every variant

The same prompt (``--prompt``, BOS first) for every row, ``--new-tokens`` tokens each (no early stop), and with
``--record`` (the default, what the PPO rollout runs) each step's log-softmax [B, V] and final hidden state kept.
Variants, each timed once per round in an order that rotates between rounds:

* ``engine``: ``sampling.generate`` as the trainers call it (the plain decoding steps when nothing is hooked);
* ``bridge``: the same through the TransformerLens bridge's steps (``plain=False``: what ran before the plain steps,
  and what runs with hooks);
* ``compiled``: ``SamplingConfig(compiled_decoding=True)`` (static cache, compiled single-token step; the compile
  happens in the untimed warmup and its seconds are printed);
* ``static``: the static cache without compiling (the compiled variant's shapes, eager steps);
* ``raw``: the plain Hugging Face module (``from_pretrained`` of the same weights) in a hand loop, as
  ``bench_models.bench_raw``: ``past_key_values``, ``torch.multinomial``, the texts decoded at the end, and with
  ``--record`` the log-softmax and final hidden state of each step, stacked at the end into [B, G, V] and [B, G, D]
  (what the rollout reads: the taken log-probs, the entropy and the exact KL need the whole distribution);
* ``raw_cdf``: the same loop sampling by the inverse CDF the engine uses (``sampling.sample_tokens``):
  ``torch.multinomial`` costs ~0.8 ms per call at batch 16 × vocabulary 2048 and ~3 ms at batch 64 on this CPU,
  a third of the raw loop's step at batch 64, so this is the stricter baseline;
* ``hf_generate``: the module's own ``generate()`` (sampling, ``min_new_tokens`` = ``max_new_tokens``);
* ``ref_forward`` / ``raw_forward``: the rollout's reference forward over one generated batch [B, P + G], as the
  rollout runs it (``plain_forward.reference_logits``, then ``objectives.generated_logprobs``: the log-softmax over the
  generated positions and the taken log-probs) against the raw module's forward with the same log-softmax and gather.
  (The old policy's pass is read from the decoding steps since issue 24, item 1: there is no second rollout forward.)

Each round times ``--repeats`` generations of each. Printed: the median (and least) seconds of each, the median
(range) of its per-round ratio to ``raw`` and to ``raw_cdf``, and the ratio of the least times (on a shared machine
the least time is the least disturbed one); load average, versions, commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import add_threads_argument, machine_info, prepare_process, profiled

import torch  # noqa: E402 (after bench_common: the offline environment first)

VARIANTS = ("engine", "bridge", "compiled", "static", "raw", "raw_cdf", "hf_generate", "ref_forward", "raw_forward")


def engine_variants(bridge, prompts: list[list[int]], args) -> dict:
    """The engine's ``generate`` in each of its paths: name -> a callable running one generation."""
    from rlhf_scratch import plain_decoding
    from rlhf_scratch.sampling import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    compiled = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False, compiled_decoding=True)

    def run(sampling, plain=True):
        return lambda: generate(bridge, prompts, sampling, generator=torch.Generator().manual_seed(args.seed),
                                record=args.record, plain=plain)

    def static():  # the compiled variant's static cache and shapes, every step eager
        real = plain_decoding._compiled_step
        plain_decoding._compiled_step = lambda plain: plain_decoding._step
        try:
            run(compiled)()
        finally:
            plain_decoding._compiled_step = real

    from rlhf_scratch.plain_forward import reference_logits
    from rlhf_scratch.objectives import generated_logprobs

    batch = run(config)()
    P = batch.prompt_len

    @torch.no_grad()
    def ref_forward():
        logits = reference_logits(bridge, batch.sequences, batch.attention_mask).float()
        generated_logprobs(logits, batch.sequences, P, config.temperature)

    return {"engine": run(config), "bridge": run(config, plain=False), "compiled": run(compiled), "static": static,
            "ref_forward": ref_forward, "_batch": batch}


def raw_variants(model_dir: Path, prompt_ids: list[int], batch, args) -> dict:
    """The raw module's loops (module docstring): name -> a callable running one generation."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rlhf_scratch.compat import cache_kwarg_name
    from rlhf_scratch.sampling import sample_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache_name = cache_kwarg_name(model)  # "cache" on transformers 5.24 ("past_key_values" warns every step)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    prompt = torch.tensor([prompt_ids] * args.batch_size, dtype=torch.long)
    G, record = args.new_tokens, args.record

    def loop(inverse_cdf: bool):
        @torch.no_grad()
        def run():
            generator = torch.Generator().manual_seed(args.seed)
            step, mask, past, new, kept = prompt, torch.ones_like(prompt), None, [], []
            for _ in range(G):
                out = model(input_ids=step, attention_mask=mask, use_cache=True, **{cache_name: past},
                            output_hidden_states=record)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
                if record:
                    logp = torch.log_softmax(logits, dim=-1)
                    kept.append((logp, out.hidden_states[-1][:, -1]))
                    probs = logp.exp()
                else:
                    probs = torch.softmax(logits, dim=-1)
                if inverse_cdf:
                    token = sample_tokens.__wrapped__(probs, generator)[:, None]  # the engine's sampler, unchecked
                else:
                    token = torch.multinomial(probs, 1, generator=generator)
                new.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                step = token
            if record:  # handed on as [B, G, V] and [B, G, D], as the engine's rollout reads them
                torch.stack([logp for logp, _ in kept], dim=1), torch.stack([resid for _, resid in kept], dim=1)
            tokenizer.batch_decode(torch.cat(new, dim=1), skip_special_tokens=True)

        return run

    @torch.no_grad()
    def hf_generate():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=G, min_new_tokens=G, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, output_scores=record, return_dict_in_generate=True)
        tokenizer.batch_decode(out.sequences[:, prompt.shape[1]:], skip_special_tokens=True)

    P = batch.prompt_len

    @torch.no_grad()
    def raw_forward():
        logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)
        logp.gather(-1, batch.sequences[:, P:, None])

    return {"raw": loop(False), "raw_cdf": loop(True), "hf_generate": hf_generate, "raw_forward": raw_forward}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin | gpt2 (GPT-2-small shape, built here) | a dir")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt", default="The movie")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="generations per timing; the figure is one generation's mean (default: 3)")
    parser.add_argument("--variants", default="engine,bridge,raw,raw_cdf",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: engine,bridge,raw,raw_cdf)")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each step's log-softmax and final hidden state, as the PPO rollout does (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one generation of each")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.device = "cpu"
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    if unknown := [name for name in names if name not in VARIANTS]:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    prepare_process(args)

    from learning_vs_raw import commit, model_directory

    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.sampling import encode

    with tempfile.TemporaryDirectory(prefix="generation_vs_raw_") as workdir:
        model_dir = model_directory(args.model, Path(workdir))
        bridge = load_bridge(model_dir)
        prompt_ids = encode(bridge.tokenizer, args.prompt)
        engine = engine_variants(bridge, [prompt_ids] * args.batch_size, args)
        available = {**engine, **raw_variants(model_dir, prompt_ids, engine.pop("_batch"), args)}
        fns = {name: available[name] for name in names}
        info, load_start, stamp = machine_info(args), os.getloadavg(), commit()
        first_call = {}
        times = {name: [] for name in fns}
        for index in range(args.warmup + args.rounds):
            order = list(fns)
            shift = index % len(order)
            for name in order[shift:] + order[:shift]:
                start = time.perf_counter()
                for _ in range(1 if index < args.warmup else args.repeats):
                    fns[name]()
                elapsed = (time.perf_counter() - start) / (1 if index < args.warmup else args.repeats)
                if index >= args.warmup:
                    times[name].append(elapsed)
                else:
                    first_call.setdefault(name, elapsed)
        load_end = os.getloadavg()
        profiles = [profiled(fns[name], f"{name}, one generation (by own time)", args.top) for name in fns] if args.profile else []

    print(f"commit {stamp}; {info['cpu_model']}, torch {info['torch']} ({info['torch_threads']} thread(s)), "
          f"transformers {info['transformers']}, transformer-lens {info['transformer_lens']}, python {info['python']}")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; model {args.model}; batch "
          f"{args.batch_size}, {args.new_tokens} new tokens, prompt {len(prompt_ids)} tokens, record={args.record}; "
          f"median of {args.rounds} rounds ({args.repeats} generations each) after {args.warmup} untimed")
    if "compiled" in first_call:
        print(f"compiled: first (untimed) call {first_call['compiled']:.1f} s, including the compile")
    result = {"times": times}
    for name, ts in times.items():
        line = f"  {name:12s} {statistics.median(ts) * 1000:8.1f} ms (min {min(ts) * 1000:.1f})"
        bases = {"ref_forward": ("raw_forward",), "raw_forward": ()}.get(name, ("raw", "raw_cdf"))
        for base in bases:
            if base in times and base != name:
                ratios = [t / b for t, b in zip(ts, times[base])]
                result[f"{name}/{base}"] = ratios
                line += (f"   ÷ {base} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; "
                         f"of minima {min(ts) / min(times[base]):.2f}x)")
        print(line)
    for text in profiles:
        print(text)
    return result


if __name__ == "__main__":
    main()
