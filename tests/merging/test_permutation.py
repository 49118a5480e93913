"""merging.permutation: specs, weight matching, C2M3, REPAIR, and the c2m3 / weight_matching merge methods.

Oracles: exact function invariance under the spec's permutations, exact recovery of a known
permutation, brute force over all permutations, autograd for the Frank-Wolfe gradient, and
the closed-form statistics REPAIR must produce. Digits models are trained once per machine
into .cache/permutation-digits (about 5 s on one core).
"""
import itertools
from pathlib import Path

import pytest
import torch
import yaml
from factories import tiny_llama

from core.errors import CheckpointError
from merging.permutation.archs import CNN, MLP, ResNet
from merging.permutation.c2m3 import _gradients, _line_polynomial, _objective, c2m3, merge_in_universe
from merging.permutation.repair import layer_stats, repair
from merging.permutation.spec import (
    PermutationSpec,
    check_invariance,
    identity_perms,
    inverse,
    llama_spec,
    permute_state,
    random_perms,
    spec_from_module,
)
from merging.permutation.weight_matching import cycle_error, objective, relative, weight_matching
from service.cli import main
from zoo import digits

pytestmark = pytest.mark.slow

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "permutation-digits"


@pytest.fixture(scope="session")
def mlps():
    return [digits.load_model(f) for f in digits.build_family(CACHE, "mlp", list(range(9)))]


@pytest.fixture(scope="session")
def cnns():
    return [digits.load_model(f) for f in digits.build_family(CACHE, "cnn", [0, 1, 2])]


def _randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def _llama_case(gqa: bool):
    m = tiny_llama(seed=1)
    if not gqa:  # the zoo's layout: as many kv heads as heads, tied embeddings
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(2)
        cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg).eval()
    return m, llama_spec(m.config, set(m.state_dict()))  # the tied lm_head is in state_dict(), not in files


# ------------------------------------------------------------------------------ invariance

@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "llama_gqa", "llama_tied"])
def test_spec_permutations_leave_outputs_unchanged(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model, x = MLP(64, [32, 24, 16], 10), torch.randn(7, 64)
    elif arch == "cnn":
        model, x = CNN(1, [8, 16], [0, 1], 8, 10, hidden=12), torch.randn(7, 1, 8, 8)
    elif arch == "resnet":
        model, x = _randomize_bn(ResNet(3, 8, 2, 10)), torch.randn(5, 3, 16, 16)
    else:
        model, spec = _llama_case(arch == "llama_gqa")
        x = torch.randint(0, 40, (2, 11))
    if not arch.startswith("llama"):
        spec = spec_from_module(model)
    state = model.state_dict()
    spec.validate(state)
    assert spec.sizes and all(n > 1 for n in spec.sizes.values())
    for seed in range(3):
        perms = random_perms(spec, torch.Generator().manual_seed(seed))
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
        assert check_invariance(model, spec, x, seed=seed) < 1e-5
    # the permutation really moves weights (a spec permuting nothing would pass trivially)
    moved = permute_state(spec, state, random_perms(spec, torch.Generator().manual_seed(0)))
    assert sum(not torch.equal(moved[n], state[n]) for n in spec.axes) >= len(spec.axes) // 2


def test_fx_spec_structure():
    """ResNet: a residual stage shares one group; BatchNorm follows its conv; stats too; head fixed."""
    spec = spec_from_module(ResNet(3, 8, 2, 10))
    a = spec.axes
    assert a["layer1.0.conv2.weight"][0] == a["layer1.1.conv2.weight"][0] == a["conv1.weight"][0]
    assert a["layer2.0.shortcut.0.weight"][0] == a["layer2.0.conv2.weight"][0] == a["layer2.1.conv2.weight"][0]
    assert a["layer2.0.shortcut.0.weight"][1] == a["conv1.weight"][0]
    assert a["layer1.0.bn1.running_var"] == (a["layer1.0.conv1.weight"][0],)
    assert a["linear.weight"][0] is None and a["conv1.weight"][1] is None
    assert "linear.bias" not in a
    assert spec.repair_layers == ()  # every conv feeds a BatchNorm
    # a flatten of 32 channels x 2 x 2 into a linear layer: blocks of 4 inputs per channel
    cnn = spec_from_module(CNN(1, [16, 32], [0, 1], 8, 10))
    assert cnn.block("classifier.1.weight", 1, (10, 128)) == 4
    assert cnn.repair_layers == ("features.0", "features.3")
    # an op that is not known to be equivariant fixes its inputs
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    assert spec_from_module(Odd()).sizes == {}


def test_spec_errors_name_the_parameter():
    spec = spec_from_module(MLP(8, [4], 2))
    state = MLP(8, [4], 2).state_dict()
    with pytest.raises(ValueError, match="layers.0.weight"):
        spec.validate({k: v for k, v in state.items() if k != "layers.0.weight"})
    with pytest.raises(ValueError, match="layers.1.weight axis 1"):
        spec.validate({**state, "layers.1.weight": torch.zeros(2, 5)})
    assert PermutationSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="malformed"):
        PermutationSpec.from_json({"axes": 3})


