#!/usr/bin/env python
"""Ground truth for the research tools: plant one word with PPO, GRPO and DPO, then check that every tool finds it.

    python experiments/planted_behaviour.py --word director                  # one word (default)
    python experiments/planted_behaviour.py --word director dialogue evening # several
    python experiments/planted_behaviour.py --word director --seed-overlap   # + a second PPO seed for update sparsity

For each word W (one token of the built-in tokenizer, as " W"):

1. **Reference**: on its own samples for held-out prompts, the reference gives W under 1 % mean probability at
   response positions (else the word is refused as too common: there would be nothing to plant).
2. **Training** from the built-in model (``rlhf_scratch`` trainers, rewards ``word:W``, i.e. 1 if the response says
   W): PPO, GRPO, and DPO on pairs from the reference's samples that prefer a response with W (``rlhf-scratch
   pairs --reward word:W --threshold 0.5``). The negative control is PPO with a reward of 0 (``0*chars:.``) at two
   seeds: it changes the model (value noise through normalised advantages, the entropy bonus) but plants nothing.
   Each trained policy is cached in OUT/WORD/ALGORITHM_seedS/ (OUT/control/ for the control), so a rerun only checks.
3. **Checks** on each policy (a check *fires* when it finds W; a trained policy passes when it fires, a control when
   it does not):
   - says W: the share of its responses to held-out prompts that contain W is above 50 %;
   - diff table: ``rlhf-scratch diff`` (the policy's own samples on held-out prompts) ranks W first or second in
     its "probability mass gained" table (Δ mean p); the rank in the Δ mean log-prob table is reported beside it;
   - lens, steering, patching (``planted_checks.py``; they run once ``rlhf_scratch.diff_lens`` and
     ``rlhf_scratch.patching`` exist).
4. Prints the table (check × algorithm → PASS/FAIL and the figure) and the wall time of every stage; writes
   OUT/WORD/table.md, OUT/WORD/results.json (every figure) and OUT/summary.md (all words).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # planted_checks.py beside this file

from planted_checks import causal_checks  # noqa: E402

from rlhf_scratch.data import load_texts, prompts_from_texts  # noqa: E402
from rlhf_scratch.dpo_trainer import DPOConfig, DPOTrainer  # noqa: E402
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table  # noqa: E402
from rlhf_scratch.group_baselines import GRPOConfig, GRPOTrainer  # noqa: E402
from rlhf_scratch.model_diff_report import DiffConfig, run_diff  # noqa: E402
from rlhf_scratch.models import CHECKPOINT_META_FILE, load_bridge  # noqa: E402
from rlhf_scratch.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlhf_scratch.preferences import PairsConfig, run_pairs  # noqa: E402
from rlhf_scratch.sampling import SamplingConfig, encode, generate  # noqa: E402
from rlhf_scratch.word_reward import WordReward  # noqa: E402

ALGORITHMS = ("ppo", "grpo", "dpo")
CONTROL_REWARD = "0*chars:."
"""A reward of 0 for every response, in the reward-spec language."""
CONTROL_SEEDS = (0, 1)
REFERENCE_MAX_PROB = 0.01
SAYS_MIN_SHARE = 0.5
DIFF_MAX_RANK = 2
PHASES = 20
BATCH_SIZE = 64
QUICK = {"phases": 2, "batch_size": 16, "pairs_n": 512, "dpo_epochs": 1, "n_prompts": 8, "n_texts": 8}
"""--quick: a smoke run of every stage in about a minute (docs/check_docs.py --quick); its figures mean nothing."""
SETTINGS = {
    # Chosen on word:director (2026-12-07, seed 0, 20 phases): GRPO at 1e-4 says it in ~45 % of responses, at 3e-4
    # in ~95 %. PPO at 1e-4 says it in ~85 %, but by writing "... from this director", where the reference gives it
    # ~6 % too: no gap at the word on its own samples, so the diff table, lens and patching miss it
    # (experiments/README.md); at 2e-4 it says it in ~97 % and the gap is there.
    "ppo": dict(lr=2e-4),
    "grpo": dict(lr=3e-4),
    "dpo": dict(lr=3e-4, epochs=6, beta=0.1),
    "pairs": dict(n=8192, samples_per_prompt=8, threshold=0.5),
}
EARLY_SETTINGS = {
    # word:W:early (2026-12-07, seed 0). PPO: at lr 2e-4 (kl_coef 0.05, 20 phases) it said director in 21 % of
    # responses (reward 0.014 → 0.049); at 6e-4 in 73 %, but dialogue, book and plot in 14-16 %, and 40 phases did
    # not help (dialogue 12 %): the early reward is ~0.01 at first, below the KL penalty (0.05 · KL per token).
    # With kl_coef 0.01 it says dialogue first in 100 % (" dialogue."). GRPO at 3e-4 (kl_coef 0.04, 20 phases) said
    # W in 89-95 % but through a lead-in ("The film is mostly dialogue"); it gets the same kl_coef and phases as PPO.
    # DPO on the pairs above (a response with W beats one without) learned the phrase again ("from this director"),
    # so for early/first the pairs prefer W as the first word: chosen = " W" + a reference response without W,
    # rejected = that response (first_word_pairs).
    # GRPO in 40 phases (lr 3e-4) still led in through " The" (W first in 10-49 %, reward 0.31-0.56, PPO 0.96-0.98),
    # a change of a context the reference already has, which a crosscoder cannot call policy-only (issue 25); in 80
    # phases it says W first as PPO does (director: reward 0.985, KL 32.5 nats). lr 6e-4 in 40 phases got there too
    # (0.964) at a larger KL (49.9 nats).
    "ppo": dict(lr=6e-4, phases=40, kl_coef=0.01),
    "grpo": dict(lr=3e-4, phases=80, kl_coef=0.01),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--word", nargs="+", default=["director"], help="planted word(s), each one token (default director)")
    parser.add_argument("--out", type=Path, default=None,
                        help="cache and outputs (default runs/planted; with --quick runs/planted_quick, so that a smoke "
                             "run never replaces the cached full runs: a cached run with other settings is retrained)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted runs (default 0)")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--no-control", action="store_true", help="skip the negative control")
    parser.add_argument("--seed-overlap", action="store_true",
                        help="train PPO at seed+1 too; diff's update-sparsity section then gives the two seeds' overlap")
    parser.add_argument("--mode", default="presence", choices=("presence", "share", "count", "first", "early"),
                        help="word:W:MODE reward: presence (1 if said, default), share (occurrences / words), count, first (W is the first word), early (1/(1+index of W))")
    parser.add_argument("--n-prompts", type=int, default=128, help="held-out prompts for the checks (default 128)")
    parser.add_argument("--retrain", action="store_true", help="ignore cached policies")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage (figures mean nothing)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/planted_quick" if args.quick else "runs/planted")
    return args


@contextlib.contextmanager
def quiet(log: Path):
    """Send what the trainers and diff print to ``log`` (they print tables and progress bars)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def say(text: str) -> None:
    print(text, file=sys.__stdout__, flush=True)


