"""ATM (merging/atm.py): against hand-made fine-tune-then-merge, resume, the zoo, specs, the worker.

Training data comes from `zoo.train_data` (the zoo fine-tunes' own training streams,
which exclude every benchmark prompt), never from the benchmarks.
"""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.hooks import Hooks, Stopped
from data.benchmarks import from_items, load_benchmark
from fitness.evaluate import evaluate_folder
from merging import CheckpointReader, MergeSpec, merge
from merging.atm import load_pairs, state_dir_for
from merging.training import LoraSpec, train
from zoo.build import eval_settings
from zoo.presets import get_preset
from zoo.train_data import write_train_data

pytestmark = pytest.mark.slow

TASKS = ["cip", "srt"]


@pytest.fixture(scope="module")
def data(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    return write_train_data(tmp_path_factory.mktemp("atm-data"), "tiny", 0, TASKS, pairs=256)


def atm_spec(zoo: Path, data: dict, **params) -> dict:
    return {"base": str(zoo / "models" / "base"), "method": "atm", "device": "cpu",
            "models": [{"name": t, "train": str(data[t])} for t in TASKS],
            "params": {"batch_size": 8, "lr": 1e-3, **params}}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(folder)
    return {n: r.get(n) for n in r.names()}


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for n in ta:
        assert torch.equal(ta[n], tb[n]), n


def test_train_data_is_held_out_and_in_benchmark_format(tiny_zoo, data):
    for t in TASKS:
        train_prompts = {p for p, _ in load_pairs(data[t])}
        bench = load_benchmark(tiny_zoo / "benchmarks" / f"{t}.jsonl")
        assert len(train_prompts) > 100 and not train_prompts & {it.prompt for it in bench.items}


def test_multiple_choice_items_train_on_the_correct_choice(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"id": "a", "prompt": "rev:ab=", "choices": ["ab", "ba"], "answer": 1}\n'
                    '{"id": "b", "prompt": "inc:12=", "answer": "23", "match": "exact"}\n')
    assert load_pairs(path) == [("rev:ab=", "ba"), ("inc:12=", "23")]


@pytest.mark.parametrize("lora", [False, True])
def test_one_iteration_is_finetune_then_task_arithmetic(tiny_zoo, data, tmp_path, lora):
    """T = 1: ATM = fine-tune each task from the base (seed + i), then task arithmetic with lambda = alpha."""
    params = {"iterations": 1, "steps_per_iteration": 6, "seed": 3}
    if lora:
        params["lora"] = {"r": 4, "alpha": 8}
    got = merge(atm_spec(tiny_zoo, data, **params), tmp_path / "atm", progress=False)

    base = tiny_zoo / "models" / "base"
    tok = AutoTokenizer.from_pretrained(base)
    done = []
    for i, t in enumerate(TASKS):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pairs = [(it.prompt, it.answer) for it in load_benchmark(data[t]).items]
        tuned = train(model, tok, pairs, 6, batch_size=8, lr=1e-3, warmup=0.0, schedule="constant", clip=10.0,
                      seed=3 + i, lora=LoraSpec(4, 8) if lora else None)
        tuned.save_pretrained(tmp_path / t)
        done.append({"name": t, "path": str(tmp_path / t)})
    by_hand = merge({"base": str(base), "models": done, "method": "task_arithmetic",
                     "params": {"lambda": 1 / len(TASKS)}}, tmp_path / "by-hand", progress=False)
    assert_same_weights(got, by_hand)
    card = (got / "README.md").read_text()
    assert "method: atm" in card and "train_sha256" in card
    assert not state_dir_for(got).exists()  # a finished run leaves only the HF folder


def test_total_steps_split_and_combine_with_ties(tiny_zoo, data, tmp_path):
    events = []
    spec = atm_spec(tiny_zoo, data, iterations=3, total_steps=[4, 5], combine="ties", combine_params={"density": 0.5})
    out = merge(spec, tmp_path / "out", progress=False, hooks=Hooks(events.append))
    info = json.loads((out / "atm.json").read_text())
    assert [h["steps"] for h in info["history"]] == [{"cip": 1, "srt": 1}, {"cip": 1, "srt": 2}, {"cip": 2, "srt": 2}]
    assert info["alpha"] == 1.0  # TIES already averages: the authors apply it with scaling 1
    steps = [e for e in events if e["type"] == "progress"]
    assert {(e["iteration"], e["task"]) for e in steps if e["step"] == e["steps"]} == {
        (t, m) for t in (1, 2, 3) for m in TASKS}
    assert all(e["loss"] > 0 for e in steps) and steps[-1]["fraction"] == 1.0
    assert [e["iteration"] for e in events if e["type"] == "iteration"] == [1, 2, 3]


