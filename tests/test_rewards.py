"""Rewards: VADER, character counts, a (tiny, local) HF classifier, spec parsing, score_texts."""

import time

import numpy as np
import pytest
import torch

from rlhf_scratch import rewards
from rlhf_scratch.rewards import (
    REWARD_SPECS,
    CharCountReward,
    HFClassifierReward,
    RewardError,
    VaderReward,
    make_reward,
    parse_reward_spec,
    score_texts,
)

# --------------------------------------------------------------------------- simple rewards


def test_vader_sign_and_range():
    reward = make_reward("vader")
    assert isinstance(reward, VaderReward) and reward.name == "vader"
    scores = score_texts(
        reward,
        [
            "This movie was wonderful, I loved it, truly great!",
            "Terrible, boring and awful. I hated every minute.",
            "The film is 120 minutes long.",
        ],
    )
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] > 0.5 and scores[1] < -0.5
    assert scores[2] == 0.0  # no sentiment words: compound is exactly 0
    assert scores.abs().max() <= 1.0


def test_char_count_by_hand():
    texts = ["One. Two. Three.", "no periods", "...", ""]
    scores = score_texts(make_reward("chars:."), texts)
    assert scores.tolist() == [3.0, 0.0, 3.0, 0.0]
    bangs = make_reward("chars:!")
    assert bangs.name == "chars:!"
    assert score_texts(bangs, ["wow!!", "a!b"]).tolist() == [2.0, 1.0]


def test_char_count_validates_char():
    with pytest.raises(RewardError, match="non-empty string"):
        CharCountReward("")
    with pytest.raises(RewardError, match="non-empty string"):
        make_reward("chars:")


# --------------------------------------------------------------------------- spec parsing


def test_spec_parsing():
    assert make_reward("chars").name == "chars:."  # default char
    assert make_reward("chars::").char == ":"  # everything after the first colon
    assert make_reward("  vader ").name == "vader"


def test_hf_spec_split_from_the_right(monkeypatch):
    seen = []

    class Fake:
        def __init__(self, path, label, output="logit"):
            seen.append((path, label, output))

    monkeypatch.setattr(rewards, "HFClassifierReward", Fake)
    make_reward("hf:some/dir:POSITIVE")
    make_reward("hf:C:/models/imdb:negative:prob")  # a colon inside the path
    make_reward("hf:dir:1:logit")
    assert seen == [
        ("some/dir", "POSITIVE", "logit"),
        ("C:/models/imdb", "negative", "prob"),
        ("dir", "1", "logit"),
    ]
    with pytest.raises(RewardError, match="hf:PATH_OR_NAME:LABEL"):
        make_reward("hf:only-a-path")


def test_unknown_spec_lists_valid_forms():
    with pytest.raises(RewardError, match="Unknown reward spec 'sentiment'") as info:
        make_reward("sentiment")
    assert REWARD_SPECS in str(info.value)
    for form in ("vader", "chars", "hf:PATH_OR_NAME:LABEL", "rm:DIR"):
        assert form in REWARD_SPECS


def test_rm_spec_without_a_reward_model_is_a_clear_error(tmp_path):
    # Loading real reward models through rm:DIR is tested in test_reward_model.py.
    with pytest.raises(RewardError, match="No such reward model directory"):
        make_reward(f"rm:{tmp_path / 'missing'}")


# --------------------------------------------------------------------------- score_texts


