"""lm-eval tasks imported as benchmarks, compared item by item with the installed lm-eval's own
rendering of the same local documents (its ConfigurableTask over a local `json` dataset: the
few-shot context, the (context, continuation) requests, the target, GSM8K's regex filter)."""
import functools
import json
from pathlib import Path

import pytest

from data.benchmarks import load_benchmark
from service.cli import main

pytestmark = pytest.mark.slow

ARC = [{"id": f"Mercury_{i}", "question": q, "choices": {"text": t, "label": lab}, "answerKey": k}
       for i, (q, t, lab, k) in enumerate([
           ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], list("ABCD"), "B"),
           ("What is 2+2?", ["3", "4", "5"], ["1", "2", "3"], "2"),
           ("Which is a mammal?", ["shark", "whale", "trout", "eel"], list("ABCD"), "B")])]
GSM8K = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
          "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}"}
         for a, b in [(3, 4), (12, 30), (1500, 2500), (7, 0)]]
HELLASWAG = [{"ind": i, "activity_label": "Baking cookies", "ctx_a": "A woman puts dough on a tray.",
              "ctx_b": "she", "ctx": "A woman puts dough on a tray. she", "split": "val", "split_type": "indomain",
              "source_id": f"activitynet~v_{i}", "label": str(i % 4),
              "endings": ["puts the tray in the oven [title] and waits.", "eats the dough.", "paints the tray.",
                          "leaves  the room."]} for i in range(3)]
MMLU = [{"question": f"  What is {a} + {b}? ", "subject": "abstract_algebra", "choices": [str(a + b), str(a), str(b), "0"],
         "answer": i % 4} for i, (a, b) in enumerate([(1, 2), (3, 5), (8, 13), (2, 2), (4, 4)])]