# ------------------------------------------------------------------------------ weight matching

def test_weight_matching_equals_brute_force_on_one_group():
    torch.manual_seed(0)
    a, b = MLP(6, [5], 3), MLP(6, [5], 3)
    spec = spec_from_module(a)
    (g,) = spec.sizes
    A, B = a.state_dict(), b.state_dict()
    best = max(objective(spec, A, B, {g: torch.tensor(p)}) for p in itertools.permutations(range(5)))
    assert objective(spec, A, B, weight_matching(spec, A, B)) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weight_matching_recovers_a_permuted_model(kind, mlps, cnns):
    model = (mlps if kind == "mlp" else cnns)[0]
    spec = spec_from_module(model)
    state = model.state_dict()
    shuffled = permute_state(spec, state, random_perms(spec, torch.Generator().manual_seed(11)))
    assert not torch.equal(shuffled["features.0.weight" if kind == "cnn" else "layers.0.weight"],
                           state["features.0.weight" if kind == "cnn" else "layers.0.weight"])
    back = permute_state(spec, shuffled, weight_matching(spec, state, shuffled))
    assert all(torch.equal(back[n], state[n]) for n in state)


def test_weight_matching_recovers_llama_heads_and_units():
    model, spec = _llama_case(gqa=True)
    state = model.state_dict()
    truth = random_perms(spec, torch.Generator().manual_seed(4))
    shuffled = permute_state(spec, state, truth)
    found = weight_matching(spec, state, shuffled)
    back = permute_state(spec, shuffled, found)
    assert all(torch.equal(back[n], state[n]) for n in state)
    assert all(torch.equal(found[g], inverse(truth[g])) for g in spec.sizes)


# ------------------------------------------------------------------------------ C2M3

@pytest.mark.parametrize("gqa", [True, False])
def test_c2m3_recovers_a_shuffled_llama(gqa):
    """Two models: the case where Frank-Wolfe from the authors' start alone stalls (see c2m3's docstring)."""
    model, spec = _llama_case(gqa)
    state = model.state_dict()
    truth = random_perms(spec, torch.Generator().manual_seed(4))
    shuffled = permute_state(spec, state, truth)
    res = c2m3(spec, [state, shuffled])
    rel = relative(res.perms[0], res.perms[1])  # maps the shuffled copy to the original
    assert all(torch.equal(rel[g], inverse(truth[g])) for g in spec.sizes)
    back = permute_state(spec, shuffled, rel)
    assert all(torch.equal(back[n], state[n]) for n in state)
    # the optimum: every pair of aligned copies identical, so the objective is ||W||^2
    assert res.final_objective == pytest.approx(sum(float((state[n].double() ** 2).sum()) for n in spec.axes), rel=1e-12)
    assert set(res.candidates) == {"sinkhorn", "weight_matching"}
    assert res.candidates["sinkhorn"] < res.final_objective  # the authors' start alone ends elsewhere