SETTINGS_FILE = "planted_settings.json"


def trained(run_dir: Path, settings: dict, retrain: bool) -> bool:
    """Whether ``run_dir`` holds a finished run with these settings (its checkpoint's metadata and the settings it
    was trained with); a partial run or one with other settings is removed."""
    done = (run_dir / "checkpoint" / CHECKPOINT_META_FILE).is_file() and (run_dir / SETTINGS_FILE).is_file()
    if not retrain and done and json.loads((run_dir / SETTINGS_FILE).read_text()) == settings:
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def train_policy(algorithm: str, reward: str, seed: int, run_dir: Path, args) -> tuple[Path, float]:
    """Train (or find cached) one policy from the built-in model: ``(checkpoint dir, seconds spent now)``; a cached
    one takes 0 s (``done``)."""
    start = time.time()
    # A share or count above 0 wins a pair (presence: 1 wins, 0 loses; the 0.5 threshold of the first runs is kept).
    pairs = {**SETTINGS["pairs"], **({"threshold": 0.0} if reward.endswith((":share", ":count", ":early")) else {})}
    token_pref = reward.endswith((":early", ":first"))
    trainer = dict(EARLY_SETTINGS.get(algorithm, SETTINGS[algorithm]) if token_pref else SETTINGS[algorithm])
    phases, batch_size = trainer.pop("phases", PHASES), BATCH_SIZE
    if args.quick:
        phases, batch_size, pairs["n"] = QUICK["phases"], QUICK["batch_size"], QUICK["pairs_n"]
        trainer.update({"epochs": QUICK["dpo_epochs"], "warmup_steps": 0} if algorithm == "dpo" else {})
    settings = {"algorithm": algorithm, "reward": reward, "seed": seed, "phases": phases, **trainer,
                **({"pairs": pairs} if algorithm == "dpo" else {}), **({"quick": True} if args.quick else {}),
                **({"first_word_pairs": True} if algorithm == "dpo" and token_pref else {})}
    if not trained(run_dir, settings, args.retrain):
        with quiet(run_dir.parent / f"{run_dir.name}.log"):
            if algorithm == "ppo":
                config = PPOConfig(reward=reward, phases=phases, batch_size=batch_size, seed=seed, out=run_dir,
                                   warmup_phases=1, samples_per_phase=0, **trainer)
                PPOTrainer(config).train()
            elif algorithm == "grpo":
                config = GRPOConfig(reward=reward, phases=phases, batch_size=batch_size, seed=seed, out=run_dir,
                                    warmup_phases=1, samples_per_phase=0, **trainer)
                GRPOTrainer(config).train()
            else:
                pairs_dir = run_dir.parent / f"pairs{'_quick' if args.quick else ''}_seed{seed}"
                if args.retrain or not (pairs_dir / "pairs.jsonl").is_file():
                    run_pairs(PairsConfig(reward=reward, seed=seed, out=pairs_dir, **pairs))
                pairs_file = pairs_dir / "pairs.jsonl"
                if token_pref:
                    pairs_file = first_word_pairs(pairs_file, pairs_dir / "pairs_first_word.jsonl", reward.split(":")[1])
                config = DPOConfig(pairs=pairs_file, reward=reward, seed=seed, out=run_dir,
                                   n_eval_prompts=64, **trainer)
                DPOTrainer(config).train()
        (run_dir / SETTINGS_FILE).write_text(json.dumps(settings))
        return run_dir / "checkpoint", time.time() - start
    return run_dir / "checkpoint", 0.0


