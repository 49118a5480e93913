"""fitness.subsets: sizes, weights, determinism, and each strategy's defining choice."""
import numpy as np
import pytest

from fitness.irt import ItemParams
from fitness.subsets import (
    Subset,
    allocate,
    anchor_subset,
    balanced_subset,
    binary_entropy,
    difficulty_strata,
    entropy_subset,
    random_subset,
)

GROUPS = np.repeat([0, 1, 2], [400, 150, 50])


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(0)
    return ItemParams(rng.lognormal(0, 0.5, (600, 1)), rng.normal(0, 1.5, 600))


@pytest.fixture(scope="module")
def probes():
    rng = np.random.default_rng(1)  # 11 probe merges (lambda grid 0, 0.1, ..., 1) on 600 items
    return (rng.random((11, 600)) < rng.random(600)).astype(float)


def check(subset, k, n_items, strategy):
    assert isinstance(subset, Subset) and subset.strategy == strategy
    assert len(subset) == k and np.unique(subset.indices).size == k
    assert np.all(np.diff(subset.indices) > 0) and 0 <= subset.indices.min() and subset.indices.max() < n_items
    assert subset.weights.sum() == pytest.approx(1.0) and np.all(subset.weights > 0)


def test_allocate_is_proportional_and_covers_groups():
    assert allocate(20, [400, 150, 50]).tolist() == [13, 5, 2]
    assert allocate(3, [1000, 1, 1]).tolist() == [1, 1, 1]  # every group represented
    assert allocate(2, [5, 5, 5]).sum() == 2  # fewer picks than groups
    assert allocate(12, [1, 1, 10]).tolist() == [1, 1, 10]  # capped by group size
    with pytest.raises(ValueError):
        allocate(13, [1, 1, 10])


def test_random_subset(items):
    a, b = random_subset(600, 20, seed=3), random_subset(600, 20, seed=3)
    check(a, 20, 600, "random")
    assert np.array_equal(a.indices, b.indices) and np.allclose(a.weights, 1 / 20)
    assert not np.array_equal(a.indices, random_subset(600, 20, seed=4).indices)


def test_stratified_weights_estimate_the_pooled_mean():
    for subset in (random_subset(600, 20, seed=0, groups=GROUPS),
                   entropy_subset(np.random.default_rng(2).random((5, 600)) < 0.5, 20, groups=GROUPS)):
        check(subset, 20, 600, subset.strategy)
        assert np.bincount(GROUPS[subset.indices]).tolist() == [13, 5, 2]
        for g, share in enumerate([400 / 600, 150 / 600, 50 / 600]):
            # a benchmark's share of the pool is recovered exactly by the weighted subset mean
            assert subset.weights @ (GROUPS[subset.indices] == g) == pytest.approx(share)


def test_difficulty_strata_cut_each_group_by_success_rate(probes):
    labels = difficulty_strata(GROUPS, probes, 20)
    subset = random_subset(600, 20, seed=0, groups=labels)
    check(subset, 20, 600, "random")
    assert np.bincount(GROUPS[subset.indices]).tolist() == [13, 5, 2]  # the kinds' shares are kept
    assert np.unique(labels).size == 20 and np.bincount(labels[subset.indices]).max() == 1
    p = probes.mean(axis=0)
    for g in range(3):  # inside a group, strata are bands of success rate: no overlap between them
        bands = [p[(labels == lab)] for lab in np.unique(labels[GROUPS == g])]
        bands.sort(key=np.min)
        assert all(lo.max() <= hi.min() for lo, hi in zip(bands, bands[1:]))


def stratified_variance(labels, values, k):
    """Cochran (1977) eq. 5.3: Var = sum_h W_h^2 (1 - n_h/N_h) S_h^2 / n_h, proportional allocation."""
    sizes = np.bincount(labels)
    take = allocate(k, sizes)
    return sum((N_h / labels.size) ** 2 * (1 - n_h / N_h) * values[labels == h].var(ddof=1) / n_h
               for h, (N_h, n_h) in enumerate(zip(sizes, take)) if N_h > 1)


def test_difficulty_strata_keep_the_mean_unbiased_and_cut_its_spread():
    """Draws stratified by difficulty: the weighted subset mean is unbiased and its spread is what
    Cochran's formula gives; when the known models' success rates predict a new model's answers,
    that spread is well below the one of draws stratified by group alone."""
    rng = np.random.default_rng(5)
    difficulty = rng.random(600)
    known = (rng.random((40, 600)) < difficulty).astype(float)
    answers = (rng.random(600) < 1 / (1 + np.exp(-10 * (difficulty - 0.5)))).astype(float)  # sharp items
    labels = difficulty_strata(GROUPS, known, 20)
    est = np.array([sub.weights @ answers[sub.indices] for sub in (random_subset(600, 20, s, labels)
                                                                   for s in range(3000))])
    assert abs(est.mean() - answers.mean()) < 3 * est.std() / np.sqrt(est.size)
    assert est.var() == pytest.approx(stratified_variance(labels, answers, 20), rel=0.1)
    assert stratified_variance(labels, answers, 20) < 0.75 * stratified_variance(GROUPS, answers, 20)


