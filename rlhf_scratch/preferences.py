"""Preference pairs ``(prompt, chosen, rejected)``: loading, validation, and building them from scored samples.

Where pairs come from:

* ``load_pairs(path)`` -- a local ``.jsonl`` (one JSON object per line) or ``.csv`` (header
  row) with the fields ``prompt``, ``chosen``, ``rejected`` and optionally ``margin`` (≥ 0) or
  ``chosen_score`` and ``rejected_score``. Example line::

      {"prompt": "The plot", "chosen": " was a joy.", "rejected": " was dull.", "chosen_score": 0.6, "rejected_score": -0.3}

  A reward model reads ``prompt + chosen`` and ``prompt + rejected`` (plain concatenation, so
  put the separating space where it belongs).
* ``load_pairs(name)`` -- a Hugging Face ``datasets`` name in the binarized HelpSteer2 layout
  (the same fields); needs the dataset hub or the local ``datasets`` cache.
* ``run_pairs(PairsConfig(...))`` (``rlhf-scratch pairs``) -- the DPO-seed recipe: sample
  several responses per prompt from a model, score them with a reward, and pair responses
  above a winner threshold with responses at or below it (``build_pairs``).

Bad rows are never dropped silently: every bad row of a file is collected and reported
with its line number in one ``PairDataError``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlhf_scratch.config import TaskConfig
from rlhf_scratch.data import (
    csv_errors,
    csv_rows,
    fixed_prefix_prompts,
    is_blank,
    load_texts,
    names_local_file,
    open_hub_dataset,
    prompts_from_texts,
    read_text_file,
)
from rlhf_scratch.models import load_bridge
from rlhf_scratch.outputs import write_json
from rlhf_scratch.rewards import make_reward, score_texts
from rlhf_scratch.sampling import encode, generate

PAIR_FILE_EXTENSIONS = (".jsonl", ".csv")
TEXT_FIELDS = ("prompt", "chosen", "rejected")
NUMBER_FIELDS = ("margin", "chosen_score", "rejected_score")
MAX_REPORTED_ROWS = 20
"""At most this many bad rows are spelled out in one error (the count covers all of them)."""


class PairDataError(ValueError):
    """Preference pairs could not be loaded or built; the message says what to fix."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``prompt + chosen`` is preferred to ``prompt + rejected``.

    ``margin`` (how much better, ≥ 0) or ``chosen_score``/``rejected_score`` are optional;
    ``margin_value`` gives the margin a Bradley–Terry-with-margin loss uses.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None

    @property
    def margin_value(self) -> float | None:
        """``margin`` if given, else ``chosen_score − rejected_score`` if both scores are given, else None."""
        if self.margin is not None:
            return self.margin
        if self.chosen_score is not None and self.rejected_score is not None:
            return self.chosen_score - self.rejected_score
        return None


# --------------------------------------------------------------------------- loading


def load_pairs(source: str | os.PathLike, limit: int | None = None, split: str = "train") -> list[PreferencePair]:
    """Preference pairs from a local ``.jsonl``/``.csv`` file or a Hugging Face dataset name.

    Each row needs ``prompt``, ``chosen`` and ``rejected`` (``chosen`` and ``rejected`` must not
    be empty or whitespace-only; ``prompt`` may be empty) and may have ``margin`` (≥ 0),
    ``chosen_score`` and ``rejected_score`` (numbers; numeric strings such as ``"0.5"`` are read
    as numbers, so CSV works; an empty CSV cell means "absent"). Other fields are ignored.

    ``chosen``/``rejected`` may also be a list of chat messages ``[{"role": ..., "content":
    ...}, ...]`` (the layout of many binarized preference sets, where each holds the whole
    conversation): the content of the *last* ``assistant`` message is the response. A
    ``prompt`` given as a message list becomes the content of its last ``user`` message.

    Every bad row (invalid JSON, missing field, empty text, non-numeric or non-finite number,
    negative margin) is collected and all are reported together, with line numbers (1-based;
    a CSV header is line 1; for a dataset, the row index), in one ``PairDataError``.
    ``limit`` reads only the first ``limit`` rows. A source without pairs is an error too.

    A source that is not an existing local path and looks like a hub id is loaded with
    ``datasets.load_dataset(source, split=split)``; offline that fails at once with a message
    saying how to export the dataset to a local ``.jsonl``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PairDataError(f"limit must be a positive integer or None, got {limit!r}.")

    name = str(source)
    path = Path(name).expanduser()
    if path.exists():
        rows, where = _read_file(path, limit), str(path)
    elif names_local_file(name, PAIR_FILE_EXTENSIONS):
        raise PairDataError(
            f"No such file: {name} (resolved to {path.resolve()}). Pass a .jsonl or .csv file of "
            "pairs (fields prompt, chosen, rejected), or a Hugging Face dataset name."
        )
    else:
        rows, where = _read_hub(name, split, limit), f"dataset {name!r} (split {split!r})"

    pairs, problems = [], []
    for lineno, row in rows:
        if isinstance(row, str):  # a problem found while reading (e.g. invalid JSON)
            problems.append((lineno, row))
            continue
        try:
            pairs.append(_pair_from_row(row))
        except _RowError as error:
            problems.append((lineno, str(error)))
    if problems:
        unit = "row" if where.startswith("dataset") else "line"
        shown = "; ".join(f"{unit} {n}: {message}" for n, message in problems[:MAX_REPORTED_ROWS])
        more = f"; ... and {len(problems) - MAX_REPORTED_ROWS} more" if len(problems) > MAX_REPORTED_ROWS else ""
        raise PairDataError(
            f"{where}: {len(problems)} bad row{'s' if len(problems) != 1 else ''}: {shown}{more}. "
            "Fix or remove these rows."
        )
    if not pairs:
        raise PairDataError(
            f"{where} holds no preference pairs. Each row needs the fields prompt, chosen and rejected, "
            'e.g. {"prompt": "The film", "chosen": " was great.", "rejected": " was dull."}.'
        )
    return pairs


class _RowError(ValueError):
    """One row's problem; load_pairs collects them."""


