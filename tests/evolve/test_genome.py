"""Search spaces: genomes <-> merge parameters, for every method and granularity."""
from pathlib import Path

import numpy as np
import pytest

from evolve.genome import GLOBAL, PER_MODEL, SearchSpace, block_of
from merging.methods import methods

DEFAULT_SPACE = {name: m.space for name, m in methods("tensor").items()}  # each method's own default
from merging.methods import method_params

CASES = [(method, blocks) for method in DEFAULT_SPACE for blocks in (1, 3)]


@pytest.mark.parametrize("method,blocks", CASES, ids=[f"{m}-b{b}" for m, b in CASES])
def test_genomes_round_trip_and_decode_to_valid_parameters(method, blocks):
    n = 3
    space = SearchSpace(method, n, n_blocks=blocks, n_layers=6)
    per_model = [p for p in DEFAULT_SPACE[method] if p in PER_MODEL]
    per_global = [p for p in DEFAULT_SPACE[method] if p in GLOBAL]
    assert space.n_var == blocks * (n * len(per_model) + len(per_global))
    lo, hi = space.bounds
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.uniform(lo, hi)
        decoded = space.decode(x)
        assert len(decoded) == blocks
        for b in decoded:
            assert all(len(b[p]) == n for p in per_model) and all(isinstance(b[p], float) for p in per_global)
        assert np.array_equal(space.encode(decoded), x)
        for b, p in zip(decoded, space.params(x)):
            assert p == method_params(method, b, n)
    one = space.decode(rng.uniform(lo, hi))[0]
    assert space.decode(space.encode(one)) == [one] * blocks  # one dict stands for every block


@pytest.mark.parametrize("method", list(DEFAULT_SPACE))
def test_out_of_range_genes_are_clipped_and_wrong_lengths_rejected(method):
    space = SearchSpace(method, 2, n_blocks=2, n_layers=4)
    lo, hi = space.bounds
    x = np.where(np.arange(space.n_var) % 2 == 0, lo - 5.0, hi + 5.0)
    assert space.decode(x) == space.decode(np.clip(x, lo, hi))
    with pytest.raises(ValueError, match="genes"):
        space.decode(np.zeros(space.n_var + 1))