@functools.cache
def task_index():
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def lm_eval_rendering(task: str, data: Path, fewshot: Path | None, num_fewshot: int, sampler: str | None = None):
    """[(context, continuations or None, target)] as lm-eval renders them."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task_index()[task].yaml_path)  # lm-eval's own loader: includes, !function
    files = {"test": str(data), "train": str(fewshot or data), "validation": str(data), "dev": str(fewshot or data)}
    split = cfg.get("test_split") or cfg.get("validation_split")
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
               test_split=split, validation_split=None if split != cfg.get("validation_split") else split)
    if sampler:
        cfg["fewshot_config"] = {**(cfg.get("fewshot_config") or {}), "sampler": sampler}
    t = ConfigurableTask(config=cfg)
    docs = list(t.test_docs() if t.has_test_docs() else t.validation_docs())
    out = []
    for d in docs:
        ctx = t.fewshot_context(d, num_fewshot)
        reqs = t.construct_requests(d, ctx, metadata=(task, 0, 1))
        if t.OUTPUT_TYPE == "multiple_choice":
            out.append((ctx, [r.arguments[1] for r in reqs], t.doc_to_target(d)))
        else:
            out.append((ctx, reqs.arguments[1]["until"] if hasattr(reqs, "arguments") else None, t.doc_to_target(d)))
    return out


def imported(tmp_path: Path, task: str, data: Path, *extra: str) -> tuple[list, dict]:
    out = tmp_path / f"{task}.jsonl"
    assert main(["benchmark", "import", "--lm-eval-task", task, "--data", str(data), "--out", str(out), *extra]) == 0
    return load_benchmark(out).items, json.loads(Path(f"{out}.lm_eval.json").read_text())


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("task,docs,fewshot,n", [("arc_challenge", ARC, None, 0), ("hellaswag", HELLASWAG, None, 0),
                                                 ("mmlu_abstract_algebra", MMLU, MMLU[:3], 2)])
def test_multiple_choice_tasks_render_as_lm_eval_renders_them(tmp_path, task, docs, fewshot, n):
    data = write(tmp_path / "data.jsonl", docs)
    extra = ["--fewshot-data", str(write(tmp_path / "dev.jsonl", fewshot)), "--num-fewshot", str(n)] if fewshot else []
    items, mapping = imported(tmp_path, task, data, *extra)
    theirs = lm_eval_rendering(task, data, tmp_path / "dev.jsonl" if fewshot else None, n)
    assert len(items) == len(theirs) == len(docs) and mapping["num_fewshot"] == n
    for item, (ctx, continuations, target) in zip(items, theirs):
        assert item.prompt == ctx
        assert list(item.choices) == continuations
        assert item.answer == target
    if task == "mmlu_abstract_algebra":  # the description and two first_n examples lead every prompt
        assert items[0].prompt.startswith("The following are multiple choice questions") and \
            items[0].prompt.count("Answer:") == 3


def test_gsm8k_renders_as_lm_eval_and_keeps_the_filtered_number(tmp_path):
    from lm_eval.filters.extraction import RegexFilter

    data = write(tmp_path / "test.jsonl", GSM8K)
    train = write(tmp_path / "train.jsonl", GSM8K[::-1])
    items, mapping = imported(tmp_path, "gsm8k", data, "--fewshot-data", str(train), "--num-fewshot", "2",
                              "--fewshot-sampler", "first_n")
    theirs = lm_eval_rendering("gsm8k", data, train, 2, sampler="first_n")
    pattern = task_index()["gsm8k"].cfg["filter_list"][0]["filter"][0]["regex_pattern"]
    strict = RegexFilter(regex_pattern=pattern)
    for item, (ctx, until, target) in zip(items, theirs):
        assert item.prompt == ctx and item.match == "number"
        assert item.answer == list(strict.apply([[target]], None))[0][0]  # lm-eval's strict-match on the target
    assert mapping["until"] == theirs[0][1] and "Question:" in mapping["until"]
    assert items[2].answer == "4,000"  # thousands groups kept; the number rule reads them as 4000


@pytest.mark.parametrize("args,message", [
    (["--lm-eval-task", "gsm8k"], "draws its 5 few-shot examples at random"),
    (["--lm-eval-task", "mmlu"], "a group of tasks"),
    (["--lm-eval-task", "winogrande"], "multiple-input tasks"),
    (["--lm-eval-task", "wikitext"], "output_type loglikelihood_rolling is not supported"),
    (["--lm-eval-task", "no_such_task_xyz"], "not a task of the installed lm-eval"),
])
def test_unsupported_features_are_refused_in_one_line(tmp_path, capsys, args, message):
    data = write(tmp_path / "d.jsonl", [{"sentence": "The _ fell.", "option1": "a", "option2": "b", "answer": "1",
                                         "question": "q", "page": "x"}])
    assert main(["benchmark", "import", *args, "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_files_import_as_their_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ARC[:2]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(ARC[2:]), tmp_path / "b.parquet")
    out = tmp_path / "arc.jsonl"
    assert main(["benchmark", "import", "--lm-eval-task", "arc_challenge", "--data", str(tmp_path / "a.parquet"),
                 str(tmp_path / "b.parquet"), "--out", str(out)]) == 0
    from_jsonl, _ = imported(tmp_path, "arc_challenge", write(tmp_path / "arc-src.jsonl", ARC))
    assert load_benchmark(out).items == from_jsonl


@pytest.mark.service
def test_the_rest_api_imports_a_task_from_files_under_the_model_roots(tmp_path):
    import httpx

    from service.config import Settings
    from service.serve import BackgroundServer

    roots = tmp_path / "models"
    roots.mkdir()
    write(roots / "arc.jsonl", ARC)
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(roots,))
    with BackgroundServer(settings) as url:
        r = httpx.post(f"{url}/v1/benchmarks/lm-eval", params={"name": "arc"},
                       json={"task": "arc_challenge", "data": ["arc.jsonl"]}, timeout=120)
        assert r.status_code == 201 and r.json()["items"] == 3, r.text
        bad = httpx.post(f"{url}/v1/benchmarks/lm-eval", params={"name": "g"},
                         json={"task": "gsm8k", "data": ["arc.jsonl"]}, timeout=120)
        outside = httpx.post(f"{url}/v1/benchmarks/lm-eval", params={"name": "o"},
                             json={"task": "arc_challenge", "data": [str(tmp_path / "elsewhere.jsonl")]})
    assert bad.status_code == 400 and bad.json()["field"] == "task" and "at random" in bad.json()["detail"]
    assert outside.status_code == 400 and outside.json()["field"] == "data[0]"
    stored = load_benchmark(next((tmp_path / "artifacts" / "benchmarks").glob("arc-*.jsonl")))
    assert stored.items == imported(tmp_path, "arc_challenge", roots / "arc.jsonl")[0]
