#!/usr/bin/env python
"""Run every command of README.md and docs/*.md in reading order, in one fresh directory, as a new user would.

    python docs/check_docs.py            # every command as written (the long runs too: about an hour on 2 cores)
    python docs/check_docs.py --quick    # every command, with tiny sizes appended (CI; a few minutes)
    python docs/check_docs.py --list     # what would run, in order, and what is skipped and why

Reading order: README.md, then the pages in the order of the README's "Documentation" table, then any other
docs/*.md. What runs: each line of a ```bash block (comments dropped, `\\` continuations joined, `&&` chains run in
turn), each ```python block as one script, and each command in the first column of a README table
(`rlhf-scratch ...` in backticks). Output blocks without a language are never run.

All commands share one fresh directory (``--dir``, default a new temporary one), where ``experiments`` and
``benchmarks`` are links to the checkout's folders, so that `python experiments/x.py runs/x` works as written there.
A command passes when it exits with status 0 and prints no Python traceback; the first failure stops the check
(``--keep-going`` runs on). The environment is the one the check runs in (``RLHF_SCRATCH_CACHE``, ``HF_HUB_OFFLINE``,
``OMP_NUM_THREADS`` are passed through).

Not run, each with the reason printed: `pip install` (the check runs in the installed environment); commands that
need a CUDA GPU (``--device cuda``, when none is present) or several machines (``--nnodes``). A page can say more
about the block that follows with an HTML comment on the line before it (invisible when rendered):

    <!-- check-docs: skip REASON -->          the block is not run (e.g. it changes the installed packages)
    <!-- check-docs: root -->                 run the block in the checkout's root (e.g. `python -m pytest`)
    <!-- check-docs: full-only REASON -->     not run with --quick (e.g. the whole test suite, which CI runs itself)

``--quick`` (the documented way to keep the check short): every command still runs, in order, but with tiny sizes
appended to it (``QUICK_FLAGS``: e.g. `--phases 2 --batch-size 8` for the trainers, `--n 32` for `pairs`,
``QUICK_SCRIPT_FLAGS`` for the experiments) and with phase counts in the command shrunk to fit (``--snapshot-every``,
``--checkpoint-every`` and ``--stop-after-phase`` become 1). Flags given later win, so a command's own flags stay
what they say unless they set a size. `rlhf-scratch` and `python experiments/...` commands run inside this process
(no interpreter start per command); `torchrun` commands and everything else run as subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("experiments", "benchmarks")
"""Checkout folders linked into the fresh directory: the docs run their scripts by these relative paths."""

TRAINER_QUICK = ["--phases", "2", "--batch-size", "8", "--max-new-tokens", "8", "--eval-prompts", "8", "--table-rows", "2"]
QUICK_FLAGS = {
    "ppo": [*TRAINER_QUICK, "--minibatch-size", "4", "--ppo-epochs", "1"],
    "reinforce": [*TRAINER_QUICK, "--minibatch-size", "8"],
    "rloo": [*TRAINER_QUICK, "--group-size", "4", "--minibatch-size", "8"],
    "grpo": [*TRAINER_QUICK, "--group-size", "4", "--minibatch-size", "8"],
    "bon": ["--n-prompts", "8", "--max-new-tokens", "8"],
    "compare": ["--n-prompts", "8", "--max-new-tokens", "8"],
    "pairs": ["--n", "400", "--max-new-tokens", "8"],  # enough pairs for the DPO snippet's defaults (warmup 5 steps)
    "rm": ["--epochs", "1"],
    "dpo": ["--epochs", "1", "--batch-size", "8", "--warmup-steps", "0", "--n-eval-prompts", "8", "--max-new-tokens", "8"],
    "diff": ["--n-texts", "4", "--max-new-tokens", "8"],
    "patch": ["--n-texts", "4", "--max-new-tokens", "4"],
    "lens": ["--n-texts", "8", "--n-prompts", "4", "--max-new-tokens", "4"],
    "crosscode": ["--n-texts", "8", "--n-samples", "4", "--max-new-tokens", "4", "--n-latents", "64", "--k", "4",
                  "--steps", "20"],
    "sae": ["--n-texts", "8", "--n-features", "64", "--k", "4", "--steps", "20"],
    "inspect": ["--max-new-tokens", "8"],
    "pretrain": ["--n-texts", "400", "--n-heldout", "40", "--steps", "20", "--vocab-size", "320", "--n-layer", "1",
                 "--n-ctx", "64", "--n-samples", "4"],
}
"""Sizes appended to each `rlhf-scratch COMMAND` with --quick (later flags win)."""
QUICK_SCRIPT_FLAGS = {
    "bon_vs_rlhf.py": ["--phases", "1", "--n-prompts", "8"],
    "reinforce_vs_ppo.py": ["--phases", "1", "--batch-size", "16", "--n-prompts", "8"],
    "reward_model_levels.py": ["--n", "200", "--rm-epochs", "1", "--phases", "1", "--batch-size", "16", "--n-prompts", "8"],
    "fdpo_tradeoff.py": ["--n-samples", "400", "--epochs", "1", "--alphas", "0.5", "--batch-size", "8", "--n-prompts", "8"],
    "planted_behaviour.py": ["--quick"],
}
"""Flags appended to `python experiments/NAME ...` with --quick (a script's own --quick, where the page passes it,
sets its smoke-run sizes after these)."""
PHASE_FLAGS = ("--snapshot-every", "--checkpoint-every", "--stop-after-phase")
"""With --quick these become 1, so that a 2-phase run still snapshots, checkpoints or stops where the page expects."""

DIRECTIVE = re.compile(r"<!--\s*check-docs:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
TABLE_COMMAND = re.compile(r"`((?:rlhf-scratch|python) [^`]+)`")


@dataclass
class Snippet:
    """One thing to run: a shell command line or a Python script, with where it was written."""

    where: str  # FILE:LINE
    kind: str  # "bash" or "python"
    text: str
    options: dict[str, str] = field(default_factory=dict)  # from a check-docs comment: skip, root, full-only


# --------------------------------------------------------------------------- reading the pages


def reading_order() -> list[Path]:
    """README.md, the pages its Documentation table links in that order, then the other docs/*.md."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Documentation", 1)[-1]
    linked = [ROOT / p for p in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)\)", table)) if (ROOT / p).is_file()]
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in linked)
    return [ROOT / "README.md", *linked, *rest]


def snippets(path: Path) -> list[Snippet]:
    """The commands and scripts of one page, in order."""
    found, lines = [], path.read_text().splitlines()
    name, index, options = path.relative_to(ROOT), 0, {}
    while index < len(lines):
        line = lines[index]
        if directive := DIRECTIVE.search(line):
            key, _, value = directive.group(1).partition(" ")
            options = {**options, key: value or key}
            index += 1
            continue
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            indent = len(fence.group(1))  # a block inside a list item is indented: read it as written at column 0
            body, language = [line[indent:] for line in lines[index + 1 : end]], fence.group(2)
            if language in ("bash", "sh", "shell"):
                found += [Snippet(f"{name}:{index + 2 + offset}", "bash", command, options)
                          for offset, command in shell_commands(body)]
            elif language == "python":
                found.append(Snippet(f"{name}:{index + 2}", "python", "\n".join(body), options))
            index, options = end + 1, {}
            continue
        if line.startswith("|") and path.name == "README.md":  # the command table: its first column
            first_cell = line.split("|")[1]
            found += [Snippet(f"{name}:{index + 1}", "bash", command) for command in TABLE_COMMAND.findall(first_cell)]
        if line.strip():
            options = {}  # a directive applies to the block right after it
        index += 1
    return found


def shell_commands(body: list[str]) -> list[tuple[int, str]]:
    """(line offset, command line) for each command of a shell block: `\\` continuations joined; lines that are
    only a comment dropped (bash drops the comment at the end of a line itself)."""
    commands, pending, start = [], "", 0
    for offset, line in enumerate(body):
        start = offset if not pending else start
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        if shlex.split(text, comments=True):
            commands.append((start, text))
    return commands


# --------------------------------------------------------------------------- deciding what runs


def skip_reason(snippet: Snippet, quick: bool, has_cuda: bool) -> str | None:
    """Why a snippet is not run here, or None."""
    if "skip" in snippet.options:
        return snippet.options["skip"]
    if quick and "full-only" in snippet.options:
        return f"full check only: {snippet.options['full-only']}"
    words = shlex.split(snippet.text, comments=True) if snippet.kind == "bash" else []
    if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
        return "installs packages: the check runs in the installed environment"
    if "--nnodes" in words:
        return "needs several machines"
    if "cuda" in " ".join(words) and "--device" in words and not has_cuda:
        return "needs a CUDA GPU (none here)"
    return None


def quick_args(command: str, args: list[str]) -> list[str]:
    """``args`` of `rlhf-scratch COMMAND` with the --quick sizes: phase flags set to 1, QUICK_FLAGS appended."""
    args = [("1" if i > 0 and args[i - 1] in PHASE_FLAGS else a) for i, a in enumerate(args)]
    return args + QUICK_FLAGS.get(command, [])


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value words as an environment, and the command after them."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def environment(env: dict[str, str], argv: list[str], cwd: Path):
    """os.environ, sys.argv and the working directory set for one in-process command, restored after."""
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    os.environ.update(env)
    sys.argv = argv
    os.chdir(cwd)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)


def exit_status(call) -> int:
    """Run ``call()``; its status: the int it returns or raises as SystemExit, 1 for an exception (printed)."""
    try:
        result = call()
        return result if isinstance(result, int) else 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback is what the check reports
        traceback.print_exc()
        return 1


SHELL_OPERATORS = ("|", "||", ";", ">", ">>", "<", "&")


def run_snippet(snippet: Snippet, cwd: Path, quick: bool) -> int:
    """Run one snippet; its exit status. A Python block runs here; a command line with redirections or pipes runs
    as written with bash; otherwise each command of an `&&` chain runs in turn (``run_command``)."""
    root = "root" in snippet.options
    if snippet.kind == "python" and not root:
        with environment({}, ["snippet"], cwd):
            return exit_status(lambda: exec(compile(snippet.text, snippet.where, "exec"), {"__name__": "__main__"}))
    if snippet.kind == "python":
        return run_shell(f"python - <<'EOF'\n{snippet.text}\nEOF", cwd)
    words = shlex.split(snippet.text, comments=True)
    if any(word in SHELL_OPERATORS for word in words):
        return run_shell(snippet.text, cwd)
    chain, part = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            chain.append(part)
            part = []
        else:
            part.append(word)
    for command in chain:
        status = run_command(command, cwd, quick, in_process=not root)
        if status != 0:
            return status
    return 0


def run_command(words: list[str], cwd: Path, quick: bool, in_process: bool) -> int:
    """`rlhf-scratch ...`, `python -m rlhf_scratch ...` and `python experiments/x.py ...` run in this process (with
    the --quick sizes); anything else (torchrun, pytest, ...) with bash, a torchrun'd rlhf_scratch with the sizes."""
    env, words = split_env(list(words))
    if in_process and (words[:1] == ["rlhf-scratch"] or words[:3] == ["python", "-m", "rlhf_scratch"]):
        from rlhf_scratch.cli import main

        args = words[1:] if words[0] == "rlhf-scratch" else words[3:]
        if quick and args:
            args = [args[0], *quick_args(args[0], args[1:])]
        with environment(env, ["rlhf-scratch", *args], cwd):
            return exit_status(lambda: main(args))
    if in_process and words[:1] == ["python"] and len(words) > 1 and words[1].split("/")[0] in LINKED:
        args = words[2:] + (QUICK_SCRIPT_FLAGS.get(Path(words[1]).name, []) if quick else [])
        with environment(env, [words[1], *args], cwd):
            return exit_status(lambda: runpy.run_path(words[1], run_name="__main__"))
    if quick and "rlhf_scratch" in words and words.index("rlhf_scratch") + 1 < len(words):
        at = words.index("rlhf_scratch") + 1
        words = words[: at + 1] + quick_args(words[at], words[at + 1 :])
    return run_shell(shlex.join([f"{k}={v}" for k, v in env.items()] + words), cwd)


def run_shell(command: str, cwd: Path) -> int:
    """``command`` with bash in ``cwd``; the interpreter's bin folder first on PATH (for rlhf-scratch, torchrun)."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-3000:])
    sys.stderr.write(done.stderr[-3000:])
    return 1 if "Traceback (most recent call last)" in done.stderr else done.returncode


def fresh_directory(given: str | None) -> Path:
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="check_docs_"))
    directory.mkdir(parents=True, exist_ok=True)
    if any(p.name not in LINKED for p in directory.iterdir()):
        raise SystemExit(f"check_docs: {directory} is not empty; give a new or empty --dir.")
    for name in LINKED:
        if not (directory / name).exists():
            (directory / name).symlink_to(ROOT / name)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes appended to every command (CI)")
    parser.add_argument("--list", action="store_true", help="print what would run, and what is skipped, and stop")
    parser.add_argument("--dir", help="the fresh directory to run in (default: a new temporary one)")
    parser.add_argument("--keep-going", action="store_true", help="run every command even after a failure")
    args = parser.parse_args(argv)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    plan = [s for page in reading_order() for s in snippets(page)]
    if args.list:
        for s in plan:
            reason = skip_reason(s, args.quick, has_cuda)
            first = s.text.splitlines()[0] if s.text else ""
            print(f"{s.where:<40} {'skip: ' + reason if reason else 'run'}\n    {first[:150]}")
        return 0
    cwd = fresh_directory(args.dir)
    print(f"check_docs: {len(plan)} commands and scripts in {cwd}{' (--quick)' if args.quick else ''}")
    failures, start = [], time.time()
    for number, snippet in enumerate(plan, start=1):
        reason = skip_reason(snippet, args.quick, has_cuda)
        head = snippet.text.splitlines()[0][:120] if snippet.text else ""
        if reason:
            print(f"[{number}/{len(plan)}] {snippet.where}: skipped ({reason}): {head}", flush=True)
            continue
        print(f"[{number}/{len(plan)}] {snippet.where}: {head}", flush=True)
        began = time.time()
        status = run_snippet(snippet, ROOT if "root" in snippet.options else cwd, args.quick)
        print(f"    -> exit {status} in {time.time() - began:.1f} s", flush=True)
        if status != 0:
            failures.append(f"{snippet.where}: exit {status}: {head}")
            if not args.keep_going:
                break
    print(f"check_docs: {len(failures)} failed in {time.time() - start:.0f} s" + "".join(f"\n  {f}" for f in failures))
    if not failures and not args.dir:
        shutil.rmtree(cwd, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
