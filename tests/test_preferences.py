"""Preference pairs: loading (jsonl, csv, hub), bad-row reporting, writing, building from scores, `pairs` command."""

import json
import time
from pathlib import Path

import pytest

from rlhf_scratch import data
from rlhf_scratch.preferences import (
    PairDataError,
    PairsConfig,
    PreferencePair,
    build_pairs,
    load_pairs,
    run_pairs,
    write_pairs,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"prompt": "The film", "chosen": " was great.", "rejected": " was dull."}


# --------------------------------------------------------------------------- loading


def test_load_jsonl_with_optional_fields(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        json.dumps(GOOD),
        "",  # blank lines are skipped, not errors
        json.dumps({**GOOD, "margin": 0.5, "extra": "ignored"}),
        json.dumps({**GOOD, "chosen_score": "0.75", "rejected_score": -0.25}),  # numeric strings are numbers
    ])
    pairs = load_pairs(path)
    assert pairs[0] == PreferencePair("The film", " was great.", " was dull.")
    assert pairs[0].margin_value is None
    assert pairs[1].margin == 0.5 and pairs[1].margin_value == 0.5
    assert (pairs[2].chosen_score, pairs[2].rejected_score) == (0.75, -0.25)
    assert pairs[2].margin_value == 1.0  # 0.75 − (−0.25)
    assert len(load_pairs(path, limit=2)) == 2


def test_message_lists_take_last_assistant_content(tmp_path):
    conversation = lambda answer: [  # noqa: E731
        {"role": "user", "content": "How was it?"}, {"role": "assistant", "content": "draft"},
        {"role": "user", "content": "Really?"}, {"role": "assistant", "content": answer},
    ]
    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q"}],
           "chosen": conversation("Great."), "rejected": conversation("Dull.")}
    pair = load_pairs(write_lines(tmp_path / "chat.jsonl", [json.dumps(row)]))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "Great.", "Dull.")


def test_jsonl_bad_rows_reported_together_with_line_numbers(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        json.dumps(GOOD),                                          # 1 fine
        "",                                                        # 2 blank
        json.dumps({"prompt": "p", "chosen": "c"}),                # 3 no rejected
        '{"prompt": "p", "chosen": ',                              # 4 broken JSON
        json.dumps({**GOOD, "chosen": "   "}),                     # 5 empty chosen
        json.dumps({**GOOD, "chosen_score": "abc"}),               # 6 not a number
        json.dumps({**GOOD, "margin": -1}),                        # 7 negative margin
        json.dumps(["p", "c", "r"]),                               # 8 not an object
        json.dumps({**GOOD, "rejected": 3}),                       # 9 not a string
    ])
    with pytest.raises(PairDataError) as info:
        load_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 7 bad rows: line 3: missing field 'rejected'; line 4: invalid JSON")
    for part in ("line 5: 'chosen' is empty", "line 6: 'chosen_score' is 'abc', not a number",
                 "line 7: 'margin' is -1.0, negative", "line 8: expected a JSON object, got list",
                 "line 9: 'rejected' is a int, not a string", "Fix or remove these rows."):
        assert part in message
    assert "line 1:" not in message and "line 2:" not in message


def test_csv_numbers_as_strings_and_bad_rows_with_line_numbers(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('prompt,chosen,rejected,chosen_score,rejected_score\n'
                    'The plot," was a joy, truly."," was dull.",0.5,-0.5\n'
                    'It,"was\ngood"," was bad.",,\n', encoding="utf-8")
    pairs = load_pairs(good)
    assert pairs[0] == PreferencePair("The plot", " was a joy, truly.", " was dull.", chosen_score=0.5, rejected_score=-0.5)
    assert pairs[1].chosen == "was\ngood" and pairs[1].chosen_score is None  # empty cells: absent

    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,chosen,rejected,margin\n'
                   'a,"multi\nline",r,1\n'   # lines 2-3: fine
                   'b,c,,\n'                 # line 4: empty rejected
                   'd,e,f,lots\n'            # line 5: margin not a number
                   'g,h\n', encoding="utf-8")  # line 6: short row, no rejected
    with pytest.raises(PairDataError) as info:
        load_pairs(bad)
    assert str(info.value) == (
        f"{bad}: 3 bad rows: line 4: 'rejected' is empty; line 5: 'margin' is 'lots', not a number; "
        "line 6: missing field 'rejected'. Fix or remove these rows."
    )


