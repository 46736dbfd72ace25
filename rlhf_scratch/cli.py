"""The ``rlhf-scratch`` command: one sub-command per system.

Each sub-command is a documented dataclass config parsed by ``tyro`` (every field is a
flag; ``--help`` lists them with their docstrings), then a plain function call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import huggingface_hub
import torch
import transformers
import tyro
from rich.console import Console
from rich.table import Table

from rlhf_scratch import distributed
from rlhf_scratch.checkpoint import find_checkpoint
from rlhf_scratch.compare import BonConfig, CompareConfig, run_bon, run_compare
from rlhf_scratch.config import config_errors_raised
from rlhf_scratch.data import fixed_prefix_prompts, load_texts, names_local_file, prompts_from_texts
from rlhf_scratch.crosscoder_report import CrosscodeConfig, run_crosscode
from rlhf_scratch.diff_lens_report import LensConfig, run_lens
from rlhf_scratch.dpo_trainer import DPOConfig, run_dpo
from rlhf_scratch.entry import INTERRUPTED_EXIT
from rlhf_scratch.group_baselines import GRPOConfig, RLOOConfig, run_grpo, run_rloo
from rlhf_scratch.interrupts import TrainingInterrupted
from rlhf_scratch.model_diff_report import DiffConfig
from rlhf_scratch.model_diff_timeline import run_diff_command
from rlhf_scratch.models import ModelLoadError, check_device, check_model_source, load_bridge
from rlhf_scratch.optimization import NonFiniteLossError
from rlhf_scratch.patching_report import PatchConfig, run_patch
from rlhf_scratch.outputs import append_jsonl, claim_run_dir, write_json
from rlhf_scratch.policy_trainer import resume_command
from rlhf_scratch.ppo import PPOConfig, preset_configs, run_ppo
from rlhf_scratch.preferences import PAIR_FILE_EXTENSIONS, PairsConfig, load_pairs, run_pairs
from rlhf_scratch.pretrain import PretrainConfig, pretrain
from rlhf_scratch.reinforce import REINFORCEConfig, run_reinforce
from rlhf_scratch.reward_model_training import RewardModelConfig, ScoreConfig, run_score, train_reward_model
from rlhf_scratch.rewards import check_reward_spec, make_reward, score_texts
from rlhf_scratch.sae_report import SAEConfig, run_sae
from rlhf_scratch.sampling import GenerationStackError, SamplingConfig, encode, generate
from rlhf_scratch.value_lens import InspectConfig, run_inspect

TYRO_CONFIG = (tyro.conf.OmitArgPrefixes,)
USER_ERRORS = (ValueError, FileNotFoundError, ModelLoadError, GenerationStackError, NonFiniteLossError,
               distributed.RankFailedError)
"""Bad input (paths, model names, rewards, prompts, damaged files), a library stack that samples wrongly, a
run that diverged, or a rank of a data-parallel run that did: each message says what to do, so the CLI prints
it instead of a traceback."""
DATA_PARALLEL_COMMANDS = ("ppo", "reinforce", "rloo", "grpo", "dpo", "rm")
"""The commands that run data-parallel under ``torchrun`` (``rlhf_scratch.distributed``)."""
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


@dataclass
class SampleConfig:
    """Sample responses from a model and print them (optionally scored by a reward)."""

    model: str = "builtin"
    """Model: "builtin", a local model directory or run checkpoint, or a hub name such as gpt2."""
    prompt: str = ""
    """Fixed prompt for every sample (fixed-prefix mode); empty: start from BOS alone."""
    data: str | None = None
    """Dataset mode: prompts are the first 2–8 tokens of texts from "builtin", a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for --data .jsonl/.csv files and datasets."""
    n: Annotated[int, tyro.conf.arg(aliases=["-n"])] = 5
    """Number of samples."""
    reward: str | None = None
    """Score the samples with this reward (vader, chars:., hf:DIR:LABEL)."""
    prepend_bos: bool = True
    """Put the BOS token in front of every prompt (as the built-in model was trained)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    out: Path | None = None
    """If given, write config.json, samples.jsonl and summary.json here."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"-n must be >= 1, got {self.n}.")


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


def _commands() -> dict:
    """name → (config class, presets {name: config}, runner, one-line description)."""

    return {
        "ppo": (PPOConfig, preset_configs(), run_ppo, "Train a policy with PPO (default: the built-in offline sentiment task)."),
        "reinforce": (REINFORCEConfig, {}, run_reinforce,
                      "Train a policy with REINFORCE and a moving-average baseline (same task, outputs and checkpoints as ppo)."),
        "rloo": (RLOOConfig, {}, run_rloo,
                 "Train a policy with RLOO: k samples per prompt, each against the mean of the other k-1 (no value head)."),
        "grpo": (GRPOConfig, {}, run_grpo,
                 "Train a policy with GRPO (--dr-grpo: Dr. GRPO): group-standardised advantages, clipped ratio, k3 KL loss."),
        "bon": (BonConfig, {}, run_bon, "Best-of-n from the reference model vs the reference: reward, measured KL and its bound."),
        "compare": (CompareConfig, {}, run_compare,
                    "Compare systems (reference, ppo:DIR, reinforce:DIR, bon:N) on held-out prompts; write report.md."),
        "pretrain": (PretrainConfig, {}, pretrain, "Build the built-in tiny model (corpus, tokenizer, GPT-2) or pretrain on --data."),
        "sample": (SampleConfig, {}, run_sample, "Print samples from a model, optionally scored by a reward."),
        "pairs": (PairsConfig, {}, run_pairs, "Build preference pairs from a model's samples scored by a reward (writes pairs.jsonl)."),
        "rm": (RewardModelConfig, {}, train_reward_model,
               "Train a reward model (--loss bt|margin|dist) on preference pairs; held-out pairwise accuracy; use as --reward rm:DIR."),
        "score": (ScoreConfig, {}, run_score, "Pairwise accuracy of any reward (rm:DIR, vader, hf:...) on a pair file."),
        "dpo": (DPOConfig, {}, run_dpo,
                "DPO / f-DPO on preference pairs (--loss sigmoid|hinge, --divergence rkl|fkl|js|alpha); evaluates with --reward."),
        "diff": (DiffConfig, {}, run_diff_command,
                 "What did RLHF change? Policy vs reference on the same texts: residual stream, weights per head, log-probs, DLA, "
                 "update sparsity and rank (--second-policy DIR: overlap of two seeds' changed weights); "
                 "--timeline RUN: the same over the phases of a run trained with --snapshot-every."),
        "patch": (PatchConfig, {}, run_patch,
                  "Activation patching policy <-> reference on the policy's samples: the fraction of the KL, reward gap and "
                  "token-set log-prob each head, MLP and layer recovers (report.md, heatmaps)."),
        "lens": (LensConfig, {}, run_lens,
                 "Activation Difference Lens: the policy's mean residual difference on held-out text, its top tokens per "
                 "layer, and steering the reference with it over a sweep of alpha (reward, token log-prob)."),
        "crosscode": (CrosscodeConfig, {}, run_crosscode,
                      "A BatchTopK crosscoder on paired policy/reference activations at one hook: explained variance, "
                      "policy-only latents (relative decoder norm, Latent Scaling), their contexts and logit effects."),
        "sae": (SAEConfig, {}, run_sae,
                "A sparse autoencoder in sae-lens's layout (--sae DIR, or one trained here) spliced into both models with "
                "the error term: the features whose activation changed most, with their contexts."),
        "inspect": (InspectConfig, {}, run_inspect,
                    "One sample of a PPO checkpoint: value, reward, advantage per token, and the value lens per layer."),
    }


def _usage(commands: dict) -> str:
    lines = ["usage: rlhf-scratch COMMAND [--help] [FLAGS]", "", "commands:"]
    lines += [f"  {name:<10} {description}" for name, (_, _, _, description) in commands.items()]
    lines += ["", "Run `rlhf-scratch COMMAND --help` for the flags of a command."]
    return "\n".join(lines)


def _take_flag(args: list[str], flag: str) -> tuple[bool, list[str]]:
    """Take a boolean ``flag`` (``--overwrite``, ``--overwrite True``, ``--overwrite=false``) out of the arguments,
    read the way ``explicit_booleans`` reads every boolean: ``(set, the other arguments)``."""
    negative, present, rest = "--no-" + flag[2:], False, []
    for arg in normalize_booleans(args, {flag}):
        if arg in (flag, negative):
            present = arg == flag  # the last one given wins
        else:
            rest.append(arg)
    return present, rest


def _split_preset(args: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--preset NAME`` (or ``--preset=NAME``) out of the argument list."""
    rest, preset = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg == "--preset":
            preset = next(iterator, None)
            if preset is None:
                raise SystemExit("--preset needs a name.")
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return preset, rest


