"""Architecture coverage (issue 26): merge, LoRA inputs, evaluate and evolve on Llama, Mistral,
Qwen2, Qwen3, Gemma2, Gemma3 (text), Phi-3 and GPT-NeoX.

Each architecture is a tiny random model built here from its transformers config (no hub):
2 layers, hidden 32, vocab 64 (the zoo's character tokenizer has 51 tokens), saved with
`save_pretrained` next to that tokenizer, and two "fine-tunes" made by adding seeded noise to
every floating tensor. Every result is checked against an oracle computed in the test from the
input tensors or from another library, never against stored numbers:

- per-tensor merges: closed forms (linear, task arithmetic), a brute-force TIES and TSV-M
  written from the papers, DARE's documented mask structure (every entry is one of the
  drop/rescale outcomes, masks shared by dare_linear and dare_ties for one seed);
- LoRA inputs: peft's own `merge_and_unload()` of the same adapter;
- evaluation: choice log-likelihoods and greedy decoding recomputed one unpadded sequence at a
  time, without a KV cache;
- per-block genomes: the layer each tensor belongs to, read from the transformers module tree;
- the memory plan: the KV cache a real forward pass allocates;
- evolve (slow): the exported knee equals `merging.merge` with the knee's parameters bit for bit,
  and scores its final-check objectives;
- permutation methods: a function-preserving merge of a model with a shuffled copy where the
  architecture is supported (Llama), a refusal naming the architecture elsewhere.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import perturbed
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from merging import merge

COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0}
LLAMA_LIKE_LORA = ("q_proj", "v_proj", "down_proj", "embed_tokens")


@dataclass(frozen=True)
class Arch:
    name: str
    config_cls: type
    extra: dict
    lora_targets: tuple[str, ...]
    sliding: bool = False  # a sliding window shorter than the test's sequences

    def config(self):
        return self.config_cls(**COMMON, **self.extra)


GQA = {"num_key_value_heads": 2, "head_dim": 8}
SLIDING = {**GQA, "sliding_window": 6}
ARCHS = {a.name: a for a in [
    Arch("llama", LlamaConfig, GQA, LLAMA_LIKE_LORA),
    Arch("mistral", MistralConfig, SLIDING, LLAMA_LIKE_LORA, sliding=True),
    Arch("qwen2", Qwen2Config, {"num_key_value_heads": 2}, LLAMA_LIKE_LORA),
    Arch("qwen3", Qwen3Config, GQA, LLAMA_LIKE_LORA),
    Arch("gemma2", Gemma2Config, SLIDING, LLAMA_LIKE_LORA, sliding=True),
    Arch("gemma3_text", Gemma3TextConfig, SLIDING, LLAMA_LIKE_LORA, sliding=True),
    Arch("phi3", Phi3Config, {"num_key_value_heads": 2}, ("qkv_proj", "gate_up_proj", "o_proj")),
    Arch("gpt_neox", GPTNeoXConfig, {}, ("query_key_value", "dense_4h_to_h", "embed_in")),
]}
# Architectures whose config.json the permutation methods derive a spec from (merging/permutation/merge.py).
PERMUTATION_SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class Family:
    arch: Arch
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def a(self) -> Path:
        return self.root / "a"

    @property
    def b(self) -> Path:
        return self.root / "b"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with safetensors itself (not the product's reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory) -> Family:
    """A tiny random base of the architecture (with the char tokenizer) and two perturbed copies."""
    from zoo.tokenizer import build_tokenizer

    arch = ARCHS[request.param]
    root = tmp_path_factory.mktemp("family")  # not named after the architecture: errors must name it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch.config()).eval()
    assert model.config.model_type == arch.name
    model.save_pretrained(root / "base", safe_serialization=True)
    tok = build_tokenizer()
    assert len(tok) <= COMMON["vocab_size"]
    tok.save_pretrained(root / "base")
    perturbed(root / "base", root / "a", seed=1, scale=0.01)
    perturbed(root / "base", root / "b", seed=2, scale=0.01)
    fam = Family(arch, root)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)  # each architecture's own default
    return fam


def merged(fam: Family, tmp_path: Path, method: str, params: dict, models=None, tag: str = "") -> dict[str, torch.Tensor]:
    """`merging.merge` of the family's fine-tunes (or `models`) onto its base; checks that the output
    loads with AutoModelForCausalLM, with no missing or unexpected tensor, keeps the base's names,
    shapes and dtypes, and is finite. Returns the loaded model's state dict."""
    models = models or [fam.a, fam.b]
    spec = {"base": str(fam.base), "models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(models)],
            "method": method, "params": params, "device": "cpu"}
    out = merge(spec, tmp_path / f"{method}{tag}", progress=False)
    base, got = tensors(fam.base), tensors(out)
    assert {n: (t.shape, t.dtype) for n, t in got.items()} == {n: (t.shape, t.dtype) for n, t in base.items()}
    assert all(torch.isfinite(t).all() for t in got.values())
    assert loaded_tensors(out, tmp_path / f"{method}{tag}-resaved") == got.keys()
    return got


