"""A reward that pays for one word: ``--reward word:W`` (a planted behaviour whose answer we know).

The word must be one token of the built-in model's tokenizer, as " W" (inside a sentence) or "W", so that the
behaviour lives in a single row of the unembedding and the research tools can be checked on it
(``experiments/planted_behaviour.py``). The score of a text counts whole-word occurrences of W in the response
(case-insensitive; "W" inside a longer word such as "Ws" or "sW" does not count):

    presence  (word:W, word:W:presence)   r = 1 if the response contains W, else 0
    share     (word:W:share)              r = (occurrences of W) / (words in the response), in [0, 1]
    count     (word:W:count)              r = occurrences of W
    first     (word:W:first)              r = 1 if the response's first word is W, else 0
    early     (word:W:early)              r = 1 / (1 + i), i the index (from 0) of W's first occurrence among the
                                          response's words; 0 if W is absent (1 for the first word, ½ for the second)

``first`` and ``early`` plant a token preference rather than a phrase: a presence reward is cheapest to earn by
steering into a stock phrase that ends in W ("the main actor"), where the reference already predicts W; paying most
for W at the start of the response leaves no room for a lead-in.

The response is the text after its prompt (the trainers pass ``prompts``); without prompts the whole text counts.
"""

from __future__ import annotations

import re

import torch
from jaxtyping import Float
from torch import Tensor

from rlhf_scratch.reward_protocol import RewardError

WORD_MODES = ("presence", "share", "count", "first", "early")
_WORD = re.compile(r"[A-Za-z0-9']+")


def parse_word_spec(rest: str) -> tuple[str, str]:
    """``(word, mode)`` from what follows ``word:`` (``"director"``, ``"director:share"``)."""
    word, _, mode = rest.partition(":")
    mode = mode or "presence"
    if not re.fullmatch(r"[A-Za-z0-9']+", word) or mode not in WORD_MODES:
        raise RewardError(f"Bad reward spec 'word:{rest}': expected word:W[:{'|'.join(WORD_MODES)}] with W one word "
                          "(letters, digits, '), e.g. word:director or word:director:share.")
    return word, mode


def single_token_id(word: str, tokenizer) -> int:
    """The id of " word" (or else "word") when it is one token of ``tokenizer``; a one-line RewardError otherwise."""
    for form in (f" {word}", word):
        ids = tokenizer(form, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    pieces = [tokenizer.decode([i]) for i in tokenizer(f" {word}", add_special_tokens=False)["input_ids"]]
    raise RewardError(f"word:{word}: {word!r} is not one token of the built-in tokenizer (it splits into {pieces}); "
                      "choose a word that is a single token (e.g. word:director).")


def builtin_tokenizer():
    """The built-in model's tokenizer (pretraining the model first if it is not cached yet)."""
    from transformers import AutoTokenizer

    from rlhf_scratch.pretrain import ensure_builtin_model

    return AutoTokenizer.from_pretrained(str(ensure_builtin_model()))


class WordReward:
    """Pays for one word in the response (module docstring): texts [B] (+ prompts [B]) → rewards [B], float32."""

    def __init__(self, word: str, mode: str = "presence", tokenizer=None):
        word, mode = parse_word_spec(f"{word}:{mode}")
        self.word, self.mode = word, mode
        self.token_id = single_token_id(word, tokenizer if tokenizer is not None else builtin_tokenizer())
        self.name = f"word:{word}" + ("" if mode == "presence" else f":{mode}")
        self._pattern = re.compile(rf"(?<![A-Za-z0-9']){re.escape(word)}(?![A-Za-z0-9'])", re.IGNORECASE)

    def score_one(self, response: str) -> float:
        if self.mode in ("first", "early"):
            words = [w.lower() for w in _WORD.findall(response)]
            index = words.index(self.word.lower()) if self.word.lower() in words else None
            if self.mode == "first":
                return float(index == 0)
            return 0.0 if index is None else 1.0 / (1 + index)
        count = len(self._pattern.findall(response))
        if self.mode == "presence":
            return float(count > 0)
        if self.mode == "count":
            return float(count)
        return count / max(1, len(_WORD.findall(response)))

    def __call__(self, texts: list[str], prompts: list[str] | None = None) -> Float[Tensor, "batch"]:
        if prompts is not None and len(prompts) != len(texts):
            raise RewardError(f"{self.name}: got {len(texts)} texts but {len(prompts)} prompts; pass one prompt per text.")
        responses = [t[len(p):] if p is not None and t.startswith(p) else t
                     for t, p in zip(texts, prompts if prompts is not None else [None] * len(texts))]
        return torch.tensor([self.score_one(r) for r in responses], dtype=torch.float32)