def _boolean_flags(config_class) -> set[str]:
    """Flag names (``--debug``, ``--stop-at-eos``) of every bool field of ``config_class`` and its nested configs."""
    flags = set()
    for name, hint in typing.get_type_hints(config_class).items():
        if hint is bool:
            flags.add("--" + name.replace("_", "-"))
        elif dataclasses.is_dataclass(hint):
            flags |= _boolean_flags(hint)
    return flags


def explicit_booleans(args: list[str], config_class) -> list[str]:
    """Accept ``--debug True`` / ``--debug=false`` as well as the bare ``--debug`` / ``--no-debug``.

    tyro takes booleans as flag pairs; earlier releases of this CLI took a value, and READMEs and
    scripts still pass one, so a value after a boolean flag is turned into the matching bare flag.
    """
    return normalize_booleans(args, _boolean_flags(config_class))


def normalize_booleans(args: list[str], flags: set[str]) -> list[str]:
    """``--flag True|False`` and ``--flag=true|false`` (for each flag in ``flags``) as ``--flag`` / ``--no-flag``."""
    rest, index = [], 0
    while index < len(args):
        arg = args[index]
        name, _, value = arg.partition("=")
        if name in flags and not value and index + 1 < len(args) and not args[index + 1].startswith("-"):
            value, index = args[index + 1], index + 1
        if name in flags and value:
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise SystemExit(f"{name} takes no value (or True/False), got {value!r}.")
            arg = name if value.lower() in TRUE_WORDS else "--no-" + name[2:]
        rest.append(arg)
        index += 1
    return rest


