"""A character-level tokenizer that Hugging Face loads offline.

Every zoo model shares one tokenizer: one token per character of a small fixed alphabet
plus `<pad>`, `<bos>`, `<eos>`, `<unk>`. It is built with the `tokenizers` library and
wrapped in `PreTrainedTokenizerFast`, so `save_pretrained` writes a `tokenizer.json`
that `AutoTokenizer.from_pretrained(folder)` reads back without any hub access.
Encoding with special tokens prepends `<bos>`; the answer of a training pair ends
with `<eos>`, which is where greedy generation stops.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET = string.ascii_lowercase + string.digits + ":=+-*,|# \n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo tokenizer; token ids are fixed (specials 0-3, then `ALPHABET` in order)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character (newline included), so WordLevel maps each to its id.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
