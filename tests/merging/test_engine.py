"""The streaming engine end to end on tiny Llama folders, and the CLI's error handling."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories import perturbed, save, state_dict, tiny_llama
from transformers import AutoModelForCausalLM

from core.errors import CheckpointError
from core.hooks import Hooks, Stopped
from merging import merge
from merging.methods import get_method, method_params, methods
from service.cli import main


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = tmp_path_factory.mktemp("family")
    base = save(tiny_llama(), d / "base", max_shard_size="20KB")
    models = [perturbed(base, d / f"ft{i}", seed=i + 1, max_shard_size="30KB") for i in range(3)]
    return base, models


def spec_for(base, models, method="task_arithmetic", **params):
    return {"base": str(base), "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(models)],
            "method": method, "params": params, "device": "cpu"}


@pytest.mark.parametrize("method", sorted(methods("tensor")))
def test_copies_of_base_give_base(tmp_path, family, method):
    base, _ = family
    out = merge(spec_for(base, [base, base, base], method), tmp_path / "out", progress=False)
    got, want = state_dict(out), state_dict(base)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_hooks_see_every_tensor_and_stop_a_merge_before_it_is_written(tmp_path, family):
    """Progress events end at the base's tensor count; a stop asked mid-merge raises Stopped and
    leaves no output folder (the writer's temporary folder is removed)."""
    from merging.checkpoint import CheckpointReader

    base, models = family
    events = []
    merge(spec_for(base, models), tmp_path / "out", progress=False, hooks=Hooks(events.append))
    total = len(CheckpointReader(base).names())
    assert events[-1] == {"type": "progress", "tensors": total, "total": total, "fraction": 1.0}
    assert [e["tensors"] for e in events] == sorted(e["tensors"] for e in events)
    seen = []
    with pytest.raises(Stopped):
        merge(spec_for(base, models), tmp_path / "stopped", progress=False,
              hooks=Hooks(seen.append, should_stop=lambda: len(seen) >= 1))
    assert not (tmp_path / "stopped").exists() and list(tmp_path.glob("*stopped*")) == []


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "weights": [1.0, 0.5, 2.0]}),
                                           ("tsv", {"alpha": 0.8}), ("dare_ties", {"seed": 3})])
def test_engine_equals_method_applied_to_each_tensor(tmp_path, family, method, params):
    base, models = family
    out = merge(spec_for(base, models, method, **params), tmp_path / "out", progress=False)
    b, fts, got = state_dict(base), [state_dict(m) for m in models], state_dict(out)
    fn, p = get_method(method).fn, method_params(method, params, 3)
    for k in b:
        want = fn(b[k].float(), [ft[k].float() - b[k].float() for ft in fts], p, k)
        assert torch.allclose(got[k].float(), want, atol=1e-6), k


@pytest.mark.parametrize("method", sorted(methods("tensor")))
def test_pipelined_and_threaded_merges_equal_the_plain_loop_bit_for_bit(tmp_path, family, method):
    """Read-ahead and write-behind at depths 0-3 and 1 or 2 torch threads: the same bytes. TSV's
    SVDs may round differently with the thread count (LAPACK's blocking; merge's docstring says
    so), so TSV is compared with the plain loop at the same thread count, and to 1e-6 across them."""
    base, models = family
    spec = spec_for(base, models, method)
    plain = {}
    for pipeline, threads in [(1, 1), (3, 2), (2, None)]:
        key = threads if method == "tsv" else 1
        if key not in plain:
            plain[key] = state_dict(merge(spec, tmp_path / f"plain{key}", progress=False, pipeline=0, threads=key))
        got = state_dict(merge(spec, tmp_path / f"p{pipeline}t{threads}", progress=False, pipeline=pipeline,
                               threads=threads))
        assert got.keys() == plain[key].keys()
        for k in got:
            assert torch.equal(got[k], plain[key][k]), (pipeline, threads, k)
            assert torch.allclose(got[k].float(), plain[next(iter(plain))][k].float(), atol=1e-6), k


def test_a_stopped_pipelined_merge_writes_nothing_and_leaves_no_thread(tmp_path, family):
    import threading

    base, models = family
    before = threading.active_count()
    seen = []
    with pytest.raises(Stopped):
        merge(spec_for(base, models), tmp_path / "stopped", progress=False, pipeline=3,
              hooks=Hooks(seen.append, should_stop=lambda: len(seen) >= 1))
    assert not (tmp_path / "stopped").exists() and threading.active_count() == before




