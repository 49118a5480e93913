"""Tiny transformers models written as HF folders for the tests (random weights, no download)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merging.checkpoint import write_checkpoint
from zoo.tokenizer import build_tokenizer


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 40, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save(model, path: Path, max_shard_size="2GB") -> Path:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def perturbed(base_dir: Path, out: Path, seed: int, scale: float = 0.02, max_shard_size="2GB") -> Path:
    """A 'fine-tune': the base plus seeded Gaussian noise on every floating tensor."""
    from merging.checkpoint import CheckpointReader

    r = CheckpointReader(base_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in r.names():
        t = r.get(n)
        tensors[n] = t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
    return write_checkpoint(out, tensors, max_shard_size=max_shard_size, side_files_from=base_dir)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from merging.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return {n: r.get(n) for n in r.names()}


def family(root: Path) -> Path:
    """A base and two 'fine-tunes' of it (math, ja) in one folder; returns the folder."""
    base = save(tiny_llama(), root / "base")
    perturbed(base, root / "math", seed=1)
    perturbed(base, root / "ja", seed=2)
    return root


# `python -c SLOW_WORKER DELAY ARGS...`: service.worker with every merged tensor delayed by DELAY
# seconds, so that a test can catch a worker mid-job.
SLOW_WORKER = """
import sys, time
import merging.engine as engine
delay = float(sys.argv[1])
if delay:
    fast = engine.merged_tensors
    def slow(*args, **kwargs):
        for item in fast(*args, **kwargs):
            time.sleep(delay)
            yield item
    engine.merged_tensors = slow
from service.worker import main
sys.exit(main(sys.argv[2:]))
"""


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", every: float = 0.1):
    """The first truthy value of `predicate()`, polled every `every` seconds; fails past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not met within {timeout:.0f} s")


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_added_tokens(base: Path, out: Path, seed: int, added: list[str], rows: int) -> Path:
    """The base perturbed, with `added` tokens in its tokenizer and its vocabulary tensors grown
    (new rows random: the added tokens' and, past them, padding)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in state_dict(base).items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = torch.randn((rows - tensors[n].shape[0], tensors[n].shape[1]), generator=g)
        tensors[n] = torch.cat([tensors[n], extra])
    write_checkpoint(out, tensors, side_files_from=base)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}))
    tok = build_tokenizer()
    tok.add_tokens(added)
    tok.save_pretrained(out)
    return out
