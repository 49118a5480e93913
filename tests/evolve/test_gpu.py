"""On a CUDA device: the resident merge (bf16 model, store on the GPU) writes what the streaming
merge computes on the CPU in float32, to bf16 rounding (DARE's counter-based masks are the same on
both devices); TIES' radix trim on the GPU keeps the same entries as on the CPU. Deselected where there is no CUDA device (conftest.py)."""
import pytest
import torch
from factories import perturbed, save, tiny_llama

from evolve.materialize import ResidentMerge
from merging.checkpoint import CheckpointReader
from merging.engine import merged_tensors
from merging.methods import get_method
from merging.task_vectors import open_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-family")
    base = save(tiny_llama(layers=4, hidden=256, vocab=2000), d / "base")
    return base, [perturbed(base, d / f"ft{k}", seed=k + 1) for k in range(3)]


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"weights": [0.5, 0.3, 0.8]}),
                                           ("ties", {"weights": [0.5, 0.3, 0.8], "density": 0.3}),
                                           ("dare_ties", {"weights": [0.5, 0.3, 0.8], "density": 0.3})])
def test_resident_merge_on_cuda_equals_the_cpu_stream(family, method, params):
    base, models = family
    p = get_method(method).params(**params)
    resident = ResidentMerge(base, models, method, device="cuda", dtype="bfloat16", store="dense")
    got = {n: t.float().cpu() for n, t in resident.materialize(p).state_dict().items()}
    reader, sources = open_inputs(base, models)
    names = [n for n in reader.names() if reader.info(n).dtype.is_floating_point]
    for n, want in merged_tensors(reader, sources, method, p, torch.device("cpu"), names):
        scale = float(want.abs().max()) or 1.0
        assert float((got[n] - want).abs().max()) <= 2 ** -7 * scale, n  # bf16 keeps 8 significant bits
    assert set(got) >= set(names) and len(names) == len(CheckpointReader(base).names())