@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [0, 2])
def test_pipelined_merge_memory_stays_within_its_stated_bound(tmp_path, pipeline):
    """merge's docstring: at most pipeline + 1 tensors' float32 inputs (base + one task vector per
    model) and pipeline + 1 merged outputs beside the plain loop's. Measured on 8 tensors of 16 MB
    (float32) each as the peak RSS (VmHWM, reset by /proc/self/clear_refs) over the RSS after a
    warm-up merge of the same names at a tiny size (imports, caches), with glibc's mmap threshold fixed so that a freed tensor's pages go
    back at once (its dynamic threshold keeps them, which measures the allocator, not the merge)."""
    import os
    import subprocess
    import sys

    from merging.checkpoint import write_checkpoint

    g = torch.Generator().manual_seed(0)
    n_tensors, n_models = 8, 3
    for size, tag in [((2048, 2048), ""), ((8, 8), "small-")]:
        base = {f"w{i}": torch.randn(size, generator=g).to(torch.bfloat16) for i in range(n_tensors)}
        write_checkpoint(tmp_path / f"{tag}base", base)
        for j in range(n_models):
            write_checkpoint(tmp_path / f"{tag}ft{j}", {k: (v.float() + 0.01 * torch.randn(size, generator=g)).to(
                torch.bfloat16) for k, v in base.items()})
    code = (
        "import sys\n"
        "from merging import merge\n"
        "status = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024\n"
        "def run(tag, out):\n"
        "    merge({'base': f'{sys.argv[1]}/{tag}base', 'device': 'cpu', 'method': 'task_arithmetic',\n"
        "           'models': [{'name': f'm{j}', 'path': f'{sys.argv[1]}/{tag}ft{j}'} for j in range(3)]},\n"
        "          f'{sys.argv[1]}/{out}', progress=False, threads=1, pipeline=int(sys.argv[2]))\n"
        "run('small-', 'warm')\n"
        "before = status('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # VmHWM restarts from the RSS now
        "run('', 'out')\n"
        "print(status('VmHWM') - before)\n")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(pipeline)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split()[-1])
    tensor = 4 * 2048 * 2048  # one float32 tensor
    plain = (n_models + 1) * tensor + 3 * tensor  # inputs, the method's sum and result, a read's buffers
    bound = plain + pipeline * (n_models + 1) * tensor + pipeline * tensor  # the docstring's
    whole = n_tensors * (n_models + 1) * tensor  # what a merge that does not stream would hold
    assert peak <= bound + (16 << 20), (peak / 2**20, bound / 2**20)
    assert peak < whole / 2