class ConstReward:
    """Returns whatever it is given, to feed score_texts bad outputs."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __call__(self, texts):
        return self.value


@pytest.mark.parametrize(
    "value",
    [[1.5, -2.0], np.array([1.5, -2.0]), torch.tensor([1.5, -2.0], dtype=torch.float64)],
    ids=["list", "numpy", "float64"],
)
def test_score_texts_converts_to_float32(value):
    out = score_texts(ConstReward("r", value), ["a", "b"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.tolist() == [1.5, -2.0]


def test_score_texts_converts_counts_to_float32():
    out = score_texts(ConstReward("int", torch.tensor([3, 4])), ["a", "b"])
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 4.0]
    out = score_texts(ConstReward("bool", torch.tensor([True, False])), ["a", "b"])
    assert out.tolist() == [1.0, 0.0]


def test_score_texts_rejects_complex():
    with pytest.raises(RewardError, match="'cplx' returned dtype torch.complex64"):
        score_texts(ConstReward("cplx", torch.zeros(2, dtype=torch.complex64)), ["a", "b"])


def test_score_texts_rejects_unconvertible():
    with pytest.raises(RewardError, match="'junk'.*cannot be turned into a float tensor"):
        score_texts(ConstReward("junk", ["x", "y"]), ["a", "b"])


@pytest.mark.parametrize(
    "value, got",
    [(torch.zeros(3, 1), r"\[3, 1\]"), (torch.zeros(2), r"\[2\]"), (torch.tensor(1.0), r"\[\]")],
)
def test_score_texts_wrong_shape_names_reward(value, got):
    with pytest.raises(RewardError, match=rf"'shapey' returned shape {got} for 3 texts; expected \[3\]"):
        score_texts(ConstReward("shapey", value), ["a", "b", "c"])


def test_score_texts_hints_squeeze():
    with pytest.raises(RewardError, match="squeeze"):
        score_texts(ConstReward("col", torch.zeros(2, 1)), ["a", "b"])


def test_score_texts_nan_and_inf_name_rows_and_texts():
    texts = ["fine", "broken " * 20, "also fine", "infinite"]
    scores = torch.tensor([0.0, float("nan"), 1.0, float("inf")])
    with pytest.raises(RewardError) as info:
        score_texts(ConstReward("flaky", scores), texts)
    message = str(info.value)
    assert "'flaky'" in message and "2 non-finite" in message
    assert "[1] nan" in message and "[3] inf" in message and "'infinite'" in message
    assert "broken broken" in message and "..." in message  # long text truncated
    assert "'fine'" not in message  # finite rows are not listed


def test_score_texts_plain_function_uses_its_name():
    def my_reward(texts):
        return torch.full((len(texts) + 1,), 1.0)

    with pytest.raises(RewardError, match="'my_reward'"):
        score_texts(my_reward, ["a"])


# --------------------------------------------------------------------------- HF classifier


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A tiny DistilBERT sentiment classifier (random weights) and its word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny_distilbert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        ["the movie was great and i loved it", "the film was awful and boring", "a fine plot ."],
        trainers.WordLevelTrainer(special_tokens=specials),
    )
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    tokenizer.save_pretrained(directory)
    config = DistilBertConfig(
        vocab_size=raw.get_vocab_size(),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        pad_token_id=raw.token_to_id("[PAD]"),
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(directory)
    return directory


TEXTS = ["the movie was great", "awful", "the film was boring and i loved the plot .", "zebra unknown words"]


def direct_logits(directory, texts):
    """Each text through the model alone (no padding): the reference for the batched reward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).logits[0])
    return torch.stack(rows)


def test_hf_logit_matches_model(tiny_classifier_dir):
    reward = make_reward(f"hf:{tiny_classifier_dir}:POSITIVE")
    assert isinstance(reward, HFClassifierReward)
    assert reward.name == f"hf:{tiny_classifier_dir}:POSITIVE"
    assert not reward.model.training
    expected = direct_logits(tiny_classifier_dir, TEXTS)
    # batch_size 3 splits the 4 texts into a padded batch of 3 and a batch of 1
    reward.batch_size = 3
    scores = score_texts(reward, TEXTS)
    torch.testing.assert_close(scores, expected[:, 1], atol=1e-5, rtol=1e-5)
    assert scores.std() > 0  # the texts really get different scores


def test_hf_prob_is_softmax_and_label_case_insensitive(tiny_classifier_dir):
    expected = torch.softmax(direct_logits(tiny_classifier_dir, TEXTS), dim=-1)
    prob = make_reward(f"hf:{tiny_classifier_dir}:negative:prob")
    assert prob.label_index == 0 and prob.name.endswith(":NEGATIVE:prob")
    torch.testing.assert_close(score_texts(prob, TEXTS), expected[:, 0], atol=1e-5, rtol=1e-5)
    by_index = make_reward(f"hf:{tiny_classifier_dir}:1")
    assert by_index.label_index == 1 and by_index.label_name == "POSITIVE"
    assert score_texts(by_index, []).shape == (0,)


def test_hf_truncates_to_position_limit(tiny_classifier_dir):
    reward = HFClassifierReward(str(tiny_classifier_dir), "POSITIVE", max_length=512)
    assert reward.max_length == 64  # min(512, max_position_embeddings)
    scores = score_texts(reward, ["great " * 200, "awful"])  # 200 words would overflow positions
    assert torch.isfinite(scores).all()


def test_hf_unknown_label_lists_labels(tiny_classifier_dir):
    with pytest.raises(RewardError, match="no label 'joy'; its labels are: 0=NEGATIVE, 1=POSITIVE"):
        make_reward(f"hf:{tiny_classifier_dir}:joy")
    with pytest.raises(RewardError, match="no label index 7"):
        HFClassifierReward(str(tiny_classifier_dir), 7)
    with pytest.raises(RewardError, match="output must be one of"):
        HFClassifierReward(str(tiny_classifier_dir), 1, output="softmax")


