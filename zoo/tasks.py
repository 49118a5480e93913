"""The zoo's synthetic tasks: seeded generators of (prompt, answer) pairs.

Each task writes its prompt as `<name>:<input>=` and its answer as a short string, so
one character-level model can hold all of them. Tasks (tiny): `rev` reverse a word,
`cip` a fixed letter substitution, `srt` sort digits, `inc` add one to every digit
(mod 10), `dup` write every letter twice. `add` (two-digit addition) is defined but in no
preset yet (it stayed below 20% within the budgets tried, see presets.py).
`cnt` (count a letter) and a per-prompt digit shift were measured and dropped: a
2-layer model trained from scratch for 400 steps reached 37% and 0% on them, against
96-100% on the five above.

`pretrain_sampler` is the base's corpus (see there for why it holds each task's
mechanism under an alias prefix). Held-out items: `split(task, n_test, seed)` draws
the test items first; training pairs come from `train_sampler`, which rejects every
prompt in the test set, so no benchmark prompt is ever trained on.
"""
from __future__ import annotations

import dataclasses
import random
import string
from dataclasses import dataclass
from typing import Callable, Sequence

LETTERS = string.ascii_lowercase
DIGITS = string.digits


def _word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def cipher_table(seed: int = 1234) -> dict[str, str]:
    """The fixed letter substitution of the `cip` task (a seeded shuffle of a-z)."""
    rng = random.Random(seed)
    shuffled = list(LETTERS)
    rng.shuffle(shuffled)
    return dict(zip(LETTERS, shuffled))


CIPHER = cipher_table()


@dataclass(frozen=True)
class Task:
    """One task: how to draw an input, how to answer it, how to make wrong answers.

    `make_input(rng)` returns the text between `name:` and `=`; `solve(input)` the answer;
    `corrupt(rng, input, answer)` a plausible wrong answer for multiple-choice items.
    `match` is the benchmark match rule for generation items ("exact" or "number").
    """

    name: str
    description: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    corrupt: Callable[[random.Random, str, str], str]
    answer_alphabet: str
    match: str = "exact"

    @property
    def key(self) -> str:
        """The name as a file stem and item-id prefix (`cip:rev` -> `cip_rev`)."""
        return self.name.replace(":", "_")

    def prompt(self, x: str) -> str:
        return f"{self.name}:{x}="

    def sample(self, rng: random.Random) -> tuple[str, str]:
        x = self.make_input(rng)
        return self.prompt(x), self.solve(x)

    def choices(self, rng: random.Random, x: str, answer: str, k: int) -> tuple[list[str], int]:
        """`k` distinct choices with the answer among them; returns (choices, answer index)."""
        wrong: list[str] = []
        for _ in range(200):
            if len(wrong) == k - 1:
                break
            w = self.corrupt(rng, x, answer)
            if w != answer and w not in wrong:
                wrong.append(w)
        while len(wrong) < k - 1:  # tiny answer spaces: fall back to random strings
            w = _word(rng, self.answer_alphabet, max(1, len(answer)), max(1, len(answer)))
            if w != answer and w not in wrong:
                wrong.append(w)
        idx = rng.randrange(k)
        return wrong[:idx] + [answer] + wrong[idx:], idx


# --- corruptions: near misses, so multiple choice needs the mapping, not just the format ---

def _swap_two(rng: random.Random, s: str) -> str:
    if len(s) < 2:
        return s
    i, j = rng.sample(range(len(s)), 2)
    chars = list(s)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _change_one(rng: random.Random, s: str, alphabet: str) -> str:
    i = rng.randrange(len(s))
    return s[:i] + rng.choice(alphabet) + s[i + 1:]


def _corrupt_rev(rng: random.Random, x: str, answer: str) -> str:
    return rng.choice([x, _swap_two(rng, answer), _change_one(rng, answer, LETTERS), "".join(rng.sample(x, len(x)))])


def _corrupt_cip(rng: random.Random, x: str, answer: str) -> str:
    return rng.choice([x, _change_one(rng, answer, LETTERS), _change_one(rng, answer, LETTERS), _swap_two(rng, answer)])


def _corrupt_srt(rng: random.Random, x: str, answer: str) -> str:
    return rng.choice([x, _swap_two(rng, answer), _change_one(rng, answer, DIGITS), "".join(sorted(x, reverse=True))])


def _corrupt_number(rng: random.Random, x: str, answer: str) -> str:
    return str(max(0, int(answer) + rng.choice([-2, -1, 1, 2, 3])))


def _corrupt_inc(rng: random.Random, x: str, answer: str) -> str:
    return rng.choice([x, _change_one(rng, answer, DIGITS), _shift(x, 2), _shift(x, -1), _swap_two(rng, answer)])


def _corrupt_dup(rng: random.Random, x: str, answer: str) -> str:
    return rng.choice([x + x, x[::-1] + x[::-1], "".join(c + c for c in _change_one(rng, x, LETTERS)),
                       "".join(c + c for c in _swap_two(rng, x)), x + x[::-1]])


def _shift(digits: str, k: int) -> str:
    return "".join(str((int(d) + k) % 10) for d in digits)


def _cnt_input(rng: random.Random) -> str:
    # The count is drawn uniformly from 0..7 (not implied by random words, which would make
    # 1 and 2 so common that a constant guess scores 30%), then placed among 1-5 other letters.
    letter = rng.choice("abcd")
    others = [rng.choice("abcd".replace(letter, "")) for _ in range(rng.randint(1, 4))]
    chars = [letter] * rng.randint(0, 5) + others
    rng.shuffle(chars)
    return letter + ":" + "".join(chars)


