"""The one job spec, shared by the CLI (YAML), the REST API (JSON) and Python, and its checks.

`JobSpec` is a pydantic union told apart by `kind`: `merge` (one merge with fixed
parameters, `merging.MergeSpec`), `evolve` (a Pareto search, `evolve.spec.EvolveSpec`) or
`mergekit` (a mergekit config, `merging.mergekit.MergekitSpec`). Parsing checks shapes and types (`parse_spec`, status
422); `check_spec` then checks what the spec refers to, against the server's view of the
world (status 400): model paths lie inside the allowed model roots once symlinks are
resolved, the folders exist and share the base's tensor names and shapes, the device is
served, the benchmarks exist (uploaded by name, or files under the roots)
and parse, and, when the service is given its workers' memory, an evolve job's memory plan
fits (`evolve.plan`). Every rejection is a `SpecError` whose message
starts with the field, e.g. `models[1].path: resolves outside the allowed model roots`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Sequence, Union

from pydantic import Field, TypeAdapter, ValidationError

from core.errors import CheckpointError
from core.validation import error_message, field_path, json_text, non_finite
from evolve.spec import EvolveSpec
from merging.checkpoint import CheckpointReader
from merging.mergekit import MergekitSpec
from merging.spec import MergeSpec

JobSpec = Annotated[Union[MergeSpec, EvolveSpec, MergekitSpec], Field(discriminator="kind")]
KINDS: tuple[str, ...] = ("merge", "evolve", "mergekit")

_ADAPTER = TypeAdapter(JobSpec)
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w\[\].]*): ")


class SpecError(ValueError):
    """A rejected spec: `field` names the offending part, `status` is the HTTP status (422/400)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.status = field, message, status


field_name = field_path  # ('models', 1, 'path') -> 'models[1].path'


def describe_error(err: Mapping[str, Any], loc: Sequence[Any] | None = None) -> tuple[str, str]:
    """(field, message) of one pydantic error, as every refusal of the API and the CLI names it:
    the location (`loc`, default the error's own) as a field path, pydantic's "Value error, "
    dropped, and a message that names a field of its own (`params.weights: 3 values for 2
    models`, from a validator of the whole spec) credited to that field."""
    msg = error_message(err)
    if err["type"] == "path_type":
        msg = "must be a path (a string)"
    field = field_name(err["loc"] if loc is None else loc)
    m = _FIELD_PREFIX.match(msg)
    if m and (not field or m.group(1).startswith(field)):
        field, msg = m.group(1), msg[m.end():]
    return field, msg


def _from_validation_error(e: ValidationError) -> SpecError:
    """The first error, 422 when the spec breaks its published JSON schema (a type, a name, a
    missing field), 400 when it fits the schema but a rule across fields refuses it (the
    validators' ValueErrors: one weight per model, a method that needs a base, ...)."""
    err = e.errors(include_url=False)[0]
    loc = list(err["loc"])
    if len(KINDS) > 1 and loc and loc[0] in KINDS:  # the union's tag, not a field
        loc = loc[1:]
    field, msg = describe_error(err, loc)
    if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
        field, msg = "kind", f"must be one of {', '.join(KINDS)}"
    return SpecError(field or "spec", msg, 400 if err["type"] in ("value_error", "assertion_error") else 422)


def parse_spec(data: Any) -> Any:
    """A JSON/YAML mapping -> a MergeSpec or EvolveSpec, validated strictly (`core.validation.json_text`:
    numbers must be finite numbers, not strings); a SpecError names the first bad field."""
    if isinstance(data, (MergeSpec, EvolveSpec)):
        return data
    if not isinstance(data, dict):
        raise SpecError("spec", "a job spec is a JSON object (kind, base, models, method, ...)", 422)
    bad = non_finite(data)
    if bad is not None:
        raise SpecError(field_name(bad) or "spec", "must be a finite number (not NaN or infinity)", 422)
    try:
        text = json_text(data)
    except (TypeError, ValueError) as e:
        raise SpecError("spec", f"not JSON data: {e}", 422) from None
    try:
        return _ADAPTER.validate_json(text, strict=True)
    except ValidationError as e:
        raise _from_validation_error(e) from None


def resolve_path(value: Path, field: str, roots: Iterable[Path], what: str = "model folder",
                 excluded: Iterable[Path] = ()) -> Path:
    """The real path of a folder (or, with what="file", a file), which must lie inside one of `roots`
    once symlinks are resolved, and inside none of `excluded` (the service's own artifacts: other
    users' outputs and uploads are reached through the API, never by path). Relative paths are
    taken relative to each root in turn."""
    roots = [Path(r).resolve() for r in roots]
    excluded = [Path(x).resolve() for x in excluded]
    if ".." in Path(value).parts:
        raise SpecError(field, "must not contain '..'")
    tries = [Path(value)] if Path(value).is_absolute() else [r / value for r in roots]
    for p in tries:
        real, found = _look_up(p, field, what)
        if not any(real.is_relative_to(r) for r in roots):
            raise SpecError(field, f"{value} lies outside the allowed model roots")
        if any(real.is_relative_to(x) for x in excluded):
            raise SpecError(field, f"{value} lies in the service's artifacts folder; "
                                   "use a model or benchmark of your own under the model roots")
        if found:
            return real
    raise SpecError(field, f"{value}: no such {what} under the model roots")


