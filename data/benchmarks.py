"""Benchmarks: JSONL files of items, validated on load, and the rules that check answers.

One item a line, one of two kinds:

    {"id": "q1", "prompt": "...", "choices": ["...", "..."], "answer": 1}
    {"id": "q2", "prompt": "...", "answer": "42", "match": "number"}

A multiple-choice item is scored by the log-likelihood of each choice; a generation item
by greedy decoding and a match rule:

- `exact` (default): equal after whitespace normalization (strip, runs of spaces -> one);
- `number`: the last number in the output equals the answer numerically ("42.0" == "42";
  thousands groups "1,234", fractions "1/2", exponents; "3-5" ends in 5: a minus sign right
  after a digit is a hyphen);
- `regex`: the answer is a pattern that must be found in the output (`re.search`; anchor
  it with ^...$ for a full match).

Loading is strict, because a silently skipped or misread item corrupts every score
computed from it: a bad line raises `BenchmarkError` naming the file and line, and so do
duplicate ids and unknown keys (an optional free-form `"meta"` object is allowed).
A benchmark's `hash` is taken over its parsed items, not the file's bytes, so it keys
caches by content whatever the JSON formatting.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

MATCH_RULES = ("exact", "number", "regex")
_KEYS = {"id", "prompt", "answer", "choices", "match", "meta"}
# A number: a fraction (1/2), or digits with optional thousands groups (1,234), decimals and an
# exponent; never started inside another number, and a sign only where it cannot be a hyphen
# between numbers ("3-5" ends in 5, "x=-5" in -5).
_NUMBER_BODY = r"[-+]?(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_NUMBER = re.compile(r"(?<![\d.])" + _NUMBER_BODY)
_MAX_EXPONENT = 1000  # 1e99999999 is a number nobody means, and exact arithmetic on it would hang


class BenchmarkError(ValueError):
    """A benchmark file or item that is not valid; the message names the file and line, and
    `line` is that line's number when there is one."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Item:
    """One benchmark item. For multiple choice `answer` is the index of the right choice."""

    id: str
    prompt: str
    answer: str | int
    choices: tuple[str, ...] | None = None
    match: str = "exact"

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    @property
    def kind(self) -> str:
        """The item's format, the stratum that subsets sample in proportion: "choice" or "generation:<match>"."""
        return "choice" if self.is_choice else f"generation:{self.match}"

    def to_json(self) -> dict:
        d: dict = {"id": self.id, "prompt": self.prompt}
        if self.is_choice:
            d["choices"] = list(self.choices)
            d["answer"] = self.answer
        else:
            d["answer"] = self.answer
            d["match"] = self.match
        return d


@dataclass(frozen=True)
class Benchmark:
    name: str
    items: tuple[Item, ...]
    hash: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def subset(self, indices: Sequence[int], name: str | None = None) -> "Benchmark":
        """The items at `indices` (in that order) as a benchmark of their own."""
        items = tuple(self.items[i] for i in indices)
        return Benchmark(name or f"{self.name}[{len(items)}]", items, content_hash(items), self.path)


def parse_number(text: str) -> Fraction | None:
    """`"1,234.5"` -> Fraction(2469, 2), `"1/2"` -> Fraction(1, 2); None if `text` is not one
    number (or its exponent is beyond +-1000)."""
    text = text.strip()
    if not re.fullmatch(_NUMBER_BODY, text):
        return None
    text = text.replace(",", "")
    exponent = re.search(r"[eE]([-+]?\d+)$", text)
    if exponent and abs(int(exponent.group(1))) > _MAX_EXPONENT:
        return None
    try:
        return Fraction(text)
    except ZeroDivisionError:
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` (see `_NUMBER`)."""
    for m in reversed(_NUMBER.findall(text)):
        value = parse_number(m)
        if value is not None:
            return value
    return None


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_correct(item: Item, output: str | int) -> bool:
    """Whether `output` answers `item`: a choice index for multiple choice, generated text otherwise."""
    if item.is_choice:
        return int(output) == item.answer
    output = str(output)
    if item.match == "exact":
        return normalize(output) == normalize(str(item.answer))
    if item.match == "number":
        got = last_number(output)
        return got is not None and got == parse_number(str(item.answer))
    if item.match == "regex":
        return re.search(str(item.answer), output) is not None
    raise BenchmarkError(f"unknown match rule {item.match!r}")


def _item(obj: object, where: str) -> Item:
    def bad(msg: str) -> BenchmarkError:
        return BenchmarkError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise bad("an item must be a JSON object")
    unknown = set(obj) - _KEYS
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("id", "prompt", "answer"):
        if key not in obj:
            raise bad(f"missing {key!r}")
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise bad("'id' must be a non-empty string or an integer")
    if not isinstance(obj["prompt"], str):
        raise bad("'prompt' must be a string")
    answer = obj["answer"]
    if "choices" in obj:
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise bad("'choices' must be a list of at least two non-empty strings")
        if len(set(choices)) != len(choices):
            raise bad("'choices' must be distinct")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise bad(f"'answer' of a multiple-choice item must be an index in 0..{len(choices) - 1}")
        if "match" in obj:
            raise bad("'match' applies to generation items only, not to items with 'choices'")
        return Item(str(item_id), obj["prompt"], answer, tuple(choices))
    match = obj.get("match", "exact")
    if match not in MATCH_RULES:
        raise bad(f"'match' must be one of {list(MATCH_RULES)}, got {match!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise bad("'answer' of a generation item must be a string (or a number)")
    answer = str(answer)
    if match == "number" and parse_number(answer) is None:
        raise bad(f"'answer' {answer!r} is not a number, but 'match' is 'number'")
    if match == "regex":
        try:
            re.compile(answer)
        except re.error as e:
            raise bad(f"'answer' is not a valid regular expression: {e}") from None
    return Item(str(item_id), obj["prompt"], answer, None, match)


def parse_items(lines: Iterable[str], source: str = "<items>") -> list[Item]:
    """Validates JSONL lines (blank lines are skipped); errors name `source` and the 1-based line."""
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", n) from None
        except RecursionError:
            raise BenchmarkError(f"{where}: not a benchmark item (nested too deeply)", n) from None
        try:
            item = _item(obj, where)
        except BenchmarkError as e:
            raise BenchmarkError(str(e), n) from None
        if item.id in first_line:
            raise BenchmarkError(f"{where}: duplicate id {item.id!r} (first on line {first_line[item.id]})", n)
        first_line[item.id] = n
        items.append(item)
    if not items:
        raise BenchmarkError(f"{source}: no items")
    return items


def content_hash(items: Iterable[Item]) -> str:
    """sha256 over the canonical JSON of the items, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it.to_json(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def from_items(name: str, items: Iterable[Item | dict]) -> Benchmark:
    """A benchmark from items in memory (dicts are validated like file lines)."""
    lines = [json.dumps(it.to_json() if isinstance(it, Item) else it) for it in items]
    parsed = tuple(parse_items(lines, source=name))
    return Benchmark(name, parsed, content_hash(parsed))


def load_benchmark(path: str | os.PathLike, name: str | None = None) -> Benchmark:
    """Reads and validates a JSONL benchmark; its name defaults to the file's stem."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            items = tuple(parse_items(f, source=str(path)))
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason})") from None
    return Benchmark(name or path.stem, items, content_hash(items), path)


def write_benchmark(path: str | os.PathLike, items: Iterable[Item]) -> Path:
    """Writes items as JSONL (one compact object a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")
    return path
