"""Prompt data: where the texts come from, and how prompts are cut from them.

Two steps, each a plain function:

1. ``load_texts(source)`` gives a list of strings from the built-in review corpus,
   a local ``.txt`` / ``.jsonl`` / ``.csv`` file, or a Hugging Face dataset by name.
2. ``prompts_from_texts(texts, encode, n)`` ("dataset mode", as in the TRL IMDB
   recipe: each prompt is the first 2–8 tokens of a real text) or
   ``fixed_prefix_prompts(prefix, encode, n)`` (the ARENA mode: every row the
   same prompt) turns them into token-id lists of ragged length, ready for
   left-padding by the sampler.

``hub_offline_var`` and ``hub_is_reachable`` let any loader fail in a fraction of
a second when the hub cannot be reached, instead of retrying for ~25 s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import socket
import threading
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from rlhf_scratch.corpus import generate_reviews

FILE_EXTENSIONS = (".txt", ".jsonl", ".csv")
BUILTIN_DEFAULT_N = 2_000
# Pretraining draws the built-in corpus with seed 0; prompts use seed 1 + seed so
# that they are held-out reviews the model has not been trained on.
BUILTIN_PROMPT_SEED_OFFSET = 1
# "name" or "owner/name", as the hub spells repository ids.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class DataError(ValueError):
    """Prompt data could not be loaded or cut; the message says what to fix."""


# --------------------------------------------------------------------------- hub access


def hub_offline_var(names: Sequence[str] = _OFFLINE_VARS) -> str | None:
    """The first of ``names`` set to a true value (1/true/yes/on) in the environment, or None."""
    for name in names:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub endpoint ($HF_ENDPOINT, default huggingface.co) open?

    The Hugging Face libraries retry an unreachable hub five times with back-off
    (~25 s per file); this probe answers in at most ``timeout`` seconds. It runs in a
    daemon thread because a hanging DNS lookup ignores socket timeouts. Behind an HTTP
    proxy (HTTPS_PROXY / ALL_PROXY set) a direct probe says nothing, so it answers True
    and lets the library try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# --------------------------------------------------------------------------- texts


INVISIBLE = frozenset("\u115f\u1160\u2800\u3164\uffa0")
"""Characters that are neither whitespace nor a format/control character but print as nothing (Hangul fillers,
the blank Braille pattern)."""


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: every character is whitespace, a format character (zero-width space U+200B,
    joiners, the byte-order mark U+FEFF, soft hyphen: Unicode category Cf), a control character (Cc) or one of
    ``INVISIBLE``. ``str.strip()`` keeps the invisible ones, so a line of zero-width spaces would count as a text."""
    return all(c.isspace() or c in INVISIBLE or unicodedata.category(c) in ("Cf", "Cc") for c in text)


def load_texts(
    source: str,
    column: str = "text",
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Load a list of texts from ``source``.

    Sources:
      - ``"builtin"``: the built-in synthetic review corpus,
        ``generate_reviews(limit or 2000, seed=1 + seed)``. Pretraining draws the
        same generator with seed 0, so these are held-out prompts.
      - a local file, chosen by extension: ``.txt`` (one text per line), ``.jsonl``
        (one JSON object per line, text in field ``column``) or ``.csv`` (header row,
        text in column ``column``).
      - otherwise a Hugging Face dataset name such as ``"stanfordnlp/imdb"``:
        ``datasets.load_dataset(source, split=split)[column]``. This needs the
        dataset hub, or the dataset already in the local ``datasets`` cache. When
        the hub cannot be reached (probed with a 3 s timeout) it fails at once;
        when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, only the local cache is
        read (that also fails in milliseconds). Either way the message says to
        export the texts to a local file and pass its path.

    Blank texts (``is_blank``: empty, whitespace or invisible characters only) are dropped
    everywhere. ``limit`` keeps the first ``limit`` texts in source order (no
    shuffle: ``prompts_from_texts`` does the seeded sampling). ``seed`` is only
    used by ``"builtin"``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}.")
    source = str(source)
    if source == "builtin":
        texts = _load_builtin(limit or BUILTIN_DEFAULT_N, seed)
    else:
        path = Path(source).expanduser()
        if path.exists():
            texts = _load_file(path, column)
        elif names_local_file(source):
            raise DataError(
                f"No such file: {source} (resolved to {path.resolve()}). Check the path; "
                f"supported files are {', '.join(FILE_EXTENSIONS)}."
            )
        else:
            texts = _load_hub_dataset(source, column, split, limit)
    texts = [t for t in texts if not is_blank(t)]
    if not texts:
        raise DataError(f"{source} holds no texts (it is empty or every text is blank or invisible characters).")
    return texts[:limit] if limit is not None else texts


