"""The zoo's training loop: `merging.training`, re-exported under its old name.

The seeded loop (AdamW, warmup + cosine, loss on answer tokens, LoRA) lives in
`merging.training` so that ATM (`merging.atm`) can use it without `merging` importing
`zoo`; everything the zoo and its callers imported from here still imports from here.
"""
from merging.training import (  # noqa: F401
    LoraSpec,
    Pair,
    PairSource,
    _collate,
    apply_lora,
    autocast_dtype,
    encode_pair,
    lr_lambda,
    train,
)

__all__ = ["LoraSpec", "Pair", "PairSource", "apply_lora", "autocast_dtype", "encode_pair", "lr_lambda", "train"]