def test_frank_wolfe_gradient_and_line_polynomial_match_autograd():
    torch.manual_seed(0)
    spec = spec_from_module(CNN(1, [4, 6], [0, 1], 8, 3, hidden=5))
    Ws = [{n: t.double() for n, t in CNN(1, [4, 6], [0, 1], 8, 3, hidden=5).state_dict().items() if n in spec.axes}
          for _ in range(3)]
    Ss = [{g: torch.softmax(torch.randn(n, n, dtype=torch.float64), 1).requires_grad_() for g, n in spec.sizes.items()}
          for _ in range(3)]
    obj = _objective_t(spec, Ws, Ss)
    obj.backward()
    grads = _gradients(spec, Ws, [{g: s.detach() for g, s in S.items()} for S in Ss])
    for S, G in zip(Ss, grads):
        for g in S:
            torch.testing.assert_close(G[g], S[g].grad, rtol=1e-9, atol=1e-9)
    plain = [{g: s.detach() for g, s in S.items()} for S in Ss]
    Ds = [{g: torch.eye(n, dtype=torch.float64)[torch.randperm(n)] for g, n in spec.sizes.items()} for _ in range(3)]
    poly = _line_polynomial(spec, Ws, plain, Ds)
    import numpy as np

    for t in (0.0, 0.37, 1.0):
        direct = _objective(spec, Ws, [{g: S[g] + t * (D[g] - S[g]) for g in S} for S, D in zip(plain, Ds)])
        assert float(np.polyval(poly, t)) == pytest.approx(direct, rel=1e-9)


def _objective_t(spec, Ws, Ss):
    """The C2M3 objective written naively (sum over pairs), differentiable, as an oracle."""
    from merging.permutation.c2m3 import to_universe

    total = 0
    for i, j in itertools.combinations(range(len(Ws)), 2):
        for n in spec.axes:
            total = total + (to_universe(spec, Ws[i], Ss[i], n) * to_universe(spec, Ws[j], Ss[j], n)).sum()
    return total


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_c2m3_recovers_permuted_copies(kind, mlps, cnns):
    model = (mlps if kind == "mlp" else cnns)[1]
    spec = spec_from_module(model)
    state = model.state_dict()
    truths = [identity_perms(spec)] + [random_perms(spec, torch.Generator().manual_seed(s)) for s in (5, 6)]
    copies = [permute_state(spec, state, t) for t in truths]
    res = c2m3(spec, copies)
    merged = merge_in_universe(spec, copies, res.perms)
    back = permute_state(spec, merged, {g: inverse(p) for g, p in res.perms[0].items()})
    for n in state:
        torch.testing.assert_close(back[n], state[n], rtol=0, atol=1e-6)
    for i in (1, 2):  # the map from copy i to copy 0 is exactly the inverse of its shuffle
        rel = relative(res.perms[0], res.perms[i])
        assert all(torch.equal(rel[g], inverse(truths[i][g])) for g in spec.sizes)


@pytest.mark.parametrize("n_models", [3, 5])
def test_c2m3_maps_are_cycle_consistent_and_pairwise_are_not(n_models, mlps):
    models = [m.state_dict() for m in mlps[:n_models]]
    spec = spec_from_module(mlps[0])
    res = c2m3(spec, models, max_iter=20)
    for i, j, k in itertools.permutations(range(n_models), 3):
        pij, pjk, pki = (relative(res.perms[a], res.perms[b]) for a, b in ((i, j), (j, k), (k, i)))
        for g in spec.sizes:
            assert torch.equal(pki[g][pjk[g][pij[g]]], torch.arange(spec.sizes[g]))
        assert cycle_error(pij, pjk, pki) == 0
    # pairwise weight matching (independent alignments) breaks the cycle on these models
    wm = {(a, b): weight_matching(spec, models[a], models[b]) for a, b in ((0, 1), (1, 2), (2, 0))}
    assert cycle_error(wm[0, 1], wm[1, 2], wm[2, 0]) > 0.05


def test_c2m3_beats_naive_averaging_and_matches_pairwise_on_digits(mlps):
    """Three disjoint triples of independently trained MLPs (fixed seeds)."""
    spec = spec_from_module(mlps[0])
    res = {"naive": [], "wm": [], "c2m3": []}
    for tri in ((0, 1, 2), (3, 4, 5), (6, 7, 8)):
        st = [mlps[i].state_dict() for i in tri]
        wm = [identity_perms(spec)] + [weight_matching(spec, st[0], s) for s in st[1:]]
        for name, perms in (("naive", [identity_perms(spec)] * 3), ("wm", wm), ("c2m3", c2m3(spec, st).perms)):
            res[name].append(digits.evaluate(digits.model_from_state("mlp", merge_in_universe(spec, st, perms))))
    mean = {k: [sum(v[i] for v in r) / len(r) for i in (0, 1)] for k, r in res.items()}  # (loss, accuracy)
    ends = [digits.evaluate(m) for m in mlps]
    assert min(a for _, a in ends) > 0.95
    assert mean["naive"][1] < 0.6 and mean["naive"][0] > 1.0
    for k in ("wm", "c2m3"):
        assert mean[k][0] < mean["naive"][0] / 4 and mean[k][1] > mean["naive"][1] + 0.3
    # C2M3 at least as good as pairwise matching onto model 0 (the paper's Table 2 ordering)
    assert mean["c2m3"][0] <= mean["wm"][0]
    assert mean["c2m3"][1] >= mean["wm"][1]


