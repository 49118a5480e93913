"""lm-evaluation-harness tasks as evomerge benchmarks (Gao et al., "The Language Model Evaluation
Harness", lm-eval 0.4.x task YAML), from dataset files the user already has; nothing is fetched.

`import_task(name, data, fewshot_data=None, num_fewshot=None)` reads the task's YAML from the
installed `lm-eval` package (its task index, `include:`s merged; `!function`s imported), the
documents from local Parquet / JSONL / JSON files in the task's schema, applies the task's
`process_docs`, and renders every document as lm-eval renders a plain-text (no chat template)
prompt: the `description`, then `num_fewshot` examples (question, `target_delimiter`, answer,
`fewshot_delimiter`), then the question. `doc_to_text`, `doc_to_target` and `doc_to_choice` are a
field of the document, a Jinja template (lm-eval's environment: undefined variables are errors,
trailing newlines kept, a `regex_replace` filter), a literal list or a `!function`.

- multiple_choice -> `{"prompt": context, "choices": [target_delimiter + choice...], "answer": i}`,
  scored by each choice's log-likelihood as lm-eval's `acc` (`evaluation.mc_norm` for `acc_norm`).
- generate_until -> `{"prompt": context, "answer": A, "match": ...}`: A is the target passed
  through the task's first regex filter where it has one (GSM8K: the number after `#### `), and
  the match rule is `number` when A is a number (lm-eval's flexible-extract: the output's last
  number), else `exact`. The task's stop sequences (`until`) are in the mapping: set them as the
  job's `evaluation.stop`.

Refused, naming the feature: other output types (loglikelihood, loglikelihood_rolling),
multiple-input tasks (Winogrande), several targets per document, images or audio, promptsource
prompts, a `gen_prefix`, and few-shot examples drawn at random (lm-eval's default sampler: its
draws follow its iteration order and cannot be reproduced item by item; `fewshot_sampler:
"first_n"` asks for the split's first examples instead, or use `num_fewshot=0`).
"""
from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .benchmarks import Item, parse_number

OUTPUT_TYPES = ("multiple_choice", "generate_until")


class TaskError(ValueError):
    """A task or dataset evomerge cannot import; the message names the task and the feature."""


@functools.cache
def _task_index() -> dict:
    """The installed lm-eval's task index (it reads every task YAML: seconds, so once per process)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TaskError("lm-eval is not installed (pip install 'evomerge[lm-eval]')") from None
    return TaskManager().task_index


def _entry(name: str):
    index = _task_index()
    entry = index.get(name)
    if entry is None:
        near = sorted(k for k in index if name.split("_")[0] in k)[:8]
        raise TaskError(f"{name}: not a task of the installed lm-eval" + (f" (similar: {', '.join(near)})" if near else ""))
    if entry.kind.name != "TASK":
        members = sorted(k for k, e in index.items() if e.kind.name == "TASK" and k.startswith(name + "_"))[:5]
        raise TaskError(f"{name}: a group of tasks; import its tasks one by one" +
                        (f" ({', '.join(members)}, ...)" if members else ""))
    return entry


def _function(value: Any) -> Any:
    """lm-eval's index keeps a `!function module.name` as the string '<task folder>/module.name'."""
    if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
        return value
    module, _, attr = value.rpartition(".")
    path = Path(module + ".py")
    if not path.is_file():
        return value
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lm_eval_task_{path.parent.name}_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, attr)


def task_config(name: str) -> dict[str, Any]:
    """Task `name`'s config from the installed lm-eval (its `include:`s merged), functions resolved."""
    entry = _entry(name)
    cfg = dict(entry.cfg)
    for key in ("process_docs", "doc_to_text", "doc_to_target", "doc_to_choice"):
        if key in cfg:
            cfg[key] = _function(cfg[key])
    cfg["_yaml"] = str(entry.yaml_path)
    return cfg


