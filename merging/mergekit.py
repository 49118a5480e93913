"""mergekit's configs in and out (Goddard et al., 2024, "Arcee's MergeKit: A Toolkit for Merging
Large Language Models"; its YAML format as of mergekit 0.1.5), for the methods both tools compute
alike: linear, task_arithmetic, ties, dare_linear and dare_ties.

In: `MergekitSpec` is a mergekit config as a job spec (`kind: mergekit`); `to_merge(spec)` gives
the `MergeSpec` and the per-tensor parameters that `merging.merge` streams, with mergekit's rules:
a parameter is a scalar, a gradient (a list, interpolated linearly at t = i / (L - 1) for layer i
of L, t = 0 for the tensors outside the layers) or filters (`{filter, value}` entries, the first
whose filter is a substring of the tensor's name wins); a model's own `parameters` come before the
config's. A key evomerge cannot honour exactly is refused naming it: `slices` and `modules`
(frankenmerges, passthrough), tokenizer and chat-template settings other than the base's,
`normalize: false` for linear (whose weights must then sum to 1), `rescale: false` for DARE,
mergekit's LoRA syntax (`model+lora`; give the adapter folder as a model instead).

DARE is the same algorithm with other random draws: evomerge's masks are its own seeded ones and
kept entries are rescaled by 1 / density (Yu et al. 2024, eq. 2), mergekit's by the ratio of l1
norms (equal in expectation); `to_merge` says so in its notes. `dtype` is mergekit's computation
dtype: evomerge always computes in float32, so `dtype` only sets the output's (unless `out_dtype`).

Out: `to_mergekit(merge_spec, params_for_tensor, names, n_layers)` writes a config mergekit
reproduces: per-block values become filters on each layer's prefix and on each other tensor's name.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.validation import off_schema

from .checkpoint import LAYER, layer_index
from .methods.registry import MethodParams, method_params
from .spec import Device

SHARED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# mergekit 0.1.5's defaults where they differ from evomerge's
NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
DENSITY = 1.0
REFUSED = {
    "slices": "slices (frankenmerges, passthrough) are not supported; merge whole models with `models`",
    "modules": "modules are not supported; merge whole models with `models`",
    "tokenizer": "tokenizer settings are not supported; the output keeps the base's tokenizer",
    "chat_template": "chat_template is not supported; the output keeps the base's tokenizer files",
}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="a local model folder or PEFT adapter")
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergekitSpec(BaseModel):
    """A mergekit YAML config as an evomerge job (`kind: mergekit`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema, cls: schema.update(
        required=["kind", *schema.get("required", [])]))

    kind: Literal["mergekit"] = "mergekit"
    merge_method: Literal[SHARED]  # type: ignore[valid-type]
    base_model: str | None = None
    models: list[ModelEntry] = Field(..., min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = Field(None, description="base (mergekit's default) only")
    device: Device = "auto"

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        if isinstance(data, dict):
            for key, why in REFUSED.items():
                if data.get(key) is not None:
                    raise off_schema(f"{key}: {why}")
            if "merge_method" in data and data["merge_method"] not in SHARED:
                raise off_schema(f"merge_method: {data['merge_method']!r} is not one evomerge computes as mergekit "
                                 f"does ({', '.join(SHARED)})")
        return data

    @model_validator(mode="after")
    def _check(self) -> "MergekitSpec":
        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if v is not None and v not in DTYPES:
                raise ValueError(f"{key}: {v!r} is not one of {', '.join(DTYPES)}")
        if self.tokenizer_source not in (None, "base"):
            raise ValueError("tokenizer_source: only base (the output keeps the base's tokenizer) is supported")
        for i, m in enumerate(self.models):
            if "+" in m.model:
                raise ValueError(f"models[{i}].model: mergekit's model+lora syntax is not supported; name the "
                                 "PEFT adapter folder as a model instead")
        if self.merge_method != "linear" and self.base_model is None:
            raise ValueError(f"base_model: required for {self.merge_method}")
        allowed = {"weight", "density"} if self.merge_method != "linear" else {"weight"}
        shared = {"lambda", "normalize", "int8_mask", "rescale"} if self.merge_method != "linear" else {"normalize"}
        for where, params in [("parameters", self.parameters)] + [
                (f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)]:
            for key in params:
                ok = allowed | (shared if where == "parameters" else set())
                if key not in ok:
                    raise ValueError(f"{where}.{key}: not a parameter of {self.merge_method} that evomerge "
                                     f"reproduces ({', '.join(sorted(ok))})")
        if self.parameters.get("rescale") is False:
            raise ValueError("parameters.rescale: false is not supported (evomerge's DARE always rescales)")
        return self


def evaluate_setting(setting: Any, name: str, t: float, where: str) -> Any:
    """A mergekit parameter setting's value for tensor `name` at layer position `t`."""
    if isinstance(setting, (bool, int, float)):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in setting):
        x = t * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for j, cond in enumerate(setting):
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise ValueError(f"{where}[{j}]: a filter entry is {{filter, value}}")
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate_setting(cond["value"], name, t, f"{where}[{j}].value")
        return None
    raise ValueError(f"{where}: {setting!r} is not a number, a gradient (list of numbers) or filters")