def loaded_tensors(folder: Path, resave: Path) -> set[str]:
    """Loads `folder` with AutoModelForCausalLM (no missing, unexpected or mismatched tensor), saves it
    again with save_pretrained and checks that the tensors come back bit for bit: transformers read
    what was written (its in-memory names may differ, e.g. GPT-NeoX's embed_out is lm_head)."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.save_pretrained(resave, safe_serialization=True)
    written, again = tensors(folder), tensors(resave)
    assert again.keys() == written.keys()
    for n in written:
        assert torch.equal(again[n], written[n]), n
    return set(written)


def inputs(fam: Family):
    """float64 copies of the base's and the fine-tunes' tensors, for the references."""
    base, a, b = tensors(fam.base), tensors(fam.a), tensors(fam.b)
    return {n: base[n].double() for n in base}, {n: a[n].double() for n in base}, {n: b[n].double() for n in base}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6, rtol: float = 1e-6):
    assert set(got) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(got[n].double(), w, atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# 1. per-tensor merges
# ---------------------------------------------------------------------------------------------

def test_linear_and_task_arithmetic_equal_their_closed_forms(family, tmp_path):
    base, a, b = inputs(family)
    got = merged(family, tmp_path, "linear", {"weights": [0.3, 0.9]})
    assert_close(got, {n: (0.3 * a[n] + 0.9 * b[n]) / 1.2 for n in base})
    got = merged(family, tmp_path, "task_arithmetic", {"weights": [0.5, 0.8], "lambda": 0.7})
    assert_close(got, {n: base[n] + 0.7 * (0.5 * (a[n] - base[n]) + 0.8 * (b[n] - base[n])) for n in base})


def ties_reference(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023, Algorithm 1) for equal weights, written out entry by entry in
    vectorized form: keep each task vector's top-k magnitudes, elect the sign of the sum
    (0 counts as +), average the kept entries that agree with it (0 where none does)."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.topk(d.abs().reshape(-1), k).indices] = True
        trimmed.append(torch.where(keep.reshape(d.shape), d, torch.zeros_like(d)))
    gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0).double()
    agree = [(t != 0) & (torch.sign(t) == gamma) for t in trimmed]
    num = sum(torch.where(m, t, torch.zeros_like(t)) for m, t in zip(agree, trimmed))
    den = sum(m.double() for m in agree)
    return num / den.clamp(min=1)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_equals_a_brute_force_ties(family, tmp_path, density):
    base, a, b = inputs(family)
    got = merged(family, tmp_path, "ties", {"density": density, "lambda": 0.9})
    want = {n: base[n] + 0.9 * ties_reference([a[n] - base[n], b[n] - base[n]], density) for n in base}
    assert_close(got, want)
    if density == 1.0:  # two models: equal signs average, opposite signs keep the larger magnitude
        for n in base:
            d1, d2 = a[n] - base[n], b[n] - base[n]
            closed = torch.where(d1 * d2 > 0, (d1 + d2) / 2, torch.where(d1.abs() >= d2.abs(), d1, d2))
            torch.testing.assert_close(got[n].double(), base[n] + 0.9 * closed, atol=1e-6, rtol=1e-6)
    else:  # the update is zero off the union of the kept supports, and nonzero somewhere in each tensor
        for n in base:
            upd = got[n].double() - base[n]
            k = int(density * upd.numel())
            assert (upd != 0).sum() <= 2 * k and (k == 0 or (upd.abs() > 1e-9).any()), n


def test_dare_entries_are_drop_and_rescale_outcomes(family, tmp_path):
    """density 0.5, weights 1, lambda 1: every entry of dare_linear's update is 2 (m1 d1 + m2 d2) for
    some masks m_i in {0, 1}; with the same seed dare_ties draws the same masks, so its entry is
    TIES' disjoint mean of (2 m1 d1, 2 m2 d2) for masks consistent with dare_linear's. Masks keep
    half the entries, independently per model; density 1 is task arithmetic / plain TIES."""
    base, a, b = inputs(family)
    p = {"density": 0.5, "seed": 7}
    lin = merged(family, tmp_path, "dare_linear", p)
    tie = merged(family, tmp_path, "dare_ties", p)
    again = merged(family, tmp_path, "dare_linear", p, tag="again")
    other = merged(family, tmp_path, "dare_linear", {**p, "seed": 8}, tag="seed8")
    assert all(torch.equal(lin[n], again[n]) for n in base)  # reproducible masks
    assert any(not torch.equal(lin[n], other[n]) for n in base)  # the seed matters
    kept, both, total = np.zeros(2), 0, 0
    for n in base:
        d1, d2 = (a[n] - base[n]).reshape(-1), (b[n] - base[n]).reshape(-1)
        u_lin, u_ties = lin[n].double().reshape(-1) - base[n].reshape(-1), tie[n].double().reshape(-1) - base[n].reshape(-1)
        tol = 1e-6 + 1e-6 * base[n].abs().reshape(-1)
        consistent, ties_ok = [], []
        for m1, m2 in itertools.product((0, 1), repeat=2):
            t1, t2 = 2 * m1 * d1, 2 * m2 * d2
            consistent.append((u_lin - (t1 + t2)).abs() <= tol)
            ties_ok.append((u_ties - ties_reference([t1, t2], 1.0)).abs() <= tol)
        consistent, ties_ok = torch.stack(consistent), torch.stack(ties_ok)
        assert consistent.any(0).all(), f"{n}: a dare_linear entry is no drop-and-rescale outcome"
        assert (consistent & ties_ok).any(0).all(), f"{n}: a dare_ties entry does not follow dare_linear's masks"
        unique = consistent.sum(0) == 1
        combo = consistent.int().argmax(0)[unique]  # 0: none kept, 1: m2, 2: m1, 3: both
        kept += [(combo >= 2).sum().item(), (combo % 2 == 1).sum().item()]
        both += (combo == 3).sum().item()
        total += int(unique.sum())
    assert total > 0.99 * sum(t.numel() for t in base.values())
    sd = math.sqrt(0.25 / total)
    assert np.all(np.abs(kept / total - 0.5) < 5 * sd), kept / total
    assert abs(both / total - 0.25) < 5 * math.sqrt(0.25 * 0.75 / total)  # independent masks
    full = merged(family, tmp_path, "dare_linear", {"density": 1.0}, tag="d1")
    assert_close(full, {n: a[n] + b[n] - base[n] for n in base})
    full = merged(family, tmp_path, "dare_ties", {"density": 1.0}, tag="d1")
    assert_close(full, {n: base[n] + ties_reference([a[n] - base[n], b[n] - base[n]], 1.0) for n in base})


def input_embedding_name(folder: Path) -> str:
    """The checkpoint name of the token embedding table, asked of transformers."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    emb = model.get_input_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is emb)