def _add_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("rev", "reverse a lowercase word", lambda r: _word(r, LETTERS, 3, 6), lambda x: x[::-1],
             _corrupt_rev, LETTERS),
        Task("cip", "apply a fixed letter substitution", lambda r: _word(r, LETTERS, 3, 7),
             lambda x: "".join(CIPHER[c] for c in x), _corrupt_cip, LETTERS),
        Task("srt", "sort digits ascending", lambda r: _word(r, DIGITS, 3, 8), lambda x: "".join(sorted(x)),
             _corrupt_srt, DIGITS),
        Task("cnt", "count a letter in a word over abcd", _cnt_input,
             lambda x: str(x[2:].count(x[0])), _corrupt_number, DIGITS, match="number"),
        Task("inc", "add one to every digit, mod 10", lambda r: _word(r, DIGITS, 3, 7), lambda x: _shift(x, 1),
             _corrupt_inc, DIGITS),
        Task("dup", "write every letter twice", lambda r: _word(r, LETTERS, 2, 5), lambda x: "".join(c + c for c in x),
             _corrupt_dup, LETTERS),
        Task("add", "add two numbers below 100", _add_input,
             lambda x: str(sum(int(v) for v in x.split("+"))), _corrupt_number, DIGITS, match="number"),
    ]
}


def alias(task: Task) -> Task:
    """The task under another prefix (`rev` -> `xev`, `cip:rev` -> `xip:xev`): how the base's corpus teaches its mechanism."""
    name = ":".join("x" + part[1:] for part in task.name.split(":"))
    return dataclasses.replace(task, name=name, description=f"alias of {task.name}")


def compose(outer: Task, inner: Task) -> Task:
    """`outer` applied to `inner`'s answer, asked as `<outer>:<inner>:<input>=`: `cip:rev:abc=` -> cipher of `cba`.

    The zoo's transfer test, in the spirit of MERGE^3's cross-lingual merges (a math model
    and a Japanese model merged into one that does math in Japanese): the base's corpus
    holds the composition of the two mechanisms under their aliases (`xip:xev:`), so it
    can compose but knows neither prefix; each fine-tune binds one prefix; only a model
    holding both bindings, a merge, can answer. Distractors are what one parent alone
    would write (`inner`'s or `outer`'s answer, the input) and near misses.
    """
    def corrupt(rng: random.Random, x: str, answer: str) -> str:
        return rng.choice([inner.solve(x), outer.solve(x), x, _swap_two(rng, answer),
                           _change_one(rng, answer, outer.answer_alphabet)])

    return Task(f"{outer.name}:{inner.name}", f"{outer.description}, after: {inner.description}", inner.make_input,
                lambda x: outer.solve(inner.solve(x)), corrupt, outer.answer_alphabet, outer.match)


def split(task: Task, n_test: int, seed: int) -> list[tuple[str, str, str]]:
    """`n_test` distinct held-out (input, prompt, answer) triples of `task`, reproducible from `seed`."""
    rng = random.Random(f"test/{task.name}/{seed}")
    seen: set[str] = set()
    out = []
    while len(out) < n_test:
        x = task.make_input(rng)
        p = task.prompt(x)
        if p not in seen:
            seen.add(p)
            out.append((x, p, task.solve(x)))
    return out


def train_sampler(task: Task, exclude: set[str], seed: int) -> Callable[[], tuple[str, str]]:
    """A seeded draw of training pairs of `task` that never returns a prompt in `exclude`."""
    rng = random.Random(f"train/{task.name}/{seed}")

    def draw() -> tuple[str, str]:
        while True:
            p, a = task.sample(rng)
            if p not in exclude:
                return p, a

    return draw


def pretrain_sampler(tasks: list[Task], seed: int, composed: Sequence[Task] = ()) -> Callable[[], tuple[str, str]]:
    """The base model's generic corpus: copying, the tasks' formats, and the tasks' mechanisms under aliases.

    A fifth of the pairs copy a word (`cpy:4711=` -> `4711`); two fifths are task prompts
    whose answer is the input copied (`rev:abc=` -> `abc`), which teaches the formats,
    alphabets and where answers end, and makes the base answer every benchmark prompt
    wrongly (copying is right only on a few inputs, e.g. already sorted digits); the
    rest are the tasks under alias prefixes (`xev:abc=` -> `cba`, see `alias`). So the
    base owns each mechanism but not the prompt that asks for it, and a fine-tune binds
    the task's prefix to it, as instruction tuning unlocks a skill a pretrained LLM has.
    `composed` tasks (see `compose`) join the aliases only, so the base learns to chain
    two aliased mechanisms (`xip:xev:abc=`) without ever seeing the composed prompt.

    Measured on the tiny preset (seed 0): with aliases, fine-tunes reach 99-100% and a
    plain task-arithmetic merge of all five averages 0.28 (base 0.04). Two corpora tried
    before did worse: random answers in the task formats taught the base to ignore its
    input and slowed fine-tuning five- to tenfold; copying plus sibling mechanisms on the
    other alphabet (reverse digits for `rev`, ...) gave fine-tunes whose merges averaged
    0.07-0.09, about the base.
    """
    rng = random.Random(f"pretrain/{seed}")
    aliases = [alias(t) for t in [*tasks, *composed]]

    def draw() -> tuple[str, str]:
        u = rng.random()
        if u < 0.2 or not tasks:
            x = _word(rng, rng.choice([LETTERS, DIGITS]), 2, 9)
            return f"cpy:{x}=", x
        if u < 0.6:
            task = rng.choice(tasks)
            x = task.make_input(rng)
            return task.prompt(x), x
        return rng.choice(aliases).sample(rng)

    return draw