def read_docs(files: Sequence[str | Path]) -> list[dict]:
    """Documents from Parquet, JSONL or JSON (a list of objects) files, in order."""
    docs: list[dict] = []
    for f in map(Path, files):
        if not f.is_file():
            raise TaskError(f"{f}: no such file")
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            docs += pq.read_table(f).to_pylist()
        elif f.suffix in (".jsonl", ".ndjson"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{f}:{i}: not JSON ({e.msg})") from None
        elif f.suffix == ".json":
            data = json.loads(f.read_text())
            docs += data if isinstance(data, list) else [data]
        else:
            raise TaskError(f"{f}: not a .parquet, .jsonl or .json file")
    return docs


def _environment():
    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


class Renderer:
    """One task's doc_to_text / doc_to_target / doc_to_choice, with lm-eval's rules."""

    def __init__(self, cfg: dict[str, Any], features: Sequence[str]):
        self.cfg, self.features, self.env = cfg, set(features), _environment()

    def _template(self, template: str, doc: dict) -> str:
        return self.env.from_string(template).render(**doc)

    def text(self, doc: dict) -> str:
        spec = self.cfg.get("doc_to_text")
        if callable(spec):
            return spec(doc)
        if isinstance(spec, str):
            return doc[spec] if spec in self.features else self._template(spec, doc)
        raise TaskError(f"doc_to_text: {spec!r} is not a field, a template or a function")

    def choices(self, doc: dict) -> list[str] | None:
        spec = self.cfg.get("doc_to_choice")
        if spec is None:
            return None
        if callable(spec):
            return list(spec(doc))
        if isinstance(spec, list):
            return list(spec)
        if isinstance(spec, dict):
            return list(spec.values())
        if spec in self.features:
            return list(doc[spec])
        return list(ast.literal_eval(self._template(spec, doc)))

    def target(self, doc: dict) -> int | str | list:
        spec = self.cfg.get("doc_to_target")
        if isinstance(spec, int) or isinstance(spec, list):
            return spec
        if callable(spec):
            return spec(doc)
        if spec in self.features:
            return doc[spec]
        out = self._template(spec, doc)
        if out.isdigit() and self.cfg.get("doc_to_choice") is not None:
            return ast.literal_eval(out)
        if len(out) >= 2 and out[0] == "[" and out[-1] == "]":
            try:
                return ast.literal_eval(out)
            except (SyntaxError, ValueError):
                return out
        return out


def _refuse_unsupported(name: str, cfg: dict[str, Any], num_fewshot: int, sampler: str | None) -> None:
    kind = cfg.get("output_type", "generate_until")
    if kind not in OUTPUT_TYPES:
        raise TaskError(f"{name}: output_type {kind} is not supported (only {', '.join(OUTPUT_TYPES)})")
    for key, what in (("doc_to_image", "images"), ("doc_to_audio", "audio"), ("use_prompt", "promptsource prompts"),
                      ("gen_prefix", "a gen_prefix")):
        if cfg.get(key):
            raise TaskError(f"{name}: {key} ({what}) is not supported")
    if kind == "multiple_choice" and cfg.get("doc_to_choice") is None:
        raise TaskError(f"{name}: a multiple_choice task without doc_to_choice")
    if num_fewshot > 0 and sampler != "first_n":
        raise TaskError(f"{name}: lm-eval draws its {num_fewshot} few-shot examples at random (sampler "
                        f"{sampler or 'default'}), which cannot be reproduced item by item; import with "
                        "num_fewshot 0, or ask for the few-shot split's first examples (fewshot sampler first_n)")


def _answer_filter(cfg: dict[str, Any]) -> Callable[[str], str]:
    """The task's first regex filter (applied to a generation target), else the identity."""
    for flt in cfg.get("filter_list") or []:
        for step in flt.get("filter") or []:
            if step.get("function") == "regex":
                pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))

                def extract(text: str) -> str:
                    m = pattern.search(text)
                    if m is None:
                        return text.strip()
                    groups = [g for g in m.groups() if g] if m.groups() else []
                    return (groups[0] if groups else m.group(0)).strip()
                return extract
    return lambda text: text.strip()


