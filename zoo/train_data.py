"""Training data for ATM on the zoo: per-task JSONL files in the benchmark format.

`write_train_data(folder, preset, seed)` writes `<task>.jsonl` for every task of the
preset, holding the pairs the zoo's own fine-tune of that task draws (`build.finetune`:
the task's `train_sampler`, which never returns a held-out benchmark prompt, mixed with
a share `preset.replay` of the base corpus on the other tasks' formats, same seeds), as
generation items `{"id", "prompt", "answer", "match": "exact"}`. By default a task gets
`steps_for(task) * finetune_batch` pairs: exactly as many as its zoo fine-tune saw, so ATM
and the zoo's fine-tunes train on the same data at the same budget.

`replay=0` gives the task's pairs alone. ATM wants that: the zoo's replay answers the
*other* tasks' prompts by copying (it keeps a one-shot fine-tune from disturbing them),
so when every task trains from the same merged model each round, each task's replay
un-teaches the others and the rounds cancel (measured on tiny, cip + srt, 400 steps
each, T = 4, alpha 1: 0.06 average accuracy with replay 0.25, base level).
"""
from __future__ import annotations

from pathlib import Path

from data.benchmarks import Item, write_benchmark

from .benchmarks import held_out_prompts
from .build import mixed_sampler
from .presets import Preset, get_preset
from .tasks import TASKS, pretrain_sampler, train_sampler


def task_pairs(preset: Preset, task_name: str, seed: int, n: int, replay: float | None = None) -> list[tuple[str, str]]:
    """The first `n` pairs of the zoo fine-tune's stream for `task_name` (never a benchmark prompt);
    `replay` (default the preset's) is the share of base-corpus pairs mixed in."""
    task = TASKS[task_name]
    others = [TASKS[t] for t in preset.tasks if t != task_name]
    draw = mixed_sampler(train_sampler(task, held_out_prompts(task, preset, seed), seed),
                         pretrain_sampler(others, seed), preset.replay if replay is None else replay, seed)
    return [draw() for _ in range(n)]


def write_train_data(folder: str | Path, preset: str | Preset = "tiny", seed: int = 0,
                     tasks: list[str] | None = None, pairs: int | None = None,
                     replay: float | None = None) -> dict[str, Path]:
    """Writes one training JSONL per task into `folder`; returns {task: path}."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    folder = Path(folder)
    out = {}
    for t in tasks or list(p.tasks):
        if t not in p.tasks:
            raise ValueError(f"task {t!r} is not in the {p.name} preset ({', '.join(p.tasks)})")
        n = pairs if pairs is not None else p.steps_for(t) * p.finetune_batch
        items = [Item(f"{t}-t{i:06d}", q, a) for i, (q, a) in enumerate(task_pairs(p, t, seed, n, replay))]
        out[t] = write_benchmark(folder / f"{t}.jsonl", items)
    return out
