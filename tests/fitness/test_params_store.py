"""Leaderboard item parameters (fitness.params_store, `evomerge irt`): fit on a response matrix,
import tinyBenchmarks-style parameters, list, and use by a job's fit_benchmark.

The oracle of the fit is the generating 2PL parameters of the matrix, not our fitter's output."""
import json

import numpy as np
import pytest

from data.benchmarks import from_items, write_benchmark
from fitness import params_store
from service.cli import main

N_ITEMS, N_ROWS = 40, 300


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    """Every test gets an empty store (the cache folder), never the shared test cache."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EVOMERGE_ARTIFACTS", str(tmp_path / "no-artifacts"))


@pytest.fixture
def bench(tmp_path):
    b = from_items("lb", [{"id": f"item-{j}", "prompt": f"q{j}", "answer": "a"} for j in range(N_ITEMS)])
    path = tmp_path / "lb.jsonl"
    write_benchmark(path, b.items)
    return b, path


def draw_2pl(seed=0, rows=N_ROWS, items=N_ITEMS, missing=0.05):
    """A 2PL response matrix (logit = a theta - b) with some cells missing (NaN), and its parameters."""
    rng = np.random.default_rng(seed)
    a, b, theta = np.exp(rng.normal(0, 0.3, items)), rng.normal(0, 1.2, items), rng.normal(0, 1, rows)
    y = (rng.random((rows, items)) < 1 / (1 + np.exp(-(theta[:, None] * a - b)))).astype(float)
    y[rng.random(y.shape) < missing] = np.nan
    return y, a, b


def write_csv(path, y, ids, names=True):
    lines = [",".join((["model"] if names else []) + list(ids))]
    for i, row in enumerate(y):
        cells = ["" if np.isnan(v) else str(int(v)) for v in row]
        lines.append(",".join(([f"llm-{i}"] if names else []) + cells))
    path.write_text("\n".join(lines) + "\n")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_irt_fit_recovers_the_generating_difficulties(bench, tmp_path, capsys):
    b, path = bench
    y, _, true_b = draw_2pl()
    perm = np.random.default_rng(1).permutation(N_ITEMS)  # columns in another order than the benchmark's
    write_csv(tmp_path / "lb.csv", y[:, perm], [b.ids[j] for j in perm])
    code, out, err = run_cli(capsys, "irt", "fit", "--responses", str(tmp_path / "lb.csv"), "--benchmark", str(path))
    assert code == 0, err
    assert "fitted" in out and f"{N_ROWS} rows" in out and len(out.strip().splitlines()) == 1
    entry = params_store.latest(b.hash)
    params = entry.params()
    assert params.item_ids == b.ids and params.n_items == N_ITEMS
    assert np.corrcoef(params.b, true_b)[0, 1] > 0.9
    assert entry.meta["source"] == "fitted" and entry.meta["rows"] == N_ROWS and entry.meta["model"] == "2pl"
    assert entry.meta["item_ids"] == b.ids and entry.meta["observed"] == int((~np.isnan(y)).sum())

    # the same matrix as NPZ: the same fit
    np.savez(tmp_path / "lb.npz", responses=y, item_ids=np.array(b.ids))
    code, _, err = run_cli(capsys, "irt", "fit", "--responses", str(tmp_path / "lb.npz"), "--benchmark", str(path))
    assert code == 0, err
    np.testing.assert_allclose(params_store.latest(b.hash).params().b, params.b, atol=1e-6)
    # and as Parquet (the CSV's table, blanks as nulls): the same fit again
    import pandas as pd

    pd.read_csv(tmp_path / "lb.csv").to_parquet(tmp_path / "lb.parquet")
    code, _, err = run_cli(capsys, "irt", "fit", "--responses", str(tmp_path / "lb.parquet"), "--benchmark", str(path))
    assert code == 0, err
    np.testing.assert_allclose(params_store.latest(b.hash).params().b, params.b, atol=1e-6)
    code, out, _ = run_cli(capsys, "irt", "list")
    assert code == 0 and len(out.strip().splitlines()) == 3 and all(b.hash[:12] in line for line in out.splitlines())


def test_import_round_trips_tinybenchmarks_parameters(bench, tmp_path, capsys):
    b, path = bench
    rng = np.random.default_rng(3)
    perm = rng.permutation(N_ITEMS)
    a, d = np.exp(rng.normal(0, 0.3, (N_ITEMS, 2))), rng.normal(0, 1, N_ITEMS)
    # tinyBenchmarks keeps A as [1, dims, items] and B as [1, dims, items] (summed over dims)
    B = np.stack([d / 2, d / 2])
    (tmp_path / "p.json").write_text(json.dumps({"A": [a[perm].T.tolist()], "B": [B[:, perm].tolist()],
                                                 "item_ids": [b.ids[j] for j in perm], "rows": 915}))
    code, out, err = run_cli(capsys, "irt", "import", "--params", str(tmp_path / "p.json"), "--benchmark", str(path))
    assert code == 0, err
    assert "imported" in out and "915 rows" in out
    got = params_store.latest(b.hash)
    p = got.params()
    np.testing.assert_allclose(p.a, a)
    np.testing.assert_allclose(p.b, d)
    assert p.model == "multidim_2pl" and got.meta["rows"] == 915 and got.source() == f"stored {got.id} (imported, fitted on 915 rows)"

    # NPZ, A as [items, dims], B as [items]
    np.savez(tmp_path / "p.npz", A=a[:, :1], B=d, item_ids=np.array(b.ids))
    code, _, err = run_cli(capsys, "irt", "import", "--params", str(tmp_path / "p.npz"), "--benchmark", str(path))
    assert code == 0, err
    p = params_store.latest(b.hash).params()
    np.testing.assert_allclose(p.a[:, 0], a[:, 0])
    np.testing.assert_allclose(p.b, d)
    code, out, _ = run_cli(capsys, "irt", "list", "--benchmark", str(path))
    assert [line.split()[0] for line in out.splitlines()] == ["lb", "lb"] and "imported" in out


@pytest.mark.parametrize("case,write,field,words", [
    ("unknown column", lambda p, ids: write_csv(p, np.ones((3, N_ITEMS)), ids[:-1] + ["stranger"]),
     "item_ids", "'stranger'"),
    ("missing column", lambda p, ids: write_csv(p, np.ones((3, N_ITEMS - 1)), ids[1:]), "item_ids", "'item-0'"),
    ("not 0/1", lambda p, ids: p.write_text(",".join(ids) + "\n" + ",".join(["2"] + ["1"] * (N_ITEMS - 1)) + "\n"),
     "responses", "'2'"),
    ("item never answered", lambda p, ids: write_csv(p, np.vstack([np.full(3, np.nan), np.ones((N_ITEMS - 1, 3))]).T,
                                                     ids), "responses", "'item-0'"),
])
def test_bad_matrices_are_refused_in_one_line(bench, tmp_path, capsys, case, write, field, words):
    b, path = bench
    write(tmp_path / "bad.csv", list(b.ids))
    code, out, err = run_cli(capsys, "irt", "fit", "--responses", str(tmp_path / "bad.csv"), "--benchmark", str(path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and f"error: {field}:" in err and words in err, err
    assert params_store.entries() == []


@pytest.mark.parametrize("data,field", [
    ({"A": [[1.0] * N_ITEMS], "B": [0.0] * N_ITEMS, "item_ids": ["nope"] + [f"item-{j}" for j in range(1, N_ITEMS)]},
     "item_ids"),
    ({"A": [[1.0] * N_ITEMS], "B": [0.0] * (N_ITEMS - 1), "item_ids": [f"item-{j}" for j in range(N_ITEMS)]}, "B"),
    ({"A": [[1.0] * 3], "B": [0.0] * N_ITEMS, "item_ids": [f"item-{j}" for j in range(N_ITEMS)]}, "A"),
    ({"A": [[1.0] * N_ITEMS], "B": [0.0] * N_ITEMS}, "item_ids"),
])
def test_bad_parameters_are_refused_naming_the_field(bench, tmp_path, capsys, data, field):
    b, path = bench
    (tmp_path / "bad.json").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "irt", "import", "--params", str(tmp_path / "bad.json"), "--benchmark", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"error: {field}:" in err, err
    bad = dict(data, A=[[float("nan")] * N_ITEMS], item_ids=list(b.ids))
    with pytest.raises(ValueError, match="^A: must be finite"):
        params_store.parse_params(bad, b)


def test_a_job_uses_the_stored_parameters(bench):
    """fit_benchmark takes the newest stored entry of the benchmark's hash; the job's own rows
    still place the endpoints' abilities and the adaptive prior; describe() names the source."""
    from fitness.evaluate import Responses
    from fitness.fitness import Fitness, fit_benchmark
    from fitness.irt import estimate_theta
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    b, path = bench
    y, _, _ = draw_2pl(seed=5)
    params_store.fit_matrix(b, y)  # an older entry: the job must take the newer one
    stored = params_store.fit_matrix(b, draw_2pl(seed=6)[0])
    rng = np.random.default_rng(7)
    answers = [Responses(b.ids, (rng.random(N_ITEMS) < p).astype(np.uint8), np.ones(N_ITEMS, int), [""] * N_ITEMS)
               for p in np.linspace(0.2, 0.8, 6)]
    spec = ObjectiveSpec(benchmark=str(path), subset={"strategy": "adaptive", "size": 10})
    fit = fit_benchmark(b, [spec], EvaluationSpec(), answers[:3], answers[3:])
    want = stored.params()
    np.testing.assert_array_equal(fit.item_params.a, want.a)
    np.testing.assert_array_equal(fit.item_params.b, want.b)
    np.testing.assert_allclose(fit.endpoint_thetas, estimate_theta(np.stack([r.correct for r in answers[:3]]), want))
    assert fit.irt_rows == 6 and fit.prior is not None
    job = Fitness([spec], {str(path): fit}, None, EvaluationSpec(), "cpu")
    info = job.describe()[str(path)]
    assert info["irt_source"].startswith("stored ") and info["irt_source"].endswith(f" (fitted on {N_ROWS} rows)")
    # a later upload gives a later job other parameters, and other settings: a resumed run's
    # scores stay keyed to the entry it used
    params_store.fit_matrix(b, draw_2pl(seed=8)[0])
    later = fit_benchmark(b, [spec], EvaluationSpec(), answers[:3], answers[3:])
    assert later.irt_source != fit.irt_source
    assert Fitness([spec], {str(path): later}, None, EvaluationSpec(), "cpu").settings_key() != job.settings_key()

    other = from_items("other", [{"id": f"item-{j}", "prompt": f"other {j}", "answer": "a"} for j in range(N_ITEMS)])
    fit = fit_benchmark(other, [spec], EvaluationSpec(), answers[:3], answers[3:])  # no entry for these items
    assert fit.irt_source == "fitted on 6 rows"
    assert not np.array_equal(fit.item_params.b, want.b)
