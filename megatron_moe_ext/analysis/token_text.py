"""Token ids as text, and token classes, for the readouts (logit lens, probes).

A checkpoint's tokenizer comes from its Megatron arguments: ``NullTokenizer`` runs (the embedded demo and every
byte-level corpus of ``training/data.py``) use byte ids 0..255 plus an end-of-document id; a
``HuggingFaceTokenizer`` run whose ``--tokenizer-model`` is a local folder is read with ``transformers``. Any
other tokenizer gives no text (readouts then report ids only and say so).

Token classes (a fixed, documented partition of the vocabulary, used as probe targets): a token's text is
``whitespace`` when it is non-empty and all whitespace, ``digit`` when its non-whitespace characters are all
decimal digits, ``alpha`` when they are all letters, ``punct`` when they are all ASCII punctuation
(``string.punctuation``), and ``other`` otherwise (mixed, non-ASCII bytes, special tokens, no text).

Legend: T tokens.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TOKEN_CLASSES: tuple[str, ...] = ("whitespace", "digit", "alpha", "punct", "other")
_PUNCT = frozenset(string.punctuation)


def token_class(text: str | None) -> int:
    """Index into TOKEN_CLASSES of one token's text (see the module docstring)."""
    if not text:
        return TOKEN_CLASSES.index("other")
    core = "".join(ch for ch in text if not ch.isspace())
    if not core:
        return TOKEN_CLASSES.index("whitespace")
    if all(ch in "0123456789" for ch in core):
        return TOKEN_CLASSES.index("digit")
    if all(ch.isalpha() for ch in core):
        return TOKEN_CLASSES.index("alpha")
    if all(ch in _PUNCT for ch in core):
        return TOKEN_CLASSES.index("punct")
    return TOKEN_CLASSES.index("other")


def byte_token_text(token_id: int, eod_id: int | None) -> str | None:
    """The text of a byte-level token: the ASCII character of ids < 128, ``<eod>`` for the end-of-document id,
    None for the other byte values (one byte of a multi-byte UTF-8 character has no text of its own)."""
    if eod_id is not None and token_id == eod_id:
        return "<eod>"
    if 0 <= token_id < 128:
        return chr(token_id)
    return None


def token_decoder(model_args: Any) -> Callable[[int], str | None] | None:
    """id -> text for the checkpoint's tokenizer (see the module docstring), or None when it has no text."""
    if model_args is None:
        return None
    kind = getattr(model_args, "tokenizer_type", None)
    if kind == "NullTokenizer":
        from megatron_moe_ext.checkpoint.hf_tokenizer import eos_token_id

        eod = eos_token_id(model_args)
        return lambda i: byte_token_text(int(i), eod)
    folder = getattr(model_args, "tokenizer_model", None)
    if kind == "HuggingFaceTokenizer" and folder and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        return lambda i: tok.decode([int(i)])
    return None


def texts(ids: Sequence[int] | np.ndarray, decode: Callable[[int], str | None] | None) -> list[str | None]:
    """The text of each id (None everywhere without a decoder)."""
    return [decode(int(i)) if decode is not None else None for i in np.asarray(ids).reshape(-1)]


def class_table(vocab_size: int, decode: Callable[[int], str | None]) -> np.ndarray:
    """class_V (int64): the token class of every id below ``vocab_size``."""
    return np.array([token_class(decode(i)) for i in range(vocab_size)], dtype=np.int64)
