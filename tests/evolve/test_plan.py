"""The memory plan (`evolve.plan`): bytes of each component against by-hand counts, placement, refusals.

7B shapes (Llama-2-7B, Mistral-7B, Qwen2-7B) are written as config.json plus a safetensors file
with the real header (real tensor names, bf16) truncated to full size: sparse on disk, so no
weights exist and the plan can only have read headers. Oracles are computed here from the
architecture's shape formulas and the published parameter counts, not through `merging.store`.
The last test measures the peak memory of a real resident merge on a small Llama against the plan.
"""
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evolve.plan import BO_BASE, BO_PER_OBSERVATION, PlanError, check_plan, plan_job
from evolve.spec import EvolveSpec

ROOT = Path(__file__).resolve().parents[2]
GB = 10**9

ARCHS = {
    # name: (config.json, published parameter count)
    "llama-2-7b": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
                    "torch_dtype": "bfloat16"}, 6_738_415_616),
    "mistral-7b": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
                    "torch_dtype": "bfloat16"}, 7_241_732_096),
    "qwen2-7b": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                  "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                  "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16"}, 7_615_616_512),
}


def shapes_of(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama-family checkpoint (Qwen2: q/k/v biases), by their real names."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
        if cfg["model_type"] == "qwen2":
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
    return out


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16", size: int = 2) -> int:
    """A safetensors file with a real header and no data written (sparse); returns its data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * size
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def write_shape_folder(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_sparse_safetensors(folder / "model.safetensors", shapes_of(cfg))
    return folder


PROMPT_CHARS, CHOICE_CHARS = 300, 30  # no tokenizer: 1 token per 3 bytes, +1 bos on the prompt


def write_mc_benchmark(path: Path, n: int = 8) -> Path:
    items = [{"id": f"q{k}", "prompt": ("x" * (PROMPT_CHARS - 3 - k)) + "Q: ",
              "choices": ["a" * CHOICE_CHARS, "b" * (CHOICE_CHARS - 6), "c", "d"], "answer": k % 4} for k in range(n)]
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


@pytest.fixture(scope="module")
def shapes7b(tmp_path_factory) -> Path:
    """<root>/<arch>/{base, ft0..ft4} and <root>/mc.jsonl."""
    root = tmp_path_factory.mktemp("shapes7b")
    for name, (cfg, _) in ARCHS.items():
        write_shape_folder(root / name / "base", cfg)
        for k in range(5):
            write_shape_folder(root / name / f"ft{k}", cfg)
    write_mc_benchmark(root / "mc.jsonl")
    return root


def evolve_spec(root: Path, arch: str, n: int = 3, method: str = "ties", **evaluation) -> EvolveSpec:
    return EvolveSpec.model_validate({
        "kind": "evolve", "base": str(root / arch / "base"), "method": method, "device": "auto",
        "models": [{"name": f"ft{k}", "path": str(root / arch / f"ft{k}")} for k in range(n)],
        "objectives": [{"benchmark": str(root / "mc.jsonl")}],
        "evaluation": {"batch_size": 16} | evaluation})


# --- by-hand oracles -------------------------------------------------------------------------------

def params_by_formula(cfg: dict) -> int:
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    attn = 2 * h * q + 2 * h * kv + (q + 2 * kv if cfg["model_type"] == "qwen2" else 0)
    return 2 * v * h + L * (attn + 3 * h * i + 2 * h) + h


def lowrank_by_hand(cfg: dict, rank: float = 0.1) -> int:
    """One model's lowrank store in bf16: matrices as r (m + n) factors, r = ceil(rank min(m, n)),
    unless that is not smaller; vectors and the token embedding dense."""
    total = 0
    for name, shape in shapes_of(cfg).items():
        if len(shape) == 1 or name == "model.embed_tokens.weight":
            total += math.prod(shape) * 2
            continue
        m, n = shape
        r = math.ceil(rank * min(m, n))
        total += 2 * (r * (m + n) if r * (m + n) < m * n else m * n)
    return total


def written_by_hand(largest: int, n: int, linear: bool = False) -> int:
    """Writing a candidate with a chunkable method: the N stored runs and 6 more float32 chunks of
    2**20 entries (merging.chunks.CHUNK), N more for a method not linear in the task vectors
    (TIES' trimmed copies), and the base's bf16 rows of one chunk, as read."""
    return (2 + ((1 if linear else 2) * n + 6) * 4) * min(largest, 1 << 20)


def evaluation_by_hand(cfg: dict, batch: int, seq: int, choice: int, size: int) -> int:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = h // heads
    kv_cache = 2 * cfg["num_hidden_layers"] * batch * seq * cfg["num_key_value_heads"] * hd * size
    act = batch * seq * (4 * h + 2 * cfg["intermediate_size"]) * size
    return kv_cache + act + batch * choice * cfg["vocab_size"] * 4 + batch * heads * seq * seq * size


SEQ = math.ceil(PROMPT_CHARS / 3) + 1 + math.ceil(CHOICE_CHARS / 3)  # longest prompt + longest choice
CHOICE = math.ceil(CHOICE_CHARS / 3)


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_resident_model_is_two_bytes_per_parameter(shapes7b, arch):
    cfg, published = ARCHS[arch]
    assert params_by_formula(cfg) == published
    plan = plan_job(evolve_spec(shapes7b, arch, store="lowrank"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert plan.device == "cuda" and plan.dtype == "bfloat16"
    assert plan.component("resident model").bytes == 2 * published
    assert plan.component("resident model").where == "gpu"
    base = plan.component("base")
    assert (base.bytes, base.where) == (2 * published, "disk")
    large = 7 * cfg["num_hidden_layers"] + 2  # the matrices of over 65,536 entries: 7 a layer, embedding, lm_head
    assert plan.component("method state").bytes == large * 3 * 4 * 2 ** 15  # ties: one 128 KB histogram each
    largest = cfg["vocab_size"] * cfg["hidden_size"]  # the embedding (and lm_head)
    assert plan.component("merge working set").bytes == written_by_hand(largest, 3)
    assert plan.component("store build").bytes == largest * (4 + 4 + 2 + 12)  # ties has no prepare
    assert (plan.seq_len, plan.batch_size) == (SEQ, 16)
    ev = sum(c.bytes for c in plan.components if c.name.startswith("evaluation"))
    assert ev == evaluation_by_hand(cfg, 16, SEQ, CHOICE, 2)


@pytest.mark.parametrize("arch", ["llama-2-7b", "mistral-7b"])
def test_dense_store_refused_and_auto_picks_a_compressed_store(shapes7b, arch):
    cfg, published = ARCHS[arch]
    dense = plan_job(evolve_spec(shapes7b, arch, store="dense"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert not dense.fits and dense.error.field == "evaluation.store"
    assert str(dense.error).startswith("evaluation.store: the task-vector store (3 x dense")
    assert dense.component("task-vector store").bytes == 3 * 2 * published  # 3 bf16 copies > 32 GB

    auto = plan_job(evolve_spec(shapes7b, arch, store="auto"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert auto.fits, auto.error
    assert auto.store_kind == "lowrank"  # the first compressed kind that fits
    assert auto.component("task-vector store").bytes == 3 * lowrank_by_hand(cfg)
    # model + store + working set + evaluation fit in 24 GB: the store sits on the GPU, nothing crosses PCIe
    gpu_by_hand = sum(c.bytes for c in auto.components if c.where == "gpu" and not c.build_only)
    assert auto.store_where == "gpu" and auto.totals["gpu"] == gpu_by_hand <= 24 * GB
    store, model = 3 * lowrank_by_hand(cfg), 2 * published
    assert auto.bytes_moved_per_candidate == store + model + model // 16  # reanchor every 16 on cuda
    tight = plan_job(evolve_spec(shapes7b, arch, store="auto"), gpu_memory=gpu_by_hand - store + GB,
                     host_memory=32 * GB)  # no room for the store next to the model: it goes to the host
    assert tight.fits and tight.store_where == "host"
    assert tight.bytes_moved_per_candidate == 2 * store + model + model // 16
    with pytest.raises(PlanError) as e:
        check_plan(evolve_spec(shapes7b, arch, store="dense"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert e.value.field == "evaluation.store"


def test_sparse_store_bytes(shapes7b):
    cfg, published = ARCHS["llama-2-7b"]
    plan = plan_job(evolve_spec(shapes7b, "llama-2-7b", store="sparse", store_density=0.05),
                    gpu_memory=24 * GB, host_memory=32 * GB)
    by_hand = 0
    for shape in shapes_of(cfg).values():
        numel = math.prod(shape)  # bitmask + kept bf16 values; vectors dense
        by_hand += 2 * numel if len(shape) == 1 else (numel + 7) // 8 + int(0.05 * numel) * 2
    assert plan.fits and plan.component("task-vector store").bytes == 3 * by_hand


def test_qwen2_fits_and_its_store_build_is_planned(shapes7b):
    """Qwen2-7B's 152064 x 3584 lm_head (545 M entries) is merged in chunks, so writing a candidate
    needs 9 float32 chunks and the base's rows of one (40 MB), not 9 float32 copies (19.6 GB): the job fits
    24 GB with a lowrank store on the host. Building the store holds ~12 GB for that tensor, before
    the model is allocated; a 10 GB GPU cannot build it and is refused naming the device."""
    cfg, published = ARCHS["qwen2-7b"]
    largest = 152064 * 3584
    plan = plan_job(evolve_spec(shapes7b, "qwen2-7b"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert plan.fits, plan.error
    assert plan.component("merge working set").bytes == written_by_hand(largest, 3)
    assert plan.totals["gpu"] == max(sum(c.bytes for c in plan.components if c.where == "gpu" and not c.build_only),
                                     largest * 22 + (plan.component("task-vector store").bytes
                                                     if plan.store_where == "gpu" else 0))
    small = plan_job(evolve_spec(shapes7b, "qwen2-7b"), gpu_memory=10 * GB, host_memory=32 * GB)
    assert not small.fits and small.error.field in ("evaluation.dtype", "device")


def test_batch_refused_with_the_largest_that_fits(shapes7b):
    cfg, published = ARCHS["llama-2-7b"]
    plan = plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size=4096), gpu_memory=24 * GB, host_memory=32 * GB)
    assert not plan.fits and plan.error.field == "evaluation.batch_size"
    room = 24 * GB - 2 * published - written_by_hand(32000 * 4096, 3)
    largest = room // evaluation_by_hand(cfg, 1, SEQ, CHOICE, 2)
    assert f"the largest batch that fits is {largest}" in str(plan.error)
    assert plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size=int(largest)), gpu_memory=24 * GB,
                    host_memory=32 * GB).fits
    assert not plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size=int(largest) + 1), gpu_memory=24 * GB,
                        host_memory=32 * GB).fits


def test_tiny_budgets_name_the_component(shapes7b):
    spec = evolve_spec(shapes7b, "mistral-7b")
    plan = plan_job(spec, gpu_memory=8 * GB, host_memory=32 * GB)  # 14.5 GB of bf16 weights
    assert plan.error.field == "evaluation.dtype" and "resident model" in str(plan.error)
    assert str(plan.error).startswith("evaluation.dtype: the resident model (7.24 B parameters x 2 B, bfloat16: 14.5 GB)")
    plan = plan_job(spec, gpu_memory=18 * GB, host_memory=1 * GB)  # the compressed stores need ~7 GB
    assert plan.error.field == "evaluation.store" and "host memory (1.0 GB)" in str(plan.error)
    model, work = 4 * ARCHS["mistral-7b"][1], written_by_hand(32000 * 4096, 3)  # float32 on cpu: 29 GB
    plan = plan_job(spec.model_copy(update={"device": "cpu"}), host_memory=model + work // 2)
    assert plan.device == "cpu" and plan.dtype == "float32"
    assert plan.error.field == "device" and "merge working set" in str(plan.error)


def test_cpu_plan_holds_everything_on_the_host(shapes7b):
    cfg, published = ARCHS["llama-2-7b"]
    spec = evolve_spec(shapes7b, "llama-2-7b", dtype="bfloat16", store="lowrank").model_copy(update={"device": "cpu"})
    plan = plan_job(spec, host_memory=64 * GB)
    assert plan.fits and plan.budgets["gpu"] is None and plan.reanchor_every == 1
    ev = evaluation_by_hand(cfg, 16, SEQ, CHOICE, 2)
    bo = plan.component("search: bo surrogate").bytes  # the default search for 16 x 8 candidates
    assert bo == BO_BASE + BO_PER_OBSERVATION * (16 * 8 + 11 + 24)  # candidates and the most probes (11 + 24)
    hists = (7 * cfg["num_hidden_layers"] + 2) * 3 * 4 * 2 ** 15  # ties' kept magnitude histograms
    assert plan.totals["host"] == (2 * published + 3 * lowrank_by_hand(cfg) + written_by_hand(32000 * 4096, 3) + ev
                                   + bo + hists)
    assert plan.totals["gpu"] == 0 and plan.moved["host->GPU"] == 0
    assert plan.bytes_moved_per_candidate == 3 * lowrank_by_hand(cfg) + 2 * published + 2 * published


def test_generation_length_and_adapter_targets(tmp_path):
    """L for generation is prompt + max_new_tokens; a LoRA adapter's store holds its targets only."""
    cfg = ARCHS["llama-2-7b"][0]
    base = write_shape_folder(tmp_path / "base", cfg)
    ft = write_shape_folder(tmp_path / "ft", cfg)
    lora = tmp_path / "lora"
    r, targets = 16, [f"model.layers.{n}.self_attn.{p}_proj" for n in range(32) for p in ("q", "v")]
    (lora / "adapter_config.json").parent.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 32,
                                                         "target_modules": ["q_proj", "v_proj"]}))
    write_sparse_safetensors(lora / "adapter_model.safetensors", {
        **{f"base_model.model.{t}.lora_A.weight": (r, 4096) for t in targets},
        **{f"base_model.model.{t}.lora_B.weight": (4096, r) for t in targets}})
    bench = tmp_path / "gen.jsonl"
    bench.write_text(json.dumps({"id": "g", "prompt": "y" * 59, "answer": "1", "match": "number"}) + "\n")
    spec = EvolveSpec.model_validate({
        "kind": "evolve", "base": str(base), "method": "task_arithmetic", "device": "cuda",
        "models": [{"name": "ft", "path": str(ft)}, {"name": "lora", "path": str(lora)}],
        "objectives": [{"benchmark": str(bench)}],
        "evaluation": {"batch_size": 8, "max_new_tokens": 100, "store": "dense"}})
    plan = plan_job(spec, gpu_memory=80 * GB, host_memory=64 * GB)
    assert plan.seq_len == math.ceil(59 / 3) + 1 + 100
    ev = sum(c.bytes for c in plan.components if c.name.startswith("evaluation"))
    assert ev == evaluation_by_hand(cfg, 8, math.ceil(59 / 3) + 1 + 100, 1, 2)
    published = ARCHS["llama-2-7b"][1]
    assert plan.component("task-vector store").bytes == 2 * published + 64 * 4096 * 4096 * 2
    assert plan.fits and plan.store_where == "gpu"  # 13.5 + 13.5 + 2.1 + 3.4 + eval < 80 GB
    assert plan.component("merge working set").bytes == written_by_hand(32000 * 4096, 2, linear=True)