def skill_answers(rng, n_models: int, items: int = 600, skills: int = 3, sharpness: float = 3.0) -> np.ndarray:
    """0/1 answers of models with one ability per skill (~ N(0, 1)) on items that each test one
    skill: P = sigmoid(sharpness * (a_j theta_skill(j) - b_j)). Sharp items make answers nearly a
    function of model and item, as greedy decoding does; skills make them depend on more than an
    item's difficulty."""
    skill = rng.integers(0, skills, items)
    a, b = np.exp(rng.normal(0, 0.3, items)), rng.normal(0, 1.0, items)
    theta = rng.normal(0, 1, (n_models, skills))
    p = 1 / (1 + np.exp(-sharpness * (a * theta[:, skill] - b)))
    return (rng.random(p.shape) < p).astype(float)


def test_balanced_subsets_keep_the_strata_and_balance_the_known_models(probes):
    labels = difficulty_strata(GROUPS, probes, 20)
    sub = balanced_subset(probes, 20, seed=4, groups=labels)
    check(sub, 20, 600, "balanced")
    plain = random_subset(600, 20, seed=4, groups=labels)
    assert np.array_equal(np.sort(labels[sub.indices]), np.sort(labels[plain.indices]))  # one item per stratum
    assert np.allclose(np.sort(sub.weights), np.sort(plain.weights))
    assert np.array_equal(balanced_subset(probes, 20, seed=4, groups=labels).indices, sub.indices)
    assert not np.array_equal(balanced_subset(probes, 20, seed=5, groups=labels).indices, sub.indices)

    def imbalance(s: Subset) -> float:
        return float(((probes[:, s.indices] @ s.weights - probes.mean(1)) ** 2).sum())

    one = balanced_subset(probes, 20, seed=4, groups=labels, draws=1)
    assert imbalance(sub) < imbalance(one)  # more draws, closer to the known accuracies
    assert imbalance(sub) < np.quantile([imbalance(random_subset(600, 20, s, labels)) for s in range(300)], 0.05)
    with pytest.raises(ValueError, match="no NaN"):
        balanced_subset(np.where(probes > 0, np.nan, 0.0), 5)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        balanced_subset(probes, 5, draws=0)


def test_balanced_subsets_estimate_new_models_better_than_random_ones():
    """A subset balanced on 17 known models estimates 200 new models' accuracies better (mean
    absolute error over 20 seeds) than random draws from the same difficulty strata, when answers
    depend on skills the strata do not see (measured ratio 0.88; with one skill and soft items,
    sharpness 1, there is little to balance: 0.95)."""
    rng = np.random.default_rng(11)
    answers = skill_answers(rng, 217)
    known, new = answers[:17], answers[17:]
    labels = difficulty_strata(None, known, 20)
    errors = {"random": [], "balanced": []}
    for seed in range(20):
        for name, sub in (("random", random_subset(600, 20, seed, labels)), ("balanced", balanced_subset(known, 20, seed, labels))):
            errors[name].append(np.abs(new[:, sub.indices] @ sub.weights - new.mean(1)).mean())
    assert np.mean(errors["balanced"]) < 0.9 * np.mean(errors["random"]), errors


def test_entropy_picks_the_items_probes_disagree_on():
    probes = np.zeros((11, 100))             # items 0-59: every probe wrong
    probes[:, 60:] = 1.0                     # items 60-99: every probe right
    probes[:6, [5, 17, 42]] = 1.0            # p = 6/11: the probes split
    probes[6:, 70] = 0.0                     # p = 6/11 as well
    probes[:3, 30] = 1.0                     # p = 3/11: informative, less so
    assert entropy_subset(probes, 4, seed=0).indices.tolist() == [5, 17, 42, 70]
    got = entropy_subset(probes, 5, seed=0)
    check(got, 5, 100, "entropy")
    assert got.indices.tolist() == [5, 17, 30, 42, 70]
    assert np.allclose(got.weights, 0.2)
    # too few informative items: the rest is a seeded random fill from the uninformative ones
    big = entropy_subset(probes, 12, seed=0)
    assert {5, 17, 30, 42, 70} <= set(big.indices.tolist())
    assert np.array_equal(big.indices, entropy_subset(probes, 12, seed=0).indices)
    assert not np.array_equal(big.indices, entropy_subset(probes, 12, seed=1).indices)


def test_binary_entropy():
    assert binary_entropy(np.array([0.0, 1.0])).tolist() == [0.0, 0.0]
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(np.log(2))
    assert binary_entropy(np.array([0.2]))[0] == pytest.approx(binary_entropy(np.array([0.8]))[0])