def test_hf_hub_name_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(RewardError) as info:
        make_reward("hf:lvwerra/distilbert-imdb:POSITIVE")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "local directory" in message and "huggingface-cli download lvwerra/distilbert-imdb" in message


def test_hf_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(rewards, "hub_is_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(RewardError, match="hub is unreachable.*local directory"):
        HFClassifierReward("lvwerra/distilbert-imdb", "POSITIVE")
    assert time.perf_counter() - start < 5


def test_hf_missing_local_path(tmp_path):
    with pytest.raises(RewardError, match="No such directory"):
        make_reward(f"hf:{tmp_path / 'missing'}:POSITIVE")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="not a loadable sequence-classification model directory"):
        make_reward(f"hf:{tmp_path / 'empty'}:POSITIVE")


# --------------------------------------------------------------------------- rewards from your own code, sums

USER_REWARDS = '''
import math


def brevity(texts):
    return [-len(text) for text in texts]


def after_prompt(texts, prompts=None):
    return [float(len(text) - len(prompt)) for text, prompt in zip(texts, prompts)]


def broken(texts):
    return [1.0 / 0 for text in texts]


def nan_for_the_second(texts):
    return [math.nan if i == 1 else 0.0 for i, _ in enumerate(texts)]
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_a_function_in_a_python_file_is_a_reward(user_file):
    reward = make_reward(f"py:{user_file}:brevity")
    assert reward.name == f"py:{user_file}:brevity"
    assert score_texts(reward, ["abc", "a"]).tolist() == [-3.0, -1.0]
    # With a `prompts` parameter it gets the prompts: the response is what follows each prompt.
    assert score_texts(make_reward(f"py:{user_file}:after_prompt"), ["The cat sat", "Hi!"], ["The", "Hi"]).tolist() == [8.0, 1.0]


def test_a_function_in_an_importable_module_is_a_reward(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert score_texts(make_reward("py:my_rewards:brevity"), ["ab"]).tolist() == [-2.0]


def test_a_user_reward_that_raises_or_returns_nan_names_its_file_and_function(user_file):
    line = USER_REWARDS.splitlines().index("    return [1.0 / 0 for text in texts]") + 1
    with pytest.raises(RewardError, match=rf"broken in {user_file} raised ZeroDivisionError.*\(at {user_file} line {line}\)"):
        score_texts(make_reward(f"py:{user_file}:broken"), ["a"])
    with pytest.raises(RewardError, match=rf"py:{user_file}:nan_for_the_second.*1 non-finite score.*\[1\] nan for 'b'"):
        score_texts(make_reward(f"py:{user_file}:nan_for_the_second"), ["a", "b"])


@pytest.mark.parametrize("spec, message", [
    ("py:{dir}/missing.py:f", r"No such file: .*missing.py"),
    ("py:{file}:nope", r"has no function 'nope' \(callables defined there: after_prompt, brevity, broken"),
    ("py:{dir}/syntax.py:f", r"Loading .*syntax.py .* raised SyntaxError.*line 1"),
    ("py:no_such_module_xyz:f", r"Cannot import no_such_module_xyz"),
    ("py:{file}", r"expected py:FILE.py:FUNCTION"),
])
def test_a_user_reward_that_cannot_load_says_why(spec, message, user_file):
    (user_file.parent / "syntax.py").write_text("def f(texts) return 1\n")
    with pytest.raises(RewardError, match=message):
        make_reward(spec.format(dir=user_file.parent, file=user_file))


def test_a_weighted_sum_of_rewards_equals_its_terms_by_hand():
    texts = ["A great film. Loved it.", "Terrible. Awful. Bad."]
    vader = score_texts(make_reward("vader"), texts)
    periods = torch.tensor([2.0, 3.0])
    total = score_texts(make_reward("vader + 0.5*chars:."), texts)
    torch.testing.assert_close(total, vader + 0.5 * periods)
    torch.testing.assert_close(score_texts(make_reward("-2*chars:."), texts), -2 * periods)
    assert parse_reward_spec("chars:+ + 2*vader") == ("sum", ((1.0, "chars:+"), (2.0, "vader")))  # "chars:+" stays one


def test_a_weighted_sum_passes_prompts_and_names_the_failing_term(user_file):
    reward = make_reward(f"chars:a + 2*py:{user_file}:after_prompt")
    assert score_texts(reward, ["The cat sat", "Hi!"], ["The", "Hi"]).tolist() == [2 + 2 * 8.0, 2 * 1.0]  # "cat", "sat": two a
    with pytest.raises(RewardError, match="nan_for_the_second"):
        score_texts(make_reward(f"vader + py:{user_file}:nan_for_the_second"), ["a", "b"])
    with pytest.raises(RewardError, match="has no reward after its weight"):
        make_reward("0.5*")