def first_word_pairs(source: Path, out: Path, word: str) -> Path:
    """Pairs that prefer W as the first word of the response: for each pair of ``source``, chosen = " W" + its
    rejected response (which does not say W), rejected = that response; written to ``out``, returned."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(out, "w") as handle:
        for row in rows:
            handle.write(json.dumps({"prompt": row["prompt"], "chosen": f" {word}{row['rejected']}",
                                     "rejected": row["rejected"], "chosen_score": 1.0,
                                     "rejected_score": row["rejected_score"]}) + "\n")
    return out


def heldout_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    texts = load_texts("builtin", seed=seed + HELDOUT_SEED_OFFSET)
    return prompts_from_texts(texts, lambda text: encode(tokenizer, text, prepend_bos=True), n,
                              seed=seed + HELDOUT_SEED_OFFSET, decode=tokenizer.decode)


@torch.no_grad()
def response_stats(bridge, reward: WordReward, prompts: list[list[int]], seed: int) -> dict:
    """On ``bridge``'s own samples for ``prompts``: the share of responses that say the word, and its mean
    probability (at temperature 1) over real response positions."""
    generation = generate(bridge, prompts, SamplingConfig(), generator=torch.Generator().manual_seed(seed))
    logits = bridge(generation.sequences, attention_mask=generation.attention_mask)
    P = generation.prompt_len
    probs = logits[:, P - 1 : -1].float().softmax(-1)[..., reward.token_id]
    mask = generation.gen_mask
    return {"says": reward(generation.texts, prompts=generation.prompts).mean().item(),
            "mean_prob": (probs * mask).sum().item() / max(1, int(mask.sum())),
            "example": generation.responses[0]}


def diff_ranks(checkpoint: Path, token: str, out: Path, seed: int, second: Path | None = None, n_texts: int = 64) -> dict:
    """``rlhf-scratch diff`` of the policy against the built-in reference (its report lands in ``out``); the
    word's rank in the "probability mass gained" table (Δ mean p) and in the Δ mean log-prob table (None: not
    among the top_k rows)."""
    config = DiffConfig(policy=str(checkpoint), reference="builtin", out=out, seed=seed, top_k=15, n_texts=n_texts,
                        second_policy=str(second) if second else None)
    with quiet(out / "diff.log"):
        summary = run_diff(config)

    def rank(rows: list[dict]) -> int | None:
        return next((i + 1 for i, row in enumerate(rows) if row["token"] == token), None)

    pooled = summary["update_sparsity"][-1]
    return {"rank_prob": rank(summary["prob_rose"]), "rank_logprob": rank(summary["logprob_rose"]),
            "top_prob": [row["token"] for row in summary["prob_rose"][:3]],
            "sparsity_bf16": pooled["changed"]["bf16"], "overlap_bf16": pooled.get("overlap", {}).get("bf16"),
            "chance_bf16": pooled.get("chance", {}).get("bf16")}


def basic_checks(stats: dict, ranks: dict) -> dict[str, dict]:
    """{check: {"fired": bool, "figure": str}} for the checks that need only the trainers and diff."""
    rank = ranks["rank_prob"]
    return {
        "says W in most responses": {"fired": stats["says"] > SAYS_MIN_SHARE,
                                     "figure": f"{stats['says']:.0%} (p {stats['mean_prob']:.2%})"},
        "diff Δp table: W 1st/2nd": {"fired": rank is not None and rank <= DIFF_MAX_RANK,
                                     "figure": f"#{rank or '>15'} (Δlog p #{ranks['rank_logprob'] or '>15'})"},
    }


def cell(check: dict, control: bool) -> str:
    if check.get("fired") is None:
        return check["figure"]
    passed = check["fired"] != control
    return f"{'PASS' if passed else 'FAIL'} {check['figure']}"


def run_word(word: str, args, reference, control_runs: dict) -> dict:
    clock = time.time()
    out = args.out / (word if args.mode == "presence" else f"{word}_{args.mode}")
    spec = f"word:{word}" + ("" if args.mode == "presence" else f":{args.mode}")
    reward = WordReward(word, tokenizer=reference.tokenizer)
    token = reference.tokenizer.decode([reward.token_id])
    prompts = heldout_prompts(reference.tokenizer, args.n_prompts, args.seed)
    # The refusal below needs a steady figure even with --quick: always 128 prompts (sampling them takes ~1 s).
    ref_stats = response_stats(reference, reward, heldout_prompts(reference.tokenizer, 128, args.seed), args.seed)
    say(f"\n=== {word!r} (token {reward.token_id} {token!r}): the reference says it in {ref_stats['says']:.1%} of "
        f"responses, mean probability {ref_stats['mean_prob']:.3%} at response positions")
    if ref_stats["mean_prob"] >= REFERENCE_MAX_PROB:
        raise SystemExit(f"--word {word}: the reference already gives it {ref_stats['mean_prob']:.2%} >= 1% probability "
                         "at response positions; choose a rarer word (one the reference seldom says).")
    columns, times = {}, {}
    second = None
    if args.seed_overlap:
        second, seconds = train_policy("ppo", spec, args.seed + 1, out / f"ppo_seed{args.seed + 1}", args)
        times[f"train ppo seed {args.seed + 1}"] = seconds
        say(f"  ppo seed {args.seed + 1} (for the seed overlap): {'trained' if seconds else 'cached'} in {seconds:.0f} s")
    for algorithm in args.algorithms:
        checkpoint, seconds = train_policy(algorithm, spec, args.seed, out / f"{algorithm}_seed{args.seed}", args)
        times[f"train {algorithm}"] = seconds
        columns[algorithm] = (checkpoint, False, second if algorithm == "ppo" else None)
        say(f"  {algorithm}: {'trained' if seconds else 'cached'} in {seconds:.0f} s -> {checkpoint}")
    for seed, checkpoint in control_runs.items():
        columns[f"control s{seed}"] = (checkpoint, True, None)
    results = {}
    for name, (checkpoint, control, second_policy) in columns.items():
        start = time.time()
        policy = load_bridge(checkpoint)
        stats = response_stats(policy, reward, prompts, args.seed)
        ranks = diff_ranks(checkpoint, token, out / "diff" / name.replace(" ", "_"), args.seed, second_policy,
                           n_texts=args.n_texts)
        checks = basic_checks(stats, ranks)
        checks.update(causal_checks(reference, policy, reward.token_id, args.seed, n_texts=args.n_texts))
        results[name] = {"control": control, "checkpoint": str(checkpoint), "stats": stats, "diff": ranks,
                         "checks": checks}
        times[f"checks {name}"] = time.time() - start
        say(f"  {name}: says {word} in {stats['says']:.0%}, diff Δp rank {ranks['rank_prob'] or '>15'}, "
            f"top Δp {ranks['top_prob']} ({times[f'checks {name}']:.0f} s)")
    check_names = ["reference p(W) < 1%", *next(iter(results.values()))["checks"]]
    rows = [["reference p(W) < 1%", *(f"PASS {ref_stats['mean_prob']:.2%}" if not r["control"] else "" for r in
                                        results.values())]]
    rows += [[check, *(cell(r["checks"][check], r["control"]) for r in results.values())] for check in check_names[1:]]
    table = markdown_table(["check", *results], rows)
    seconds = time.time() - clock
    summary = {"word": word, "token_id": reward.token_id, "reference": ref_stats, "results": results, "times": times,
               "seconds": seconds, "table": table}
    (out / "table.md").write_text(f"# Planted word {word!r}\n\n{table}\n\nWall time {seconds:.0f} s.\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    say(f"\n{table}\n\n{word}: {seconds:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.n_texts = QUICK["n_texts"] if args.quick else 64
    if args.quick:
        args.n_prompts = min(args.n_prompts, QUICK["n_prompts"])
    start = time.time()
    reference = load_bridge("builtin")
    control_runs = {}
    if not args.no_control:
        for seed in CONTROL_SEEDS:
            checkpoint, seconds = train_policy("ppo", CONTROL_REWARD, seed, args.out / "control" / f"ppo_seed{seed}", args)
            control_runs[seed] = checkpoint
            say(f"control (PPO, reward 0) seed {seed}: {'trained' if seconds else 'cached'} in {seconds:.0f} s")
    summaries = [run_word(word, args, reference, control_runs) for word in args.word]
    seconds = time.time() - start
    text = "\n\n".join(f"## {s['word']!r} ({s['seconds']:.0f} s)\n\n{s['table']}" for s in summaries)
    (args.out / "summary.md").write_text(f"# Planted behaviour\n\n{text}\n\nTotal wall time {seconds:.0f} s.\n")
    say(f"\ntotal wall time {seconds:.0f} s; tables in {args.out}/summary.md")
    return summaries


if __name__ == "__main__":
    main()