def test_anchor_finds_one_item_per_cluster_weighted_by_cluster_size():
    # five tight, well-separated clusters of items in (a, b) space, of known sizes
    rng = np.random.default_rng(0)
    centres = np.array([[0.5, -2.0], [1.0, 0.0], [2.0, 2.0], [0.3, 3.0], [1.5, -1.0]])
    sizes = np.array([50, 10, 25, 5, 10])
    label = np.repeat(np.arange(5), sizes)
    emb = centres[label] + rng.normal(0, 0.01, (100, 2))
    got = anchor_subset(5, ItemParams(emb[:, :1], emb[:, 1]))
    check(got, 5, 100, "anchor")
    assert sorted(label[got.indices].tolist()) == [0, 1, 2, 3, 4]
    assert np.allclose(got.weights, sizes[label[got.indices]] / 100)


def test_anchor_with_fewer_distinct_items_than_k_still_takes_k():
    # 100 items on three distinct embeddings (60 / 30 / 10 items), as items every known model
    # answers the same way get from a deterministic IRT fit
    label = np.repeat([0, 1, 2], [60, 30, 10])
    emb = np.array([[1.0, -3.0], [1.2, 0.5], [0.8, 2.0]])[label]
    got = anchor_subset(10, ItemParams(emb[:, :1], emb[:, 1]))
    check(got, 10, 100, "anchor")
    assert np.bincount(label[got.indices]).tolist() == [6, 3, 1]
    for c, share in enumerate([0.6, 0.3, 0.1]):
        assert got.weights[label[got.indices] == c].sum() == pytest.approx(share)
    assert not np.array_equal(got.indices, anchor_subset(10, ItemParams(emb[:, :1], emb[:, 1]), seed=1).indices)


def test_anchor_subsets(items, probes):
    by_irt = anchor_subset(20, items, seed=42)
    check(by_irt, 20, 600, "anchor")
    assert np.array_equal(by_irt.indices, anchor_subset(20, items, seed=42).indices)
    by_answers = anchor_subset(20, responses=probes, features="correctness")
    check(by_answers, 20, 600, "anchor")
    grouped = anchor_subset(20, items, groups=GROUPS)
    check(grouped, 20, 600, "anchor")
    assert np.bincount(GROUPS[grouped.indices]).tolist() == [13, 5, 2]
    with pytest.raises(ValueError):
        anchor_subset(5)


def test_serialisation(probes):
    s = entropy_subset(probes, 10, seed=5)
    back = Subset.from_dict(s.to_dict())
    assert np.array_equal(back.indices, s.indices) and np.array_equal(back.weights, s.weights)
    with pytest.raises(ValueError):
        Subset(np.array([1, 1]), np.array([0.5, 0.5]), "random")


def test_fitness_subsets_are_stratified_by_item_kind():
    """A job's fixed subsets take each item kind (multiple choice, generation per match rule) in
    proportion to its share of the benchmark, weighted so the weighted mean is the mean over all items."""
    from data.benchmarks import from_items
    from fitness.evaluate import Responses
    from fitness.fitness import fit_benchmark
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    rows = ([{"id": f"g{i}", "prompt": "p", "answer": "a"} for i in range(140)]
            + [{"id": f"n{i}", "prompt": "p", "answer": "1", "match": "number"} for i in range(20)]
            + [{"id": f"m{i}", "prompt": "p", "choices": ["a", "b"], "answer": 0} for i in range(40)])
    bench = from_items("mixed", rows)
    kinds = np.array([it.kind for it in bench.items])
    assert sorted(set(kinds)) == ["choice", "generation:exact", "generation:number"]
    rng = np.random.default_rng(0)
    answers = [Responses(bench.ids, (rng.random(200) < 0.5).astype(np.uint8), np.ones(200, int), [""] * 200)
               for _ in range(6)]
    evaluation = EvaluationSpec(irt={"epochs": 20})
    for strategy in ("random", "balanced", "anchor", "entropy"):
        spec = ObjectiveSpec(benchmark="mixed.jsonl", subset={"strategy": strategy, "size": 10, "seed": 3})
        sub = fit_benchmark(bench, [spec], evaluation, answers[:3], answers[3:]).subset
        taken = {k: int((kinds[sub.indices] == k).sum()) for k in set(kinds)}
        assert taken == {"generation:exact": 7, "generation:number": 1, "choice": 2}, strategy
        for k, n in taken.items():
            assert sub.weights[kinds[sub.indices] == k].sum() == pytest.approx((kinds == k).mean())


@pytest.mark.parametrize("call,words", [
    (lambda: random_subset(-5, 1), "n_items must be a positive integer"),
    (lambda: random_subset(100, 2.5), "k must be an integer"),
    (lambda: random_subset(100, 5, seed=None), "seed must be a non-negative integer"),
    (lambda: random_subset(100, 5, seed=-1), "seed must be a non-negative integer"),
    (lambda: entropy_subset(np.zeros((3, 10)), 2, seed=1.5), "seed must be a non-negative integer"),
])
def test_bad_subset_arguments_are_named(call, words):
    """A subset is deterministic for its seed: no seedless (differing every run) or malformed draws."""
    with pytest.raises(ValueError, match=words):
        call()