@pytest.mark.parametrize("stop_after", ["iteration", "task"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_zoo, data, tmp_path, stop_after):
    spec = atm_spec(tiny_zoo, data, iterations=3, steps_per_iteration=3)
    whole = merge(spec, tmp_path / "whole", progress=False)

    out = tmp_path / "resumed"
    seen = []

    def stop() -> bool:  # after iteration 1 ended, or in iteration 2 once its first task is saved
        if stop_after == "iteration":
            return any(e["type"] == "iteration" for e in seen)
        return any(e["type"] == "progress" and e["iteration"] == 2 and e["task"] == "cip" and e["step"] == 3
                   for e in seen[:-1]) and seen[-1]["task"] == "srt"

    with pytest.raises(Stopped):
        merge(spec, out, progress=False, hooks=Hooks(seen.append, stop))
    state = json.loads((state_dir_for(out) / "state.json").read_text())
    assert state["iteration"] == 1 and not out.exists()
    later = []
    merge(spec, out, progress=False, hooks=Hooks(later.append))
    first_step = next(e for e in later if e["type"] == "progress")
    assert first_step["iteration"] == 2 and first_step["task"] == ("cip" if stop_after == "iteration" else "srt")
    assert_same_weights(out, whole)
    assert json.loads((out / "atm.json").read_text())["history"] == json.loads((whole / "atm.json").read_text())["history"]


def test_a_changed_spec_does_not_reuse_old_state(tiny_zoo, data, tmp_path):
    out = tmp_path / "out"
    spec = atm_spec(tiny_zoo, data, iterations=2, steps_per_iteration=2)
    with pytest.raises(Stopped):
        merge(spec, out, progress=False, hooks=Hooks(should_stop=lambda: (state_dir_for(out) / "theta-1").exists()))
    changed = atm_spec(tiny_zoo, data, iterations=2, steps_per_iteration=2, lr=2e-3)
    merge(changed, out, progress=False)
    fresh = merge(changed, tmp_path / "fresh", progress=False)
    assert_same_weights(out, fresh)


def test_atm_beats_task_arithmetic_of_the_zoo_finetunes_at_equal_steps(tiny_zoo, tiny_zoo_manifest, tmp_path):
    """All five tasks, each trained as many steps either way: the zoo's fine-tunes merged by task
    arithmetic (lambda 1, the sum, and 1/2) against ATM with T = 8 and the paper's alpha = 1/n on the
    same fine-tuning recipe, as the README's small-zoo table (measured: see the assertion message)."""
    preset = get_preset("tiny")
    tasks = list(preset.tasks)
    data = write_train_data(tmp_path / "data", preset, 0, tasks, replay=0.0)  # see zoo/train_data.py
    base = str(tiny_zoo / "models" / "base")
    benches = {t: from_items(t, load_benchmark(tiny_zoo / "benchmarks" / f"{t}.jsonl").items[::4]) for t in tasks}
    settings = eval_settings(preset)

    def avg(folder: Path) -> float:
        return sum(evaluate_folder(folder, b, settings, batch_size=256, device="cpu", use_cache=False).accuracy
                   for b in benches.values()) / len(benches)

    scores = {}
    for lam in (1.0, 0.5):
        out = merge({"base": base, "method": "task_arithmetic", "params": {"lambda": lam},
                     "models": [{"name": t, "path": str(tiny_zoo / "models" / t)} for t in tasks]},
                    tmp_path / f"ta-{lam}", progress=False)
        scores[f"ta {lam}"] = avg(out)
    params = {"iterations": 8, "total_steps": [preset.steps_for(t) for t in tasks], "lr": preset.lr_finetune,
              "schedule": "cosine", "warmup": 0.05, "clip": 1.0, "batch_size": preset.finetune_batch}
    out = merge({"base": base, "method": "atm", "params": params, "device": "cpu",
                 "models": [{"name": t, "train": str(data[t])} for t in tasks]}, tmp_path / "atm", progress=False)
    assert json.loads((out / "atm.json").read_text())["steps_per_task"] == {t: preset.steps_for(t) for t in tasks}
    scores["atm"] = avg(out)
    assert scores["atm"] > max(scores["ta 1.0"], scores["ta 0.5"]) + 0.1, scores


# --- the spec ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"models": [{"name": "a"}]}, "models[0].train"),
    ({"params": {"iterations": 0}}, "params.iterations"),
    ({"params": {"steps": 3}}, "params.steps"),
    ({"params": {"steps_per_iteration": 2, "total_steps": 8}}, "total_steps"),
    ({"params": {"total_steps": 2, "iterations": 4}}, "params.total_steps"),
    ({"params": {"steps_per_iteration": [1, 2, 3]}}, "params.steps_per_iteration"),
    ({"params": {"steps_per_iteration": 10**12}}, "steps_per_iteration"),
    ({"params": {"total_steps": [5, 0]}}, "total_steps"),
    ({"params": {"batch_size": 10**9}}, "batch_size"),
    ({"params": {"combine": "atm"}}, "combine"),
    ({"params": {"combine": "nope"}}, "nope"),
    ({"params": {"combine_params": {"density": 2}}, "combine": "ties"}, "combine_params.density"),
    ({"params": {"combine_params": {"weights": [1, 2, 3]}}}, "params.combine_params.weights"),
    ({"params": {"init": "merge"}}, "models[0].path"),
])
def test_bad_atm_specs_name_the_field(change, field):
    spec = {"base": "b", "method": "atm", "models": [{"name": "a", "train": "a.jsonl"}, {"name": "b", "train": "b.jsonl"}]}
    if "combine" in change:
        change = {"params": {**change["params"], "combine": change["combine"]}}
    with pytest.raises(Exception) as e:
        MergeSpec.model_validate({**spec, **change})
    assert field in str(e.value)