def _look_up(p: Path, field: str, what: str) -> tuple[Path, bool]:
    """`p` with symlinks resolved, and whether it is a file (what="file") or a folder; a path the
    operating system refuses (a NUL byte, a name too long) is a SpecError, not a traceback."""
    try:
        real = p.resolve()
        return real, real.is_file() if what == "file" else real.is_dir()
    except (OSError, ValueError) as e:
        reason = "contains a NUL character" if "null byte" in str(e) else (
            "is too long" if getattr(e, "errno", None) == 36 else "is not a usable path")
        raise SpecError(field, f"the path {reason}") from None


def device_accepted(device: str, devices: Iterable[str]) -> bool:
    devices = list(devices)
    if not devices or device == "auto":
        return True
    return device in devices or any(device == d.split(":")[0] for d in devices) or (
        device == "cuda:0" and "cuda" in devices)


def check_spec(spec: Any, model_roots: Iterable[Path], devices: Iterable[str] = (),
               uploaded_benchmark: Callable[[str], Path | None] = lambda name: None,
               excluded: Iterable[Path] = (), gpu_memory: int | None = None,
               host_memory: int | None = None) -> Any:
    """Checks what the spec points at; returns a copy with every path made real and absolute.

    `uploaded_benchmark(name)` gives the file of a benchmark uploaded under that name (an
    evolve objective may name one instead of giving a path). No path may lie in `excluded`
    (the service passes its artifacts folder, see `resolve_path`). With `gpu_memory` and/or
    `host_memory` (the workers' budgets, bytes), an evolve spec's memory plan must fit them
    (`check_plan_budgets`)."""
    from merging.task_vectors import open_inputs

    roots, ex = list(model_roots), list(excluded)
    if not device_accepted(spec.device, devices):
        raise SpecError("device", f"no worker serves {spec.device} (served: {', '.join(devices)})")
    if spec.kind == "mergekit":
        return _check_mergekit(spec, roots, ex)
    if spec.base is None:  # c2m3, weight_matching: no base; the models share names and shapes
        return _check_baseless(spec, roots, ex, uploaded_benchmark)
    base = resolve_path(spec.base, "base", roots, excluded=ex)
    paths = [None if m.path is None else resolve_path(m.path, f"models[{i}].path", roots, excluded=ex)
             for i, m in enumerate(spec.models)]  # method atm may train from data alone
    present = [i for i, p in enumerate(paths) if p is not None]
    trains = [None if m.train is None else _benchmark_file(m.train, f"models[{i}].train", roots, uploaded_benchmark, ex)
              for i, m in enumerate(spec.models)]
    try:
        CheckpointReader(base)
    except CheckpointError as e:
        raise SpecError("base", str(e).replace(str(base), str(spec.base))) from None
    try:
        open_inputs(base, [paths[i] for i in present], getattr(spec, "tokenizer", None))
    except CheckpointError as e:
        msg = str(e)
        i = present[_model_index(e.field)]
        marker = f"does not match the base {base}: "
        if marker in msg:
            msg = f"{spec.models[i].path} does not match the base {spec.base}: {msg.split(marker, 1)[1]}"
        raise SpecError(f"models[{i}].path", msg.replace(str(paths[i]), str(spec.models[i].path))) from None
    update: dict[str, Any] = {"base": base,
                              "models": [m.model_copy(update={"path": p, "train": t})
                                         for m, p, t in zip(spec.models, paths, trains)]}
    if getattr(spec, "objectives", None) is not None:
        update["objectives"] = [_check_objective(o, f"objectives[{i}]", roots, uploaded_benchmark, ex)
                                for i, o in enumerate(spec.objectives)]
    irt = getattr(getattr(spec, "evaluation", None), "irt", None)
    if irt is not None and irt.params_file is not None:
        real = resolve_path(irt.params_file, "evaluation.irt.params_file", roots, "file", ex)
        evaluation = spec.evaluation.model_copy(update={"irt": irt.model_copy(update={"params_file": real})})
        update["evaluation"] = evaluation
    checked = spec.model_copy(update=update)
    if getattr(checked, "kind", None) == "evolve" and (gpu_memory is not None or host_memory is not None):
        check_plan_budgets(checked, gpu_memory, host_memory)
    return checked