def _read_file(path: Path, limit: int | None) -> list[tuple[int, dict | str]]:
    """``(line number, row dict or problem message)`` for each non-blank row of a local pair file."""
    if path.is_dir():
        raise PairDataError(f"{path} is a directory; pass a .jsonl or .csv file of pairs.")
    suffix = path.suffix.lower()
    if suffix not in PAIR_FILE_EXTENSIONS:
        raise PairDataError(
            f"Unknown pair file type {suffix or '(no extension)'!r} for {path}: use .jsonl (one JSON object "
            "per line) or .csv (header row prompt,chosen,rejected[,margin,chosen_score,rejected_score])."
        )
    rows: list[tuple[int, dict | str]] = []
    # Not UTF-8, or NUL bytes (a binary or UTF-16 file): one error before any row is read.
    handle = read_text_file(path, csv_file=suffix == ".csv", error=PairDataError)
    if suffix == ".jsonl":
        for lineno, line in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                rows.append((lineno, f"invalid JSON ({error.msg})"))
                continue
            rows.append((lineno, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"))
    else:
        # Strict: an unterminated quote is an error naming its line, not the rest of the file read as one cell.
        reader = csv.DictReader(handle, strict=True)
        with csv_errors(reader, path, PairDataError, start=[1]):
            fieldnames = reader.fieldnames
        if fieldnames is not None:
            missing = [f for f in TEXT_FIELDS if f not in fieldnames]
            if missing:
                raise PairDataError(
                    f"{path}: the header has no column{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(m) for m in missing)}; it has {list(fieldnames)}. The header "
                    "must name prompt, chosen, rejected (and optionally margin, chosen_score, rejected_score)."
                )
        for start, row in csv_rows(reader, path, PairDataError):  # a row's line is where it starts
            if None in row:
                rows.append((start, f"{len(row[None])} more cell(s) than the header has columns"))
            else:
                rows.append((start, row))
            if limit is not None and len(rows) >= limit:
                break  # before reading the next row: rows past the limit are not looked at
    return rows


def _read_hub(name: str, split: str, limit: int | None) -> list[tuple[int, dict]]:
    """``(row index, row dict)`` of a Hugging Face dataset; fails fast when the hub cannot be reached."""

    export_hint = (
        "On a machine with network, export it to a local file: `datasets.load_dataset("
        f"{name!r}, split={split!r}).to_json('pairs.jsonl')` (fields prompt, chosen, rejected, and "
        "chosen_score/rejected_score if present), copy pairs.jsonl here and pass its path."
    )
    dataset = open_hub_dataset(name, split, export_hint, error=PairDataError)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(enumerate(dataset))


def _message_content(value, field: str, role: str):
    """A string field, or the content of the last ``role`` message of a chat-message list."""
    if not isinstance(value, list):
        return value
    contents = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
    if not contents:
        raise _RowError(f"{field!r} is a message list without a {role!r} message")
    return contents[-1]


def _number(row: dict, field: str) -> float | None:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise _RowError(f"{field!r} is {value!r}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _RowError(f"{field!r} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise _RowError(f"{field!r} is {value!r}, not a finite number")
    return number


def _pair_from_row(row: dict) -> PreferencePair:
    texts = {}
    for field in TEXT_FIELDS:
        if field not in row or row[field] is None:
            raise _RowError(f"missing field {field!r}")
        value = _message_content(row[field], field, "user" if field == "prompt" else "assistant")
        if not isinstance(value, str):
            raise _RowError(f"{field!r} is a {type(value).__name__}, not a string")
        if field != "prompt" and is_blank(value):
            raise _RowError(f"{field!r} is empty" + (" (only invisible characters)" if value.strip() else ""))
        texts[field] = value
    numbers = {field: _number(row, field) for field in NUMBER_FIELDS}
    if numbers["margin"] is not None and numbers["margin"] < 0:
        raise _RowError(f"'margin' is {numbers['margin']}, negative (a margin says how much better chosen is: >= 0)")
    return PreferencePair(**texts, **numbers)


def write_pairs(path: str | os.PathLike, pairs: list[PreferencePair]) -> Path:
    """Write pairs as JSON lines (optional fields only when set), atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps({k: v for k, v in asdict(pair).items() if v is not None}) + "\n")
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------- building pairs from scored samples


def drop_duplicate_pairs(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """``(pairs with each (prompt, chosen, rejected) once, number of copies dropped)``; the first copy is kept, in order.

    A copy of a pair adds nothing to train on, and a copy on each side of the held-out split makes held-out
    accuracy measure memory (a file of doubled pairs gave ``rm`` a held-out accuracy of 1.000). Pairs that
    differ only in ``margin`` or scores are copies too: the texts are what a model reads.
    """
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for pair in pairs:
        key = (pair.prompt, pair.chosen, pair.rejected)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique, len(pairs) - len(unique)


def duplicates_note(n_dropped: int, n_pairs: int, source) -> str:
    """The line trainers print after ``drop_duplicate_pairs``: what was dropped, from where, and what is left."""
    return (f"dropped {n_dropped} duplicate pair{'s' if n_dropped != 1 else ''} (same prompt, chosen and rejected as an "
            f"earlier row) of {n_pairs} in {source}: each pair is trained on or held out once; {n_pairs - n_dropped} remain.")


def drop_pairs_without_preference(pairs: list[PreferencePair], source) -> tuple[list[PreferencePair], str | None]:
    """``(the pairs whose chosen and rejected texts differ, a note saying how many were dropped or None)``.

    A pair whose two responses are the same text (after stripping whitespace) states no preference: every
    reward model scores both alike, so it can only be "wrong" on it, and DPO's loss on it is a constant.
    Some public preference sets contain such rows. If no pair is left, PairDataError.
    """
    kept = [pair for pair in pairs if pair.chosen.strip() != pair.rejected.strip()]
    dropped = len(pairs) - len(kept)
    if pairs and not kept:
        raise PairDataError(f"Every pair in {source} has the same text as chosen and as rejected, so none states a "
                            "preference. Check how the file was built (the columns may be swapped or duplicated).")
    note = (f"dropped {dropped} pair{'s' if dropped != 1 else ''} of {len(pairs)} in {source} whose chosen and rejected "
            f"are the same text (no preference); {len(kept)} remain{'s' if len(kept) == 1 else ''}.") if dropped else None
    return kept, note


def usable_pairs(pairs: list[PreferencePair], source, note: Callable[[str], None]) -> tuple[list[PreferencePair], int]:
    """``(the pairs a trainer learns from, number of duplicates dropped)``: ``drop_pairs_without_preference``, then
    ``drop_duplicate_pairs``; ``note`` receives the line saying what each dropped, when it dropped anything.
    What ``rm`` and ``dpo`` both do with a pair file before splitting it."""
    pairs, no_preference = drop_pairs_without_preference(pairs, source)
    if no_preference:
        note(no_preference)
    # A copy of a pair on each side of the held-out split would make held-out accuracy measure memory.
    kept, n_duplicates = drop_duplicate_pairs(pairs)
    if n_duplicates:
        note(duplicates_note(n_duplicates, len(pairs), source))
    return kept, n_duplicates


def split_heldout(pairs: list[PreferencePair], heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, heldout)`` pair indices (sorted), about ``heldout_fraction`` of the pairs held out, split by prompt.

    Every pair of a held-out prompt is held out, so held-out accuracy is measured on prompts the
    model never trained on (pairs built from samples share their prompt: 4 samples per prompt give up
    to 2 pairs). Prompts are visited in a seeded shuffle and held out until round(fraction·N) pairs
    (at least 1) are; at least one prompt stays for training. With a single prompt (fixed-prefix
    data) there is nothing to group by, and pairs are held out by their texts instead: copies of a pair (see
    ``drop_duplicate_pairs``) still land on the same side.
    """
    if not 0 <= heldout_fraction < 1:
        raise PairDataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
    n = len(pairs)
    if heldout_fraction == 0:
        return list(range(n)), []
    if n < 2:
        raise PairDataError(f"{n} pair(s) cannot be split into training and held-out pairs "
                            f"(heldout_fraction {heldout_fraction}); add pairs or pass --heldout-fraction 0.")
    target = max(1, round(heldout_fraction * n))
    groups: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(index)
    if len(groups) == 1:  # one prompt: hold out single pairs, grouped by content so that copies stay together
        groups = {}
        for index, pair in enumerate(pairs):
            groups.setdefault(json.dumps([pair.chosen, pair.rejected]), []).append(index)
    prompts = list(groups)
    random.Random(seed).shuffle(prompts)
    heldout: list[int] = []
    for prompt in prompts[:-1]:  # the last prompt always stays for training
        if len(heldout) >= target:
            break
        heldout += groups[prompt]
    held = set(heldout)
    return [i for i in range(n) if i not in held], sorted(heldout)


def build_pairs(
    prompts: list[str], responses: list[list[str]], scores: list[list[float]], threshold: float
) -> list[PreferencePair]:
    """Pairs from scored responses, the DPO-seed recipe.

    For each prompt ``prompts[k]`` with responses ``responses[k]`` and their scores
    ``scores[k]``: responses with score > ``threshold`` are winners, those with score ≤
    ``threshold`` losers. Winners are sorted best first, losers worst first (ties keep their
    original order), and the i-th winner is paired with the i-th loser for i < min(#winners,
    #losers): the best winner with the worst loser, the second best with the second worst, and
    so on. Each response is used at most once, so a group with w winners and l losers gives
    min(w, l) pairs, and ``chosen_score > threshold ≥ rejected_score`` in every pair.
    Responses that are empty or whitespace-only are skipped (a pair file may not hold them).
    ``chosen_score``/``rejected_score`` are filled; ``margin`` is left unset.
    """
    if not len(prompts) == len(responses) == len(scores):
        raise PairDataError(
            f"build_pairs needs one response group and one score group per prompt; got {len(prompts)} prompts, "
            f"{len(responses)} response groups and {len(scores)} score groups."
        )
    pairs = []
    for k, (prompt, group, group_scores) in enumerate(zip(prompts, responses, scores)):
        if len(group) != len(group_scores):
            raise PairDataError(f"prompt {k}: {len(group)} responses but {len(group_scores)} scores.")
        if any(not math.isfinite(s) for s in group_scores):
            raise PairDataError(f"prompt {k}: a score is not finite ({group_scores}); check the reward.")
        scored = [(float(s), r) for r, s in zip(group, group_scores) if not is_blank(r)]
        winners = sorted((x for x in scored if x[0] > threshold), key=lambda x: -x[0])
        losers = sorted((x for x in scored if x[0] <= threshold), key=lambda x: x[0])
        pairs += [
            PreferencePair(prompt=prompt, chosen=w, rejected=l, chosen_score=ws, rejected_score=ls)
            for (ws, w), (ls, l) in zip(winners, losers)
        ]
    return pairs


@dataclass
class PairsConfig(TaskConfig):
    """Build preference pairs from a model's own samples: sample, score with a reward, pair winners with losers.

    Prompts come from ``--data`` (first min–max tokens of its texts; by default held-out built-in
    reviews) or ``--prompt``; each gets ``samples_per_prompt`` responses."""

    n: int = 5000
    """Number of sampled responses in total (n / samples_per_prompt prompts)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt; pairs are formed within a prompt's responses."""
    threshold: float = 0.0
    """Winner threshold: score > threshold wins, score <= threshold loses. With vader (compound in [-1, 1]), 0.0
    splits positive from neutral-or-negative texts: about half of the built-in model's samples each."""
    batch_size: int = 256
    """Sequences generated per forward batch."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/pairs")
    """Output directory: pairs.jsonl, config.json, summary.json."""

    def _checks(self) -> list[tuple[bool, str]]:
        spp = self.samples_per_prompt
        return [
            *super()._checks(),
            (spp >= 2, f"samples_per_prompt must be >= 2 (pairs are formed within a prompt's responses), got {spp}."),
            (self.n >= max(spp, 1), f"n ({self.n}) must be >= samples_per_prompt ({spp})."),
            (spp < 1 or self.n % spp == 0,
             f"n ({self.n}) must be a multiple of samples_per_prompt ({spp}); e.g. --n {max(spp, 1) * max(self.n // max(spp, 1), 1)}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (math.isfinite(self.threshold), f"threshold must be a finite number, got {self.threshold}."),
        ]


def run_pairs(config: PairsConfig) -> dict:
    """Sample ``config.n`` responses, score them, build pairs; write pairs.jsonl, config.json, summary.json.

    Returns the summary: n_prompts, n_samples, n_pairs (distinct pairs written), n_duplicates_dropped (copies of an
    earlier pair, not written), n_empty (empty responses, never paired),
    sample_score_mean, frac_above_threshold, chosen_score_mean, rejected_score_mean, threshold,
    pairs_file, seconds.
    """


    console = Console()
    start = time.time()
    torch.manual_seed(config.seed)
    bridge = load_bridge(config.model, device=config.device)
    reward = make_reward(config.reward)
    n_prompts = config.n // config.samples_per_prompt

    def encode_text(text: str) -> list[int]:
        return encode(bridge.tokenizer, text, prepend_bos=config.prepend_bos)

    if config.prompt is not None:
        prompt_ids = fixed_prefix_prompts(config.prompt, encode_text, n_prompts)
    else:
        texts = load_texts(config.data, column=config.column, seed=config.seed)
        prompt_ids = prompts_from_texts(texts, encode_text, n_prompts, min_tokens=config.min_prompt_tokens,
                                        max_tokens=config.max_prompt_tokens, seed=config.seed, decode=bridge.tokenizer.decode)
    # Row r answers prompt r // samples_per_prompt: a prompt's responses are consecutive.
    rows = [ids for ids in prompt_ids for _ in range(config.samples_per_prompt)]
    generator = torch.Generator().manual_seed(config.seed)
    prompt_texts, responses, scores = [], [], []
    columns = [TextColumn("[bold]pairs[/] sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("sample", total=len(rows))
        for i in range(0, len(rows), config.batch_size):
            generation = generate(bridge, rows[i : i + config.batch_size], config.sampling, generator=generator)
            prompt_texts += generation.prompts
            responses += generation.responses
            # Rounded: float32 rewards would otherwise print as 0.4767000079154968 in the jsonl.
            scores += [round(s, 6) for s in score_texts(reward, generation.texts, generation.prompts).tolist()]
            progress.update(task, advance=len(generation.prompts))

    spp = config.samples_per_prompt
    groups = range(0, len(rows), spp)
    pairs = build_pairs([prompt_texts[g] for g in groups], [responses[g : g + spp] for g in groups],
                        [scores[g : g + spp] for g in groups], config.threshold)
    if not pairs:
        above = sum(score > config.threshold for score in scores)
        raise ValueError(
            f"No pairs: no prompt had responses on both sides of --threshold {config.threshold} ({above} of {len(scores)} "
            f"samples scored above it, mean score {sum(scores) / len(scores):+.3f}). Move --threshold towards the "
            "median score or raise --samples-per-prompt; nothing was written."
        )
    # Prompts repeat (always with --prompt) and so do short responses: a pair may come out twice. Written once, so
    # that n_pairs is what rm and dpo will train on (they would drop the copies anyway).
    n_built = len(pairs)
    pairs, n_duplicates = drop_duplicate_pairs(pairs)
    if n_duplicates:
        console.print(f"note: {duplicates_note(n_duplicates, n_built, 'the pairs built')}")
    out = Path(config.out)
    write_json(out / "config.json", config)
    write_pairs(out / "pairs.jsonl", pairs)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    summary = {
        "reward": reward.name,
        "n_prompts": n_prompts,
        "n_samples": len(rows),
        "n_pairs": len(pairs),
        "n_duplicates_dropped": n_duplicates,
        "n_empty": sum(is_blank(r) for r in responses),
        "sample_score_mean": mean(scores),
        "frac_above_threshold": mean([float(s > config.threshold) for s in scores]),
        "chosen_score_mean": mean([p.chosen_score for p in pairs]),
        "rejected_score_mean": mean([p.rejected_score for p in pairs]),
        "threshold": config.threshold,
        "pairs_file": str(out / "pairs.jsonl"),
        "seconds": time.time() - start,
    }
    write_json(out / "summary.json", summary)
    console.print(
        f"pairs: {len(pairs)} pairs from {len(rows)} samples ({n_prompts} prompts × {spp}); {reward.name} "
        f"chosen {summary['chosen_score_mean']:+.3f} vs rejected {summary['rejected_score_mean']:+.3f} "
        f"(threshold {config.threshold:g}); {summary['seconds']:.0f} s → {out / 'pairs.jsonl'}"
    )
    return summary