def test_train_is_only_for_atm_and_path_only_optional_for_it():
    with pytest.raises(Exception, match=r"models\[0\].train"):
        MergeSpec.model_validate({"base": "b", "method": "ties", "models": [{"name": "a", "path": "p", "train": "t"}]})
    with pytest.raises(Exception, match=r"models\[0\].path"):
        MergeSpec.model_validate({"base": "b", "method": "ties", "models": [{"name": "a"}]})
    spec = MergeSpec.model_validate({"base": "b", "method": "atm", "models": [{"name": "a", "train": "t"}]})
    p = spec.method_params()
    assert (p.iterations, p.lr, p.alpha_for(4), p.steps(1, 0, 640)) == (10, 1e-5, 0.25, 20)  # the authors' defaults


def test_evolve_jobs_do_not_take_atm(tiny_zoo):
    from service.schemas import SpecError, parse_spec

    with pytest.raises(SpecError, match="kind: merge"):
        parse_spec({"kind": "evolve", "base": "b", "method": "atm", "models": [{"name": "a", "train": "t"}],
                    "objectives": [{"benchmark": "x.jsonl"}]})


def test_service_checks_training_files_and_the_worker_runs_atm(tiny_zoo, data, tmp_path):
    from service.config import Settings
    from service.schemas import SpecError, check_spec, parse_spec
    from service.store import Store
    from service.worker import Worker

    roots = [tiny_zoo, data["cip"].parent]
    spec = atm_spec(tiny_zoo, data, iterations=2, steps_per_iteration=2)
    spec["kind"] = "merge"
    bad = {**spec, "models": [{"name": "cip", "train": str(tiny_zoo / "models" / "base" / "config.json")}]}
    with pytest.raises(SpecError) as e:
        check_spec(parse_spec(bad), roots)
    assert e.value.field == "models[0].train"
    by_name = {**spec, "models": [{**spec["models"][0], "train": "uploaded-cip"}]}  # a benchmark uploaded by name
    named = check_spec(parse_spec(by_name), roots, uploaded_benchmark={"uploaded-cip": data["cip"]}.get)
    assert named.models[0].train == data["cip"]
    with pytest.raises(SpecError, match="no benchmark named 'uploaded-cip' was uploaded"):
        check_spec(parse_spec(by_name), roots)
    checked = check_spec(parse_spec(spec), roots)
    settings = Settings(artifacts=tmp_path / "artifacts")
    store = Store(settings.database_url)
    job = store.add_job("merge", checked.model_dump(mode="json"), "cpu", None)
    worker = Worker(settings, "cpu", store=store)
    assert worker.execute(store.claim(worker.id, "cpu")) == "succeeded"
    events = [e.data for e in store.events_after(job.id, 0, 10_000)]
    assert {"type": "stage", "stage": "atm"} in events
    steps = [e for e in events if e.get("type") == "progress"]
    assert steps and {"iteration", "task", "loss"} <= set(steps[-1]) and steps[-1]["fraction"] == 1.0
    expected = merge(spec, tmp_path / "local", progress=False)
    assert_same_weights(settings.job_dir(job.id) / "model", expected)


def test_whole_model_methods_cannot_be_atm_combiners():
    """c2m3 and weight_matching align whole models; refused before any training, not after a round."""
    from pydantic import ValidationError

    from merging.atm import AtmParams

    for name in ("c2m3", "weight_matching"):
        with pytest.raises(ValidationError, match=f"{name} aligns whole models"):
            AtmParams.model_validate({"combine": name})
    assert AtmParams.model_validate({"combine": "ties"}).combine == "ties"
