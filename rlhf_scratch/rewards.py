"""Reward functions: decoded texts → one float per text.

A reward is any object with a ``name: str`` and ``__call__(texts) -> Float[Tensor, "batch"]``
(the ``Reward`` protocol); one whose ``__call__`` has a ``prompts`` parameter also gets the
prompts. Trainers never call a reward directly: they call ``score_texts(reward, texts,
prompts)``, which checks the result's type, shape and finiteness and names the reward in
every error, so a broken reward stops the run at the first bad batch instead of turning
into NaN losses later.

Rewards return CPU float32 tensors; the trainer moves them to its device.

Build one from a command-line spec with ``make_reward`` (forms in ``REWARD_SPECS``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_scratch.data import HUB_ID_PATTERN, hub_is_reachable, hub_offline_var
from rlhf_scratch.models import ModelLoadError, brief
from rlhf_scratch.python_rewards import PythonFunctionReward, _check_python_file
from rlhf_scratch.reward_model import find_reward_model_dir, load_reward_model
from rlhf_scratch.reward_protocol import Reward, RewardError  # noqa: F401 (re-exported)
from rlhf_scratch.typecheck import typechecker
from rlhf_scratch.word_reward import WordReward, parse_word_spec

REWARD_SPECS = """\
Reward specs (--reward):
  vader                      VADER sentiment, compound score in [-1, 1]
  chars[:C]                  count of the character (or substring) C per text; default "."
  word:W[:presence|share|count|first|early]  pays for the word W (one token of the built-in tokenizer) in the response
  hf:PATH_OR_NAME:LABEL      a Hugging Face sequence classifier's logit for LABEL
  hf:PATH_OR_NAME:LABEL:prob ... its softmax probability for LABEL (":logit" is the default)
                             LABEL is a label name from config.id2label (any case) or an index;
                             e.g. hf:models/distilbert-imdb:POSITIVE
  rm:DIR                     a trained reward model: the --out folder of `rlhf-scratch rm` (or its
                             reward_model/ subfolder); scalar heads give r, distributional heads
                             the expected rating in [0, K-1]
  py:FILE.py:FUNCTION        your own function in a Python file: FUNCTION(texts) -> one float per
  py:MODULE:FUNCTION         text (a list, array or tensor); it also gets prompts=[...] if it has a
                             `prompts` parameter (texts are prompt + response)
  W*SPEC + W*SPEC ...        a weighted sum of the above, e.g. "vader + 0.1*chars:." (quote it);
                             a weight (default 1) is a number before `*`; terms are joined by `+`"""

HF_OUTPUTS = ("logit", "prob")


# --------------------------------------------------------------------------- rewards


class VaderReward:
    """VADER sentiment: ``polarity_scores(text)["compound"]`` in [−1, 1] (positive > 0)."""

    name = "vader"

    def __init__(self):
        # Optional at import time: only the vader reward needs the lexicon package.
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()  # loads the lexicon once

    @jaxtyped(typechecker=typechecker)
    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]:
        scores = [self._analyzer.polarity_scores(t)["compound"] for t in texts]
        return torch.tensor(scores, dtype=torch.float32)


class CharCountReward:
    """Occurrences of ``char`` in each text (``str.count``: non-overlapping, so a
    multi-character ``char`` counts substrings). With ``"."`` this is ARENA's
    "make the model write more sentences" task."""

    def __init__(self, char: str = "."):
        if not isinstance(char, str) or not char:
            raise RewardError(
                f"CharCountReward needs a non-empty string to count, got {char!r}; "
                'e.g. --reward chars:. or --reward "chars:!".'
            )
        self.char = char
        self.name = f"chars:{char}"

    @jaxtyped(typechecker=typechecker)
    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]:
        return torch.tensor([t.count(self.char) for t in texts], dtype=torch.float32)


class HFClassifierReward:
    """A Hugging Face sequence classifier's score for one label.

    ``output="logit"``: ``logits[:, label]`` (the TRL IMDB recipe uses the POSITIVE
    logit of ``lvwerra/distilbert-imdb``); ``output="prob"``:
    ``softmax(logits, -1)[:, label]``. ``label`` is a name matched case-insensitively
    against ``config.id2label``, or an index (an int, or a digit string that names no
    label). Texts are scored in batches of ``batch_size``, padded, and truncated to
    ``min(max_length, max_position_embeddings)`` tokens.

    ``name_or_path`` is a local directory (from ``save_pretrained`` or
    ``huggingface-cli download NAME --local-dir DIR``) or a hub name. Loading a hub
    name needs the hub or the local HF cache; when neither works it fails at once,
    saying how to get a local copy.
    """

    def __init__(
        self,
        name_or_path: str,
        label: str | int,
        output: str = "logit",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
    ):
        if output not in HF_OUTPUTS:
            raise RewardError(f"output must be one of {HF_OUTPUTS}, got {output!r}.")
        if batch_size < 1 or max_length < 1:
            raise RewardError(
                f"batch_size and max_length must be positive, got {batch_size} and {max_length}."
            )
        self.tokenizer, self.model = _load_classifier(str(name_or_path), device)
        self.device = torch.device(device)
        self.output = output
        self.batch_size = batch_size
        n_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, n_positions) if n_positions else max_length
        self.label_index = _resolve_label(self.model.config.id2label, label, name_or_path)
        self.label_name = self.model.config.id2label[self.label_index]
        self.name = f"hf:{name_or_path}:{self.label_name}" + (":prob" if output == "prob" else "")
        # Some tokenizers emit inputs the model does not take (token_type_ids for DistilBERT).
        self._input_names = set(inspect.signature(self.model.forward).parameters)
        if self.tokenizer.pad_token is None:  # GPT-2-style classifiers: pad with EOS
            if self.tokenizer.eos_token is None:
                raise RewardError(f"The tokenizer of {name_or_path} has no pad or EOS token.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.eos_token_id

    @jaxtyped(typechecker=typechecker)
    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]:
        scores = [torch.zeros(0)]
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                inputs = {k: v.to(self.device) for k, v in batch.items() if k in self._input_names}
                logits: Float[Tensor, "b labels"] = self.model(**inputs).logits.float()
                if self.output == "prob":
                    logits = torch.softmax(logits, dim=-1)
                scores.append(logits[:, self.label_index].cpu())
        return torch.cat(scores)


def _saved_architectures(directory: str) -> list[str] | None:
    """The ``architectures`` its config.json names, or None when that cannot be read (loading reports it)."""
    try:
        return list(json.loads(Path(directory, "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return None


def check_classifier_source(name_or_path: str) -> None:
    """RewardError unless ``name_or_path`` is an existing directory or could be a hub name (``owner/name``)."""
    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path) and (os.path.exists(path) or not HUB_ID_PATTERN.match(name_or_path)):
        raise RewardError(
            f"No such directory: {name_or_path}. Pass a directory holding a Hugging Face "
            "sequence classifier (config.json, weights, tokenizer files)."
        )


def _load_classifier(name_or_path: str, device):
    """(tokenizer, model in eval mode) from a local directory or a hub name; fails fast offline."""

    def load(**kwargs):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        return tokenizer, model.to(device).eval()  # eval: dropout off, scores deterministic

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        architectures = _saved_architectures(path)
        if architectures is not None and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise RewardError(
                f"{path} holds a {', '.join(architectures) or 'model'}, not a sequence classifier: loading it as one "
                "would score texts with a randomly initialised head. For a reward model trained here use "
                f"--reward rm:{name_or_path}; for hf: pass a *ForSequenceClassification model directory."
            )
        try:
            return load()
        except (OSError, ValueError) as error:
            raise RewardError(
                f"{path} is not a loadable sequence-classification model directory "
                f"({type(error).__name__}: {brief(error, 300)}). It needs config.json, the "
                "weights and the tokenizer files, as written by save_pretrained."
            ) from error
    check_classifier_source(name_or_path)
    how_to_fix = (
        f"Download the model on a machine with network (`huggingface-cli download "
        f"{name_or_path} --local-dir DIR`, or from_pretrained(...).save_pretrained(DIR) for "
        "the model and the tokenizer), copy DIR here and pass the local directory: "
        "--reward hf:DIR:LABEL."
    )
    offline = hub_offline_var(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    # An unreachable hub makes transformers retry for ~25 s per file: probe first, and
    # then look only in the local cache.
    local_only = offline is None and not hub_is_reachable()
    try:
        return load(local_files_only=True) if local_only else load()
    except (OSError, ValueError) as error:
        if offline or local_only:
            reason = f"{offline} is set" if offline else "the Hugging Face hub is unreachable"
            raise RewardError(
                f"Cannot load the reward classifier {name_or_path!r}: it is not a local "
                f"directory, {reason}, and it is not in the local HF cache. {how_to_fix}"
            ) from error
        raise RewardError(
            f"Cannot load the reward classifier {name_or_path!r} from the Hugging Face hub "
            f"({type(error).__name__}: {brief(error, 300)}). {how_to_fix}"
        ) from error


def _resolve_label(id2label: dict, label: str | int, where: str) -> int:
    """Index of ``label`` in ``id2label`` (name, any case; or an index)."""
    names = {int(i): str(n) for i, n in id2label.items()}
    available = ", ".join(f"{i}={n}" for i, n in sorted(names.items()))
    if isinstance(label, str):
        matches = [i for i, n in names.items() if n.lower() == label.lower()]
        if matches:
            return matches[0]
        if not label.isdigit():
            raise RewardError(f"{where} has no label {label!r}; its labels are: {available}.")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or label not in names:
        raise RewardError(f"{where} has no label index {label!r}; its labels are: {available}.")
    return label


class WeightedSumReward:
    """``r(x) = Σ_i w_i · r_i(x)``: several rewards in one (``--reward "vader + 0.1*chars:."``).

    Each term is scored through ``score_texts``, so an error names the term that failed; the
    prompts reach the terms that take them.
    """

    def __init__(self, terms: list[tuple[float, Any]], name: str):
        self.terms, self.name = terms, name

    def __call__(self, texts: list[str], prompts: list[str] | None = None) -> Float[Tensor, "batch"]:
        return sum(weight * score_texts(reward, texts, prompts) for weight, reward in self.terms)


# --------------------------------------------------------------------------- specs


_KINDS = r"(?:vader|chars|word:|hf:|rm:|py:)"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM_SEPARATOR = re.compile(rf"\s*\+\s*(?=(?:{_NUMBER}\s*\*\s*)?{_KINDS})")
"""A ``+`` that starts a new term: followed by an optional ``WEIGHT*`` and a reward kind (so ``chars:+`` stays one)."""
_WEIGHTED = re.compile(rf"^\s*({_NUMBER})\s*\*\s*(.*)$", re.DOTALL)


def parse_reward_spec(spec: str) -> tuple[str, tuple]:
    """``(kind, arguments)`` of a command-line reward spec (see ``REWARD_SPECS``), without loading anything:
    ``("vader", ())``, ``("chars", (char,))``, ``("word", (word, mode))``, ``("hf", (path_or_name, label, output))``, ``("rm", (directory,))``,
    ``("py", (file_or_module, function))``, or ``("sum", ((weight, spec), ...))`` for a weighted sum.

    ``hf:`` specs are split from the right, so a path may contain colons (a Windows
    drive, say) while the label and the output may not: an optional trailing
    ``:prob``/``:logit`` is taken off first, then the label is what follows the last
    remaining colon.
    """
    spec = spec.strip()
    terms = _TERM_SEPARATOR.split(spec)
    if len(terms) > 1 or _WEIGHTED.match(spec):
        weighted = []
        for term in terms:
            match = _WEIGHTED.match(term)
            weight, term_spec = (float(match[1]), match[2]) if match else (1.0, term)
            if not term_spec.strip() or _TERM_SEPARATOR.split(term_spec.strip())[1:] or _WEIGHTED.match(term_spec.strip()):
                raise RewardError(f"Bad reward spec {spec!r}: the term {term!r} has no reward after its weight. Write "
                                  'terms as WEIGHT*SPEC joined by +, e.g. "vader + 0.1*chars:.".')
            weighted.append((weight, term_spec.strip()))
        return "sum", tuple(weighted)
    if spec == "vader":
        return "vader", ()
    if spec == "chars":
        return "chars", (".",)
    if spec.startswith("chars:"):
        return "chars", (spec[len("chars:") :],)  # everything after it: "chars::" counts ":"
    if spec.startswith("word:"):
        return "word", parse_word_spec(spec[len("word:") :])
    if spec.startswith("hf:"):
        rest, output = spec[len("hf:") :], "logit"
        head, _, last = rest.rpartition(":")
        if last in HF_OUTPUTS and ":" in head:
            rest, output = head, last
        path, _, label = rest.rpartition(":")
        if not path or not label:
            raise RewardError(
                f"Bad reward spec {spec!r}: expected hf:PATH_OR_NAME:LABEL[:prob], "
                "e.g. hf:models/distilbert-imdb:POSITIVE."
            )
        return "hf", (path, label, output)
    if spec.startswith("rm:"):
        directory = spec[len("rm:") :]
        if not directory:
            raise RewardError(f"Bad reward spec {spec!r}: expected rm:DIR, the --out folder of `rlhf-scratch rm`.")
        return "rm", (directory,)
    if spec.startswith("py:"):
        source, _, function = spec[len("py:") :].rpartition(":")
        if not source or not function.isidentifier():
            raise RewardError(f"Bad reward spec {spec!r}: expected py:FILE.py:FUNCTION or py:MODULE:FUNCTION, "
                              "e.g. py:my_rewards.py:brevity.")
        return "py", (source, function)
    raise RewardError(f"Unknown reward spec {spec!r}.\n{REWARD_SPECS}")


def make_reward(spec: str) -> Reward:
    """Build a reward from a command-line spec (``parse_reward_spec``; the kinds are in ``REWARD_SPECS``)."""
    kind, arguments = parse_reward_spec(spec)
    if kind == "vader":
        return VaderReward()
    if kind == "chars":
        return CharCountReward(*arguments)
    if kind == "word":
        return WordReward(*arguments)
    if kind == "hf":
        path, label, output = arguments
        return HFClassifierReward(path, label, output=output)
    if kind == "py":
        return PythonFunctionReward(*arguments)
    if kind == "sum":
        return WeightedSumReward([(weight, make_reward(term)) for weight, term in arguments], name=spec.strip())
    return RewardModelReward(*arguments)


def check_reward_spec(spec: str) -> None:
    """Raise RewardError now, before any model loads, if ``spec`` is malformed or names a local directory that is
    missing (or holds no reward model): the checks of ``make_reward`` that read no weights."""
    kind, arguments = parse_reward_spec(spec)
    if kind == "chars":
        CharCountReward(*arguments)
    elif kind == "rm":
        try:
            find_reward_model_dir(arguments[0])
        except ModelLoadError as error:
            raise RewardError(str(error)) from error
    elif kind == "hf":
        check_classifier_source(arguments[0])
    elif kind == "py":
        _check_python_file(arguments[0])
    elif kind == "sum":
        for _, term in arguments:
            check_reward_spec(term)


class RewardModelReward:
    """A trained reward model as a reward (``--reward rm:DIR``): texts → rewards [B], CPU float32."""

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", batch_size: int = 64):
        try:
            self.model = load_reward_model(directory, device=device)
        except ModelLoadError as error:
            raise RewardError(str(error)) from error
        self.batch_size = batch_size
        self.name = f"rm:{directory}"

    @jaxtyped(typechecker=typechecker)
    def __call__(self, texts: list[str]) -> Float[Tensor, "batch"]:
        return self.model.score(texts, batch_size=self.batch_size)


# --------------------------------------------------------------------------- checking


def _reward_name(reward: Any) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or repr(reward))


@jaxtyped(typechecker=typechecker)
def score_texts(reward: Any, texts: list[str], prompts: list[str] | None = None) -> Float[Tensor, "batch"]:
    """``reward(texts)`` checked: a float tensor of shape [len(texts)] with no NaN or inf.

    ``prompts`` (the prompt of each text; texts begin with them) are passed on as ``prompts=`` to a
    reward whose ``__call__`` has a ``prompts`` parameter.

    The result is always float32: lists, numpy arrays and int/bool/float64 tensors are
    converted (on the reward's device). Every
    error names the reward; a non-finite score also names the first offending rows
    and their (truncated) texts.
    """
    name = _reward_name(reward)
    scores = reward(texts, prompts=prompts) if _takes_prompts(reward) else reward(texts)
    if not isinstance(scores, Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise RewardError(
                f"Reward {name!r} returned a {type(scores).__name__} that cannot be turned into "
                f"a float tensor ({error}); return a torch tensor of shape [batch]."
            ) from error
    if scores.is_complex() or not (scores.is_floating_point() or scores.dtype in _REAL_DTYPES):
        raise RewardError(f"Reward {name!r} returned dtype {scores.dtype}; return real floats.")
    # One dtype for every reward: counts are fine as rewards but losses need floats, and a
    # float64 reward would silently promote the advantages it is mixed into.
    scores = scores.float()
    if tuple(scores.shape) != (len(texts),):
        hint = " (squeeze the last dimension)" if tuple(scores.shape) == (len(texts), 1) else ""
        raise RewardError(
            f"Reward {name!r} returned shape {list(scores.shape)} for {len(texts)} texts; "
            f"expected [{len(texts)}], one score per text{hint}."
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        rows = "; ".join(f"[{i}] {scores[i].item()} for {_clip(texts[i])!r}" for i in bad[:3])
        raise RewardError(
            f"Reward {name!r} returned {len(bad)} non-finite score(s) (NaN or inf), first: {rows}."
        )
    return scores


def _takes_prompts(reward: Any) -> bool:
    try:
        return "prompts" in inspect.signature(reward).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


_REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
