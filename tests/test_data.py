"""Prompt data: loading texts from files / builtin / dataset names, and cutting prompts."""

import json
import socket
import time

import pytest

from rlhf_scratch import data
from rlhf_scratch.data import (
    DataError,
    fixed_prefix_prompts,
    hub_is_reachable,
    load_texts,
    prompts_from_texts,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- files


def test_txt_one_text_per_line_blank_lines_skipped(tmp_path):
    source = write(tmp_path / "t.txt", "first review\n\n   \nsecond review\r\nthird\n")
    assert load_texts(source) == ["first review", "second review", "third"]
    assert load_texts(source, limit=2) == ["first review", "second review"]  # file order


def test_jsonl_column(tmp_path):
    rows = [{"text": "a good one", "label": 1}, {"text": "a bad one", "label": 0}, {"text": ""}]
    source = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(source) == ["a good one", "a bad one"]  # empty text dropped
    source = write(tmp_path / "r.jsonl", '{"review": "x"}\n{"review": "y"}\n')
    assert load_texts(source, column="review") == ["x", "y"]


def test_csv_column_with_quotes_and_bom(tmp_path):
    source = tmp_path / "t.csv"
    source.write_text('\ufeffid,text\n1,"hello, world"\n2,"line one\nline two"\n3,\n', encoding="utf-8")
    assert load_texts(str(source)) == ["hello, world", "line one\nline two"]
    assert load_texts(str(source), column="id") == ["1", "2", "3"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="No such file: .*nope.txt"):
        load_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="No such file"):
        load_texts("./data/prompts")  # path-shaped, not a dataset name


def test_invalid_json_names_line(tmp_path):
    source = write(tmp_path / "t.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 3: invalid JSON"):
        load_texts(source)
    source = write(tmp_path / "list.jsonl", '["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        load_texts(source)
    source = write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match="field 'text' is a int, not a string"):
        load_texts(source)


def test_missing_column_lists_available(tmp_path):
    source = write(tmp_path / "t.jsonl", '{"review": "x", "stars": 5}\n')
    with pytest.raises(DataError, match=r"line 1: no field 'text'; available fields: \['review', 'stars'\]"):
        load_texts(source)
    source = write(tmp_path / "t.csv", "review,stars\nx,5\n")
    with pytest.raises(DataError, match=r"no column 'text'; available columns: \['review', 'stars'\]"):
        load_texts(source)


@pytest.mark.parametrize("name", ["n.txt", "n.jsonl", "n.csv"])
def test_nul_bytes_are_refused_with_the_line(tmp_path, name):
    # A file of NUL bytes used to train on "\u0000" prompts; UTF-16 text decodes as UTF-8 with a NUL per character.
    path = tmp_path / name
    path.write_bytes(b"text\n" + b"\x00" * 8 + b"\n")
    with pytest.raises(DataError, match=r"n\.\w+, line 2: a NUL byte \(\\x00\), the first of 8 .*Re-save it as UTF-8"):
        load_texts(str(path))
    path.write_bytes("text\nhello\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="line 1: a NUL byte .* saved as UTF-16"):
        load_texts(str(path))


def test_csv_unterminated_quote_names_its_line_instead_of_swallowing_the_file(tmp_path):
    # The lenient reader read everything after the stray quote as one cell: 1 text instead of 4.
    source = write(tmp_path / "q.csv", 'text,label\nfine,1\n"a good film,1\nbad one,0\nlast,1\n')
    with pytest.raises(DataError, match=r"q\.csv, line 3: a quoted cell that starts on this line is never closed"):
        load_texts(source)
    source = write(tmp_path / "h.csv", '"text\nx\n')
    with pytest.raises(DataError, match="h.csv, line 1: a quoted cell"):
        load_texts(source)
    source = write(tmp_path / "m.csv", 'text\nok\n"a"b\n')
    with pytest.raises(DataError, match=r"m\.csv, line 3: malformed CSV .* write a quote inside it as \"\""):
        load_texts(source)
    # Quotes inside an unquoted cell and quoted cells with commas and line breaks stay fine.
    source = write(tmp_path / "ok.csv", 'text\nhe said "hi" there\n"a, b"\n"two\nlines"\n')
    assert load_texts(source) == ['he said "hi" there', "a, b", "two\nlines"]


@pytest.mark.parametrize("name, content", [("e.txt", ""), ("b.txt", "\n  \n"), ("e.jsonl", ""), ("e.csv", ""), ("h.csv", "text\n")])
def test_empty_file(tmp_path, name, content):
    with pytest.raises(DataError, match="holds no texts"):
        load_texts(write(tmp_path / name, content))


def test_unknown_extension_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"Unknown file type '.parquet'.*\.txt, \.jsonl, \.csv"):
        load_texts(write(tmp_path / "d.parquet", "x"))
    with pytest.raises(DataError, match="is a directory"):
        load_texts(str(tmp_path))


