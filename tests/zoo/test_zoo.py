"""The tiny zoo: files and hashes, quality thresholds, honest accuracies, determinism, caching."""
import dataclasses
import json
import random
import shutil

import pytest
import torch

from data.benchmarks import load_benchmark
from fitness.evaluate import evaluate_folder
from merging.training import LoraSpec, encode_pair, train
from zoo.build import (
    BASE_MAX,
    FT_MIN,
    _reusable,
    build_zoo,
    eval_settings,
    finetune,
    fixed_threads,
    pretrain_base,
    verify,
    weights_hash,
)
from zoo.presets import get_preset
from zoo.tasks import TASKS, train_sampler

pytestmark = pytest.mark.slow

TINY = get_preset("tiny")


def test_layout_and_hashes(tiny_zoo, tiny_zoo_manifest):
    m = tiny_zoo_manifest
    assert (m["preset"], m["seed"]) == ("tiny", 0)
    assert verify(tiny_zoo, m) == []
    assert len(TINY.tasks) >= 5 and set(m["benchmarks"]) == set(TINY.tasks)
    kinds = {n: e["kind"] for n, e in m["models"].items()}
    assert kinds["base"] == "base"
    assert sorted(n for n, k in kinds.items() if k == "full") == sorted(TINY.tasks)
    assert len([k for k in kinds.values() if k == "lora"]) >= 2
    for name, e in m["models"].items():
        folder = tiny_zoo / e["path"]
        assert (folder / "tokenizer.json").exists()
        if e["kind"] == "lora":
            assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        else:
            assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
        assert weights_hash(folder) == e["weights_hash"]


def test_benchmarks_are_held_out_and_mixed(tiny_zoo, tiny_zoo_manifest):
    for task, b in tiny_zoo_manifest["benchmarks"].items():
        bench = load_benchmark(tiny_zoo / b["path"], task)
        assert bench.hash == b["hash"]
        assert len(bench) >= 500
        mc = [it for it in bench.items if it.is_choice]
        assert len(mc) >= 100 and len(bench) - len(mc) >= 100
        assert all(it.choices[it.answer] == TASKS[task].solve(it.prompt[len(task) + 1:-1]) for it in mc)
        prompts = {it.prompt for it in bench.items}
        assert len(prompts) == len(bench)
        # the training stream of the fine-tunes never shows a benchmark prompt
        draw = train_sampler(TASKS[task], prompts, 0)
        assert not any(draw()[0] in prompts for _ in range(3000))