def names_local_file(source: str, extensions: tuple[str, ...] = FILE_EXTENSIONS) -> bool:
    """Whether ``source`` is meant as a local file rather than a hub dataset name: it exists, ends in one of
    ``extensions``, or is not shaped like a hub id. (A missing one of these is a missing file, not a dataset.)"""
    source = str(source)
    return (Path(source).expanduser().exists() or source.lower().endswith(extensions)
            or not HUB_ID_PATTERN.match(source))


def _load_builtin(n: int, seed: int) -> list[str]:
    # Imported here: the corpus module is only needed for the built-in source.

    return list(generate_reviews(n, seed=BUILTIN_PROMPT_SEED_OFFSET + seed))


def _load_file(path: Path, column: str) -> list[str]:
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a {', '.join(FILE_EXTENSIONS)} file.")
    suffix = path.suffix.lower()
    if suffix not in FILE_EXTENSIONS:
        raise DataError(
            f"Unknown file type {suffix or '(no extension)'!r} for {path}: supported are "
            f"{', '.join(FILE_EXTENSIONS)} (one text per line / one JSON object per line "
            "/ CSV with a header row). Convert the file or rename it."
        )
    f = read_text_file(path, csv_file=suffix == ".csv")
    if suffix == ".txt":
        return [line.rstrip("\r\n") for line in f]
    if suffix == ".jsonl":
        return _read_jsonl(f, path, column)
    return _read_csv(f, path, column)


