"""Independently initialized tiny Llamas pretrained on the same corpus (for permutation merging).

    build_llama_family(root, seeds=(0, 1, 2), preset="tiny", steps=None) -> [root/llama-s<seed>, ...]

Each member is `zoo.build.pretrain_base(preset, seed)`: the same architecture, tokenizer and
corpus (`tasks.pretrain_sampler` of the preset's tasks) as the zoo's base, but its own
initialization and batch order, so its hidden units (residual stream, MLP units, heads) are
ordered differently from its siblings'. `steps` overrides the preset's pretraining steps
(the tiny preset's 800 take about 25 s per model on one core; the tests use a few). A
folder is reused when its `family.json` records the same preset, steps and seed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from .build import _save_full, fixed_threads, pretrain_base
from .presets import get_preset


def build_llama_family(root: Path, seeds=(0, 1, 2), preset: str = "tiny", steps: int | None = None,
                       log: Callable[[str], None] = lambda line: None) -> list[Path]:
    p = get_preset(preset)
    if steps is not None:
        p = dataclasses.replace(p, pretrain_steps=steps)
    root = Path(root)
    out = []
    for seed in seeds:
        folder = root / f"llama-s{seed}"
        want = {"preset": p.to_json(), "seed": seed, "torch": torch.__version__}
        stamp = folder / "family.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
            tmp = folder.with_name(folder.name + ".new")
            shutil.rmtree(tmp, ignore_errors=True)
            with fixed_threads(p.threads):
                model, tok = pretrain_base(p, seed, log=log)
            _save_full(model, tok, tmp, p)
            (tmp / "family.json").write_text(json.dumps(want))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        out.append(folder)
    return out
