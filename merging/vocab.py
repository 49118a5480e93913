"""Models whose vocabularies differ from the base's (added tokens, padded embedding matrices),
found before anything is written, and the two ways to merge them (mergekit's `tokenizer_source`):

- `tokenizer: base`: the output keeps the base's tokenizer and shapes. Each embedding / LM-head
  row of a base token is merged over the models that have that token; a model without it
  contributes nothing there (its task vector's row is 0), and rows past the base's tokens (the
  base's padding) stay the base's.
- `tokenizer: union`: the output's tokens are the base's, then every model's tokens the base
  lacks (in the order of the models, then of their ids), written as an extended tokenizer. Base
  tokens merge as with `base`; a new token's row is the weighted mean of the rows of the models
  that have it (the method's weights, renormalized over those models), whatever the method.

Token ids are compared, not remapped: fine-tunes of one base keep its ids and add tokens after
them, so a model whose tokenizer holds another token at an id both vocabularies use is refused,
naming the model, the id and both tokens. Vocabulary tensors are the input embeddings and the LM
head (`VOCAB_TENSOR`) whose first dimension is the vocabulary.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.errors import CheckpointError

VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|word_embeddings|lm_head|embed_out)\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokens_of(folder: str | Path) -> tuple[list[str], set[str]] | None:
    """(id -> token for every id of the folder's tokenizer, its special tokens), or None without one."""
    files = [Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()]
    if not files:
        return None
    return _tokens(str(Path(folder).resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=32)
def _tokens(folder: str, stamp: tuple) -> tuple[list[str], set[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.convert_ids_to_tokens(list(range(len(tok)))), set(tok.all_special_tokens)


@dataclass
class Vocabularies:
    """The base's and each full model's vocabulary, as the merge sees them."""

    base_tokens: list[str]
    base_rows: int
    rows: list[int | None]  # embedding rows per model (None: an adapter, which keeps the base's)
    tokens: list[list[str] | None]  # per model (None: no tokenizer files: the base's ids, as far as its rows go)
    special: list[set[str]] = field(default_factory=list)

    def differ(self) -> bool:
        return any(r is not None and r != self.base_rows for r in self.rows) or any(
            t is not None and len(t) != len(self.base_tokens) for t in self.tokens)

    def new_tokens(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """Tokens the base lacks: (token, [(model, its id)]), in model order then id order."""
        out: dict[str, list[tuple[int, int]]] = {}
        known = set(self.base_tokens)
        for i, toks in enumerate(self.tokens):
            for j in range(len(self.base_tokens), len(toks or [])):
                if toks[j] not in known:
                    out.setdefault(toks[j], []).append((i, j))
        return list(out.items())


def read_vocabularies(base: str | Path, base_rows: int, models: Sequence[tuple[str | Path, int | None]]) -> Vocabularies:
    """Every vocabulary, checked to agree on the ids both sides have (CheckpointError naming the
    model, the id and both tokens)."""
    base_vocab = tokens_of(base)
    base_tokens = base_vocab[0] if base_vocab else None
    tokens, special = [], []
    for i, (path, rows) in enumerate(models):
        mine = tokens_of(path) if rows is not None else None
        if mine is not None and base_tokens is not None:
            for j in range(min(len(base_tokens), len(mine[0]))):
                if mine[0][j] != base_tokens[j]:
                    raise CheckpointError(f"models[{i}] ({path}): its tokenizer has {mine[0][j]!r} at id {j}, the "
                                          f"base's has {base_tokens[j]!r}: a fine-tune must keep the base's token ids",
                                          field=f"models[{i}].path")
        tokens.append(mine[0] if mine else None)
        special.append(mine[1] if mine else set())
    if base_tokens is None:  # no tokenizer files: ids are rows
        base_tokens = [str(j) for j in range(base_rows)]
    return Vocabularies(base_tokens, base_rows, [r for _, r in models], tokens, special)


def row_map(v: Vocabularies, i: int, out_rows: int) -> torch.Tensor:
    """For every output row, model i's row holding the same base token, or -1 (contributes 0)."""
    n_model = v.rows[i]
    known = len(v.tokens[i]) if v.tokens[i] is not None else n_model
    shared = min(len(v.base_tokens), known, n_model)
    idx = torch.full((out_rows,), -1, dtype=torch.long)
    idx[:shared] = torch.arange(shared)
    return idx


def gather_rows(t: torch.Tensor, idx: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """model rows minus base rows at the mapped rows, 0 where the map says -1."""
    out = torch.zeros_like(base)
    keep = idx >= 0
    out[keep] = t[idx[keep]].to(base.dtype) - base[keep]
    return out


class UnionVocab:
    """What `tokenizer: union` adds: the new tokens' rows and the extended tokenizer."""

    def __init__(self, v: Vocabularies):
        self.v = v
        self.new = v.new_tokens()
        for token, holders in self.new:
            for i, _ in holders:
                if v.tokens[i] is None:
                    raise CheckpointError(f"models[{i}]: tokenizer union needs its tokenizer files", field=f"models[{i}].path")
        self.out_rows = max(v.base_rows, len(v.base_tokens) + len(self.new))
        self.names: set[str] = set()  # the vocabulary tensors (set by the engine)

    def extend_base(self, name: str, base: torch.Tensor, readers, weights: Sequence[float]) -> torch.Tensor:
        """The base tensor with the union's rows: new tokens' rows are the weighted mean of the rows
        of the models that have them."""
        out = torch.zeros((self.out_rows, *base.shape[1:]), dtype=base.dtype, device=base.device)
        out[:base.shape[0]] = base
        start = len(self.v.base_tokens)
        models: dict[int, torch.Tensor] = {}
        for k, (_, holders) in enumerate(self.new):
            total = sum(weights[i] for i, _ in holders)
            if abs(total) < 1e-12:
                raise CheckpointError(f"{name}: the models holding token {self.new[k][0]!r} have weights summing to 0")
            row = torch.zeros_like(out[0])
            for i, j in holders:
                if i not in models:
                    models[i] = readers[i].get(name, base.device)
                row += (weights[i] / total) * models[i][j].to(base.dtype)
            out[start + k] = row
        return out

    def write_files(self, base: str | Path, folder: Path) -> None:
        """The output's tokenizer (`write_tokenizer`) and config (`vocab_size`: the new rows)."""
        import json

        self.write_tokenizer(base, folder)
        config = folder / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            cfg["vocab_size"] = self.out_rows
            config.write_text(json.dumps(cfg, indent=2) + "\n")

    def write_tokenizer(self, base: str | Path, folder: Path) -> None:
        """The base's tokenizer with the new tokens added (special where a model marks them so)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        for token, holders in self.new:
            special = any(token in self.v.special[i] for i, _ in holders)
            tok.add_tokens([token], special_tokens=special)
        if len(tok) != len(self.v.base_tokens) + len(self.new):
            raise CheckpointError(f"{base}: its tokenizer did not take the {len(self.new)} new tokens as new ids")
        tok.save_pretrained(folder)


def vocab_tensors(infos) -> dict[str, int]:
    """The base's vocabulary tensors and their rows."""
    return {n: i.shape[0] for n, i in infos.items() if VOCAB_TENSOR.search(n) and len(i.shape) == 2}


def vocabularies(base: str | Path, infos, sources, paths) -> tuple[list[str], Vocabularies | None]:
    """The base's vocabulary tensors, and every vocabulary (`read_vocabularies`: checked to agree
    on shared ids) when some model's differs from the base's, else None."""
    names = vocab_tensors(infos)
    if not names:
        return [], None
    first = next(iter(names))
    rows = [src.reader.info(first).shape[0] if hasattr(src, "reader") and first in src.reader else None
            for src in sources]
    v = read_vocabularies(base, names[first], list(zip(paths, rows)))
    return list(names), v if v.differ() else None


def align(base: str | Path, infos, sources, paths, tokenizer: str | None) -> Vocabularies | None:
    """Checks the models' vocabularies against the base's (`vocabularies`) and, with a
    `tokenizer` mode, sets each full model's row maps (`ModelSource.rows`); returns the
    vocabularies when they differ (None when every model has the base's)."""
    names, v = vocabularies(base, infos, sources, paths)
    if v is None:
        return None
    if tokenizer is None:
        i = next(k for k, r in enumerate(v.rows) if (r is not None and r != v.base_rows) or
                 (v.tokens[k] is not None and len(v.tokens[k]) != len(v.base_tokens)))
        size = len(v.tokens[i]) if v.tokens[i] is not None else v.rows[i]
        raise CheckpointError(f"models[{i}] ({paths[i]}): its vocabulary ({size} tokens, {v.rows[i]} embedding rows) "
                              f"differs from the base's ({len(v.base_tokens)} tokens, {v.base_rows} rows); set "
                              "tokenizer: base (keep the base's) or union (add the models' tokens)",
                              field=f"models[{i}].path")
    out_rows = UnionVocab(v).out_rows if tokenizer == "union" else v.base_rows
    for i, src in enumerate(sources):
        if v.rows[i] is not None:
            src.rows = {n: row_map(v, i, out_rows) for n in names}
    return v

