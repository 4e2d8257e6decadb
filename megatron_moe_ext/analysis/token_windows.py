"""The tokens an analysis runs a model on: data sources cut into fixed-length windows, with labels.

Each ``--data`` source (a Megatron indexed-dataset prefix, or a raw text file tokenised byte-level exactly as
``train`` does) is read in order, its documents concatenated (each ends with its end-of-document token when the
dataset stores one), and cut into windows of the model's sequence length; a partial last window is dropped.
Tokens are shared evenly between the sources so that each contributes the same number of windows (when it has
them). The label of a token is, by default, the index of the source it came from (``label_names`` are the
sources' names): so ``--data web.txt code.txt`` asks "do experts specialise by domain?". A per-token label file
replaces that.

Legend: W windows, S sequence length.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """tokens_WS (int64), the document index of each token (documents numbered across all sources), its
    label_WS (int64) and the names of the labels."""

    tokens_WS: np.ndarray
    documents_WS: np.ndarray
    labels_WS: np.ndarray
    label_names: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_WS.size)

    def save(self, path: str) -> None:
        np.savez(path, tokens_WS=self.tokens_WS, documents_WS=self.documents_WS, labels_WS=self.labels_WS,
                 label_names=np.array(self.label_names))

    @classmethod
    def load(cls, path: str) -> TokenWindows:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["tokens_WS"], f["documents_WS"], f["labels_WS"], tuple(str(x) for x in f["label_names"]))


def _source_tokens(prefix: str, budget: int, first_document: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``budget`` tokens of an indexed dataset, in order, with their (global) document index."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    doc_bounds = dataset.document_indices  # sequence index where each document starts (plus the end)
    tokens, docs, have = [], [], 0
    for d in range(len(doc_bounds) - 1):
        for s in range(doc_bounds[d], doc_bounds[d + 1]):
            seq = np.asarray(dataset[s], dtype=np.int64)[: budget - have]
            tokens.append(seq)
            docs.append(np.full(seq.shape, first_document + d, dtype=np.int64))
            have += seq.size
            if have >= budget:
                break
        if have >= budget:
            break
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(tokens), np.concatenate(docs)


# Default analysis data: four standard-library packages, one label each (a "domain" per package), so that the
# specialisation report has something to find on any machine, offline.
DEFAULT_PACKAGES: tuple[str, ...] = ("asyncio", "email", "json", "logging")


def default_sources(cache_dir: str, packages: Sequence[str] = DEFAULT_PACKAGES) -> tuple[list[str], list[str]]:
    """(dataset prefixes, names): each package's sources tokenised byte-level as one dataset."""
    from megatron_moe_ext.training.data import build_text_dataset, stdlib_package_files

    return [build_text_dataset(stdlib_package_files(p), cache_dir) for p in packages], [f"stdlib {p}" for p in packages]


def load_token_windows(sources: Sequence[str], *, seq_length: int, max_tokens: int, cache_dir: str,
                       labels_file: str | None = None, names: Sequence[str] | None = None) -> TokenWindows:
    """Windows of ``seq_length`` tokens from ``sources`` (at most ``max_tokens`` in all); ``names`` name the
    sources (default: their file names). ValueError naming the problem for a missing source, too little data, or
    a label file whose length does not match."""
    from megatron_moe_ext.training.data import resolve_data_paths

    if not sources:
        raise ValueError("no --data given; fix: pass one or more dataset prefixes or text files")
    if seq_length < 1 or max_tokens < seq_length:
        raise ValueError(f"--max-tokens {max_tokens} is below one window of {seq_length} tokens (the model's "
                         f"sequence length); fix: --max-tokens {seq_length} or more")
    prefixes = resolve_data_paths(list(sources), cache_dir)
    per_source = (max_tokens // len(prefixes)) // seq_length * seq_length
    if per_source < seq_length:
        raise ValueError(f"--max-tokens {max_tokens} gives {len(prefixes)} sources less than one window of "
                         f"{seq_length} tokens each; fix: --max-tokens {seq_length * len(prefixes)} or more")
    tokens_WS, docs_WS, labels_WS = [], [], []
    first_doc = 0
    for label, prefix in enumerate(prefixes):
        toks, docs = _source_tokens(prefix, per_source, first_doc)
        windows = toks.size // seq_length
        if windows == 0:
            raise ValueError(f"data source {sources[label]!r} has {toks.size} tokens, less than one window of "
                             f"{seq_length}; fix: give it more text, or drop it")
        n = windows * seq_length
        tokens_WS.append(toks[:n].reshape(windows, seq_length))
        docs_WS.append(docs[:n].reshape(windows, seq_length))
        labels_WS.append(np.full((windows, seq_length), label, dtype=np.int64))
        first_doc = int(docs.max()) + 1
    tokens = np.concatenate(tokens_WS)
    names = tuple(names) if names is not None else tuple(os.path.basename(s.rstrip("/")) for s in sources)
    labels = np.concatenate(labels_WS)
    if labels_file is not None:
        per_token = read_labels_file(labels_file)
        if per_token.size != tokens.size:
            raise ValueError(f"label file {labels_file!r} has {per_token.size} labels but the analysed data has "
                             f"{tokens.size} tokens ({tokens.shape[0]} windows of {seq_length}); fix: one label per "
                             f"analysed token, or --max-tokens {per_token.size} if the data has that many")
        labels = per_token.reshape(tokens.shape)
        names = tuple(str(v) for v in range(int(labels.max()) + 1))
    return TokenWindows(tokens, np.concatenate(docs_WS), labels, names)


def read_labels_file(path: str) -> np.ndarray:
    """Per-token integer labels from ``.npy`` or a text file (one integer per line, or whitespace-separated)."""
    if not os.path.isfile(path):
        raise ValueError(f"label file {path!r} does not exist")
    if path.endswith(".npy"):
        labels = np.load(path, allow_pickle=False).reshape(-1)
    else:
        try:
            with open(path) as f:
                labels = np.array(f.read().split(), dtype=np.int64)
        except ValueError as err:
            raise ValueError(f"label file {path!r}: {err}; fix: integers only (0, 1, ...)") from None
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"label file {path!r}: labels must be integers >= 0")
    return labels.astype(np.int64)