def layer_position(name: str, n_layers: int) -> float:
    """mergekit's t for a tensor: i / (L - 1) in layer i of L (1 when L = 1), 0 outside the layers."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def to_merge(spec: MergekitSpec, names: Sequence[str], n_layers: int):
    """(MergeSpec, params_for_tensor, notes) computing what mergekit computes for `spec`; `names`:
    the base's tensor names (every one is resolved here, so a bad value fails before any work)."""
    from .spec import MergeSpec

    method = spec.merge_method
    base = spec.base_model if spec.base_model is not None else spec.models[0].model
    entries = [m for m in spec.models if method == "linear" or m.model != base]
    if not entries:
        raise ValueError("models: every model is the base_model; nothing to merge")
    refs = []
    for i, m in enumerate(entries):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", m.model.rstrip("/").split("/")[-1])[:100] or "model"
        refs.append({"name": f"{i}-{stem}", "path": m.model})
    normalize = spec.parameters.get("normalize", NORMALIZE[method])
    notes = []
    if method.startswith("dare"):
        notes.append(f"{method}: evomerge draws its own seeded masks and rescales kept entries by 1 / density; "
                     "mergekit's masks differ and it rescales by the l1-norm ratio (the same in expectation)")

    def value(key: str, i: int | None, name: str, t: float, default: Any = None) -> Any:
        own = entries[i].parameters if i is not None else {}
        if key in own:
            v = evaluate_setting(own[key], name, t, f"models[{spec.models.index(entries[i])}].parameters.{key}")
            if v is not None:
                return v
        if key in spec.parameters:
            v = evaluate_setting(spec.parameters[key], name, t, f"parameters.{key}")
            if v is not None:
                return v
        return default

    def raw(name: str) -> dict[str, Any]:
        t = layer_position(name, n_layers)
        weights = [value("weight", i, name, t) for i in range(len(entries))]
        for i, w in enumerate(weights):
            if w is None:
                raise ValueError(f"models[{spec.models.index(entries[i])}].parameters.weight: required (no weight "
                                 f"for {name})")
        p: dict[str, Any] = {"weights": [float(w) for w in weights]}
        if method == "linear":
            if not normalize and abs(sum(weights) - 1.0) > 1e-6:
                raise ValueError("parameters.normalize: false is supported for linear only when the weights sum "
                                 f"to 1 ({sum(weights):g} for {name})")
            return p
        lam = value("lambda", None, name, t, 1.0)
        if method == "task_arithmetic":
            total = sum(p["weights"])
            if normalize and abs(total) >= 1e-8:  # mergekit's divisor rule
                p["weights"] = [w / total for w in p["weights"]]
            return p | {"lambda": float(lam)}
        p |= {"lambda": float(lam), "normalize": bool(normalize),
              "density": [float(value("density", i, name, t, DENSITY)) for i in range(len(entries))]}
        return p

    cache: dict[str, MethodParams] = {}

    def params_for_tensor(name: str) -> MethodParams:
        p = raw(name)
        key = repr(sorted(p.items()))
        if key not in cache:
            try:
                cache[key] = method_params(method, p, len(entries))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return cache[key]

    for name in names:
        params_for_tensor(name)
    out_dtype = spec.out_dtype or spec.dtype
    merge_spec = MergeSpec(base=base, models=refs, method=method, device=spec.device,
                           output={"dtype": DTYPES[out_dtype]} if out_dtype else {},
                           tokenizer="base" if spec.tokenizer_source == "base" else None)
    return merge_spec, params_for_tensor, notes


