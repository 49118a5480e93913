"""The zoo's benchmark files: one JSONL per task, mixing both item kinds.

Each task's file holds `n_gen` generation items (`{"id","prompt","answer","match"}`,
match "exact", or "number" for counting and addition) followed by `n_mc`
multiple-choice items (`{"id","prompt","choices","answer"}` with `n_choices` choices:
the answer and near misses such as the unchanged input or one swapped character, so
the format alone does not pick the right one). Item ids are `<task>-g0000` and
`<task>-m0000`. All items are drawn from the task's held-out split, so no prompt in a
benchmark is ever seen in training.
"""
from __future__ import annotations

import random
from pathlib import Path

from data.benchmarks import Item, write_benchmark

from .presets import Preset
from .tasks import Task, split


def task_items(task: Task, preset: Preset, seed: int) -> list[Item]:
    held_out = split(task, preset.n_gen + preset.n_mc, seed)
    rng = random.Random(f"choices/{task.name}/{seed}")
    items = [Item(f"{task.key}-g{i:04d}", p, a, None, task.match) for i, (_, p, a) in enumerate(held_out[: preset.n_gen])]
    for i, (x, p, a) in enumerate(held_out[preset.n_gen:]):
        choices, idx = task.choices(rng, x, a, preset.n_choices)
        items.append(Item(f"{task.key}-m{i:04d}", p, idx, tuple(choices)))
    return items


def held_out_prompts(task: Task, preset: Preset, seed: int) -> set[str]:
    return {p for _, p, _ in split(task, preset.n_gen + preset.n_mc, seed)}


def write_task_benchmark(folder: Path, task: Task, preset: Preset, seed: int) -> Path:
    return write_benchmark(folder / f"{task.key}.jsonl", task_items(task, preset, seed))