def test_not_utf8(tmp_path):
    (tmp_path / "l.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_texts(str(tmp_path / "l.txt"))


def test_bad_limit(tmp_path):
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_texts(write(tmp_path / "t.txt", "a\n"), limit=0)


# --------------------------------------------------------------------------- builtin


def test_builtin_is_held_out_and_reproducible():
    corpus = pytest.importorskip("rlhf_scratch.corpus")
    texts = load_texts("builtin", limit=50)
    assert len(texts) == 50 and all(isinstance(t, str) and t.strip() for t in texts)
    assert load_texts("builtin", limit=50) == texts
    assert texts == corpus.generate_reviews(50, seed=1)  # not the pretraining seed 0
    assert texts != corpus.generate_reviews(50, seed=0)


# --------------------------------------------------------------------------- datasets by name


def test_dataset_name_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_texts("stanfordnlp/imdb")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "not in the local datasets cache" in message
    assert "local .txt/.jsonl/.csv" in message


def test_dataset_name_unreachable_hub_fails_before_loading(monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "hub_is_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(DataError, match="dataset hub is unreachable.*local .txt/.jsonl/.csv"):
        load_texts("stanfordnlp/imdb")


def test_dataset_name_column_and_limit(monkeypatch):
    """The real load path, with load_dataset replaced by an in-memory dataset."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["one", "two", "", "four"], "label": [1, 0, 1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("stanfordnlp/imdb", split="test", limit=2) == ["one", "two"]
    assert load_texts("stanfordnlp/imdb") == ["one", "two", "four"]
    assert calls == [("stanfordnlp/imdb", "test"), ("stanfordnlp/imdb", "train")]
    with pytest.raises(DataError, match=r"no column 'review'; available columns: \['text', 'label'\]"):
        load_texts("stanfordnlp/imdb", column="review")


def test_hub_probe_reports_closed_port(monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: connecting is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    assert hub_is_reachable(timeout=2.0) is False
    assert time.perf_counter() - start < 3


# --------------------------------------------------------------------------- prompts


def make_encoder():
    """Whitespace encoder: each new word gets the next id."""
    vocab = {}
    return lambda s: [vocab.setdefault(w, len(vocab)) for w in s.split()]


TEXTS = [
    "the movie was great and i loved every minute",
    "awful",  # one token: too short for min_tokens=2
    "a slow start but a strong finish overall",
    "i would not watch it again",
]


def test_prompts_lengths_and_prefixes():
    encode = make_encoder()
    prompts = prompts_from_texts(TEXTS, encode, n=30, min_tokens=2, max_tokens=5, seed=3)
    assert len(prompts) == 30
    assert all(2 <= len(p) <= 5 for p in prompts)
    full = [encode(t) for t in TEXTS]
    assert all(any(p == ids[: len(p)] for ids in full) for p in prompts)  # each is a text's prefix
    assert not any(p == full[1][: len(p)] for p in prompts)  # the 1-token text is skipped
    assert {len(p) for p in prompts} == {2, 3, 4, 5}  # all lengths drawn


def test_prompts_reproducible_and_seeded():
    a = prompts_from_texts(TEXTS, make_encoder(), n=12, seed=0)
    assert prompts_from_texts(TEXTS, make_encoder(), n=12, seed=0) == a
    assert prompts_from_texts(TEXTS, make_encoder(), n=12, seed=1) != a


def test_prompts_cycle_through_permutation():
    texts = ["w%d x y z" % i for i in range(3)]  # distinct first words identify the text
    encode = make_encoder()
    prompts = prompts_from_texts(texts, encode, n=7, min_tokens=2, max_tokens=2)
    first = [p[0] for p in prompts]
    assert sorted(first[:3]) == sorted(encode(t)[0] for t in texts)  # one pass covers all
    assert first[3:6] == first[:3] and first[6] == first[0]  # then the same order again


def test_short_text_kept_whole():
    prompts = prompts_from_texts(["a b"], make_encoder(), n=5, min_tokens=2, max_tokens=8)
    assert prompts == [[0, 1]] * 5


def test_prompts_errors():
    encode = make_encoder()
    with pytest.raises(DataError, match="min_tokens <= max_tokens"):
        prompts_from_texts(TEXTS, encode, n=2, min_tokens=5, max_tokens=3)
    with pytest.raises(DataError, match="1 <= min_tokens"):
        prompts_from_texts(TEXTS, encode, n=2, min_tokens=0)
    with pytest.raises(DataError, match="positive integer"):
        prompts_from_texts(TEXTS, encode, n=0)
    with pytest.raises(DataError, match="no texts"):
        prompts_from_texts([], encode, n=2)
    with pytest.raises(DataError, match="No text has at least min_tokens=20 tokens \\(the longest has 9\\)"):
        prompts_from_texts(TEXTS, encode, n=2, min_tokens=20, max_tokens=30)


def test_encode_returning_2d_is_explained():
    torch = pytest.importorskip("torch")
    with pytest.raises(DataError, match=r"got shape \(1, 3\).*take row 0"):
        prompts_from_texts(["a b c"], lambda s: torch.zeros(1, 3, dtype=torch.long), n=1)
    ids = prompts_from_texts(["a b c"], lambda s: torch.tensor([5, 6, 7]), n=1, min_tokens=3, max_tokens=3)
    assert ids == [[5, 6, 7]] and type(ids[0][0]) is int


def test_fixed_prefix():
    prompts = fixed_prefix_prompts("This movie is", make_encoder(), n=3)
    assert prompts == [[0, 1, 2]] * 3
    prompts[0].append(99)
    assert prompts[1] == [0, 1, 2]  # rows are independent lists
    with pytest.raises(DataError, match="encodes to no tokens"):
        fixed_prefix_prompts("   ", make_encoder(), n=3)
    with pytest.raises(DataError, match="positive integer"):
        fixed_prefix_prompts("x", make_encoder(), n=0)


# --------------------------------------------------------------------------- prompts cut at whole characters

NON_ASCII = [
    "\u200b😀 What a film, truly.",  # zero-width space then an emoji: 3 + 4 bytes, byte tokens in a small vocabulary
    "Amélie était magnifique, vraiment.",
    "映画はとても良かった。",
    "Naïve but 🎬🎬 charming.",
]


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)


def test_prompts_decode_to_whole_characters(tiny_tokenizer):
    from rlhf_scratch.sampling import encode

    def encode_text(text):
        return encode(tiny_tokenizer, text, prepend_bos=True)

    # Without decode, cuts fall inside characters (the "\u200b\ufffd" prompts of issue 15).
    blind = prompts_from_texts(NON_ASCII, encode_text, n=200, seed=0)
    assert any("\ufffd" in tiny_tokenizer.decode(p) for p in blind)
    prompts = prompts_from_texts(NON_ASCII, encode_text, n=200, seed=0, decode=tiny_tokenizer.decode)
    assert len(prompts) == 200 and all(2 <= len(p) <= 8 for p in prompts)
    full = [encode_text(t) for t in NON_ASCII]
    for prompt in prompts:
        text = tiny_tokenizer.decode(prompt[1:])  # after BOS
        assert "\ufffd" not in text and any(t.startswith(text) for t in NON_ASCII), text
        assert any(ids[: len(prompt)] == prompt for ids in full)  # still a token prefix of a text
    # Texts of ASCII words are cut exactly as before.
    assert prompts_from_texts(TEXTS * 3, encode_text, n=40, seed=2, decode=tiny_tokenizer.decode) == \
        prompts_from_texts(TEXTS * 3, encode_text, n=40, seed=2)


def test_no_whole_character_cut_in_range_is_explained(tiny_tokenizer):
    ids = tiny_tokenizer("😀😀", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8  # one token per byte in this small vocabulary
    with pytest.raises(DataError, match=r"No text can be cut to 2-3 tokens that decode to whole characters.*--max-prompt-tokens"):
        prompts_from_texts(["😀😀"], lambda t: tiny_tokenizer(t, add_special_tokens=False)["input_ids"], n=1,
                           min_tokens=2, max_tokens=3, decode=tiny_tokenizer.decode)