# ------------------------------------------------------------------------------ REPAIR

def test_repair_sets_the_interpolated_statistics(mlps):
    spec = spec_from_module(mlps[0])
    st = [m.state_dict() for m in mlps[:2]]
    perms = [identity_perms(spec), weight_matching(spec, st[0], st[1])]
    xtr, _, _, _ = digits.digits_data()
    batches = [xtr[i:i + 100] for i in range(0, 400, 100)]
    ends = [digits.model_from_state("mlp", permute_state(spec, s, p)) for s, p in zip(st, perms)]
    merged = digits.model_from_state("mlp", merge_in_universe(spec, st, perms, [0.3, 0.7]))
    repair(merged, ends, spec.repair_layers, batches, [0.3, 0.7])
    got = layer_stats(merged, spec.repair_layers, batches)
    e = [layer_stats(m, spec.repair_layers, batches) for m in ends]
    for n in spec.repair_layers:
        torch.testing.assert_close(got[n][0], 0.3 * e[0][n][0] + 0.7 * e[1][n][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[n][1], 0.3 * e[0][n][1] + 0.7 * e[1][n][1], rtol=0, atol=1e-4)
    # on the unaligned average, whose hidden units collapse, REPAIR recovers much of the loss
    naive = digits.model_from_state("mlp", merge_in_universe(spec, st, [identity_perms(spec)] * 2))
    collapsed = digits.evaluate(naive)[0]
    repair(naive, [digits.model_from_state("mlp", s) for s in st], spec.repair_layers, batches)
    assert digits.evaluate(naive)[0] < 0.7 * collapsed


def test_repair_resets_batchnorm_statistics():
    torch.manual_seed(0)
    model = _randomize_bn(ResNet(3, 4, 1, 5))
    x = torch.randn(40, 3, 8, 8)
    repair(model, [model], spec_from_module(model).repair_layers, [x[:20], x[20:]])
    feats = {}
    model.conv1.register_forward_hook(lambda m, i, o: feats.setdefault("c", o))
    model(x)
    c = feats["c"].transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model.bn1.running_mean, c.mean(1), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ the merge method, end to end

def _spec_file(tmp_path, spec):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def test_cli_merges_digits_folders_with_c2m3_and_repair(tmp_path, mlps, capsys):
    folders = digits.build_family(CACHE, "mlp", [0, 1, 2])
    data = digits.write_inputs(tmp_path / "x.safetensors", 256)
    spec = {"kind": "merge", "models": [{"name": f"s{i}", "path": str(f)} for i, f in enumerate(folders)],
            "method": "c2m3", "params": {"repair": True, "data": str(data), "iterations": 60}, "device": "cpu"}
    assert main(["merge", _spec_file(tmp_path, spec), "--out", str(tmp_path / "out"), "--quiet"]) == 0, \
        capsys.readouterr().err
    merged = digits.load_model(tmp_path / "out")
    loss, acc = digits.evaluate(merged)
    assert acc > 0.9
    recipe = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("```yaml\n")[1].split("```")[0])
    assert recipe["method"] == "c2m3" and recipe["alignment"]["iterations"] <= 60
    assert all(len(m["sha256"]) == 64 for m in recipe["models"])
    # weight_matching through the Python API, weighted
    from merging import merge

    out = merge({**spec, "method": "weight_matching", "params": {"weights": [2, 1, 1]}}, tmp_path / "wm", progress=False)
    assert digits.evaluate(digits.load_model(out))[1] > 0.85


