"""Models whose vocabularies differ from the base's: refused without a tokenizer mode, merged
under `tokenizer: base` and `tokenizer: union` (rows checked against references computed by hand
here), and a tokenizer that disagrees on a shared id refused naming the model and the token."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from factories import save, state_dict, tiny_llama, with_added_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.cli import main
from zoo.tokenizer import build_tokenizer

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    save(tiny_llama(vocab=50), root / "base")  # exactly the zoo tokenizer's 50 tokens
    build_tokenizer().save_pretrained(root / "base")
    with_added_tokens(root / "base", root / "a", 1, ["<a1>", "<s1>"], rows=64)  # two added tokens, padded to 64 rows
    with_added_tokens(root / "base", root / "b", 2, ["<s1>"], rows=51)
    return root


def spec(root: Path, **extra) -> dict:
    return {"kind": "merge", "base": str(root / "base"), "method": "task_arithmetic", "device": "cpu",
            "models": [{"name": "a", "path": str(root / "a")}, {"name": "b", "path": str(root / "b")}],
            "params": {"weights": [0.3, 0.6], "lambda": 1.0}, **extra}


def merge_cli(root: Path, out: Path, capsys=None, **extra) -> int:
    f = out.with_suffix(".yml")
    f.write_text(yaml.safe_dump(spec(root, **extra)))
    return main(["merge", str(f), "--out", str(out), "--quiet"])


def test_a_different_vocabulary_needs_a_tokenizer_mode(models, tmp_path, capsys):
    assert merge_cli(models, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "models[0]" in err and "52 tokens, 64 embedding rows" in err and "tokenizer: base" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_base_merges_the_shared_rows(models, tmp_path):
    assert merge_cli(models, tmp_path / "out", tokenizer="base") == 0
    base, a, b = (state_dict(models / n) for n in ("base", "a", "b"))
    out = state_dict(tmp_path / "out")
    for n in (EMB, HEAD):
        assert out[n].shape == base[n].shape  # the base's 50 rows
        want = base[n] + 0.3 * (a[n][:50] - base[n]) + 0.6 * (b[n][:50] - base[n])
        assert torch.allclose(out[n], want, atol=1e-6)
    other = next(n for n in base if n not in (EMB, HEAD))
    assert torch.allclose(out[other], base[other] + 0.3 * (a[other] - base[other]) + 0.6 * (b[other] - base[other]),
                          atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 50


def test_tokenizer_union_adds_the_models_tokens(models, tmp_path):
    assert merge_cli(models, tmp_path / "out", tokenizer="union") == 0
    base, a, b = (state_dict(models / n) for n in ("base", "a", "b"))
    out = state_dict(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 52 and tok.convert_tokens_to_ids(["<a1>", "<s1>"]) == [50, 51]
    for n in (EMB, HEAD):
        assert out[n].shape == (52, base[n].shape[1])
        shared = base[n] + 0.3 * (a[n][:50] - base[n]) + 0.6 * (b[n][:50] - base[n])
        assert torch.allclose(out[n][:50], shared, atol=1e-6)
        assert torch.allclose(out[n][50], a[n][50], atol=1e-6)  # <a1>: only a has it
        assert torch.allclose(out[n][51], (0.3 * a[n][51] + 0.6 * b[n][50]) / 0.9, atol=1e-6)  # <s1>: a's 51, b's 50
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 52
    ids = tok("<a1>ab<s1>", return_tensors="pt").input_ids
    assert 50 in ids[0] and 51 in ids[0] and model(ids).logits.shape[-1] == 52


def test_a_tokenizer_that_disagrees_on_a_shared_id_is_refused(models, tmp_path, capsys):
    bad = tmp_path / "bad"
    with_added_tokens(models / "base", bad, 3, [], rows=50)
    vocab = json.loads((bad / "tokenizer.json").read_text())
    v = vocab["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]  # the same tokens, two of them at each other's ids
    (bad / "tokenizer.json").write_text(json.dumps(vocab))
    s = spec(models, tokenizer="base")
    s["models"][1]["path"] = str(bad)
    f = tmp_path / "s.yml"
    f.write_text(yaml.safe_dump(s))
    assert main(["merge", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "models[1]" in err and "'b' at id 4, the base's has 'a'" in err and len(err.strip().splitlines()) == 1


def test_evolve_refuses_union(models):
    from evolve import EvolveSpec

    with pytest.raises(ValueError, match="tokenizer: union writes a model with a new vocabulary"):
        EvolveSpec.model_validate({**spec(models, tokenizer="union"), "kind": "evolve",
                                   "objectives": [{"benchmark": "x.jsonl"}]})
