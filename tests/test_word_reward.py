"""word:W pays for one word in the response: values by hand, the one-token rule, spec parsing."""

import pytest

from rlhf_scratch.rewards import RewardError, check_reward_spec, make_reward, parse_reward_spec, score_texts
from rlhf_scratch.word_reward import WordReward


@pytest.fixture()
def tokenizer(tiny_bridge):
    return tiny_bridge.tokenizer  # trained on the tiny texts of conftest: " was" is one token


PROMPTS = ["It was", "I think", "A film"]
TEXTS = ["It was good, it was, it WAS!", "I think the wasp left.", "A film"]
# responses: " good, it was, it WAS!" (5 words, 2 hits), " the wasp left." (3 words, 0 hits: inside a word), ""


def test_presence_share_and_count_by_hand(tokenizer):
    presence = WordReward("was", tokenizer=tokenizer)
    assert presence(TEXTS, prompts=PROMPTS).tolist() == [1.0, 0.0, 0.0]
    assert WordReward("was", "count", tokenizer=tokenizer)(TEXTS, prompts=PROMPTS).tolist() == [2.0, 0.0, 0.0]
    share = WordReward("was", "share", tokenizer=tokenizer)(TEXTS, prompts=PROMPTS).tolist()
    assert share == pytest.approx([2 / 5, 0.0, 0.0])
    # Without prompts the whole text counts: the prompt's "was" too.
    assert WordReward("was", "count", tokenizer=tokenizer)(TEXTS).tolist() == [3.0, 0.0, 0.0]
    assert score_texts(presence, TEXTS, PROMPTS).tolist() == [1.0, 0.0, 0.0]  # the trainers' checked call


def test_first_and_early_by_hand(tokenizer):
    texts = ["It was good, it was", "I think was it", "A film was", "A film"]
    prompts = ["It", "I think", "A film", "A film"]
    # responses: " was good, it was" (W first), " was it" (W first), " was" (W first), "" (no W)
    assert WordReward("was", "first", tokenizer=tokenizer)(texts, prompts=prompts).tolist() == [1.0, 1.0, 1.0, 0.0]
    texts = ["It good was", "It was", "It a b c was", "It wasp"]
    prompts = ["It"] * 4
    # responses: " good was" (index 1), " was" (0), " a b c was" (3), " wasp" (not the word)
    assert WordReward("was", "first", tokenizer=tokenizer)(texts, prompts=prompts).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert WordReward("was", "early", tokenizer=tokenizer)(texts, prompts=prompts).tolist() == pytest.approx(
        [1 / 2, 1.0, 1 / 4, 0.0])
    assert parse_reward_spec("word:director:first") == ("word", ("director", "first"))


def test_a_word_of_several_tokens_is_refused_in_one_line(tokenizer):
    with pytest.raises(RewardError, match=r"'xylophonequartz' is not one token .* splits into") as error:
        WordReward("xylophonequartz", tokenizer=tokenizer)
    assert "\n" not in str(error.value)


def test_spec_parsing():
    assert parse_reward_spec("word:director") == ("word", ("director", "presence"))
    assert parse_reward_spec("word:director:share") == ("word", ("director", "share"))
    assert parse_reward_spec("0.5*word:director + vader")[0] == "sum"
    for bad in ("word:", "word:two words", "word:director:often"):
        with pytest.raises(RewardError, match="expected word:W"):
            parse_reward_spec(bad)
    check_reward_spec("word:director:count")  # syntax only, loads nothing


def test_make_reward_uses_the_builtin_tokenizer(monkeypatch, tokenizer):
    import rlhf_scratch.word_reward as word_reward

    monkeypatch.setattr(word_reward, "builtin_tokenizer", lambda: tokenizer)
    reward = make_reward("word:was:share")
    assert reward.name == "word:was:share" and tokenizer.decode([reward.token_id]).strip() == "was"