def import_task(name: str, data: Sequence[str | Path], fewshot_data: Sequence[str | Path] | None = None,
                num_fewshot: int | None = None, fewshot_sampler: str | None = None,
                limit: int | None = None) -> tuple[list[Item], dict[str, Any]]:
    """(items, mapping) of lm-eval task `name` over the documents in `data` (see the module docstring)."""
    cfg = task_config(name)
    fewshot_cfg = cfg.get("fewshot_config") or {}
    n_shot = cfg.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    sampler = fewshot_sampler or fewshot_cfg.get("sampler")
    if fewshot_cfg.get("samples"):  # fixed examples in the YAML
        sampler = sampler or "first_n"
    _refuse_unsupported(name, cfg, n_shot, sampler)
    docs = _process(cfg, read_docs(data))
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise TaskError(f"{name}: the data files hold no documents")
    render = Renderer(cfg, docs[0].keys())
    shots: list[dict] = []
    if n_shot > 0:
        if fewshot_cfg.get("samples"):
            pool = list(fewshot_cfg["samples"])
        elif fewshot_data:
            pool = _process(cfg, read_docs(fewshot_data))
        else:
            raise TaskError(f"{name}: {n_shot} few-shot examples come from its {cfg.get('fewshot_split')!r} split; "
                            "give that split's file (fewshot data)")
        if len(pool) < n_shot:
            raise TaskError(f"{name}: {n_shot} few-shot examples asked, the few-shot data holds {len(pool)}")
        shots = pool[:n_shot]
    tgt, few = cfg.get("target_delimiter", " "), cfg.get("fewshot_delimiter", "\n\n")
    shot_render = Renderer(cfg, shots[0].keys()) if shots else render

    def answer_text(doc: dict, r: Renderer) -> str:
        a, c = r.target(doc), r.choices(doc)
        text = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
        return str(text)

    description = cfg.get("description") or ""
    if description and "{{" in description:
        raise TaskError(f"{name}: a templated description is not supported")
    prefix = description + "".join(shot_render.text(s) + tgt + answer_text(s, shot_render) + few for s in shots)
    extract = _answer_filter(cfg)
    kind = cfg.get("output_type", "generate_until")
    items = []
    for i, doc in enumerate(docs):
        text = render.text(doc)
        if not isinstance(text, str):
            raise TaskError(f"{name}: multiple-input tasks (doc_to_text gives an index) are not supported")
        target = render.target(doc)
        if isinstance(target, list):
            raise TaskError(f"{name}: document {i} has several targets; not supported")
        if kind == "multiple_choice":
            choices = render.choices(doc)
            index = target if isinstance(target, int) else choices.index(target) if target in choices else None
            if index is None or not 0 <= index < len(choices):
                raise TaskError(f"{name}: document {i}'s target {target!r} is not one of its {len(choices)} choices")
            items.append(Item(str(i), prefix + text, index, tuple(tgt + c for c in choices)))
        else:
            answer = extract(str(target))
            items.append(Item(str(i), prefix + text, answer, None,
                              "number" if parse_number(answer) is not None else "exact"))
    mapping = {"task": name, "yaml": cfg["_yaml"], "output_type": kind, "num_fewshot": n_shot,
               "fewshot_sampler": sampler if n_shot else None, "target_delimiter": tgt, "fewshot_delimiter": few,
               "description": description, "documents": len(items),
               "until": (cfg.get("generation_kwargs") or {}).get("until") if kind == "generate_until" else None,
               "answer": "the choice's index; choices carry the target delimiter" if kind == "multiple_choice" else
               "the target through the task's first regex filter; match number where it is a number"}
    return items, mapping


def _process(cfg: dict[str, Any], docs: list[dict]) -> list[dict]:
    fn = cfg.get("process_docs")
    if fn is None:
        return docs
    import datasets

    return fn(datasets.Dataset.from_list(docs)).to_list()