def test_csv_without_required_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,good,bad\na,b,c\n", encoding="utf-8")
    with pytest.raises(PairDataError, match="no columns 'chosen', 'rejected'"):
        load_pairs(path)


def test_no_pairs_and_missing_files(tmp_path):
    with pytest.raises(PairDataError, match="holds no preference pairs"):
        load_pairs(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(PairDataError, match="No such file"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(PairDataError, match="Unknown pair file type '.txt'"):
        load_pairs(write_lines(tmp_path / "pairs.txt", ["x"]))


def test_write_then_load_round_trip(tmp_path):
    pairs = [
        PreferencePair("Le film", " était génial ✓", " était \"nul\"\nvraiment"),
        PreferencePair("", "a", "b", margin=0.0),
        PreferencePair("p", "c", "r", chosen_score=0.25, rejected_score=-1.5),
    ]
    path = write_pairs(tmp_path / "out" / "pairs.jsonl", pairs)
    assert load_pairs(path) == pairs
    assert "margin" not in path.read_text().splitlines()[0]  # unset fields are not written
    assert not list(path.parent.glob(".*tmp"))


def test_hub_name_fails_fast_offline(monkeypatch):
    start = time.time()
    with pytest.raises(PairDataError, match="to_json\\('pairs.jsonl'\\)") as info:
        load_pairs("someone/helpsteer2-binarized")  # conftest sets HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE is set" in str(info.value)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "hub_is_reachable", lambda timeout=3.0: False)
    with pytest.raises(PairDataError, match="hub is unreachable.*export it to a local file"):
        load_pairs("someone/helpsteer2-binarized")
    assert time.time() - start < 15


# --------------------------------------------------------------------------- building pairs


def test_build_pairs_best_winner_with_worst_loser():
    pairs = build_pairs(
        prompts=["A", "B", "C"],
        responses=[["r1", "r2", "r3", "r4", "r5"], ["s1", "s2"], ["t1", " ", "t3", "t4"]],
        scores=[[0.9, -0.2, 0.5, 0.0, 0.7], [0.3, 0.4], [0.8, -0.9, 0.6, -0.1]],
        threshold=0.0,
    )
    # A: winners r1 (0.9), r5 (0.7), r3 (0.5); losers r2 (−0.2), r4 (0.0 ≤ threshold) → 2 pairs.
    # B: two winners, no loser → none. C: the blank response (−0.9) is skipped → t1 vs t4.
    assert pairs == [
        PreferencePair("A", "r1", "r2", chosen_score=0.9, rejected_score=-0.2),
        PreferencePair("A", "r5", "r4", chosen_score=0.7, rejected_score=0.0),
        PreferencePair("C", "t1", "t4", chosen_score=0.8, rejected_score=-0.1),
    ]


def test_build_pairs_rejects_mismatched_groups():
    with pytest.raises(PairDataError, match="2 responses but 1 scores"):
        build_pairs(["A"], [["a", "b"]], [[1.0]], 0.0)
    with pytest.raises(PairDataError, match="1 prompts, 2 response groups"):
        build_pairs(["A"], [["a"], ["b"]], [[1.0], [2.0]], 0.0)
    with pytest.raises(PairDataError, match="not finite"):
        build_pairs(["A"], [["a", "b"]], [[float("nan"), 1.0]], 0.0)


def test_pairs_config_validation():
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PairsConfig(n=10, samples_per_prompt=4)
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        PairsConfig(samples_per_prompt=1)


def test_run_pairs_on_tiny_model(tiny_model_dir, tmp_path):
    from rlhf_scratch.sampling import SamplingConfig

    config = PairsConfig(model=str(tiny_model_dir), reward="chars:e", n=48, samples_per_prompt=4, threshold=2.0,
                         batch_size=16, out=tmp_path, sampling=SamplingConfig(max_new_tokens=12))
    summary = run_pairs(config)
    assert (summary["n_prompts"], summary["n_samples"]) == (12, 48)
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    assert summary["n_pairs"] == len(pairs) > 0
    for pair in pairs:
        # the scores are the reward of prompt + response, and chosen is above the threshold, rejected not
        assert pair.chosen_score == (pair.prompt + pair.chosen).count("e") > 2.0 >= pair.rejected_score
        assert pair.rejected_score == (pair.prompt + pair.rejected).count("e")
    assert json.loads((tmp_path / "summary.json").read_text())["n_pairs"] == len(pairs)
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] == 2.0


def test_run_pairs_with_no_pair_is_an_error_that_writes_nothing(tiny_model_dir, tmp_path):
    """A threshold above every score leaves no prompt with both a winner and a loser: an empty pairs.jsonl
    would only fail later in rm or dpo, so the command fails now and says how to move the threshold."""
    from rlhf_scratch.sampling import SamplingConfig

    config = PairsConfig(model=str(tiny_model_dir), reward="chars:e", n=8, samples_per_prompt=4, threshold=1000.0,
                         batch_size=8, out=tmp_path / "pairs", sampling=SamplingConfig(max_new_tokens=6))
    with pytest.raises(ValueError, match=r"No pairs: .*0 of 8 samples scored above it.*nothing was written"):
        run_pairs(config)
    assert not (tmp_path / "pairs").exists()


def test_pair_files_with_nul_bytes_or_an_unterminated_quote_are_refused(tmp_path):
    path = tmp_path / "nul.csv"
    path.write_bytes(b"prompt,chosen,rejected\nThe film, good, bad\x00\n")
    with pytest.raises(PairDataError, match="nul.csv, line 2: a NUL byte"):
        load_pairs(path)
    path = write_lines(tmp_path / "quote.csv", ["prompt,chosen,rejected", 'The film," was great., was dull.',
                                               "The plot, was fun., was slow."])
    with pytest.raises(PairDataError, match="quote.csv, line 2: a quoted cell that starts on this line is never closed"):
        load_pairs(path)
    # limit stops before a malformed row further down
    assert len(load_pairs(write_lines(tmp_path / "l.csv", ["prompt,chosen,rejected", "a,b,c", '"x,y,z']), limit=1)) == 1


# --------------------------------------------------------------------------- duplicates and the held-out split


def test_duplicate_pairs_are_dropped_and_counted():
    from rlhf_scratch.preferences import drop_duplicate_pairs, duplicates_note

    a, b = PreferencePair("The film", " was great.", " was dull."), PreferencePair("The film", " was fun.", " was slow.")
    scored_copy = PreferencePair("The film", " was great.", " was dull.", chosen_score=0.9, rejected_score=-0.2)
    swapped = PreferencePair("The film", " was dull.", " was great.")  # not a copy: the other preference
    assert drop_duplicate_pairs([a, b, a, scored_copy, swapped, b]) == ([a, b, swapped], 3)
    assert drop_duplicate_pairs([a, b]) == ([a, b], 0)
    assert duplicates_note(3, 6, "p.jsonl") == ("dropped 3 duplicate pairs (same prompt, chosen and rejected as an earlier "
                                                "row) of 6 in p.jsonl: each pair is trained on or held out once; 3 remain.")


def test_split_keeps_copies_of_a_pair_on_one_side_with_a_single_prompt():
    from rlhf_scratch.preferences import split_heldout

    # Fixed-prefix pairs share one prompt, so single pairs are held out: a copy used to land on the other side.
    pairs = [PreferencePair("This is", f" good {i}.", f" bad {i}.") for i in range(10)] * 2
    for seed in range(5):
        train, heldout = split_heldout(pairs, 0.2, seed=seed)
        assert heldout and sorted(train + heldout) == list(range(20))
        assert {pairs[i] for i in heldout}.isdisjoint({pairs[i] for i in train})


def test_pairs_whose_chosen_and_rejected_are_the_same_text_are_dropped_with_a_note():
    from rlhf_scratch.preferences import PairDataError, drop_pairs_without_preference

    same = PreferencePair(prompt="P", chosen=" same ", rejected="same")
    good = PreferencePair(prompt="P", chosen=" good", rejected=" bad")
    kept, note = drop_pairs_without_preference([same, good, same], "p.jsonl")
    assert kept == [good]
    assert note == "dropped 2 pairs of 3 in p.jsonl whose chosen and rejected are the same text (no preference); 1 remains."
    assert drop_pairs_without_preference([good], "p.jsonl") == ([good], None)
    with pytest.raises(PairDataError, match="none states a preference"):
        drop_pairs_without_preference([same, same], "p.jsonl")