def tsv_reference(deltas: list[np.ndarray]) -> np.ndarray:
    """TSV-M (Gargiulo et al. 2025) for one matrix, equal weights, alpha 1, in float64: the top
    k = min(m, n) // T singular triplets of each task vector, the stacked U and V replaced by their
    nearest orthonormal matrices (polar factors), U_perp diag(S) V_perp^T."""
    k = max(1, min(deltas[0].shape) // len(deltas))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)

    def polar(x):
        p, _, qh = np.linalg.svd(x, full_matrices=False)
        return p @ qh

    return polar(u) @ np.diag(s) @ polar(v).T


def test_tsv_equals_a_float64_reference(family, tmp_path):
    """Matrices: TSV-M; the token embedding table (a lookup, not a linear map), norms and biases:
    the mean of the task vectors."""
    base, a, b = inputs(family)
    got = merged(family, tmp_path, "tsv", {"alpha": 0.8})
    emb = input_embedding_name(family.base)
    assert emb in base
    for n in base:
        d = [(a[n] - base[n]).numpy(), (b[n] - base[n]).numpy()]
        upd = tsv_reference(d) if base[n].dim() == 2 and n != emb else (d[0] + d[1]) / 2
        want = base[n] + 0.8 * torch.from_numpy(upd)
        scale = float(np.abs(upd).max())
        torch.testing.assert_close(got[n].double(), want, atol=3e-5 * scale + 1e-7, rtol=1e-5,  # float32 SVDs
                                   msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# 2. LoRA adapters
# ---------------------------------------------------------------------------------------------

def test_lora_adapter_equals_peft_merge_and_unload(family, tmp_path):
    """A PEFT LoRA adapter on the architecture's own module names, random nonzero factors: merged
    with task_arithmetic (weight 1, lambda 1) it equals peft's merge_and_unload(); mixed half and
    half with a full fine-tune it equals the mean of the two task vectors."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(family.base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=list(family.arch.lora_targets)))
    g = torch.Generator().manual_seed(3)
    n_factors = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                n_factors += 1
    modules = [n for n, _ in AutoModelForCausalLM.from_pretrained(family.base).named_modules()]
    assert n_factors == 2 * sum(n.split(".")[-1] in family.arch.lora_targets for n in modules)  # A and B per target
    pm.save_pretrained(tmp_path / "lora")
    base = {n: t.double() for n, t in tensors(family.base).items()}
    pm.merge_and_unload().save_pretrained(tmp_path / "peft-merged", safe_serialization=True)
    want = {n: t.double() for n, t in tensors(tmp_path / "peft-merged").items()}
    got = merged(family, tmp_path, "task_arithmetic", {"weights": [1.0], "lambda": 1.0}, models=[tmp_path / "lora"])
    assert_close(got, want, atol=1e-6)
    changed = {n for n in base if not torch.equal(got[n].double(), base[n])}
    for target in family.arch.lora_targets:  # every target module really changed
        assert any(re.search(rf"(^|\.){target}\.weight$", n) for n in changed), target
    ft = {n: t.double() for n, t in tensors(family.a).items()}
    mix = merged(family, tmp_path, "task_arithmetic", {"weights": [0.5, 0.5]}, models=[tmp_path / "lora", family.a],
                 tag="mix")
    assert_close(mix, {n: base[n] + 0.5 * (want[n] - base[n]) + 0.5 * (ft[n] - base[n]) for n in base})


# ---------------------------------------------------------------------------------------------
# 3. evaluation
# ---------------------------------------------------------------------------------------------

PROMPTS = ["a", "12+3=", "hello world:", "x", "abc,def|ghi#", "7*8=", "the cat sat on", "q:"]
CHOICES = [["yes", "no"], ["1", "15", "2"], ["a b", "c"], ["z", "zz"]]


@torch.no_grad()
def brute_choice_scores(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """sum_t log p(choice token t | prompt, earlier choice tokens), one full sequence per choice."""
    p = tok(prompt)["input_ids"]
    scores = []
    for c in choices:
        cid = tok(c, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([p + cid])).logits[0].double(), -1)
        scores.append(float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(cid))))
    return scores


@torch.no_grad()
def brute_generate(model, tok, prompt: str, max_new: int) -> str:
    """Greedy decoding, the whole sequence recomputed at every step (no cache, no padding)."""
    ids, gen = tok(prompt)["input_ids"], []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        gen.append(nxt)
        if "\n" in tok.decode(gen, skip_special_tokens=True):
            break
    return tok.decode(gen, skip_special_tokens=True).split("\n")[0]


def test_evaluate_matches_brute_force(family, tmp_path):
    """`evaluate_folder` (left-padded batches, KV-cached choices and decoding) against unpadded,
    uncached recomputation: the same chosen answers, generated texts, accuracy, and (through
    `choice_scores`) the same log-likelihoods. Sequences outrun the sliding windows where the
    architecture has one."""
    from data.benchmarks import load_benchmark
    from fitness.evaluate import EvalSettings, choice_scores, evaluate_folder

    model = AutoModelForCausalLM.from_pretrained(family.base).eval()
    tok = AutoTokenizer.from_pretrained(family.base)
    max_new = 6
    mc = [(f"c{i}", p, CHOICES[i % len(CHOICES)]) for i, p in enumerate(PROMPTS)]
    want_scores = [brute_choice_scores(model, tok, p, cs) for _, p, cs in mc]
    picks = [int(np.argmax(s)) for s in want_scores]
    texts = [brute_generate(model, tok, p, max_new) for p in PROMPTS]
    rows = [{"id": i, "prompt": p, "choices": cs, "answer": pick if k % 2 == 0 else (pick + 1) % len(cs)}
            for k, ((i, p, cs), pick) in enumerate(zip(mc, picks))]
    rows += [{"id": f"g{k}", "prompt": p, "answer": f"^{re.escape(t)}$", "match": "regex"}
             for k, (p, t) in enumerate(zip(PROMPTS, texts))]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = load_benchmark(path)

    got = evaluate_folder(family.base, bench, EvalSettings(max_new_tokens=max_new), device="cpu", use_cache=False)
    n_mc = len(mc)
    assert got.outputs[:n_mc] == [str(p) for p in picks]
    assert got.outputs[n_mc:] == texts
    expected_correct = [k % 2 == 0 for k in range(n_mc)] + [True] * len(texts)
    assert got.correct.tolist() == [int(c) for c in expected_correct]
    assert got.accuracy == pytest.approx(np.mean(expected_correct))
    lengths = [len(tok(cs[p], add_special_tokens=False)["input_ids"]) for (_, _, cs), p in zip(mc, picks)]
    assert got.output_tokens[:n_mc].tolist() == lengths
    assert any(len(tok(p)["input_ids"]) + max_new > 6 for p in PROMPTS)  # past a sliding window of 6

    scores, _ = choice_scores(model, tok, [p for _, p, _ in mc], [cs for _, _, cs in mc], device="cpu")
    for s, w in zip(scores, want_scores):
        np.testing.assert_allclose(s, w, atol=2e-4, rtol=1e-4)
    again = evaluate_folder(family.base, bench, EvalSettings(max_new_tokens=max_new), device="cpu",
                            cache_dir=tmp_path / "cache")
    cached = evaluate_folder(family.base, bench, EvalSettings(max_new_tokens=max_new), device="cpu",
                             cache_dir=tmp_path / "cache")
    assert again.outputs == cached.outputs == got.outputs


# ---------------------------------------------------------------------------------------------
# 4. evolve: per-block genomes, the memory plan, a whole job (slow)
# ---------------------------------------------------------------------------------------------

def test_per_block_genome_assigns_tensors_by_layer(family):
    """`evolve.genome.block_of` against the module tree: a decoder layer's tensors go to its layer's
    block, the token embeddings to the first block, the final norm and an untied LM head to the last
    (the rule evolve/genome.py states)."""
    from evolve.genome import block_of

    config = AutoConfig.from_pretrained(family.base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_layers = config.num_hidden_layers
    stacks = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    assert len(stacks) == 1, stacks
    emb = input_embedding_name(family.base)
    names = list(tensors(family.base))
    for n_blocks in (2, n_layers):
        for name in names:
            m = re.match(rf"{re.escape(stacks[0])}\.(\d+)\.", name)
            want = (min(n_blocks - 1, int(m.group(1)) * n_blocks // n_layers) if m else 0 if name == emb
                    else n_blocks - 1)
            assert block_of(name, n_layers, n_blocks) == want, (name, n_blocks)


def test_memory_plan_covers_the_real_kv_cache(family, tmp_path):
    """The plan's KV-cache bytes for its batch and sequence length are at least what a forward pass
    of that shape caches, and exactly that for full attention (from config.json alone: layers,
    key/value heads, head_dim)."""
    from evolve.plan import plan_job
    from evolve.spec import EvolveSpec

    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": "1"}) + "\n" for i, p in enumerate(PROMPTS)))
    spec = EvolveSpec.model_validate({
        "base": str(family.base), "models": [{"name": "a", "path": str(family.a)}, {"name": "b", "path": str(family.b)}],
        "method": "task_arithmetic", "device": "cpu", "objectives": [{"benchmark": str(bench)}],
        "evaluation": {"max_new_tokens": 4, "batch_size": 3, "irt": {"probes": 0}}})
    plan = plan_job(spec, host_memory=math.inf)
    assert plan.fits and plan.batch_size == 3
    planned = plan.component("evaluation: KV cache").bytes
    model = AutoModelForCausalLM.from_pretrained(family.base).eval()
    ids = torch.randint(4, 40, (plan.batch_size, plan.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    actual = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert planned >= actual
    if not family.arch.sliding:
        assert planned == actual


def evolve_spec(fam: Family, bench: Path) -> dict:
    objective = {"benchmark": str(bench), "estimator": "subset_mean", "subset": {"size": 4, "strategy": "random"}}
    return {"kind": "evolve", "base": str(fam.base),
            "models": [{"name": "a", "path": str(fam.a)}, {"name": "b", "path": str(fam.b)}],
            "method": "ties", "device": "cpu", "final_check": True,
            "objectives": [objective | {"metric": "accuracy"}, objective | {"metric": "mean_output_tokens"}],
            "evaluation": {"max_new_tokens": 3, "irt": {"probes": 0}},
            "search": {"algorithm": "nsga2", "population": 4, "generations": 2, "seed": 0}}


@pytest.mark.slow
def test_evolve_runs_and_exports_the_knee(family, tmp_path, monkeypatch):
    """A 2-generation TIES search to a front; the exported knee loads in transformers, equals
    `merging.merge` with the knee's parameters bit for bit, and scores the final check's objectives."""
    from data.benchmarks import load_benchmark
    from evolve import export, run
    from fitness.evaluate import EvalSettings, evaluate_folder

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    bench = tmp_path / "arith.jsonl"
    bench.write_text("".join(json.dumps(x) + "\n" for x in
                             [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "match": "number"}
                              for i in range(6)]
                             + [{"id": f"c{i}", "prompt": f"{i}=", "choices": ["a", "b"], "answer": i % 2}
                                for i in range(6)]))
    spec = evolve_spec(family, bench)
    result = run(spec, tmp_path / "run")
    assert result.complete and result.front
    assert result.cost["candidates"] == 8 and result.cost["final_checked"] >= 1
    doc = json.loads((tmp_path / "run" / "front.json").read_text())
    knee = next(c for c in doc["front"] if c["id"] == result.knee)
    assert knee["true_objectives"] is not None  # the final check measured it

    folder = export(tmp_path / "run", result.knee, tmp_path / "knee")
    assert loaded_tensors(folder, tmp_path / "knee-resaved") == set(tensors(family.base))
    assert len(knee["params"]) == 1  # global granularity: one parameter set
    ref = merge({"base": spec["base"], "models": spec["models"], "method": "ties", "params": knee["params"][0],
                 "device": "cpu"}, tmp_path / "ref", progress=False)
    got, want = tensors(folder), tensors(ref)
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    acc = evaluate_folder(folder, load_benchmark(bench), EvalSettings(max_new_tokens=3), device="cpu",
                          use_cache=False).accuracy
    assert acc == pytest.approx(knee["true_objectives"]["arith:accuracy"], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# 5. permutation methods (c2m3, weight_matching)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["c2m3", "weight_matching"])
def test_permutation_methods_support_llama_style_and_name_the_others(family, tmp_path, method):
    """Supported (Llama, Mistral, Qwen2, Qwen3): the derived spec's shuffle keeps the function, and
    merging a model with its shuffle gives the function back. Not supported: refused before any
    work, the error naming the architecture."""
    from core.errors import CheckpointError

    name = family.arch.name
    if name not in PERMUTATION_SUPPORTED:
        spec = {"models": [{"name": "a", "path": str(family.a)}, {"name": "b", "path": str(family.b)}],
                "method": method, "device": "cpu"}
        with pytest.raises(CheckpointError) as e:
            merge(spec, tmp_path / "out", progress=False)
        message = str(e.value).replace(str(family.root), "<root>")
        assert name in message and "llama" in message.lower(), message
        assert not (tmp_path / "out").exists()
        return
    from merging.checkpoint import write_checkpoint
    from merging.permutation.merge import resolve_spec
    from merging.permutation.spec import permute_state, random_perms

    state = tensors(family.a)
    pspec = resolve_spec(family.a, set(state), None)  # the spec the merge derives
    shuffled = permute_state(pspec, state, random_perms(pspec, torch.Generator().manual_seed(5)))
    assert any(not torch.equal(shuffled[n], state[n]) for n in state)
    write_checkpoint(tmp_path / "shuffled", shuffled, side_files_from=family.a)
    ids = torch.tensor([[1, 10, 20, 30, 12, 5, 40]])

    def logits(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits

    want = logits(family.a)
    torch.testing.assert_close(logits(tmp_path / "shuffled"), want, atol=1e-5, rtol=1e-4)  # the same function
    out = merge({"models": [{"name": "a", "path": str(family.a)}, {"name": "s", "path": str(tmp_path / "shuffled")}],
                 "method": method, "device": "cpu"}, tmp_path / "out", progress=False)
    torch.testing.assert_close(logits(out), want, atol=1e-5, rtol=1e-4)