def test_cli_errors_name_the_field(tmp_path, capsys):
    folders = digits.build_family(CACHE, "mlp", [0, 1])
    models = [{"name": f"s{i}", "path": str(f)} for i, f in enumerate(folders)]

    def err(spec):
        capsys.readouterr()
        assert main(["merge", _spec_file(tmp_path, spec), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert not (tmp_path / "o").exists()
        return capsys.readouterr().err

    assert "params.data" in err({"models": models, "method": "c2m3", "params": {"repair": True}})
    assert "base: required for method ties" in err({"models": models, "method": "ties"})
    assert "params.iterations" in err({"models": models, "method": "c2m3", "params": {"iterations": 0}})
    assert "params.bogus" in err({"models": models, "method": "weight_matching", "params": {"bogus": 1}})
    other = digits.save_model(MLP(64, [8], 10), "mlp", tmp_path / "narrow")
    assert "models[1]" in err({"models": [models[0], {"name": "n", "path": str(other)}], "method": "c2m3"})
    # a config.json of fewer layers than the weights would leave the extra layers unaligned
    import json
    import shutil

    lying = tmp_path / "lying"
    shutil.copytree(folders[0], lying)
    cfg = json.loads((lying / "config.json").read_text())
    cfg["evomerge_arch"]["hidden"] = cfg["evomerge_arch"]["hidden"][:-1]
    (lying / "config.json").write_text(json.dumps(cfg))
    msg = err({"models": [{"name": "l", "path": str(lying)}, models[1]], "method": "weight_matching"})
    assert "models[0]" in msg and "do not fit config.json" in msg
    (tmp_path / "empty.json").write_text(json.dumps({"axes": {}, "sizes": {}}))
    assert "permutes nothing" in err({"models": models, "method": "c2m3", "params": {"spec": str(tmp_path / "empty.json")}})
    bad_inputs = tmp_path / "x5.safetensors"
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(32, 5)}, str(bad_inputs))
    assert "params.data" in err({"models": models, "method": "c2m3", "params": {"repair": True, "data": str(bad_inputs)}})
    assert "params.weights[0]: must be a finite number" in err(
        {"models": models, "method": "weight_matching", "params": {"weights": [float("nan"), 1.0]}})


def test_merge_aligns_independent_llamas(tmp_path):
    """Two tiny Llamas from different seeds (and a shuffled copy) through merging.merge."""
    from factories import save, state_dict
    from transformers import LlamaForCausalLM

    from merging import merge
    from merging.checkpoint import write_checkpoint

    a, b = save(tiny_llama(seed=1), tmp_path / "a"), save(tiny_llama(seed=2), tmp_path / "b")
    sa = state_dict(a)
    spec = llama_spec(tiny_llama().config, set(sa))
    shuffled = permute_state(spec, sa, random_perms(spec, torch.Generator().manual_seed(0)))
    c = write_checkpoint(tmp_path / "c", shuffled, side_files_from=a)
    out = merge({"models": [{"name": "a", "path": str(a)}, {"name": "c", "path": str(c)}], "method": "weight_matching",
                 "device": "cpu"}, tmp_path / "ac", progress=False)
    back = state_dict(out)  # a and its shuffled copy align exactly: the merge computes what a computes
    x = torch.randint(0, 40, (2, 9))
    ref = LlamaForCausalLM.from_pretrained(a).eval()
    got = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, ref(x).logits, rtol=0, atol=1e-4)
    assert set(back) == set(sa)
    out_c = merge({"models": [{"name": "a", "path": str(a)}, {"name": "c", "path": str(c)}], "method": "c2m3",
                   "device": "cpu"}, tmp_path / "ac_c2m3", progress=False)
    with torch.no_grad():  # C2M3 recovers the shuffle too (in the universe's unit order: compare functions)
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(out_c).eval()(x).logits, ref(x).logits,
                                   rtol=0, atol=1e-4)
    out2 = merge({"models": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}, {"name": "c", "path": str(c)}],
                  "method": "c2m3", "params": {"iterations": 20}}, tmp_path / "ab", progress=False)
    assert LlamaForCausalLM.from_pretrained(out2)(x).logits.isfinite().all()
    with pytest.raises(CheckpointError, match="output folder exists"):
        merge({"models": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}],
               "method": "c2m3"}, tmp_path / "ab", progress=False)


def test_llama_family_members_differ(tmp_path):
    from zoo.family import build_llama_family

    fs = build_llama_family(tmp_path, seeds=(0, 1), steps=2)
    from factories import state_dict

    a, b = state_dict(fs[0]), state_dict(fs[1])
    assert set(a) == set(b) and not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert build_llama_family(tmp_path, seeds=(0,), steps=2) == fs[:1]  # reused


