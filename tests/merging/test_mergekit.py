"""mergekit configs in and out, checked against mergekit 0.1.5 itself (its `mergekit-yaml`, run
in a fresh process on the same config): the same tensors up to float rounding."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories import perturbed, save, state_dict, tiny_llama

from service.cli import main

MERGEKIT = str(Path(sys.executable).with_name("mergekit-yaml"))


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mk")
    save(tiny_llama(layers=4, hidden=32), root / "base")
    for i, name in enumerate(("a", "b", "c")):
        perturbed(root / "base", root / name, seed=i + 1, scale=0.05)
    return root


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    cfg = out.with_suffix(".yml")
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    r = subprocess.run([MERGEKIT, str(cfg), str(out), "--no-lazy-unpickle", "--allow-crimes"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return state_dict(out)


def run_ours(config: dict, out: Path, capsys=None) -> dict[str, torch.Tensor]:
    cfg = out.with_suffix(".ours.yml")
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", str(cfg), "--out", str(out), "--quiet"]) == 0
    return state_dict(out)


def assert_same(ours: dict, theirs: dict, atol: float = 2e-6) -> None:
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=atol, rtol=1e-5), \
            (k, (ours[k].float() - theirs[k].float()).abs().max())


def configs(root: Path) -> dict[str, dict]:
    a, b, c, base = (str(root / n) for n in ("a", "b", "c", "base"))
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": [0.2, 0.8]}},  # a gradient over the layers
            {"model": b, "parameters": {"weight": 0.5}},
            {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.3}]}}],
            "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": [0.1, 0.9, 0.3]}}],
            "parameters": {"lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 1.2}], "normalize": True},
            "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": [0.3, 0.7]}},
            {"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": c, "parameters": {"weight": [{"filter": "layers.2.", "value": 0.2}, {"value": 0.9}]}}],
            "parameters": {"lambda": 0.8, "int8_mask": True}, "dtype": "float32"},
        "ties_sum": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.4, "normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"},
        # without dropping, DARE is deterministic: both tools must agree exactly
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.7, "density": 1.0}},
            {"model": b, "parameters": {"weight": 0.4, "density": 1.0}}], "dtype": "float32"},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 1.0, "normalize": True}, "dtype": "float32"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "ties", "ties_sum", "dare_ties", "dare_linear"])
def test_mergekit_configs_merge_as_mergekit_merges_them(four_layers, tmp_path, case):
    """Gradients, filters, per-model and global parameters, normalize, out_dtype: evomerge's merge
    of a mergekit config equals mergekit's own."""
    config = configs(four_layers)[case]
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ours(config, tmp_path / "ours")
    assert_same(ours, theirs, atol=2e-6 if case != "ties_sum" else 8e-3)  # bf16 output: one rounding step


@pytest.mark.parametrize("change,message", [
    ({"slices": [{"sources": []}]}, "slices: slices (frankenmerges"),
    ({"merge_method": "slerp"}, "merge_method: 'slerp' is not one"),
    ({"tokenizer_source": "union"}, "tokenizer_source: only base"),
    ({"parameters": {"normalize": False}}, "parameters.normalize: false is supported for linear only when"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of linear"),
    ({"models": [{"model": "x+y", "parameters": {"weight": 1}}]}, "models[0].model: mergekit's model+lora"),
])
def test_what_cannot_be_honoured_is_refused_naming_it(four_layers, tmp_path, capsys, change, message):
    config = {**configs(four_layers)["linear"], **change}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_dare_import_says_its_masks_are_its_own(four_layers, tmp_path, capsys):
    config = {**configs(four_layers)["dare_ties"]}
    config["models"] = [{**m, "parameters": {**m["parameters"], "density": 0.5}} for m in config["models"]]
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "note: dare_ties: evomerge draws its own seeded masks" in capsys.readouterr().err


@pytest.mark.slow
def test_an_evolve_candidate_exports_as_a_config_mergekit_reproduces(tiny_zoo, tiny_zoo_manifest, tmp_path):
    """A per-block TIES candidate (different weights and densities per block of layers): the
    exported YAML, run by mergekit, gives the candidate's own export."""
    from evolve import run

    spec = {"kind": "evolve", "base": str(tiny_zoo / tiny_zoo_manifest["models"]["base"]["path"]),
            "models": [{"name": t, "path": str(tiny_zoo / tiny_zoo_manifest["models"][t]["path"])} for t in ("rev", "cip")],
            "method": "ties", "device": "cpu", "final_check": False,
            "search": {"algorithm": "nsga2", "population": 4, "generations": 1, "granularity": "per_block", "blocks": 2},
            "objectives": [{"benchmark": str(tiny_zoo / tiny_zoo_manifest["benchmarks"]["rev"]["path"]),
                            "estimator": "subset_mean", "subset": {"size": 4, "strategy": "random"}}],
            "evaluation": {"max_new_tokens": tiny_zoo_manifest["eval_settings"]["max_new_tokens"],
                           "irt": {"probes": 0}}}
    result = run(spec, tmp_path / "run")
    cid = result.knee
    yml = tmp_path / "knee.yml"
    assert main(["export", str(tmp_path / "run"), "--candidate", str(cid), "--mergekit-yaml", str(yml),
                 "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    config = yaml.safe_load(yml.read_text())
    weights = config["models"][0]["parameters"]["weight"]
    assert isinstance(weights, list) and {e["value"] for e in weights} == {
        p["weights"][0] for p in next(c for c in result.front if c["id"] == cid)["params"]}  # one value per block
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = state_dict(tmp_path / "ours")
    assert_same(ours, theirs, atol=1e-5)
