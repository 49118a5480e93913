"""`merging.merge` for methods `c2m3` and `weight_matching`: align whole models, average, write.

Unlike the per-tensor methods, these read every input model whole (onto the spec's
device): alignment couples all layers, so nothing is streamed. `base` is optional; the
models need only share tensor names and shapes. The permutation spec comes from
`params.spec` (a JSON file, see `spec.PermutationSpec.to_json`) or from `models[0]`'s
config.json: `evomerge_arch` (the small architectures of `archs`, spec derived with
torch.fx) or a Llama config (`llama_spec`). `weight_matching` aligns every model to
`models[0]` pairwise; `c2m3` aligns all to a universe. The result is the (weighted) average
of the aligned models, optionally REPAIRed on `params.data`, written atomically with
`CheckpointWriter` (config and tokenizer files from `models[0]`; the card records the
recipe, every input's sha256 and the alignment's statistics).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError

from core.devices import DTYPES
from core.errors import CheckpointError
from core.hashing import content_hash

from ..card import model_card
from ..checkpoint import CheckpointReader, CheckpointWriter
from .c2m3 import c2m3, merge_in_universe
from .spec import PermutationSpec, identity_perms, llama_spec, permute_state, spec_from_module
from .weight_matching import weight_matching


def open_models(paths: list[str | os.PathLike]) -> list[CheckpointReader]:
    """Readers of the models, checked to share tensor names and shapes (errors name models[i])."""
    readers = []
    for i, p in enumerate(paths):
        try:
            readers.append(CheckpointReader(p))
        except CheckpointError as e:
            raise CheckpointError(f"models[{i}]: {e}", field=f"models[{i}].path") from None
    ref = {n: readers[0].info(n) for n in readers[0].names()}
    for i, r in enumerate(readers[1:], 1):
        names = set(r.names())
        if names != set(ref):
            extra = sorted(names ^ set(ref))[0]
            raise CheckpointError(f"models[{i}] ({paths[i]}): tensor names differ from models[0] (e.g. {extra})",
                                  field=f"models[{i}].path")
        for n in ref:
            if r.info(n).shape != ref[n].shape:
                raise CheckpointError(f"models[{i}] ({paths[i]}): {n} has shape {r.info(n).shape}, "
                                      f"models[0] has {ref[n].shape}", field=f"models[{i}].path")
    return readers


def _config(folder: Path) -> dict:
    f = Path(folder) / "config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise CheckpointError(f"{f}: not JSON") from None


def build_module(config: Mapping[str, Any]) -> torch.nn.Module | None:
    """The torch module a config describes (evomerge_arch or a Llama), or None."""
    if "evomerge_arch" in config:
        from .archs import build

        return build(config["evomerge_arch"])
    if config.get("model_type") == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig.from_dict(config))
    return None


def check_fits_config(folder: Path, names, where: str) -> None:
    """The checkpoint holds exactly the tensors its config.json's model has (built on the meta
    device: no memory): a config of fewer layers would leave the extra ones unaligned."""
    cfg = _config(folder)
    with torch.device("meta"):
        module = build_module(cfg)
    if module is None:
        return
    expected = set(module.state_dict())
    extra = sorted(set(names) - expected)
    missing = sorted(expected - set(names) - {"lm_head.weight"})  # tied heads are not stored
    if extra or missing:
        what = f"has {extra[0]}, which its config's model does not" if extra else f"lacks {missing[0]}"
        raise CheckpointError(f"{where} ({folder}): the weights do not fit config.json (the checkpoint {what})")


def resolve_spec(folder: Path, names: set[str], spec_file: str | None) -> PermutationSpec:
    if spec_file:
        return PermutationSpec.load(spec_file)
    cfg = _config(folder)
    if "evomerge_arch" in cfg:
        return spec_from_module(build_module(cfg))
    if cfg.get("model_type") in LLAMA_STYLE:
        return llama_spec({**cfg, **LLAMA_STYLE[cfg["model_type"]]}, names)
    arch = cfg.get("model_type") or "unknown (config.json has no model_type)"
    raise CheckpointError(f"models[0] ({folder}): architecture {arch} is not supported by the permutation methods, "
                          f"which derive specs for Llama-style decoders (model_type {', '.join(LLAMA_STYLE)}) and "
                          "evomerge_arch models; give params.spec (a JSON file)")


# Decoders whose weights permute as Llama's do (checked by tests/merging/test_architectures.py:
# a model merged with a shuffled copy of itself keeps its logits); Qwen2 always has q/k/v biases.
LLAMA_STYLE = {"llama": {}, "mistral": {}, "qwen2": {"attention_bias": True}, "qwen3": {}}


def repair_batches(data: str, n: int, batch_size: int, tokenizer_from: Path | None, device) -> list:
    """REPAIR inputs: rows of a tensor file, or tokenized prompts of a JSONL benchmark."""
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"params.data: {data}: no such file")
    if path.suffix == ".jsonl":
        from transformers import AutoTokenizer

        from data.benchmarks import load_benchmark

        items = load_benchmark(path).items[:n]
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        out = []
        for i in range(0, len(items), batch_size):
            enc = tok([it.prompt for it in items[i:i + batch_size]], return_tensors="pt", padding=True)
            out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)})
        return out
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        x = tensors.get("inputs", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if x is None:
            raise ValueError(f"params.data: {data} holds several tensors and none named 'inputs'")
    elif path.suffix in (".pt", ".pth"):
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"params.data: {data} does not hold one tensor")
    else:
        raise ValueError(f"params.data: {data}: expected .safetensors, .pt or .jsonl")
    x = x[:n].to(device)
    if x.is_floating_point():
        x = x.float()
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def align(method: str, spec: PermutationSpec, states: list[dict[str, torch.Tensor]], params, device) -> tuple[list, dict]:
    """Per-model permutations to the merged model's units, and statistics for the card."""
    t0 = time.perf_counter()
    if method == "c2m3":
        res = c2m3(spec, states, max_iter=params.iterations or 200, device=device, init=params.init, seed=params.seed)
        perms, info = res.perms, {"iterations": res.iterations, "objective": res.final_objective, "init": res.init}
    elif method == "weight_matching":
        perms = [identity_perms(spec)] + [weight_matching(spec, states[0], s, max_iter=params.iterations or 100,
                                                          seed=params.seed, device=device) for s in states[1:]]
        info = {}
    else:
        raise ValueError(f"method {method} is not a permutation method")
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return perms, info