def read_text_file(path: Path, csv_file: bool = False, error: type[ValueError] = DataError) -> io.StringIO:
    """The UTF-8 text of ``path`` as a line-iterable buffer; raises ``error`` for a file that is not text.

    Read once and checked before any parsing: a byte-order mark is dropped (spreadsheet exports
    often start with one), bytes that are not UTF-8 are an error, and so is a NUL byte. A NUL
    decodes as valid UTF-8, but text never holds one: a file with NULs is binary or UTF-16/32
    encoded, and read as lines it gives prompts such as "\\u0000". ``csv_file`` keeps line ends
    untranslated, as the csv module needs (a quoted cell may hold a newline).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="" if csv_file else None) as handle:
            content = handle.read()
    except UnicodeDecodeError as cause:
        raise error(f"{path} is not UTF-8 text ({cause}). Re-save it as UTF-8.") from cause
    nul = content.find("\x00")
    if nul >= 0:
        line = content.count("\n", 0, nul) + 1
        raise error(
            f"{path}, line {line}: a NUL byte (\\x00), the first of {content.count(chr(0))} in the file. A text file "
            "holds none: this one is binary, or saved as UTF-16/UTF-32. Re-save it as UTF-8 text."
        )
    return io.StringIO(content, newline="" if csv_file else "\n")


def _read_jsonl(lines, path: Path, column: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {lineno}: invalid JSON ({error.msg}). Each line must be one "
                f'JSON object such as {{"{column}": "..."}}.'
            ) from error
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}. "
                f'Each line must be one JSON object such as {{"{column}": "..."}}.'
            )
        if column not in row:
            raise DataError(
                f"{path}, line {lineno}: no field {column!r}; available fields: "
                f"{sorted(row)}. Pass column=... (--column) to choose one."
            )
        value = row[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{path}, line {lineno}: field {column!r} is a {type(value).__name__}, not a string."
            )
        texts.append(value)
    return texts


def _read_csv(f, path: Path, column: str) -> list[str]:
    reader = csv.DictReader(f, strict=True)
    with csv_errors(reader, path, start=[1]):  # the header row
        fieldnames = reader.fieldnames
    if fieldnames is None:
        return []  # empty file; load_texts reports "no texts"
    if column not in fieldnames:
        raise DataError(
            f"{path}: no column {column!r}; available columns: {list(fieldnames)}. "
            "Pass column=... (--column) to choose one."
        )
    # A short row gives None for the missing field: treat it as empty.
    return [row[column] or "" for _, row in csv_rows(reader, path)]


@contextmanager
def csv_errors(reader: csv.DictReader, path: Path, error: type[ValueError] = DataError, start: list[int] | None = None):
    """Turn a ``csv.Error`` of a strict reader into ``error``, naming the line where the broken row starts."""
    try:
        yield
    except csv.Error as cause:
        line = start[0] if start else max(1, reader.line_num)
        if "unexpected end of data" in str(cause):
            what = ("a quoted cell that starts on this line is never closed, so the rest of the file would be read "
                    'as one cell. Close the quote (a quote inside a quoted cell is written "")')
        else:
            what = (f"malformed CSV ({cause}). Put quotes around a cell that holds a comma, a quote or a line "
                    'break, and write a quote inside it as ""')
        raise error(f"{path}, line {line}: {what}.") from cause


def csv_rows(reader: csv.DictReader, path: Path, error: type[ValueError] = DataError):
    """``(line where the row starts, row)`` of a strict ``csv.DictReader``; a malformed row raises ``error``.

    A strict reader refuses what the lenient default silently misreads: an unterminated
    quote (the default reads the rest of the file into one cell) and a quote followed by
    text inside a quoted cell.
    """
    start = [reader.line_num + 1]
    rows = iter(reader)
    while True:
        with csv_errors(reader, path, error, start):
            row = next(rows, None)
        if row is None:
            return
        yield start[0], row
        start[0] = reader.line_num + 1


def open_hub_dataset(name: str, split: str, export_hint: str, error: type[ValueError] = DataError):
    """The ``split`` of the Hugging Face dataset ``name`` (needs the hub or a warm local cache).

    Fails fast offline: raises ``error`` with the reason followed by ``export_hint`` (how to
    export the data to a local file on a machine with network).
    """
    offline = hub_offline_var()
    # Without the offline flag, an unreachable hub makes `datasets` retry for ~25 s: probe first.
    if offline is None and not hub_is_reachable():
        raise error(
            f"{name!r} is not a local file, so it was taken as a Hugging Face dataset name, "
            f"but the dataset hub is unreachable. {export_hint}"
        )
    import datasets  # slow to import; only this source needs it

    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as cause:  # ConnectionError, DatasetNotFoundError, bad split
        reason = (
            f"{offline} is set and it is not in the local datasets cache"
            if offline
            else f"{type(cause).__name__}: {str(cause)[:300]}"
        )
        raise error(
            f"Could not load the Hugging Face dataset {name!r} (split {split!r}): {reason}. "
            f"If you meant a local file, no file {Path(name).resolve()} exists. {export_hint}"
        ) from cause


def _load_hub_dataset(name: str, column: str, split: str, limit: int | None) -> list[str]:
    export_hint = (
        "Export the texts to a local .txt/.jsonl/.csv file on a machine with network "
        f"(e.g. `datasets.load_dataset({name!r}, split={split!r}).to_json('texts.jsonl')`) "
        "and pass its path."
    )
    dataset = open_hub_dataset(name, split, export_hint)
    if column not in dataset.column_names:
        raise DataError(
            f"Dataset {name!r} has no column {column!r}; available columns: "
            f"{dataset.column_names}. Pass column=... (--column) to choose one."
        )
    if limit is not None:
        # Select rows before reading the column: a full column can be large.
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [t for t in dataset[column] if isinstance(t, str)]


# --------------------------------------------------------------------------- prompts


def prompts_from_texts(
    texts: list[str],
    encode: Callable[[str], list[int]],
    n: int,
    min_tokens: int = 2,
    max_tokens: int = 8,
    seed: int = 0,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """``n`` prompts, each the first k tokens of a text, k ~ Uniform{min_tokens..max_tokens}.

    This is the TRL IMDB recipe's "dataset mode". Texts are visited in a seeded
    permutation (``random.Random(seed)``), cycling through the same permutation again
    when ``n`` exceeds the number of usable texts. Texts with fewer than ``min_tokens``
    tokens are skipped; a text with fewer than k tokens is used whole (as TRL's
    ``input_ids[:k]``), so every prompt has between ``min_tokens`` and ``max_tokens``
    tokens. ``encode`` decides about a BOS token; one counts toward the length.

    ``decode`` (the tokenizer's, ids → text): cut only where the prompt decodes to whole
    characters. A byte-level tokenizer splits a character outside ASCII (an emoji, a
    zero-width space, most non-Latin letters) into several tokens, and a cut between them
    gives a prompt that decodes to "\\ufffd". When the drawn k cuts a character, k moves
    down to the nearest whole-character cut of at least ``min_tokens`` tokens, else up to
    one of at most ``max_tokens``; a text with neither is skipped. Without ``decode``
    the cut is at k wherever that falls. Texts of whole ASCII words give the same
    prompts either way.

    Returns a list of ``n`` token-id lists (ragged). Same arguments, same prompts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n (number of prompts) must be a positive integer, got {n!r}.")
    if not 1 <= min_tokens <= max_tokens:
        raise DataError(
            f"Need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, "
            f"max_tokens={max_tokens}."
        )
    if not texts:
        raise DataError("prompts_from_texts got no texts; load some with load_texts first.")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    cache: dict[int, list[int]] = {}  # encode each text once, even when cycling
    prompts: list[list[int]] = []
    cut_nowhere = 0  # texts long enough, but with no whole-character cut in [min_tokens, max_tokens]
    while len(prompts) < n:
        found_one = False
        for i in order:
            if i not in cache:
                cache[i] = _encode_checked(encode, texts[i])
            ids = cache[i]
            if len(ids) < min_tokens:
                continue
            k = rng.randint(min_tokens, max_tokens)
            if decode is not None:
                k = _whole_character_cut(ids, k, min_tokens, max_tokens, decode)
                if k is None:
                    cut_nowhere += 1
                    continue
            found_one = True
            prompts.append(ids[:k])
            if len(prompts) == n:
                break
        if not found_one:  # a whole pass without a usable text: cycling would never end
            longest = max(len(ids) for ids in cache.values())
            if cut_nowhere:
                raise DataError(
                    f"No text can be cut to {min_tokens}-{max_tokens} tokens that decode to whole characters "
                    f"({cut_nowhere} texts are long enough, but each cut in that range splits a character into "
                    "its bytes). Raise max_tokens (--max-prompt-tokens)."
                )
            raise DataError(
                f"No text has at least min_tokens={min_tokens} tokens (the longest has "
                f"{longest}). Lower min_tokens or use longer texts."
            )
    return prompts


MAX_TOKENS_PER_CHARACTER = 4
"""A byte-level tokenizer spends at most one token per byte, and UTF-8 uses at most 4 bytes per character."""


def _whole_character_cut(ids: list[int], k: int, min_tokens: int, max_tokens: int, decode) -> int | None:
    """The cut nearest ``k`` (down first, then up, within [min_tokens, max_tokens]) whose prefix is whole characters."""
    k = min(k, len(ids))  # a short text is used whole, and a whole text always is whole characters
    for cut in [*range(k, min_tokens - 1, -1), *range(k + 1, min(max_tokens, len(ids)) + 1)]:
        if _cuts_between_characters(ids, cut, decode):
            return cut
    return None


def _cuts_between_characters(ids: list[int], cut: int, decode) -> bool:
    """Does ``ids[:cut]`` decode to whole characters of the text?

    Cut inside a character, the prefix decodes to "\\ufffd" where the longer prefix that
    completes the character decodes to the character itself, so the short one is not a
    prefix of the long one. Cut between characters, it is (a real "\\ufffd" in the text
    is in both).
    """
    if cut >= len(ids):
        return True
    return decode(ids[: cut + MAX_TOKENS_PER_CHARACTER]).startswith(decode(ids[:cut]))


def fixed_prefix_prompts(prefix: str, encode: Callable[[str], list[int]], n: int) -> list[list[int]]:
    """``n`` copies of ``encode(prefix)`` (the ARENA setup: one prompt, many samples).

    Each row is its own list, so editing one prompt does not change the others.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n (number of prompts) must be a positive integer, got {n!r}.")
    ids = _encode_checked(encode, prefix)
    if not ids:
        raise DataError(
            f"The prefix {prefix!r} encodes to no tokens; pass a non-empty prefix "
            "(or an encoder that prepends a BOS token)."
        )
    return [list(ids) for _ in range(n)]


def _encode_checked(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """``encode(text)`` as a flat list of Python ints, with a clear error for a 2-D result."""
    ids = encode(text)
    if getattr(ids, "ndim", 1) != 1:
        raise DataError(
            f"encode must return a flat sequence of token ids, got shape {tuple(ids.shape)}. "
            "(`to_tokens` returns [1, seq]: take row 0.)"
        )
    return [int(t) for t in ids]