def _setting(values: dict[str, Any]) -> Any:
    """One parameter's values by filter -> a scalar when they agree, else mergekit filters."""
    distinct = set(map(repr, values.values()))
    if len(distinct) == 1:
        return next(iter(values.values()))
    return [{"filter": f, "value": v} for f, v in values.items()]


def to_mergekit(spec, params_for_tensor: Callable[[str], MethodParams], names: Sequence[str],
                floating: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """A mergekit config for `spec` (a MergeSpec of a shared method) with per-tensor parameters:
    the values of each layer's tensors under that layer's prefix (`model.layers.3.`), every other
    floating tensor under its own name; a scalar where all agree."""
    method = spec.method
    if method not in SHARED:
        raise ValueError(f"method: {method} has no mergekit counterpart ({', '.join(SHARED)})")
    groups: dict[str, MethodParams] = {}
    for name in names:
        if not floating(name):
            continue
        m = LAYER.match(name)
        key = m.group(1) if m else name
        p = params_for_tensor(name)
        if key in groups and groups[key] != p:
            raise ValueError(f"{key}: tensors of one layer have different parameters; mergekit filters cannot say so")
        groups[key] = p
    n = len(spec.models)

    def per(getter) -> dict[str, Any]:
        return {k: getter(p) for k, p in groups.items()}

    models = []
    for i, ref in enumerate(spec.models):
        params: dict[str, Any] = {"weight": _setting(per(lambda p: p.per_model("weights", n, 1.0)[i]))}
        if method != "linear" and method != "task_arithmetic":
            params["density"] = _setting(per(lambda p: p.per_model("density", n, 0.0)[i]))
        models.append({"model": str(ref.path), "parameters": params})
    shared: dict[str, Any] = {}
    if method == "linear":
        shared["normalize"] = True
    else:
        shared["lambda"] = _setting(per(lambda p: p.lambda_))
        if method == "task_arithmetic":
            shared["normalize"] = False
        else:
            normal = per(lambda p: p.normalize if p.normalize is not None else method != "dare_linear")
            if len(set(normal.values())) > 1:
                raise ValueError("params.normalize: differs between tensors; mergekit's normalize is one value")
            shared["normalize"] = next(iter(normal.values()))
        if method.startswith("dare"):
            shared["rescale"] = True
    out = {"merge_method": method, "base_model": str(spec.base), "models": models, "parameters": shared,
           "dtype": "float32"}
    if method == "linear":  # mergekit's linear averages the models alone (evomerge's: base + the same mean's delta)
        del out["base_model"]
    if spec.output.dtype:
        out["out_dtype"] = spec.output.dtype
    return out


def base_layout(base) -> tuple[list[str], int, Callable[[str], bool]]:
    """The base's tensor names, its number of layers and which tensors are floating."""
    import json
    from pathlib import Path

    from .checkpoint import CheckpointReader

    reader = CheckpointReader(base)
    config = json.loads((Path(base) / "config.json").read_text())
    n_layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 1)
    return reader.names(), n_layers, lambda name: reader.info(name).dtype.is_floating_point


def merge_mergekit(config: MergekitSpec | Mapping[str, Any], out_dir, **kwargs):
    """Runs a mergekit config through evomerge's streaming engine (`merging.merge`'s keywords);
    returns (output folder, notes)."""
    from core.validation import strict_spec

    from .engine import merge

    spec = strict_spec(MergekitSpec, config)
    base = spec.base_model if spec.base_model is not None else spec.models[0].model
    names, n_layers, _ = base_layout(base)
    merge_spec, params, notes = to_merge(spec, names, n_layers)
    card = {"mergekit": spec.model_dump(mode="json", exclude={"kind", "device"}, exclude_none=True)}
    return merge(merge_spec, out_dir, params=params, card_extra=card, **kwargs), notes
