"""A non-Llama architecture (GPT-NeoX: fused query_key_value, embed_out renamed by transformers
5, LayerNorm biases) end to end through the CLI and the REST API: a merge from a spec file, an
evolve job by a worker whose downloaded knee equals the same merge."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from factories import perturbed, save, state_dict
from test_service_evolve import BENCH, Workers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from service.cli import main
from service.client import Client
from service.config import Settings
from service.serve import BackgroundServer
from zoo.tokenizer import build_tokenizer

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("neox")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    save(GPTNeoXForCausalLM(cfg).eval(), root / "base")
    build_tokenizer().save_pretrained(root / "base")
    perturbed(root / "base", root / "a", seed=1, scale=0.05)
    perturbed(root / "base", root / "b", seed=2, scale=0.05)
    return root


def test_gpt_neox_through_the_cli_and_the_api(neox, tmp_path):
    merge_spec = {"kind": "merge", "base": str(neox / "base"), "method": "ties", "device": "cpu",
                  "models": [{"name": "a", "path": str(neox / "a")}, {"name": "b", "path": str(neox / "b")}]}
    evolve_spec = {"kind": "evolve", "base": "base", "models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
                   "method": "ties", "device": "cpu", "final_check": False,
                   "objectives": [{"benchmark": "arith", "estimator": "subset_mean",
                                   "subset": {"size": 4, "strategy": "random"}}],
                   "evaluation": {"max_new_tokens": 3, "irt": {"probes": 0}},
                   "search": {"algorithm": "nsga2", "population": 4, "generations": 2,
                              "granularity": "per_block", "blocks": 2}}
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(neox,), poll_seconds=0.2)
    workers = Workers(settings)
    with BackgroundServer(settings) as url, Client(url) as client:
        client.upload_benchmark("arith", BENCH.encode())
        workers.start()
        try:
            job = client.submit(evolve_spec)
            assert client.wait(job["id"])["status"] == "succeeded"
            front = client.front(job["id"])
            knee = next(c for c in front["candidates"] if c["id"] == front["knee"])
            folder = client.download(job["id"], knee["id"], tmp_path / "knee")
        finally:
            workers.stop()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "gpt_neox"
    # the knee's two blocks as the CLI's merge of the same parameters, block by block
    downloaded = state_dict(Path(folder))
    for block, params in enumerate(knee["params"]):
        spec_file = tmp_path / f"b{block}.yml"
        spec_file.write_text(yaml.safe_dump({**merge_spec, "params": params}))
        assert main(["merge", str(spec_file), "--out", str(tmp_path / f"b{block}"), "--quiet"]) == 0
        merged = state_dict(tmp_path / f"b{block}")
        layer = f"gpt_neox.layers.{block}."
        for name in (n for n in merged if n.startswith(layer)):
            assert torch.equal(downloaded[name], merged[name]), name
    assert json.loads((Path(folder) / "config.json").read_text())["model_type"] == "gpt_neox"
