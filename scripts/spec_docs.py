"""Generates the field tables of docs/spec.md from the job spec's pydantic models.

docs/spec.md is hand-written prose with generated blocks:

    <!-- generated: ModelName -->
    ... (rewritten by this script) ...
    <!-- end generated -->

`python scripts/spec_docs.py` rewrites every block in place from the model of that name;
`python scripts/spec_docs.py --check` writes nothing and exits 1 with one line if the file is
not what the models generate (tests/test_docs.py runs it).

The models are imported by dotted path from MODELS below: when a module moves, update the path
here. Every model listed must have a block in docs/spec.md, and every block must name a listed
model.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

# (dotted path of the model) -- the block's marker is the class name
MODELS = [
    "merging.spec.MergeSpec",
    "merging.spec.ModelRef",
    "merging.spec.OutputSpec",
    "merging.mergekit.MergekitSpec",
    "evolve.spec.EvolveSpec",
    "evolve.spec.SearchSpec",
    "evolve.spec.FinalCheckSpec",
    "evolve.spec.ExecutionSpec",
    "fitness.spec.ObjectiveSpec",
    "fitness.spec.SubsetSpec",
    "fitness.spec.EvaluationSpec",
    "fitness.spec.IrtSpec",
    "merging.methods.registry.MethodParams",
    "merging.methods.linear.LinearParams",
    "merging.methods.task_arithmetic.TaskArithmeticParams",
    "merging.methods.ties.TiesParams",
    "merging.methods.dare.DareParams",
    "merging.methods.tsv.TsvParams",
    "merging.permutation.methods.PermutationParams",
    "merging.atm.AtmParams",
    "merging.atm.LoraParams",
]

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "spec.md"
BLOCK = re.compile(r"<!-- generated: (\w+) -->\n.*?<!-- end generated -->", re.S)


def load_models() -> dict[str, type]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = {}
    for dotted in MODELS:
        module, _, name = dotted.rpartition(".")
        out[name] = getattr(importlib.import_module(module), name)
    return out


def _constraints(metadata) -> list[str]:
    out = []
    for m in metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"length >= {m.min_length}")
        if getattr(m, "max_length", None) is not None:
            out.append(f"length <= {m.max_length}")
        if getattr(m, "pattern", None) is not None:
            out.append(f"pattern `{m.pattern}`")
        if getattr(m, "metadata", None):  # a Field(...) inside Annotated
            out += _constraints(m.metadata)
    return out


def type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is Annotated:
        inner, cons = type_name(args[0]), _constraints(args[1:])
        return f"{inner} ({', '.join(cons)})" if cons else inner
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(ann, type):
        return "path" if issubclass(ann, Path) else ann.__name__
    return str(ann)


def default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return f"`{type(value).__name__}` defaults"
    else:
        value = field.default
    return f"`{json.dumps(value)}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()).replace("``", "`") if doc else ""


def render(name: str, cls: type) -> str:
    lines = [f"<!-- generated: {name} -->"]
    doc = docstring(cls)
    if doc:
        lines += [f"`{cls.__module__}.{name}`: {doc}", ""]
    else:
        lines += [f"`{cls.__module__}.{name}`", ""]
    lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for fname, field in cls.model_fields.items():
        shown = field.alias or fname
        ftype = type_name(field.annotation)
        cons = _constraints(field.metadata)
        if cons:
            ftype += f" ({', '.join(cons)})"
        lines.append(f"| `{shown}` | {cell(ftype)} | {cell(default_text(field))} | {cell(field.description or '')} |")
    lines.append("<!-- end generated -->")
    return "\n".join(lines)


def regenerate(text: str, models: dict[str, type]) -> str:
    seen = set()

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in models:
            raise SystemExit(f"docs/spec.md: block for {name}, which is not in MODELS of scripts/spec_docs.py")
        seen.add(name)
        return render(name, models[name])

    out = BLOCK.sub(sub, text)
    missing = [n for n in models if n not in seen]
    if missing:
        raise SystemExit(f"docs/spec.md: no generated block for {', '.join(missing)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/spec.md is not current; write nothing")
    ap.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    text = args.doc.read_text()
    new = regenerate(text, load_models())
    if args.check:
        if new != text:
            print(f"{args.doc}: generated tables are stale; run python scripts/spec_docs.py")
            return 1
        return 0
    if new != text:
        args.doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
