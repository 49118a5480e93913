"""Benchmark loading (validation errors name file and line) and the answer match rules."""
import json
from fractions import Fraction

import pytest

from data.benchmarks import (
    BenchmarkError,
    Item,
    content_hash,
    from_items,
    is_correct,
    last_number,
    load_benchmark,
    write_benchmark,
)

GOOD = [
    {"id": "q1", "prompt": "2+2=", "answer": "4", "match": "number"},
    {"id": "q2", "prompt": "pick", "choices": ["a", "b", "c"], "answer": 2},
    {"id": 3, "prompt": "say hi", "answer": "hi"},
    {"id": "q4", "prompt": "x", "answer": "^ab+c$", "match": "regex"},
]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_good_file(tmp_path):
    b = load_benchmark(write_lines(tmp_path / "good.jsonl", GOOD[:2] + [""] + GOOD[2:]))
    assert b.name == "good"
    assert b.ids == ["q1", "q2", "3", "q4"]
    assert b.items[1].choices == ("a", "b", "c") and b.items[1].answer == 2 and b.items[1].is_choice
    assert b.items[2].match == "exact" and not b.items[2].is_choice


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"id": "z", "prompt": "p"}, "missing 'answer'"),
        ({"id": "z", "prompt": "p", "answer": "a", "anwser": "typo"}, "unknown key"),
        ({"id": "z", "prompt": 5, "answer": "a"}, "'prompt'"),
        ({"id": "z", "prompt": "p", "answer": "a", "match": "fuzzy"}, "'match'"),
        ({"id": "z", "prompt": "p", "answer": "forty", "match": "number"}, "not a number"),
        ({"id": "z", "prompt": "p", "answer": "(", "match": "regex"}, "regular expression"),
        ({"id": "z", "prompt": "p", "choices": ["a"], "answer": 0}, "at least two"),
        ({"id": "z", "prompt": "p", "choices": ["a", "a"], "answer": 0}, "distinct"),
        ({"id": "z", "prompt": "p", "choices": ["a", "b"], "answer": 2}, "index"),
        ({"id": "z", "prompt": "p", "choices": ["a", "b"], "answer": "a"}, "index"),
        ({"id": "z", "prompt": "p", "choices": ["a", "b"], "answer": 0, "match": "exact"}, "generation items only"),
        ({"id": "q1", "prompt": "again", "answer": "x"}, "duplicate id 'q1' (first on line 1)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bench.jsonl", GOOD[:2] + [bad])
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(path)
    assert f"{path}:3:" in str(e.value)
    assert message in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(BenchmarkError, match="no items"):
        load_benchmark(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(BenchmarkError, match="cannot read"):
        load_benchmark(tmp_path / "absent.jsonl")


def test_hash_is_over_content_not_formatting(tmp_path):
    compact = load_benchmark(write_lines(tmp_path / "a.jsonl", GOOD))
    spaced = load_benchmark(write_lines(tmp_path / "b.jsonl", [json.dumps(x, indent=None, separators=(" , ", " : ")) for x in GOOD]))
    changed = load_benchmark(write_lines(tmp_path / "c.jsonl", GOOD[:3] + [{**GOOD[3], "answer": "^abc$"}]))
    assert compact.hash == spaced.hash
    assert compact.hash != changed.hash
    assert content_hash(compact.items) == compact.hash
    # writing and reading back keeps the items and so the hash
    assert load_benchmark(write_benchmark(tmp_path / "d.jsonl", compact.items)).hash == compact.hash
    assert from_items("mem", GOOD).hash == compact.hash


def gen(answer, match="exact"):
    return Item("i", "p", answer, None, match)


@pytest.mark.parametrize(
    "answer, output, ok",
    [
        ("edcba", "edcba", True),
        ("edcba", "  edcba \n", True),
        ("hello world", "hello   world", True),
        ("edcba", "edcb", False),
        ("edcba", "edcbaa", False),
        ("Paris", "paris", False),
    ],
)
def test_exact_match(answer, output, ok):
    assert is_correct(gen(answer), output) is ok


@pytest.mark.parametrize(
    "answer, output, ok",
    [
        ("42", "42", True),
        ("42", "The answer is 42.", True),
        ("42", "first 7, then 42", True),
        ("42", "42 or maybe 41", False),  # the last number counts
        ("42", "42.0", True),
        ("1234", "1,234", True),
        ("-3", "it is -3", True),
        ("0.5", "1/2 = 0.50", True),
        ("42", "no number here", False),
        ("42", "420", False),
    ],
)
def test_number_match(answer, output, ok):
    assert is_correct(gen(answer, "number"), output) is ok


@pytest.mark.parametrize("text,value", [
    ("a 1 b 2.5 c", Fraction(5, 2)), ("x", None), ("numbers 1,2,3", 3), ("1,234.5", Fraction(2469, 2)),
    ("3-5", 5), ("10-2", 2), ("x=-5", -5), ("+3", 3), ("42.", 42), (".5", Fraction(1, 2)), ("-.5", Fraction(-1, 2)),
    ("1e3", 1000), ("1/2", Fraction(1, 2)), ("rev42", 42), ("1e99999999", None), ("2 then 1e99999999", 2),
])
def test_last_number(text, value):
    """Commas group thousands only in groups of three, a minus sign right after a digit is a
    hyphen, fractions are numbers, and absurd exponents are no number (exact arithmetic on
    them would not finish)."""
    assert last_number(text) == value


def test_fraction_answers_match_fraction_outputs():
    assert is_correct(gen("1/2", "number"), "it is 1/2") and is_correct(gen("0.5", "number"), "1/2")
    assert not is_correct(gen("3", "number"), "numbers 1,2") and is_correct(gen("2", "number"), "numbers 1,2")


def test_regex_match():
    item = gen(r"^ab+c$", "regex")
    assert is_correct(item, "abbbc")
    assert not is_correct(item, "xabbbc")
    assert is_correct(gen(r"\bcat\b", "regex"), "the cat sat")


def test_choice_match():
    item = Item("m", "p", 1, ("a", "b"))
    assert is_correct(item, 1) and is_correct(item, "1")
    assert not is_correct(item, 0)