def test_tokenizer_lengths(tmp_path):
    """With tokenizer files in the base, lengths come from the tokenizer (the zoo's: one token per
    character, bos prepended)."""
    from factories import save, tiny_llama

    from zoo.tokenizer import build_tokenizer

    base = save(tiny_llama(), tmp_path / "base")
    build_tokenizer().save_pretrained(base)
    bench = tmp_path / "mc.jsonl"
    bench.write_text(json.dumps({"id": "a", "prompt": "12+30=", "choices": ["42", "4"], "answer": 0}) + "\n"
                     + json.dumps({"id": "b", "prompt": "1+1=", "choices": ["2", "3333"], "answer": 0}) + "\n")
    spec = EvolveSpec.model_validate({
        "kind": "evolve", "base": str(base), "method": "ties", "device": "cpu",
        "models": [{"name": "m", "path": str(base)}], "objectives": [{"benchmark": str(bench)}]})
    plan = plan_job(spec, host_memory=GB)
    assert plan.seq_len == len("12+30=") + 1 + 4 and "tokenizer" in plan.seq_len_note
    assert plan.fits and plan.dtype == "float32"


def test_table_is_readable(shapes7b):
    table = plan_job(evolve_spec(shapes7b, "llama-2-7b"), gpu_memory=24 * GB, host_memory=32 * GB).table()
    lines = table.splitlines()
    assert any(line.startswith("resident model") and "13.5 GB" in line for line in lines)
    assert any(line.startswith("total gpu") and "of 24.0 GB" in line for line in lines)
    assert lines[-1] == "fits: yes"


