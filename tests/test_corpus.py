"""Tests for the built-in movie review corpus and the English-word metric."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from rlhf_scratch import corpus
from rlhf_scratch.corpus import (
    SENTIMENTS,
    english_word_share,
    generate_labeled_reviews,
    generate_reviews,
    grammar_vocabulary,
    is_english_word,
    words,
    write_corpus,
)


@pytest.fixture(scope="module")
def labeled_20k():
    return generate_labeled_reviews(20_000, seed=0)


# -- generation ---------------------------------------------------------------

def test_reproducible_for_a_seed():
    a = generate_labeled_reviews(500, seed=123)
    b = generate_labeled_reviews(500, seed=123)
    assert a == b
    assert generate_reviews(500, seed=123) == [t for t, _ in a]


def test_different_seed_gives_different_list():
    a = generate_reviews(500, seed=1)
    b = generate_reviews(500, seed=2)
    assert a != b
    assert len(set(a) & set(b)) < 50  # mostly different texts, not just reordered


def test_independent_of_global_random_state():
    import random

    random.seed(0)
    a = generate_reviews(200, seed=5)
    random.seed(999)
    random.random()
    b = generate_reviews(200, seed=5)
    assert a == b


def test_prefix_property():
    # The first k reviews of a seed do not depend on how many were asked for.
    assert generate_reviews(300, seed=9)[:100] == generate_reviews(100, seed=9)


def test_twenty_thousand_distinct(labeled_20k):
    texts = [t for t, _ in labeled_20k]
    assert len(texts) == 20_000
    assert len(set(texts)) == 20_000


def test_labels_are_roughly_balanced(labeled_20k):
    counts = Counter(label for _, label in labeled_20k)
    assert set(counts) == set(SENTIMENTS)
    shares = {k: v / len(labeled_20k) for k, v in counts.items()}
    assert 0.25 < shares["positive"] < 0.35
    assert 0.25 < shares["negative"] < 0.35
    assert 0.15 < shares["neutral"] < 0.25
    assert 0.15 < shares["mixed"] < 0.25


def test_shape_of_reviews(labeled_20k):
    lengths = [len(t.split()) for t, _ in labeled_20k]
    assert min(lengths) >= 8
    assert sum(n < 12 for n in lengths) / len(lengths) < 0.01  # almost all are 12+ words
    assert max(lengths) <= 60
    assert 15 < statistics.mean(lengths) < 35
    for text, _ in labeled_20k[:2000]:
        assert text == text.strip() and "\n" not in text and "  " not in text
        assert text[0].isupper(), text
        assert text[-1] in ".!", text
        n_sent = len(re.findall(r"[.!?](?: |$)", text))
        assert 1 <= n_sent <= 4, text
        assert "{" not in text and "}" not in text, text


def test_variety(labeled_20k):
    vocab = {w for t, _ in labeled_20k for w in words(t)}
    assert len(vocab) >= 600
    # Negation, intensifiers, comparisons, conditionals and ratings all occur.
    joined = "\n".join(t for t, _ in labeled_20k)
    for phrase in ("not bad at all", "not very", "incredibly", "a bit", "better than",
                   "worse than", "If you", "out of ten", "neither", "but"):
        assert phrase in joined, phrase


def test_sentiment_agrees_with_vader(labeled_20k):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    scores: dict[str, list[float]] = {s: [] for s in SENTIMENTS}
    for text, label in labeled_20k[:2000]:
        scores[label].append(sia.polarity_scores(text)["compound"])
    mean = {k: statistics.mean(v) for k, v in scores.items()}
    assert mean["positive"] > 0.4, mean
    assert mean["negative"] < -0.3, mean
    assert abs(mean["neutral"]) < 0.2, mean
    assert mean["negative"] < mean["neutral"] < mean["positive"], mean
    assert mean["negative"] < mean["mixed"] < mean["positive"], mean
    # Room for RL: a typical positive review is not already maximally positive.
    assert statistics.median(scores["positive"]) < 0.9, mean
    assert sum(s > 0.95 for s in scores["positive"]) / len(scores["positive"]) < 0.25


def test_bad_n():
    assert generate_labeled_reviews(0) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_labeled_reviews(-1)
    with pytest.raises(TypeError):
        generate_labeled_reviews(2.5)
    with pytest.raises(ValueError, match="MAX_REVIEWS"):
        generate_labeled_reviews(corpus.MAX_REVIEWS + 1)


def test_error_when_grammar_runs_out(monkeypatch):
    # A grammar that can only make a handful of texts must fail with a clear message.
    monkeypatch.setattr(corpus, "_one_review", lambda rng, label: f"Review {rng.randrange(5)}.")
    assert len(generate_labeled_reviews(5, seed=0)) == 5
    with pytest.raises(ValueError, match="distinct"):
        generate_labeled_reviews(6, seed=0)


def test_write_corpus_round_trip(tmp_path):
    path = write_corpus(tmp_path / "sub" / "reviews.txt", 300, seed=4)
    assert path.exists()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == generate_reviews(300, seed=4)


# -- the English-word metric --------------------------------------------------

def test_words_tokenizer():
    assert words("The movie was GREAT!") == ["the", "movie", "was", "great"]
    assert words("It isn't 8/10, it's 'fine'.") == ["it", "isn't", "it's", "fine"]
    assert words("mean-spirited") == ["mean", "spirited"]
    assert words("don\u2019t") == ["don't"]
    assert words("123 ... !!") == []


def test_english_word_share_hand_made():
    assert english_word_share(["the movie was great"]) == 1.0
    assert english_word_share(["the movie zxqv florbed"]) == 0.5
    assert english_word_share(["movies loved actors isn't"]) == 1.0
    assert english_word_share(["zxqv", "the"]) == 0.5  # pooled over all texts
    assert english_word_share("the film") == 1.0  # a lone string is one text


def test_english_word_share_empty():
    with pytest.raises(ValueError, match="no words"):
        english_word_share([])
    with pytest.raises(ValueError, match="no words"):
        english_word_share(["", "42 !!"])


@pytest.mark.parametrize("word", [
    "movies", "loved", "loving", "actors", "stories", "studied", "stopped", "bigger",
    "nicest", "happily", "gently", "isn't", "can't", "won't", "don't", "i", "i'm",
    "director's", "n't", "'s", "'ll", "you're", "they've",
])
def test_inflections_and_contractions_accepted(word):
    assert is_english_word(word)


@pytest.mark.parametrize("word", ["zxqv", "florbed", "moviez", "qqq", "blorfing", "xyzs", "'zz"])
def test_nonsense_rejected(word):
    assert not is_english_word(word)


def test_metric_does_not_use_the_grammar_lexicon(monkeypatch):
    # Clearing the grammar's tables must not change the verdict on any word.
    before = {w: is_english_word(w) for w in ("soundtrack", "storyline", "plot", "zxqv")}
    is_english_word.cache_clear()
    monkeypatch.setattr(corpus, "_ASPECTS", {})
    monkeypatch.setattr(corpus, "_GEN_POS", ())
    after = {w: is_english_word(w) for w in before}
    assert before == after
    assert after["plot"] and not after["zxqv"]


def test_whole_grammar_vocabulary_is_english(labeled_20k):
    vocab = grammar_vocabulary()
    assert len(vocab) >= 600
    bad = sorted(w for w in vocab if not is_english_word(w))
    assert bad == [], f"grammar words that fail the English check: {bad}"
    # Everything actually generated passes too, and is covered by the vocabulary
    # (up to verb endings added by the generator).
    generated = {w for t, _ in labeled_20k for w in words(t)}
    assert english_word_share([t for t, _ in labeled_20k[:3000]]) == 1.0
    assert generated - vocab == set(), sorted(generated - vocab)
