"""docs/check_docs.py: what it extracts from a page and runs, and a static check of the real docs that runs in
seconds (no two commands write the same --out, every file a command reads is made by an earlier one)."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "docs" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # its dataclass looks its module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["check_docs"]
    return module


PAGE = """# A page

| command | what |
|---|---|
| `rlhf-scratch sample -n 2` / `rlhf-scratch ppo --out runs/t` | two commands in one cell |

```bash
rlhf-scratch ppo --out runs/a \\
    --phases 40   # a comment
# only a comment
OMP_NUM_THREADS=1 python experiments/step_through.py && rlhf-scratch diff --out runs/d
```

```
output, never run
```

<!-- check-docs: skip changes the environment -->
```bash
pip install something-else
```

- a list item with a block:

  ```python
  def f():
      return 1
  ```
"""


def test_snippets_are_read_in_order_with_directives(check_docs, tmp_path, monkeypatch):
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)
    page = tmp_path / "README.md"
    page.write_text(PAGE)
    found = check_docs.snippets(page)
    assert [(s.kind, s.text) for s in found] == [
        ("bash", "rlhf-scratch sample -n 2"),
        ("bash", "rlhf-scratch ppo --out runs/t"),
        ("bash", "rlhf-scratch ppo --out runs/a      --phases 40   # a comment"),
        ("bash", "OMP_NUM_THREADS=1 python experiments/step_through.py && rlhf-scratch diff --out runs/d"),
        ("bash", "pip install something-else"),
        ("python", "def f():\n    return 1"),
    ]
    assert found[4].options == {"skip": "changes the environment"} and found[5].options == {}
    assert [s.where for s in found[:4]] == ["README.md:5", "README.md:5", "README.md:8", "README.md:11"]
    assert check_docs.skip_reason(found[4], quick=False, has_cuda=False) == "changes the environment"


def test_quick_sizes_keep_the_meaning_of_phase_flags(check_docs):
    args = check_docs.quick_args("ppo", ["--out", "runs/a", "--phases", "40", "--checkpoint-every", "10",
                                         "--stop-after-phase", "20", "--snapshot-every", "5"])
    assert args[:10] == ["--out", "runs/a", "--phases", "40", "--checkpoint-every", "1", "--stop-after-phase", "1",
                         "--snapshot-every", "1"]
    assert args[10:12] == ["--phases", "2"]  # appended: the later flag wins
    assert check_docs.quick_args("score", ["--pairs", "p.jsonl"]) == ["--pairs", "p.jsonl"]


def run_commands(check_docs) -> list[tuple[str, list[str]]]:
    """(where, words) of every command the full check would run (skipped and root blocks left out)."""
    commands = []
    for page in check_docs.reading_order():
        for snippet in check_docs.snippets(page):
            if snippet.kind != "bash" or check_docs.skip_reason(snippet, quick=False, has_cuda=True):
                continue
            words = shlex.split(snippet.text, comments=True)
            part = []
            for word in [*words, "&&"]:
                if word == "&&":
                    commands.append((snippet.where, part))
                    part = []
                else:
                    part.append(word)
    return commands


def test_the_docs_never_write_the_same_out_twice(check_docs):
    """In reading order, a second command into an --out that holds a run is refused (issue 22: runs/ppo, runs/pairs,
    runs/dpo, runs/cmp and runs/bon were each made twice)."""
    seen = {}
    for where, words in run_commands(check_docs):
        if "--out" in words and "--resume" not in words and "--nnodes" not in words and "cuda" not in words:
            out = words[words.index("--out") + 1]
            assert out not in seen, f"{where} writes --out {out}, already written at {seen[out]}"
            seen[out] = where
    assert "runs/ppo" in seen and "runs/pairs" in seen


def test_every_run_a_command_reads_was_made_before(check_docs):
    """--policy, --checkpoint, --pairs, --timeline, --resume, rm:DIR and SYSTEM:DIR name a run made earlier."""
    made, missing = set(), []
    for where, words in run_commands(check_docs):
        for i, word in enumerate(words[:-1]):
            value = words[i + 1]
            reads = [value] if word in ("--policy", "--checkpoint", "--pairs", "--timeline", "--resume", "--model") else []
            if word == "--reward" and value.startswith("rm:"):
                reads = [value[3:]]
            if word == "--systems":
                reads = [w.split(":", 1)[1] for w in words[i + 1 :] if w.split(":")[0] in ("ppo", "reinforce", "dpo")]
            for path in reads:
                if path.startswith("runs/") and path.split("/")[1] not in made:
                    missing.append(f"{where}: {path}")
        if "--out" in words:
            made.add(words[words.index("--out") + 1].split("/")[1])
        if words[:2] == ["python", "experiments/fdpo_tradeoff.py"] or words[:2] == ["python", "experiments/bon_vs_rlhf.py"]:
            made.add(words[2].split("/")[1])
    assert not missing, missing
