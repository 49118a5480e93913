"""Runs a causal LM on benchmark items and records, per item, right/wrong and output length.

Two kinds of items (see `data.benchmarks`):

- multiple choice: each choice is scored by the sum of the log-probabilities of its
  tokens given the prompt (`mc_norm="sum"`), or that sum divided by the choice's token
  count (`mc_norm="mean"`, which does not favour short choices); the prediction is the
  argmax (first on ties);
- generation: greedy decoding for at most `max_new_tokens`, stopping at eos or at the
  first stop string (the output is cut before it), then the item's match rule.

Many items share one forward pass: sequences are left-padded, with position ids counted
from each row's first real token, so a row's result does not depend on its batch mates
(up to float rounding). Left padding also puts every choice at the end of its row, so
only the last few positions' logits are computed (`logits_to_keep`): the vocabulary-sized
logits of long prompts are never built.

`evaluate_folder` adds a response cache on disk keyed by the model folder's content
hash, the benchmark's content hash and the evaluation settings: the endpoint models
of a search are evaluated on the full benchmarks once per machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core.cache import cache_dir as evomerge_cache_dir
from core.cache import register_section, touch
from core.devices import DTYPES, resolve_device
from core.fs import atomic_file
from core.hashing import content_hash
from data.benchmarks import Benchmark, Item, is_correct

register_section("responses")

CACHE_VERSION = 2  # 2: the number match rule changed (thousands groups, hyphens, fractions)


@dataclass(frozen=True)
class EvalSettings:
    """What decides an evaluation's results (and so its cache key), apart from model and items."""

    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    mc_norm: str = "sum"  # "sum" or "mean" (length-normalized)
    dtype: str = "float32"  # used when evaluate_folder loads a model

    def __post_init__(self):
        if self.mc_norm not in ("sum", "mean"):
            raise ValueError(f"mc_norm must be 'sum' or 'mean', got {self.mc_norm!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class Responses:
    """One model's responses to one benchmark, in the benchmark's item order.

    `correct` is 0/1 per item; `output_tokens` is the number of tokens generated before
    eos or a stop string (for multiple choice: the chosen choice's token count);
    `outputs` holds the generated text, or the chosen index as a string.
    """

    item_ids: list[str]
    correct: np.ndarray
    output_tokens: np.ndarray
    outputs: list[str]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    @property
    def mean_output_tokens(self) -> float:
        return float(self.output_tokens.mean()) if len(self.output_tokens) else float("nan")

    def split(self, sizes: Sequence[int]) -> list["Responses"]:
        """Consecutive parts of the given sizes: one evaluation of several item lists, back apart."""
        if sum(sizes) != len(self.correct):
            raise ValueError(f"sizes add up to {sum(sizes)}, not {len(self.correct)} responses")
        bounds = np.cumsum([0, *sizes])
        return [Responses(self.item_ids[a:b], self.correct[a:b], self.output_tokens[a:b], self.outputs[a:b])
                for a, b in zip(bounds[:-1], bounds[1:])]

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write of an .npz file."""
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, item_ids=np.array(self.item_ids, dtype=str), correct=self.correct,
                     output_tokens=self.output_tokens, outputs=np.array(self.outputs, dtype=str))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Responses":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(s) for s in z["item_ids"]], z["correct"], z["output_tokens"], [str(s) for s in z["outputs"]])


def response_matrix(responses: Sequence[Responses]) -> np.ndarray:
    """Stacks several models' responses to the same items into a models x items 0/1 matrix."""
    ids = responses[0].item_ids
    if any(r.item_ids != ids for r in responses):
        raise ValueError("responses are to different items")
    return np.stack([r.correct for r in responses]).astype(np.uint8)


# --- batching primitives -------------------------------------------------------------

def _pad(rows: Sequence[Sequence[int]], pad_id: int, device, left: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows padded to one width (on the left for prompts, on the right for continuations):
    ids, attention mask and position ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _cache_arg(out) -> dict:
    """The KV cache of a forward pass's output, as the keyword the next pass takes it by."""
    key = "cache" if "cache" in out else "past_key_values"
    return {key: out[key]}


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def _forward(model, keep: int, **inputs):
    """`model(**inputs)` computing logits for the last `keep` positions only, where the model supports it."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:  # transformers < 4.50 or a model without the argument: full logits, same values
        out = model(**inputs)
        out.logits = out.logits[:, -keep:]
        return out


def _encode(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=special)["input_ids"]
    if special and any(len(x) == 0 for x in ids):  # nothing to condition on (no bos, empty prompt)
        raise ValueError("a prompt encodes to no tokens; give it some text or use a tokenizer that adds bos")
    return ids


def _item_batches(order: Sequence[int], sizes: Sequence[int], rows: int) -> list[list[int]]:
    """Consecutive items of `order` grouped so that a group's sizes add up to at most `rows` (one item at least)."""
    out: list[list[int]] = []
    used = rows
    for i in order:
        if used + sizes[i] > rows:
            out.append([])
            used = 0
        out[-1].append(i)
        used += sizes[i]
    return out


@torch.inference_mode()
def choice_scores(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  *, batch_size: int = 64, device="cpu", ids: Sequence[str] | None = None
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per item, the summed log-probability of each choice given its prompt, and each choice's token count.

    The prompt is shared by the item's choices, so it runs once: a batch of prompts (left padded)
    fills the KV cache and gives the log-probabilities of every first choice token; the cache is
    then repeated once per choice and the choices' tokens (right padded, after the prompt) are
    scored in a second pass. A batch holds at most `batch_size` choice rows. Same values as
    scoring each prompt + choice sequence on its own, up to float rounding, at about half the
    tokens when choices are as long as prompts (far fewer when prompts are longer). `ids` name the
    items in errors (an item whose choices encode alike is refused).
    """
    prompt_ids = _encode(tokenizer, prompts, special=True)
    flat = [c for cs in choices for c in cs]
    flat_ids = _encode(tokenizer, flat, special=False)
    if any(len(c) == 0 for c in flat_ids):
        raise ValueError("a choice encodes to no tokens")
    starts = np.cumsum([0] + [len(cs) for cs in choices])
    choice_ids = [flat_ids[starts[i]:starts[i + 1]] for i in range(len(choices))]
    for i, cs in enumerate(choice_ids):  # text-distinct choices the tokenizer maps alike (<unk>) always tie
        first = {}
        for j, c in enumerate(cs):
            if first.setdefault(tuple(c), j) != j:
                raise ValueError(f"item {ids[i] if ids else i}: choices {first[tuple(c)]} and {j} encode to the same "
                                 "tokens for this tokenizer, so they cannot be told apart")
    scores = np.zeros(len(flat), dtype=np.float64)
    order = sorted((i for i in range(len(prompts)) if choices[i]), key=lambda i: -len(prompt_ids[i]))
    pad = _pad_id(tokenizer)
    for batch in _item_batches(order, [len(cs) for cs in choices], batch_size):
        ids, mask, pos = _pad([prompt_ids[i] for i in batch], pad, device)
        out = _forward(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [items, vocab]: the first choice token
        owner = [j for j, i in enumerate(batch) for _ in choice_ids[i]]
        cids, cmask, _ = _pad([c for i in batch for c in choice_ids[i]], pad, device, left=False)
        width = cids.shape[1]
        idx = torch.tensor(owner, device=device)
        logp0 = first[idx].gather(-1, cids[:, :1]).squeeze(-1).double()
        tok_logp = None
        if width > 1:
            cache = _cache_arg(out)
            (kv,) = cache.values()
            kv.reorder_cache(idx)  # one copy of the prompt's keys and values per choice
            cpos = pos[idx, -1:] + 1 + torch.arange(width - 1, device=device)
            logits = _forward(model, width - 1, input_ids=cids[:, :-1], attention_mask=torch.cat([mask[idx], cmask[:, :-1]], 1),
                              position_ids=cpos, use_cache=True, **cache).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # position t predicts choice token t + 1
            tok_logp = logp.gather(-1, cids[:, 1:].unsqueeze(-1)).squeeze(-1).double() * cmask[:, 1:]
        total = logp0 + (tok_logp.sum(-1) if tok_logp is not None else 0.0)
        r = 0
        for i in batch:
            n = len(choice_ids[i])
            scores[starts[i]:starts[i] + n] = total[r:r + n].cpu().numpy()
            r += n
    lengths = np.array([len(c) for c in flat_ids])
    return ([scores[starts[i]:starts[i + 1]] for i in range(len(choices))],
            [lengths[starts[i]:starts[i + 1]] for i in range(len(choices))])


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, stop: Sequence[str] = ("\n",),
             batch_size: int = 64, device="cpu") -> tuple[list[str], np.ndarray]:
    """Greedy continuations of `prompts` (cut before the first stop string) and their token counts."""
    prompt_ids = _encode(tokenizer, prompts, special=True)
    eos = tokenizer.eos_token_id
    pad = _pad_id(tokenizer)
    texts: list[str] = [""] * len(prompts)
    counts = np.zeros(len(prompts), dtype=np.int64)
    order = sorted(range(len(prompts)), key=lambda r: -len(prompt_ids[r]))
    for batch in _batches(order, batch_size):
        ids, mask, pos = _pad([prompt_ids[r] for r in batch], pad, device)
        out = _forward(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for j, t in enumerate(nxt.tolist()):
                if done[j]:
                    continue
                if t == eos:
                    done[j] = True
                    continue
                generated[j].append(t)
                if stop and _cut_at_stop(tokenizer.decode(generated[j], skip_special_tokens=True), stop)[1]:
                    done[j] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
            pos = pos[:, -1:] + 1
            out = _forward(model, 1, input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos, use_cache=True,
                           **_cache_arg(out))
        for j, r in enumerate(batch):
            texts[r] = _cut_at_stop(tokenizer.decode(generated[j], skip_special_tokens=True), stop)[0]
            counts[r] = len(generated[j])
    return texts, counts


def evaluate(model, tokenizer, benchmark: Benchmark | Sequence[Item], settings: EvalSettings = EvalSettings(),
             *, batch_size: int = 64, device=None) -> Responses:
    """Evaluates an in-memory model on every item; no caching (see `evaluate_folder`).

    `device` (default: where the model's parameters are) is where the inputs go; the
    model is moved there too.
    """
    items = list(benchmark.items if isinstance(benchmark, Benchmark) else benchmark)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(device).eval()
    correct = np.zeros(len(items), dtype=np.uint8)
    n_tokens = np.zeros(len(items), dtype=np.int64)
    outputs = [""] * len(items)
    mc = [i for i, it in enumerate(items) if it.is_choice]
    gen = [i for i, it in enumerate(items) if not it.is_choice]
    if mc:
        scores, lengths = choice_scores(model, tokenizer, [items[i].prompt for i in mc],
                                        [items[i].choices for i in mc], batch_size=batch_size, device=device,
                                        ids=[items[i].id for i in mc])
        for i, s, n in zip(mc, scores, lengths):
            pick = int(np.argmax(s / n if settings.mc_norm == "mean" else s))
            outputs[i], n_tokens[i], correct[i] = str(pick), n[pick], is_correct(items[i], pick)
    if gen:
        texts, counts = generate(model, tokenizer, [items[i].prompt for i in gen], max_new_tokens=settings.max_new_tokens,
                                 stop=settings.stop, batch_size=batch_size, device=device)
        for i, t, n in zip(gen, texts, counts):
            outputs[i], n_tokens[i], correct[i] = t, n, is_correct(items[i], t)
    return Responses([it.id for it in items], correct, n_tokens, outputs)


# --- folders and the response cache ---------------------------------------------------

def model_hash(path: str | os.PathLike) -> str:
    """sha256 over a model folder's weights, configs and tokenizer files (names and bytes), remembered
    per machine; for a PEFT adapter, over the adapter and the base it is applied to."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    own = content_hash(path, ("*.safetensors", "*.json", "*.bin", "*.model"))
    base = _adapter_base(path)
    return own if base is None else hashlib.sha256(f"{own}+{model_hash(base)}".encode()).hexdigest()


def _adapter_base(path: Path) -> Path | None:
    """The base folder a PEFT adapter folder names (relative to the adapter, as the zoo writes it,
    or as given); None for a full model."""
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path") or ""
    if (path / base).is_dir():
        return path / base
    if Path(base).is_dir():
        return Path(base)
    raise FileNotFoundError(f"{cfg}: its base_model_name_or_path {base!r} is not a folder here")


def default_cache_dir() -> Path:
    return evomerge_cache_dir() / "responses"


def cache_key(model_digest: str, benchmark: Benchmark, settings: EvalSettings, device: torch.device) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": model_digest, "benchmark": benchmark.hash,
                       "settings": asdict(settings), "device": device.type}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_model(path: str | os.PathLike, dtype: str = "float32", device="auto"):
    """A model folder (full model or PEFT adapter over its base) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    device = resolve_device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base = _adapter_base(path)
        # Folding the adapter into the weights gives the same function and a plain, faster model.
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype]), path)
        model = model.merge_and_unload()
        tok_dir = path if (path / "tokenizer_config.json").exists() else base
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        tok_dir = path
    return model.to(device).eval(), AutoTokenizer.from_pretrained(tok_dir)


def cached_responses_path(model_digest: str, benchmark: Benchmark, settings: EvalSettings, device,
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `cached_responses` keeps the answers of the model named by `model_digest`."""
    return Path(cache_dir or default_cache_dir()) / f"{cache_key(model_digest, benchmark, settings, resolve_device(device))}.npz"


def cached_responses(model_digest: str, benchmark: Benchmark, settings: EvalSettings, device,
                     compute: Callable[[], Responses], cache_dir: str | os.PathLike | None = None) -> Responses:
    """The responses of the model named by `model_digest`, from the response cache or `compute()` (then cached).

    `model_digest` names the weights: a folder's content hash, or for a model that exists
    only in memory (an evolve job's probe merges) a hash of its recipe and inputs' hashes.
    """
    cache_file = cached_responses_path(model_digest, benchmark, settings, device, cache_dir)
    if cache_file.exists():
        try:
            cached = Responses.load(cache_file)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: a miss, then overwritten
            cached = None
        if cached is not None and cached.item_ids == benchmark.ids:
            touch(cache_file)
            return cached
    responses = compute()
    responses.save(cache_file)
    return responses


def evaluate_folder(path: str | os.PathLike, benchmark: Benchmark, settings: EvalSettings = EvalSettings(), *,
                    batch_size: int = 64, device="auto", cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True) -> Responses:
    """Evaluates the model in folder `path`, reading and writing the response cache.

    The cache key is (model content hash, benchmark content hash, settings, device type);
    the batch size is not part of it, since results do not depend on it (up to float rounding).
    `cache_dir` defaults to `$EVOMERGE_CACHE/responses` (or ~/.cache/evomerge/responses).
    """
    device = resolve_device(device)

    def compute() -> Responses:
        model, tokenizer = load_model(path, settings.dtype, device)
        return evaluate(model, tokenizer, benchmark, settings, batch_size=batch_size, device=device)

    if not use_cache:
        return compute()
    return cached_responses(model_hash(path), benchmark, settings, device, compute, cache_dir)