def write_spec(path: Path, root: Path, arch: str, store: str) -> Path:
    import yaml

    spec = evolve_spec(root, arch, store=store)
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_cli_exit_codes(shapes7b, tmp_path):
    def plan(spec, *flags):
        return subprocess.run([sys.executable, "-m", "service.cli", "plan", str(spec), *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    ok = plan(write_spec(tmp_path / "auto.yaml", shapes7b, "llama-2-7b", "auto"), "--gpu-memory", "24GB",
              "--host-memory", "32GB")
    assert ok.returncode == 0, ok.stderr
    assert "resident model" in ok.stdout and "fits: yes" in ok.stdout and ok.stderr == ""
    bad = plan(write_spec(tmp_path / "dense.yaml", shapes7b, "llama-2-7b", "dense"), "--gpu-memory", "24GB",
               "--host-memory", "32GB")
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "evaluation.store: the task-vector store" in bad.stderr
    assert "32.0 GB" in bad.stderr
    gib = plan(tmp_path / "auto.yaml", "--gpu-memory", "8GiB", "--host-memory", "32GiB")
    assert gib.returncode == 1 and "evaluation.dtype" in gib.stderr and "8.6 GB" in gib.stderr


def test_service_refuses_a_job_over_its_budget(tmp_path):
    """POST /v1/jobs through the real app: with a host budget the plan runs, and a job over it is a
    400 naming the field; without budgets the API does not plan."""
    import httpx
    from factories import family

    from service.config import Settings
    from service.serve import BackgroundServer

    models = family(tmp_path / "models")
    (models / "bench.jsonl").write_text(json.dumps({"id": "q1", "prompt": "2+2=", "answer": "4"}) + "\n")
    job = {"kind": "evolve", "base": "base", "models": [{"name": "a", "path": "math"}, {"name": "b", "path": "ja"}],
           "method": "task_arithmetic", "device": "cpu", "objectives": [{"benchmark": "bench.jsonl"}]}
    for host, status in (("1kB", 400), ("4GB", 201), (None, 201)):
        settings = Settings(artifacts=tmp_path / f"art-{host}", model_roots=(models,), host_memory=host)
        with BackgroundServer(settings) as url:
            r = httpx.post(f"{url}/v1/jobs", json=job, timeout=30)
        assert r.status_code == status, r.text
        if status == 400:  # a tiny model in float32 is more than 1 kB
            assert r.json()["field"] == "evaluation.dtype"
            assert r.json()["detail"].startswith("evaluation.dtype: the resident model")
            assert "host memory (1.0 kB)" in r.json()["detail"]


MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys, torch
    from evolve.materialize import ResidentMerge
    from merging.methods import get_method
    from merging.store import StoreSettings

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    base, models, kind = sys.argv[1], sys.argv[2:5], sys.argv[5]
    params = get_method("task_arithmetic").params

    def job():
        merge = ResidentMerge(base, models, "task_arithmetic", device="cpu", dtype="bfloat16",
                              store=StoreSettings(kind=kind, dtype=torch.bfloat16))
        for w in (0.3, 0.5, 0.7):
            merge.materialize(params(weights=[w, 1 - w, 0.5]))

    # code, not data: a first run loads every module and makes torch's and the libraries' one-off
    # allocations; then the heap is given back and the peak counter reset, so the second run's
    # peak is what the plan counts (Linux: clear_refs 5 resets VmHWM)
    job()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    job()
    print(json.dumps({"peak": status("VmHWM") - before}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "lowrank", "sparse"])
def test_plan_matches_measured_peak(tmp_path, kind):
    """The plan's host total against the measured peak RSS increase of building a resident merge
    of 3 fine-tunes of a ~33 M parameter Llama (bf16) and materializing 3 candidates, on cpu: weights
    (model 65 MB, dense store 195 MB) and the merge working set (74 MB) dominate."""
    from factories import perturbed, save, tiny_llama

    base = save(tiny_llama(layers=12, hidden=512, vocab=4000), tmp_path / "base")
    models = [perturbed(base, tmp_path / f"ft{k}", seed=k + 1) for k in range(3)]
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "q", "prompt": "hi", "answer": "x"}) + "\n")
    spec = EvolveSpec.model_validate({
        "kind": "evolve", "base": str(base), "method": "task_arithmetic", "device": "cpu",
        "models": [{"name": f"m{k}", "path": str(m)} for k, m in enumerate(models)],
        "objectives": [{"benchmark": str(bench)}], "search": {"algorithm": "nsga2"},  # no surrogate: the merge alone
        "evaluation": {"dtype": "bfloat16", "store": kind, "batch_size": 1, "max_new_tokens": 1}})
    plan = plan_job(spec, host_memory=64 * GB)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", MEASURE, str(base), *map(str, models), kind], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    # measured after a first run (imports and one-off allocations out of the count): 1.00-1.05
    # (dense, lowrank) and 1.04-1.30 (sparse, whose peak moves with the heap's layout from run to
    # run: 1.05-1.19 in six runs on one machine, 1.30 once in a CI run)
    high = 1.4 if kind == "sparse" else 1.3
    assert plan.totals["host"] * 0.7 <= peak <= plan.totals["host"] * high, (peak, plan.table())


def test_auto_batch_is_the_largest_that_fits(shapes7b):
    """batch_size: auto places the store first (on the GPU when it fits there at batch 1), then
    takes the largest batch that fits in what is left, at most 256."""
    auto = plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size="auto"), gpu_memory=24 * GB, host_memory=32 * GB)
    assert auto.fits and auto.store_where == "gpu"
    gpu = lambda p: sum(c.bytes for c in p.components if c.where == "gpu" and not c.build_only)  # noqa: E731
    per_seq = sum(c.bytes for c in plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size=1), gpu_memory=24 * GB,
                                            host_memory=32 * GB).components if c.name.startswith("evaluation"))
    assert gpu(auto) <= 24 * GB < gpu(auto) + per_seq  # one more sequence would not fit
    roomy = plan_job(evolve_spec(shapes7b, "llama-2-7b", batch_size="auto"), gpu_memory=80 * GB, host_memory=32 * GB)
    assert roomy.batch_size == 256