LLAMA_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "permutation-llama-family"


def test_c2m3_and_repair_merge_pretrained_llamas(tmp_path, tiny_zoo):
    """Three independently initialized tiny Llamas (zoo/family.py, 30 pretraining steps each,
    cached) merged with c2m3 + REPAIR on a JSONL benchmark through merging.merge; the oracle
    for REPAIR is the per-unit std of the repaired layers, measured here with forward hooks on
    the written model and on the aligned endpoints (Llama's MLP projections have no bias, so
    REPAIR can only rescale: the std is matched, the mean is scaled with it)."""
    from factories import state_dict
    from transformers import LlamaForCausalLM

    from merging import merge
    from merging.permutation.merge import repair_batches
    from zoo.family import build_llama_family

    folders = build_llama_family(LLAMA_CACHE, seeds=(0, 1, 2), steps=30)
    data = tiny_zoo / "benchmarks" / "rev.jsonl"
    params = {"repair": True, "data": str(data), "repair_examples": 32, "batch_size": 16, "iterations": 5,
              "init": "weight_matching"}  # one Frank-Wolfe run (auto runs two), few iterations: test time
    spec = {"models": [{"name": f"s{i}", "path": str(f)} for i, f in enumerate(folders)], "method": "c2m3",
            "params": params, "device": "cpu"}
    out = merge(spec, tmp_path / "merged", progress=False)
    recipe = yaml.safe_load((out / "README.md").read_text().split("```yaml\n")[1].split("```")[0])
    assert recipe["alignment"]["repair"]["layers"] == 4  # gate_proj and up_proj of 2 layers
    assert recipe["alignment"]["iterations"] <= 5 and recipe["alignment"]["init"] == "weight_matching"

    # the same alignment again (deterministic), to rebuild the aligned endpoints
    states = [state_dict(f) for f in folders]
    pspec = llama_spec(LlamaForCausalLM.from_pretrained(folders[0]).config, set(states[0]))
    res = c2m3(pspec, states, max_iter=5, init="weight_matching")
    assert res.final_objective == pytest.approx(recipe["alignment"]["objective"], rel=1e-9)
    batches = repair_batches(str(data), 32, 16, folders[0], "cpu")

    def model(state):
        m = LlamaForCausalLM.from_pretrained(folders[0]).eval()
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"} and m.config.tie_word_embeddings
        m.tie_weights()
        return m

    def stds(m):
        rows = {n: [] for n in pspec.repair_layers}
        mods = dict(m.named_modules())
        mask = {}
        hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n: rows[n].append(o[mask["m"].bool()].double()))
                 for n in pspec.repair_layers]
        with torch.no_grad():
            for b in batches:
                mask["m"] = b["attention_mask"]
                m(**b)
        for h in hooks:
            h.remove()
        return {n: torch.cat(r).std(0, unbiased=False) for n, r in rows.items()}

    ends = [stds(model(permute_state(pspec, s, p))) for s, p in zip(states, res.perms)]
    got = stds(LlamaForCausalLM.from_pretrained(out).eval())
    plain = stds(model(merge_in_universe(pspec, states, res.perms)))
    for n in pspec.repair_layers:
        goal = sum(e[n] for e in ends) / 3
        torch.testing.assert_close(got[n], goal, rtol=1e-4, atol=1e-5)
        assert float((plain[n] - goal).abs().max()) > 1e-2  # REPAIR changed something real
    with torch.no_grad():
        assert LlamaForCausalLM.from_pretrained(out)(**batches[0]).logits.isfinite().all()


def test_cli_methods_lists_the_whole_model_methods(capsys):
    from merging.methods import METHODS, methods

    assert main(["methods"]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    for name, m in METHODS.items():
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        assert m.summary in line and "params:" in line
    assert set(methods("model")) == {"c2m3", "weight_matching"} and set(methods("training")) == {"atm"}
    assert "ties" in methods("tensor")
    (c2m3_line,) = [ln for ln in lines if ln.split()[:1] == ["c2m3"]]
    assert "Frank-Wolfe" in c2m3_line and "init" in c2m3_line and "repair" in c2m3_line
    (atm_line,) = [ln for ln in lines if ln.split()[:1] == ["atm"]]
    assert "iterations" in atm_line and "combine" in atm_line
