"""LoRA adapters as task vectors: the merged folder equals peft's merge_and_unload()."""
import pytest
import torch
from factories import save, state_dict, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from merging import merge
from merging.adapters import LoraAdapter


def make_adapter(model, path, **cfg):
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
    pm.save_pretrained(path)
    return pm


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"],
         modules_to_save=["lm_head"]),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2},
         alpha_pattern={"up_proj": 6}),
])
def test_llama_adapter_equals_merge_and_unload(tmp_path, cfg):
    base = save(tiny_llama(), tmp_path / "base")
    pm = make_adapter(tiny_llama(), tmp_path / "lora", **cfg)
    want = {k: v for k, v in pm.merge_and_unload().state_dict().items()}
    out = merge({"base": base, "models": [{"name": "lora", "path": tmp_path / "lora"}],
                 "method": "task_arithmetic", "device": "cpu"}, tmp_path / "merged", progress=False)
    got = state_dict(out)
    assert set(got) == set(want)
    changed = 0
    base_sd = state_dict(base)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
        changed += not torch.equal(got[k], base_sd[k])
    assert changed >= 4  # the adapter really changed the model


def test_fan_in_fan_out_gpt2(tmp_path):
    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()

    base = save(gpt2(), tmp_path / "base")
    pm = make_adapter(gpt2(), tmp_path / "lora", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True)
    want = pm.merge_and_unload().state_dict()
    out = merge({"base": base, "models": [{"name": "lora", "path": tmp_path / "lora"}],
                 "method": "task_arithmetic", "device": "cpu"}, tmp_path / "merged", progress=False)
    got = state_dict(out)
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_adapter_targets_and_zero_elsewhere(tmp_path):
    make_adapter(tiny_llama(), tmp_path / "lora", r=2, lora_alpha=2, target_modules=["k_proj"])
    a = LoraAdapter(tmp_path / "lora")
    assert a.targets() == [f"model.layers.{i}.self_attn.k_proj.weight" for i in range(2)]
    base = torch.randn(32, 32)
    assert torch.equal(a.delta("model.layers.0.mlp.up_proj.weight", base), torch.zeros(32, 32))


@pytest.mark.parametrize("edit,words", [
    (lambda text: text.replace('"r": 2', '"r": 0'), "r must be a positive integer, got 0"),
    (lambda text: text.replace('"lora_alpha": 2', '"lora_alpha": "x"'), "lora_alpha must be a finite number"),
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: text.replace('"r": 2', '"r": true'), "r must be a positive integer, got True"),
    (lambda text: text.replace('"alpha_pattern": {}', '"alpha_pattern": {"k_proj": "x"}'), "gives model.layers.0.self_attn.k_proj alpha 'x'"),
    (lambda text: text.replace('"rank_pattern": {}', '"rank_pattern": {"k_proj(": 2}'), "is not a regular expression"),
    (lambda text: text.replace('"rank_pattern": {}', '"rank_pattern": {"k_proj": 0}'), "rank 0, not a positive integer"),
])
def test_broken_adapter_configs_are_named(tmp_path, edit, words):
    from core.errors import CheckpointError

    make_adapter(tiny_llama(), tmp_path / "lora", r=2, lora_alpha=2, target_modules=["k_proj"])
    cfg = tmp_path / "lora" / "adapter_config.json"
    text = cfg.read_text()
    assert edit(text) != text  # the case really breaks the config
    cfg.write_text(edit(text))
    with pytest.raises(CheckpointError) as e:
        LoraAdapter(tmp_path / "lora")
    assert str(e.value).startswith(str(cfg)) and words in str(e.value)


def test_integral_float_rank_is_a_rank(tmp_path):
    make_adapter(tiny_llama(), tmp_path / "lora", r=2, lora_alpha=2, target_modules=["k_proj"])
    ref = LoraAdapter(tmp_path / "lora")
    cfg = tmp_path / "lora" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 2', '"r": 2.0'))
    base = torch.randn(32, 32)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(LoraAdapter(tmp_path / "lora").delta(name, base), ref.delta(name, base))