def check_plan_budgets(spec: Any, gpu_memory: int | None, host_memory: int | None) -> None:
    """The memory plan against the workers' budgets; a budget not given is not checked. A spec
    with device auto is planned for a GPU when a GPU budget is given, else for the CPU (this
    process's own hardware says nothing about the workers')."""
    import math

    from evolve.plan import PlanError, plan_job

    device = spec.device if spec.device != "auto" else ("cuda" if gpu_memory is not None else "cpu")
    try:
        plan = plan_job(spec, math.inf if gpu_memory is None else gpu_memory,
                        math.inf if host_memory is None else host_memory, device=device)
    except (PlanError, CheckpointError) as e:
        raise SpecError(getattr(e, "field", "base"), getattr(e, "message", str(e))) from None
    if not plan.fits:
        raise SpecError(plan.error.field, plan.error.message)


def _check_mergekit(spec: MergekitSpec, roots: list[Path], ex: list[Path]) -> MergekitSpec:
    """A mergekit config: its models inside the roots and alike, every parameter resolvable for
    every tensor of the base (`merging.mergekit.to_merge`)."""
    from merging.mergekit import base_layout, to_merge
    from merging.task_vectors import open_inputs

    models = [m.model_copy(update={"model": str(resolve_path(Path(m.model), f"models[{i}].model", roots, excluded=ex))})
              for i, m in enumerate(spec.models)]
    base = None if spec.base_model is None else str(resolve_path(Path(spec.base_model), "base_model", roots,
                                                                 excluded=ex))
    checked = spec.model_copy(update={"models": models, "base_model": base})
    base_dir = base or models[0].model
    try:
        names, n_layers, _ = base_layout(base_dir)
        merge_spec, _, _ = to_merge(checked, names, n_layers)
        open_inputs(base_dir, [m.path for m in merge_spec.models])
    except CheckpointError as e:
        raise SpecError("base_model" if e.field in (None, "base") else "models", str(e)) from None
    except ValueError as e:
        m = _FIELD_PREFIX.match(str(e))
        raise SpecError(m.group(1) if m else "parameters", str(e)[m.end():] if m else str(e)) from None
    return checked


def _check_baseless(spec: Any, roots: list[Path], ex: list[Path], uploaded: Callable[[str], Path | None]) -> Any:
    """Whole-model methods: models inside the roots and alike; params.data / params.spec files too
    (a JSONL params.data may name an uploaded benchmark)."""
    from merging.permutation.merge import open_models

    paths = [resolve_path(m.path, f"models[{i}].path", roots, excluded=ex) for i, m in enumerate(spec.models)]
    try:
        open_models(paths)
    except CheckpointError as e:
        raise SpecError(f"models[{_model_index(e.field)}].path", str(e)) from None
    params = dict(spec.params)
    for key in ("data", "spec"):
        given = params.get(key)
        if given and key == "data" and len(Path(given).parts) == 1 and uploaded(str(given)) is not None:
            params[key] = str(_benchmark_file(Path(given), "params.data", roots, uploaded, ex))
        elif given:
            params[key] = str(resolve_path(given, f"params.{key}", roots, "file", ex))
    return spec.model_copy(update={"params": params,
                                   "models": [m.model_copy(update={"path": p}) for m, p in zip(spec.models, paths)]})


def _check_objective(obj: Any, where: str, roots: list[Path], uploaded: Callable[[str], Path | None],
                     ex: list[Path]) -> Any:
    """An objective's benchmark: an uploaded name or a JSONL file under the roots, and valid."""
    path = _benchmark_file(Path(obj.benchmark), f"{where}.benchmark", roots, uploaded, ex)
    update: dict[str, Any] = {"benchmark": path}
    if obj.name is None and re.fullmatch(r"[A-Za-z0-9_.:-]+", obj.label):
        update["name"] = obj.label  # keep the label the user's spec implies, whatever the real file name
    return obj.model_copy(update=update)


def _benchmark_file(given: Path, field: str, roots: list[Path], uploaded: Callable[[str], Path | None],
                    ex: list[Path]) -> Path:
    """A JSONL file in the benchmark format: a benchmark uploaded under that name, or a file under
    the roots; loaded once to check it."""
    from data.benchmarks import BenchmarkError, load_benchmark

    path = uploaded(str(given)) if len(given.parts) == 1 else None
    if path is None:
        try:
            path = resolve_path(given, field, roots, "file", ex)
        except SpecError as e:
            if len(given.parts) == 1 and "no such" in e.message:
                raise SpecError(field, f"no benchmark named {str(given)!r} was uploaded, "
                                       "and no such file is under the model roots") from None
            raise
    try:
        load_benchmark(path)
    except BenchmarkError as e:
        raise SpecError(field, str(e).replace(str(path), str(given))) from None
    return path


def _model_index(field: str | None) -> int:
    """i of the `models[i].path` an input error names (CheckpointError.field), else 0."""
    return int(field.split("[", 1)[1].split("]", 1)[0]) if field and field.startswith("models[") else 0


def spec_json(spec: Any) -> dict:
    return spec.model_dump(mode="json")