def test_merged_folder_loads_and_generates(tmp_path, family):
    base, models = family
    spec = spec_for(base, models, "ties", density=0.5)
    spec["output"] = {"dtype": "bfloat16", "max_shard_size": "10KB"}
    out = merge(spec, tmp_path / "out", progress=False)
    assert len(list(out.glob("model-*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["method"] == "ties" and len(recipe["models"]) == 3
    assert all(len(m["sha256"]) == 64 for m in recipe["models"])
    assert (out / "config.json").is_file()


def write_spec(tmp_path, spec):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def assert_cli_error(tmp_path, capsys, spec_path, message, out_name="out"):
    capsys.readouterr()
    code = main(["merge", spec_path, "--out", str(tmp_path / out_name), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("evomerge: error:") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not any(p.name.startswith((out_name, f".{out_name}")) for p in tmp_path.iterdir())


def test_cli_errors(tmp_path, family, capsys):
    base, models = family
    good = spec_for(base, models[:2], "ties")
    cases = [
        ({**good, "method": "slerp_magic"}, "unknown method 'slerp_magic'"),
        ({**good, "params": {"density": 2}}, "params.density"),
        ({**good, "params": {"weights": [1, 2, 3]}}, "params.weights: 3 values for 2 models"),
        ({**good, "colour": "blue"}, "colour"),
        ({**good, "models": [{"name": "x", "path": str(tmp_path / "missing")}]}, "missing: no such model folder"),
        ({**good, "device": "tpu"}, "device"),
        ({**good, "output": {"max_shard_size": "lots"}}, "max_shard_size"),
    ]
    for spec, message in cases:
        assert_cli_error(tmp_path, capsys, write_spec(tmp_path, spec), message)
    assert_cli_error(tmp_path, capsys, str(tmp_path / "nope.yaml"), "no such spec file")
    (tmp_path / "bad.yaml").write_text("kind: [merge\n")
    assert_cli_error(tmp_path, capsys, str(tmp_path / "bad.yaml"), "not valid YAML")


def test_cli_shape_mismatch_names_the_tensor(tmp_path, family, capsys):
    base, models = family
    other = save(tiny_llama(hidden=16), tmp_path / "other")
    spec = write_spec(tmp_path, spec_for(base, [models[0], other]))
    assert_cli_error(tmp_path, capsys, spec, "models[1]")
    assert_cli_error(tmp_path, capsys, spec, "tensor model.embed_tokens.weight has shape (40, 16)")


def test_cli_refuses_existing_output(tmp_path, family, capsys):
    base, models = family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code = main(["merge", write_spec(tmp_path, spec_for(base, models)), "--out", str(tmp_path / "out")])
    assert code == 2 and "exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_console_script_merges(tmp_path, family):
    base, models = family
    spec = write_spec(tmp_path, {"kind": "merge", **spec_for(base, models, "linear")})
    r = subprocess.run([sys.executable, "-m", "service.cli", "merge", spec, "--out", str(tmp_path / "m"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got, fts = state_dict(tmp_path / "m"), [state_dict(m) for m in models]
    for k in got:
        assert torch.allclose(got[k], sum(ft[k] for ft in fts) / 3, atol=1e-6)


def test_tsv_c_compress_keeps_low_rank_fine_tunes_and_reports_energy(tmp_path):
    from merging.checkpoint import write_checkpoint
    from merging.compress import compress

    base = save(tiny_llama(), tmp_path / "base")
    b = state_dict(base)
    g = torch.Generator().manual_seed(0)
    ft = {k: (v + torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) * 0.01
              if v.dim() == 2 else v + 0.01) for k, v in b.items()}
    write_checkpoint(tmp_path / "ft", ft, side_files_from=base)
    report = compress(base, tmp_path / "ft", tmp_path / "c", fraction=0.25, device="cpu")  # rank 8 >= 2
    assert report["kept_energy"] > 1 - 1e-6
    got = state_dict(tmp_path / "c")
    for k in b:
        assert torch.allclose(got[k], ft[k], atol=1e-5), k
    report = compress(base, tmp_path / "ft", tmp_path / "c1", fraction=1 / 32, device="cpu")  # rank 1 < 2
    k = "model.layers.0.mlp.up_proj.weight"
    tau = ft[k] - b[k]
    sv = torch.linalg.svdvals(tau)
    assert abs(report["per_matrix"][k] - float(sv[0] ** 2 / (sv**2).sum())) < 1e-5
    assert report["kept_energy"] < 1.0


def test_output_never_replaces_an_input(tmp_path, family, capsys):
    """--overwrite replaces an older output, never the models being merged (or a folder holding them)."""
    base, models = family
    spec = write_spec(tmp_path, spec_for(base, models, "linear"))
    before = state_dict(models[0])
    for out, field in [(models[0], "models[0].path"), (base, "base"), (base.parent, "base")]:
        capsys.readouterr()
        assert main(["merge", spec, "--out", str(out), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"the output would replace {field}" in err, err
    after = state_dict(models[0])
    assert all(torch.equal(before[k], after[k]) for k in before)


KILL_ON_FIRST_TENSOR = """
import os, signal, sys
from merging import checkpoint
from service.cli import main
write = checkpoint.CheckpointWriter.write
def write_then_terminate(self, name, tensor):
    write(self, name, tensor)
    os.kill(os.getpid(), signal.SIGTERM)
checkpoint.CheckpointWriter.write = write_then_terminate
sys.exit(main(["merge", {spec!r}, "--out", {out!r}, "--quiet"]))
"""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, family):
    """timeout, docker and systemd stop a process with SIGTERM: the merge stops with status 143
    (128 + SIGTERM, as a shell reports it) and leaves neither the output nor its temporary folder
    behind."""
    base, models = family
    spec = write_spec(tmp_path, spec_for(base, models, "linear"))
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", KILL_ON_FIRST_TENSOR.format(spec=spec, out=str(out))],
                       capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 128 + signal.SIGTERM and "terminated" in r.stderr, r.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".m", "m"))]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv"])
def test_a_nan_weight_is_refused_naming_the_tensor_and_the_model(tmp_path, family, method):
    """A fine-tune with one NaN weight would give a merged checkpoint with NaN in it: the merge
    stops at that tensor, names it and the model it came from, and writes nothing; an evolve
    job's resident merge refuses it the same way."""
    from factories import write_checkpoint

    base, models = family
    bad = {k: v.clone() for k, v in state_dict(models[1]).items()}
    name = next(k for k in sorted(bad) if k.endswith("q_proj.weight"))
    bad[name][0, 0] = float("nan")
    broken = write_checkpoint(tmp_path / "broken", bad, side_files_from=models[1])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{name}: the merge has NaN or infinite values, from models\[1\]"):
        merge(spec_for(base, [models[0], broken, models[2]], method), out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    from evolve.materialize import ResidentMerge  # an evolve job refuses it when it loads its inputs

    with pytest.raises(CheckpointError, match=rf"{name}: NaN or infinite weights from models\[1\]"):
        ResidentMerge(base, [models[0], broken, models[2]], method, device="cpu")


def test_all_finite_screens_by_the_sum_without_false_alarms():
    """Against the elementwise test: finite values whose sum overflows are finite; a NaN, or
    infinities that cancel in the sum's NaN, are not."""
    from merging.engine import all_finite

    cases = [torch.full((10,), 3e38), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")]),
             torch.randn(100, 7), torch.zeros(0)]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