def test_per_block_parameters_follow_the_layers():
    space = SearchSpace("task_arithmetic", 2, n_blocks=2, n_layers=4)
    x = np.array([0.1, 0.2, 0.7, 0.8])  # genes: weights[0]@b0, weights[1]@b0, weights[0]@b1, weights[1]@b1
    assert [g.label for g in space.genes] == ["weights[0]@b0", "weights[1]@b0", "weights[0]@b1", "weights[1]@b1"]
    of = space.params_for_tensor(x)
    assert of("model.embed_tokens.weight").weights == [0.1, 0.2]
    assert of("model.layers.1.mlp.up_proj.weight").weights == [0.1, 0.2]
    assert of("model.layers.2.self_attn.q_proj.weight").weights == [0.7, 0.8]
    assert of("model.norm.weight").weights == [0.7, 0.8] and of("lm_head.weight").weights == [0.7, 0.8]
    assert [block_of(f"model.layers.{i}.x", 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("space,fixed,words", [
    ({"colour": [0, 1]}, None, "search.space.colour: not a searchable parameter"),
    ({"weights": [1.0, 0.5]}, None, "search.space.weights: lower bound 1.0 above upper bound 0.5"),
    ({"density": [0.0, 2.0]}, None, "search.space.density: 0.0 is outside what ties accepts"),
    ({"density": [0.5, 2.0]}, None, "search.space.density: 2.0 is outside what ties accepts"),
    ({"weights": [0, 1]}, {"weights": [1, 1]}, "params.weights: both fixed and searched"),
    ({}, None, "search.space: nothing to search"),
])
def test_bad_spaces_are_rejected_naming_the_field(space, fixed, words):
    with pytest.raises(ValueError) as e:
        SearchSpace("ties", 2, space, fixed)
    assert str(e.value).startswith(words)


def test_evolve_spec_rejects_a_space_the_method_cannot_take():
    from pydantic import ValidationError

    from evolve.spec import EvolveSpec

    spec = {"kind": "evolve", "base": "b", "models": [{"name": "a", "path": "a"}, {"name": "c", "path": "c"}],
            "method": "ties", "search": {"space": {"density": [0.0, 2.0]}}, "objectives": [{"benchmark": "x.jsonl"}]}
    with pytest.raises(ValidationError, match="search.space.density"):
        EvolveSpec.model_validate(spec)
    spec["search"]["space"]["density"] = [0.2, 1.0]
    assert EvolveSpec.model_validate(spec).search.space["density"] == [0.2, 1.0]


def test_fitness_defaults_follow_metric_and_subset():
    """Left out, accuracy is auto (the CAT or blend_irt, chosen at job start), a named estimator gets a fixed random subset,
    a fixed subset takes gmp-IRT, an adaptive one p-IRT, and lengths (which IRT does not model) the
    subset mean on a fixed random subset, shared with the accuracy objective on the same benchmark; an IRT estimator on tokens and two subset
    specs on one benchmark are refused, naming the field."""
    from pydantic import ValidationError

    from evolve.spec import EvolveSpec

    def resolved(*objectives):
        spec = {"kind": "evolve", "base": "b", "models": [{"name": "a", "path": "a"}], "method": "task_arithmetic",
                "objectives": list(objectives)}
        return [(o.estimator, o.subset.strategy, o.subset.size) for o in EvolveSpec.model_validate(spec).objectives]

    assert resolved({"benchmark": "x.jsonl"}) == [("auto", "auto", 20)]
    assert resolved({"benchmark": "x.jsonl", "subset": {"size": 10}}) == [("auto", "auto", 10)]
    assert resolved({"benchmark": "x.jsonl", "estimator": "auto"}) == [("auto", "auto", 20)]
    assert resolved({"benchmark": "x.jsonl", "subset": {"strategy": "auto", "round": 4}}) == [("auto", "auto", 20)]
    assert resolved({"benchmark": "x.jsonl", "subset": {"strategy": "adaptive"}}) == [("p_irt", "adaptive", 20)]
    for bad in ({"estimator": "auto", "subset": {"strategy": "random"}}, {"estimator": "p_irt", "subset": {"strategy": "auto"}}):
        with pytest.raises(ValidationError, match="estimator: auto chooses the subset strategy too"):
            resolved({"benchmark": "x.jsonl", **bad})
    assert resolved({"benchmark": "x.jsonl", "subset": {"prior": "surrogate"}}) == [("p_irt", "adaptive", 20)]
    assert resolved({"benchmark": "x.jsonl", "estimator": "p_irt", "subset": {"round": 4}}) == [("p_irt", "adaptive", 20)]
    with pytest.raises(ValidationError, match="subset.round applies to strategy adaptive"):
        resolved({"benchmark": "x.jsonl", "subset": {"strategy": "random", "round": 4}})
    assert resolved({"benchmark": "x.jsonl", "subset": {"strategy": "anchor"}}) == [("gmp_irt", "anchor", 20)]
    assert resolved({"benchmark": "x.jsonl", "estimator": "map_irt"}) == [("map_irt", "random", 20)]
    tokens = {"benchmark": "x.jsonl", "metric": "mean_output_tokens"}
    assert resolved({"benchmark": "x.jsonl"}, tokens) == [("gmp_irt", "random", 20), ("subset_mean", "random", 20)]
    assert resolved({"benchmark": "y.jsonl"}, tokens) == [("auto", "auto", 20), ("subset_mean", "random", 20)]
    cat = {"benchmark": "x.jsonl", "subset": {"strategy": "adaptive", "size": 10}}
    assert resolved(cat, tokens) == [("p_irt", "adaptive", 10), ("subset_mean", "adaptive", 10)]
    with pytest.raises(ValidationError, match=r"objectives\[1\].subset"):
        resolved(cat, {**tokens, "subset": {"size": 10}})
    with pytest.raises(ValidationError, match="mean_output_tokens is estimated by subset_mean or full"):
        resolved({**tokens, "estimator": "gmp_irt"})


def test_readme_evolve_example_is_a_valid_spec():
    """The README's evolve spec validates, and its objectives resolve as its comments say."""
    import re

    import yaml

    from evolve.spec import EvolveSpec

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(kind: evolve\n.*?)```", readme, re.S).group(1)
    spec = EvolveSpec.model_validate(yaml.safe_load(block))
    assert [(o.estimator, o.subset.strategy, o.subset.size) for o in spec.objectives] == [
        ("auto", "auto", 20), ("gmp_irt", "random", 20)]


def test_knee_point_on_convex_and_concave_fronts():
    """Closed-form fronts (minimization, already on [0, 1]): on the convex z2 = (1 - z1)^2 the
    distance below the line z1 + z2 = 1 is z1 (1 - z1), largest at z1 = 0.5; on the concave
    z2 = 1 - z1^2 no point lies below that line, and the distance to the ideal (0, 0),
    z1^2 + (1 - z1^2)^2, is smallest at z1 = 1/sqrt(2): on the grid, 0.7 (not an extreme)."""
    from evolve.pareto import knee_point, non_dominated

    z = np.linspace(0, 1, 11)
    convex, concave = np.column_stack([z, (1 - z) ** 2]), np.column_stack([z, 1 - z ** 2])
    for F in (convex, concave):
        assert len(non_dominated(F)) == len(F)
    assert knee_point(convex) == 5 and knee_point(concave) == 7
    assert knee_point(concave * [2.0, 10.0] + 3.0) == 7  # scaled per objective first
    assert knee_point(np.array([[3.0], [1.0], [2.0]])) == 1