def quiet_libraries() -> None:
    """No "Loading weights" / "Writing model shards" progress bars and no transformers deprecation notices on every
    command: the CLI checks what matters itself (weights finite, cached generation = full forward) and says so."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def take_threads(args: list[str]) -> tuple[int | None, list[str]]:
    """Take ``--threads N`` (or ``--threads=N``) out of the arguments: ``(N or None, the other arguments)``."""
    rest, threads, index = [], None, 0
    while index < len(args):
        name, has_value, value = args[index].partition("=")
        if name == "--threads":
            if not has_value:
                index += 1
                value = args[index] if index < len(args) else ""
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"--threads takes a positive whole number of CPU threads, got {value!r}.")
            threads = int(value)
        else:
            rest.append(args[index])
        index += 1
    return threads, rest


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's operators; without ``--threads``, warn when the machine is already busy.

    torch starts one thread per physical core. When other processes keep those cores busy, its threads wait for
    each other at every operator: on a 2-core machine under load, built-in-model PPO phases took 50–100 s with
    2 threads instead of seconds with 1 (benchmarks/README.md). On an idle machine 2 threads are faster (1.3 s
    against 1.8 s a phase), so the default stays, with a note when the load is already at the core count.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load >= cores:
        print(f"note: this machine is busy (load {load:.1f} on {cores} cores). torch's {torch.get_num_threads()} "
              "threads will wait for the other processes at every step, which can make this command many times "
              "slower; if it is, pass --threads 1.", file=sys.stderr)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands))
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in commands:
        print(f"rlhf-scratch: unknown command {name!r}.\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    config_class, presets, runner, description = commands[name]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name not in DATA_PARALLEL_COMMANDS:
        print(f"rlhf-scratch {name}: does not run on several processes; only {', '.join(DATA_PARALLEL_COMMANDS)} do. "
              "Run it without torchrun.", file=sys.stderr)
        return 2
    overwrite, args = _take_flag(args, "--overwrite")
    threads, args = take_threads(args)
    args = explicit_booleans(args, config_class)
    description += (" --overwrite: replace an earlier run in --out (otherwise refused). --threads N: CPU threads for "
                    "torch (default: one per core; pass 1 on a busy machine).")
    default = None
    if presets:
        preset, args = _split_preset(args)
        preset = preset or next(iter(presets))
        if preset not in presets:
            print(f"rlhf-scratch {name}: unknown preset {preset!r}; choose from {', '.join(presets)}.", file=sys.stderr)
            return 2
        default = presets[preset]()
        description += f" Presets (--preset NAME): {', '.join(presets)}; current: {preset}."
    try:
        with config_errors_raised():  # a refused value: one line, not tyro's box
            config = tyro.cli(config_class, args=args, default=default, prog=f"rlhf-scratch {name}", description=description, config=TYRO_CONFIG)
    except ValueError as error:  # config validation in __post_init__: one line, exit status 2 (as tyro's own)
        print(f"rlhf-scratch {name}: invalid configuration: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    set_threads(threads)
    started = False
    try:
        preflight(config)
        distributed.init_from_env(getattr(config, "device", "cpu"))
        # Only rank 0 claims (and may clean) --out: it alone writes there.
        if getattr(config, "out", None) is None or not distributed.is_main():
            claim = contextlib.nullcontext()
        else:
            claim = claim_run_dir(config.out, name, overwrite=overwrite, resuming=_resumes_into_out(config),
                                  inputs=_input_paths(config), clean_on=USER_ERRORS, kept_on=(TrainingInterrupted,))
        with claim:
            started = True  # past the --out check: a failure from here on may leave a checkpoint worth continuing
            runner(config)
    except USER_ERRORS as error:
        # Every rank raises the same RankFailedError; rank 0 says it once.
        if distributed.is_main() or not isinstance(error, distributed.RankFailedError):
            where = f" (rank {distributed.rank()})" if distributed.is_distributed() else ""
            print(f"rlhf-scratch {name}{where}: error: {error}", file=sys.stderr)
            checkpoint = Path(config.out) / "checkpoint" if getattr(config, "out", None) is not None else None
            if started and hasattr(config, "resume") and checkpoint is not None and checkpoint.is_dir():
                print(f"The run's last checkpoint is kept in {checkpoint}: once the cause is fixed, continue with "
                      f"`{resume_command(name, config.out)}`.", file=sys.stderr)
        return 1
    except TrainingInterrupted as stopped:
        if distributed.is_main():
            print(f"rlhf-scratch {name}: {stopped}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except KeyboardInterrupt:
        out = getattr(config, "out", None)
        kept = f"; what it had written is in {out}" if out is not None and Path(out).exists() else ""
        print(f"rlhf-scratch {name}: interrupted (Ctrl-C){kept}.", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        distributed.shutdown()
    return 0


MODEL_FIELDS = ("model", "reference", "policy", "second_policy", "checkpoint")
"""Config fields that name a model to load (``--model``, ``--reference``, diff's ``--policy``, inspect's ``--checkpoint``)."""


def preflight(config) -> None:
    """Check what is cheap before any model loads (or the built-in model is first pretrained, minutes on a fresh
    machine): the device, model directories, the reward spec and its directory, local data and pair files
    (read in full: they are small), and the checkpoint to resume. Raises the same errors the later loads would."""
    value = lambda name: getattr(config, name, None)  # noqa: E731
    if value("device") is not None:
        check_device(value("device"))
    for name in MODEL_FIELDS:
        if isinstance(value(name), (str, Path)) and str(value(name)):
            check_model_source(value(name), flag="--" + name.replace("_", "-"))
    if value("reward"):
        check_reward_spec(value("reward"))
    if value("data") and str(value("data")) != "builtin" and names_local_file(value("data")):
        load_texts(str(value("data")), column=value("column") or "text")
    if value("pairs") and names_local_file(value("pairs"), PAIR_FILE_EXTENSIONS):
        load_pairs(value("pairs"))
    if value("resume") is not None:
        find_checkpoint(value("resume"))


def _input_paths(config) -> list[str]:
    """Every string or path field of ``config`` (models, pair and data files, rm:DIR rewards, ...)."""
    values = [getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "out"]
    return [str(v) for v in values if isinstance(v, (str, Path))] + [
        str(item) for v in values if isinstance(v, (list, tuple)) for item in v if isinstance(item, (str, Path))]


def _resumes_into_out(config) -> bool:
    """A resumed trainer appends to its own run directory: ``--resume DIR`` with ``--out`` DIR (or unset)."""
    resume = getattr(config, "resume", None)
    if resume is None:
        return False
    run_dirs = {Path(resume).resolve(), Path(resume).resolve().parent}
    return Path(config.out).resolve() in run_dirs


if __name__ == "__main__":
    raise SystemExit(main())