def merge_permutation(spec, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
                      card_extra: Mapping[str, Any] | None = None) -> Path:
    """Runs a `MergeSpec` whose method is c2m3 or weight_matching (see the module docstring)."""
    from core.devices import resolve_device

    out = Path(out_dir)  # merge() has refused an existing folder unless overwrite
    params = spec.method_params()
    paths = [Path(m.path) for m in spec.models]
    readers = open_models(paths)
    device = resolve_device(spec.device)
    names = readers[0].names()
    for i, (path, reader) in enumerate(zip(paths, readers)):
        check_fits_config(path, reader.names(), f"models[{i}]")
    pspec = resolve_spec(paths[0], set(names), params.spec)
    states = [{n: r.get(n, device) for n in names} for r in readers]
    for i, s in enumerate(states):
        try:
            pspec.validate(s, f"models[{i}]")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    perms, info = align(spec.method, pspec, states, params, device)
    merged = merge_in_universe(pspec, states, perms, params.weights)
    if params.repair:
        merged = _repaired(pspec, merged, states, perms, params, paths[0], device)
        info["repair"] = {"data": str(params.data), "layers": len(pspec.repair_layers)}
    infos = {n: readers[0].info(n) for n in names}
    dtype = DTYPES[spec.output.dtype] if spec.output.dtype else None
    hashes = {str(p): content_hash(p) for p in paths}
    card = model_card(spec, hashes, {"alignment": info, **(card_extra or {})},
                      "The models were aligned (permutations of their hidden units) and averaged.")
    with CheckpointWriter(out, infos, dtype, spec.output.max_shard_size, overwrite) as writer:
        for n in writer.expected:
            writer.write(n, merged[n])
        return writer.finish(side_files_from=paths[0], card=card)


def _repaired(pspec, merged, states, perms, params, folder0: Path, device) -> dict[str, torch.Tensor]:
    from .repair import repair

    cfg = _config(folder0)
    if build_module(cfg) is None:
        raise ValueError("params.repair: needs a model that can be run (config.json with evomerge_arch or Llama)")
    if not pspec.repair_layers and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                           for m in build_module(cfg).modules()):
        raise ValueError("params.repair: the permutation spec names no layer to repair")

    def module(state):
        m = build_module(cfg)
        missing, unexpected = m.load_state_dict(state, strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise CheckpointError(f"models[0]: weights do not fit its config.json ({(unexpected or missing)[0]})")
        if "lm_head.weight" in missing and hasattr(m, "tie_weights"):
            m.tie_weights()
        return m.to(device).eval()

    ends = [module(permute_state(pspec, s, p)) for s, p in zip(states, perms)]
    m = module(merged)
    try:
        batches = repair_batches(params.data, params.repair_examples, params.batch_size, folder0, device)
        repair(m, ends, pspec.repair_layers, batches, params.weights)
    except (RuntimeError, OSError, ValueError, SafetensorError) as e:  # unreadable file, inputs the model cannot take
        if isinstance(e, CheckpointError) or str(e).startswith("params."):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"params.data: {params.data}: not inputs this model can run ({first})") from None
    sd = m.state_dict()
    return {n: sd[n].detach() for n in merged}


