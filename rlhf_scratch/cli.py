"""The ``rlhf-scratch`` command: one sub-command per system.

Each sub-command is a documented dataclass config parsed by ``tyro`` (every field is a
flag; ``--help`` lists them with their docstrings), then a plain function call.

The configs are plain dataclasses (``config``, ``algorithm_configs``, ``command_configs``) that import no
torch, so ``rlhf-scratch --help``, ``rlhf-scratch ppo --help`` and a configuration error answer at once. A
command's own module (and with it torch, transformers and TransformerLens) is imported only after its flags
have been parsed: ``_commands`` names each runner as ``"module:function"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import typing
from pathlib import Path

import tyro

from rlhf_scratch.algorithm_configs import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    REINFORCEConfig,
    RewardModelConfig,
    RLOOConfig,
    preset_configs,
)
from rlhf_scratch.command_configs import (
    BonConfig,
    CompareConfig,
    DiffConfig,
    ExportConfig,
    InspectConfig,
    LensConfig,
    PairsConfig,
    PatchConfig,
    PretrainConfig,
    SampleConfig,
    ScoreConfig,
)
from rlhf_scratch.config import config_errors_raised
from rlhf_scratch.interrupts import INTERRUPTED_EXIT, TrainingInterrupted
from rlhf_scratch.research_configs import CrosscodeConfig, SAEConfig

TYRO_CONFIG = (tyro.conf.OmitArgPrefixes,)
DATA_PARALLEL_COMMANDS = ("ppo", "reinforce", "rloo", "grpo", "dpo", "rm")
"""The commands that run data-parallel under ``torchrun`` (``rlhf_scratch.distributed``)."""
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


def user_errors() -> tuple[type[BaseException], ...]:
    """Bad input (paths, model names, rewards, prompts, damaged files), a library stack that samples wrongly, a
    run that diverged, or a rank of a data-parallel run that did: each message says what to do, so the CLI prints
    it instead of a traceback. (A function: these modules import torch, which only a running command needs.)"""
    from rlhf_scratch.distributed import RankFailedError
    from rlhf_scratch.models import ModelLoadError
    from rlhf_scratch.optimization import NonFiniteLossError
    from rlhf_scratch.sampling import GenerationStackError

    return ValueError, FileNotFoundError, ModelLoadError, GenerationStackError, NonFiniteLossError, RankFailedError


def load_runner(spec: str):
    """``"rlhf_scratch.ppo:run_ppo"`` → that function; its module (and torch) is imported now."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _commands() -> dict:
    """name → (config class, presets {name: config}, runner as "module:function", one-line description)."""

    return {
        "ppo": (PPOConfig, preset_configs(), "rlhf_scratch.ppo:run_ppo", "Train a policy with PPO (default: the built-in offline sentiment task)."),
        "reinforce": (REINFORCEConfig, {}, "rlhf_scratch.reinforce:run_reinforce",
                      "Train a policy with REINFORCE and a moving-average baseline (same task, outputs and checkpoints as ppo)."),
        "rloo": (RLOOConfig, {}, "rlhf_scratch.group_baselines:run_rloo",
                 "Train a policy with RLOO: k samples per prompt, each against the mean of the other k-1 (no value head)."),
        "grpo": (GRPOConfig, {}, "rlhf_scratch.group_baselines:run_grpo",
                 "Train a policy with GRPO (--dr-grpo: Dr. GRPO): group-standardised advantages, clipped ratio, k3 KL loss."),
        "bon": (BonConfig, {}, "rlhf_scratch.compare:run_bon", "Best-of-n from the reference model vs the reference: reward, measured KL and its bound."),
        "compare": (CompareConfig, {}, "rlhf_scratch.compare:run_compare",
                    "Compare systems (reference, ppo:DIR, reinforce:DIR, bon:N) on held-out prompts; write report.md."),
        "pretrain": (PretrainConfig, {}, "rlhf_scratch.pretrain:pretrain", "Build the built-in tiny model (corpus, tokenizer, GPT-2) or pretrain on --data."),
        "sample": (SampleConfig, {}, "rlhf_scratch.sample_command:run_sample", "Print samples from a model, optionally scored by a reward."),
        "pairs": (PairsConfig, {}, "rlhf_scratch.preferences:run_pairs", "Build preference pairs from a model's samples scored by a reward (writes pairs.jsonl)."),
        "rm": (RewardModelConfig, {}, "rlhf_scratch.reward_model_training:train_reward_model",
               "Train a reward model (--loss bt|margin|dist) on preference pairs; held-out pairwise accuracy; use as --reward rm:DIR."),
        "score": (ScoreConfig, {}, "rlhf_scratch.reward_model_training:run_score", "Pairwise accuracy of any reward (rm:DIR, vader, hf:...) on a pair file."),
        "dpo": (DPOConfig, {}, "rlhf_scratch.dpo_trainer:run_dpo",
                "DPO / f-DPO on preference pairs (--loss sigmoid|hinge, --divergence rkl|fkl|js|alpha); evaluates with --reward."),
        "diff": (DiffConfig, {}, "rlhf_scratch.model_diff_timeline:run_diff_command",
                 "What did RLHF change? Policy vs reference on the same texts: residual stream, weights per head, log-probs, DLA, "
                 "update sparsity and rank (--second-policy DIR: overlap of two seeds' changed weights); "
                 "--timeline RUN: the same over the phases of a run trained with --snapshot-every."),
        "patch": (PatchConfig, {}, "rlhf_scratch.patching_report:run_patch",
                  "Activation patching policy <-> reference on the policy's samples: the fraction of the KL, reward gap and "
                  "token-set log-prob each head, MLP and layer recovers (report.md, heatmaps)."),
        "lens": (LensConfig, {}, "rlhf_scratch.diff_lens_report:run_lens",
                 "Activation Difference Lens: the policy's mean residual difference on held-out text, its top tokens per "
                 "layer, and steering the reference with it over a sweep of alpha (reward, token log-prob)."),
        "crosscode": (CrosscodeConfig, {}, "rlhf_scratch.crosscoder_report:run_crosscode",
                      "A BatchTopK crosscoder on paired policy/reference activations at one hook: explained variance, "
                      "policy-only latents (relative decoder norm, Latent Scaling), their contexts and logit effects."),
        "sae": (SAEConfig, {}, "rlhf_scratch.sae_report:run_sae",
                "A sparse autoencoder in sae-lens's layout (--sae DIR, or one trained here) spliced into both models with "
                "the error term: the features whose activation changed most, with their contexts."),
        "inspect": (InspectConfig, {}, "rlhf_scratch.value_lens:run_inspect",
                    "One sample of a PPO checkpoint: value, reward, advantage per token, and the value lens per layer."),
        "export": (ExportConfig, {}, "rlhf_scratch.export:run_export",
                   "Write a model as a plain save_pretrained directory, a LoRA run's adapters merged into its weights."),
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
    import huggingface_hub
    import transformers

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
    import torch

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
    config = _resume_into_its_run(config)
    # The command's libraries load only now that the flags are known to be right.
    from rlhf_scratch import distributed
    from rlhf_scratch.outputs import claim_run_dir
    from rlhf_scratch.run import resume_command

    quiet_libraries()
    set_threads(threads)
    errors = user_errors()
    started = False
    try:
        preflight(config)
        distributed.init_from_env(getattr(config, "device", "cpu"))
        # Only rank 0 claims (and may clean) --out: it alone writes there.
        if getattr(config, "out", None) is None or not distributed.is_main():
            claim = contextlib.nullcontext()
        else:
            claim = claim_run_dir(config.out, name, overwrite=overwrite, resuming=_resumes_into_out(config),
                                  inputs=_input_paths(config), clean_on=errors, kept_on=(TrainingInterrupted,))
        with claim:
            started = True  # past the --out check: a failure from here on may leave a checkpoint worth continuing
            load_runner(runner)(config)
    except errors as error:
        # Every rank raises the same RankFailedError; rank 0 says it once.
        if distributed.is_main() or not isinstance(error, distributed.RankFailedError):
            where = f" (rank {distributed.rank()})" if distributed.is_distributed() else ""
            print(f"rlhf-scratch {name}{where}: error: {error}", file=sys.stderr)
            checkpoint = Path(config.out) / "checkpoint" if getattr(config, "out", None) is not None else None
            if started and hasattr(config, "resume") and checkpoint is not None and checkpoint.is_dir():
                print(f"The run's last checkpoint is kept in {checkpoint}: once the cause is fixed, continue with "
                      f"`{resume_command(name, config.out)}`.", file=sys.stderr)
        return 1
    except TrainingInterrupted as stopped:  # Ctrl-C or SIGTERM: checkpoint written, resume command given
        if distributed.is_main():
            print(f"rlhf-scratch {name}: {stopped}", file=sys.stderr)
        return stopped.exit_code
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
    from rlhf_scratch.checkpoint import find_checkpoint
    from rlhf_scratch.data import load_texts, names_local_file
    from rlhf_scratch.models import check_device, check_model_source
    from rlhf_scratch.preferences import PAIR_FILE_EXTENSIONS, load_pairs
    from rlhf_scratch.rewards import check_reward_spec

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


def _resume_into_its_run(config):
    """``--resume RUN`` without ``--out`` continues in RUN: an ``out`` left at its default (rm's runs/rm) is dropped,
    so that the resumed config takes the run's directory (``checkpoint.resumed_config``)."""
    if getattr(config, "resume", None) is None or getattr(config, "out", None) is None:
        return config
    default = next(f.default for f in dataclasses.fields(config) if f.name == "out")
    return dataclasses.replace(config, out=None) if default is not None and Path(config.out) == Path(default) else config


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
