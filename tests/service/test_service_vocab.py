"""Vocabularies that differ, through the REST API: refused at submission naming the model and the
remedy, merged as `tokenizer: union` by a worker, the new tokens in the downloaded checkpoint."""
from pathlib import Path

import httpx
import pytest
from factories import save, tiny_llama, with_added_tokens
from test_service_evolve import Workers
from transformers import AutoTokenizer

from service.client import Client
from service.config import Settings
from service.serve import BackgroundServer
from zoo.tokenizer import build_tokenizer

pytestmark = pytest.mark.service


def test_a_padded_vocabulary_through_the_api(tmp_path):
    root = tmp_path / "models"
    save(tiny_llama(vocab=50), root / "base")
    build_tokenizer().save_pretrained(root / "base")
    with_added_tokens(root / "base", root / "a", 1, ["<im_start>"], rows=56)
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(root,), poll_seconds=0.2)
    workers = Workers(settings)
    spec = {"kind": "merge", "base": "base", "models": [{"name": "a", "path": "a"}], "method": "task_arithmetic",
            "device": "cpu"}
    with BackgroundServer(settings) as url, Client(url) as client:
        r = httpx.post(f"{url}/v1/jobs", json=spec)
        assert r.status_code == 400 and r.json()["field"] == "models[0].path", r.text
        assert "tokenizer: base" in r.json()["detail"] and "51 tokens, 56 embedding rows" in r.json()["detail"]
        workers.start()
        try:
            job = client.submit(spec | {"tokenizer": "union"})
            assert client.wait(job["id"])["status"] == "succeeded"
            folder = client.download(job["id"], 0, tmp_path / "out")
        finally:
            workers.stop()
    tok = AutoTokenizer.from_pretrained(Path(folder))
    assert len(tok) == 51 and tok.convert_tokens_to_ids("<im_start>") == 50