def test_tokenizer_loads_offline(tiny_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo / "models" / "base")
    ids = tok("rev:abc=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("rev:abc=")
    assert tok.decode(ids, skip_special_tokens=True) == "rev:abc="
    assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3


def test_quality_thresholds(tiny_zoo_manifest):
    acc, models = tiny_zoo_manifest["accuracy"], tiny_zoo_manifest["models"]
    for name, e in models.items():
        if e["kind"] in ("full", "lora"):
            assert acc[name][e["task"]] >= FT_MIN, f"{name} on its own task"
    for task, a in acc["base"].items():
        assert a < BASE_MAX, f"base on {task}"
    merge = tiny_zoo_manifest["merge_check"]
    assert merge is not None, "the task-arithmetic check did not run (merging not importable?)"
    check = tiny_zoo_manifest["checks"]["merge_between"]
    assert check["base_avg"] + 0.05 < check["merge_avg"] < check["finetune_avg"] - 0.05
    assert tiny_zoo_manifest["checks"]["passed"]


@pytest.mark.parametrize("name", ["base", "rev", "cip-lora"])
def test_manifest_accuracies_are_real(tiny_zoo, tiny_zoo_manifest, tmp_path, name):
    """Re-evaluating a model from its folder reproduces the accuracy the build recorded."""
    entry = tiny_zoo_manifest["models"][name]
    task = entry["task"] or "rev"
    bench = load_benchmark(tiny_zoo / tiny_zoo_manifest["benchmarks"][task]["path"], task)
    r = evaluate_folder(tiny_zoo / entry["path"], bench, eval_settings(TINY), device="cpu", cache_dir=tmp_path)
    assert r.accuracy == pytest.approx(tiny_zoo_manifest["accuracy"][name][task], abs=1e-4)


def test_same_seed_same_weights(tiny_zoo_manifest, tmp_path):
    """Retraining the base and one fine-tune with the zoo's seed reproduces their exact bytes."""
    with fixed_threads(TINY.threads):
        base, tok = pretrain_base(TINY, 0, log=lambda s: None)
        base.save_pretrained(tmp_path / "base")
        ft = finetune(base, tok, TINY, "srt", 0)
        ft.save_pretrained(tmp_path / "srt")
    models = tiny_zoo_manifest["models"]
    assert weights_hash(tmp_path / "base") == models["base"]["weights_hash"]
    assert weights_hash(tmp_path / "srt") == models["srt"]["weights_hash"]
    assert models["srt"]["weights_hash"] != models["rev"]["weights_hash"]


def test_second_build_reuses_and_tampering_is_detected(tiny_zoo, tiny_zoo_manifest, tmp_path):
    lines = []
    again = build_zoo(tiny_zoo, "tiny", 0, log=lines.append, strict=False)
    assert any("reusing" in line for line in lines)
    assert again["models"] == tiny_zoo_manifest["models"]
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, copy)
    bench = copy / tiny_zoo_manifest["benchmarks"]["rev"]["path"]
    bench.write_text(bench.read_text().replace("rev:", "rev: ", 1))
    weights = next((copy / "models" / "cip").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert sorted(verify(copy, tiny_zoo_manifest)) == ["benchmarks/rev.jsonl", "models/cip"]


def test_loss_is_on_answer_tokens_only():
    from zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ids, labels = encode_pair(tok, "rev:ab=", "ba")
    assert len(ids) == len(labels) == 1 + len("rev:ab=") + len("ba") + 1
    assert labels[: 1 + len("rev:ab=")] == [-100] * 8
    assert labels[-3:] == ids[-3:] and labels[-1] == tok.eos_token_id


def test_lora_training_touches_only_the_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [("rev:ab=", "ba"), ("rev:xyz=", "zyx")]
    peft_model = train(model, tok, pairs, 5, batch_size=4, lr=1e-2, lora=LoraSpec(r=2, alpha=4))
    after = peft_model.get_base_model().state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys
    for k, v in before.items():
        key = k if k in after else next(a for a in after if a.endswith(k.replace(".weight", ".base_layer.weight")))
        assert torch.equal(after[key], v), k
    assert any(not torch.all(after[k] == 0) for k in lora_keys if "lora_B" in k)


def test_composed_task_chains_its_parents():
    from zoo.tasks import CIPHER, alias, compose, pretrain_sampler

    task = compose(TASKS["cip"], TASKS["rev"])
    assert (task.name, task.key, alias(task).name) == ("cip:rev", "cip_rev", "xip:xev")
    rng = random.Random(0)
    for _ in range(50):
        x = task.make_input(rng)
        assert task.prompt(x) == f"cip:rev:{x}="
        assert task.solve(x) == "".join(CIPHER[c] for c in reversed(x))
        choices, idx = task.choices(rng, x, task.solve(x), 5)
        assert choices[idx] == task.solve(x) and len(set(choices)) == 5
    # the base's corpus holds the composition under the aliases only, never the composed prompt
    draw = pretrain_sampler([TASKS["cip"], TASKS["rev"]], 0, [task])
    pairs = [draw() for _ in range(3000)]
    composed = [(p, a) for p, a in pairs if p.startswith("xip:xev:")]
    assert composed and all(a == task.solve(p[len("xip:xev:"):-1]) for p, a in composed)
    assert not any(p.startswith("cip:rev:") for p, _ in pairs)


def test_zoo_built_before_a_preset_field_existed_is_reused(tiny_zoo, tiny_zoo_manifest, tmp_path):
    """A field added to Preset later, at its default, does not invalidate an older zoo; another value does."""
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, copy)
    manifest = json.loads((copy / "zoo.json").read_text())
    manifest["preset_config"].pop("composed", None)  # tiny leaves it at its default
    (copy / "zoo.json").write_text(json.dumps(manifest))
    lines = []
    build_zoo(copy, "tiny", 0, log=lines.append, strict=False, workers=1)
    assert any("reusing" in line for line in lines)
    assert not any("rebuilding" in line for line in lines)
    assert _reusable(copy, dataclasses.replace(TINY, pretrain_threads=3), 0, lines.append) is None
    # a zoo from before `pretrain_threads` was pretrained on the default one thread, not tiny's two
    manifest["preset_config"].pop("pretrain_threads")
    (copy / "zoo.json").write_text(json.dumps(manifest))
    assert TINY.pretrain_threads != 1 and _reusable(copy, TINY, 0, lines.append) is None


def _square(x: int) -> int:
    return x * x


def test_submit_returns_results_in_job_order_whatever_the_submission_order():
    """The build's scheduler: jobs submitted longest first still come back in the jobs' order,
    in worker processes and in-process alike; in-process, they run in the submission order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from zoo.build import _submit

    jobs, order = [(3,), (1,), (4,), (2,)], [2, 0, 3, 1]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert [r() for r in _submit(pool, _square, jobs, order)] == [9, 1, 16, 4]
    ran = []

    def record(x):
        ran.append(x)
        return x * x

    results = _submit(None, record, jobs, order)
    assert ran == []  # nothing runs before a result is asked for
    assert results[1]() == 1 and ran == [4, 3, 2, 1]
    assert [r() for r in results] == [9, 1, 16, 4] and ran == [4, 3, 2, 1]


def test_a_stopped_build_leaves_nothing(tmp_path):
    """Hooks see the build's log lines; a stop asked at the first one raises Stopped before any
    model trains, and neither the zoo folder nor a temporary build folder is left."""
    from core.hooks import Hooks, Stopped

    events = []
    with pytest.raises(Stopped):
        build_zoo(tmp_path / "zoo", "tiny", 0, log=lambda line: None, hooks=Hooks(events.append, lambda: bool(events)))
    assert events[0]["type"] == "log" and "building the tiny zoo" in events[0]["message"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
