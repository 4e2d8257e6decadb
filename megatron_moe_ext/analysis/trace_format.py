"""Routing-trace format: columnar, streamed to disk in shards, bounded memory, numpy only.

A routing trace records, for a set of tokens, which experts each MoE layer selected and with what gates, plus the
token's identity and place in the data (and, opt-in, hidden states at chosen layers). It is written by
:class:`TraceWriter` while a model runs and read back chunk by chunk by :class:`TraceReader`, so neither side
ever holds more than one chunk (``chunk_tokens`` rows) per layer in memory.

Legend: T tokens (rows) in a batch or chunk, K selections per token in a layer (``top_k``; for PEER,
heads * k per head; for routers with a variable number of experts per token, the most a token can get),
H product-key heads, D hidden size, N experts in a layer, M null experts of a layer, C chunks.

Schema (format ``megatron_moe_ext.routing_trace``, version 2; version 1 traces still read)
------------------------------------------------------------
A trace is a directory::

    DIR/schema.json                  manifest (below); rewritten atomically after every chunk
    DIR/tokens-{c:06d}.npz           token columns of chunk c
    DIR/layer{l:04d}-{c:06d}.npz     routing columns of model layer l for chunk c

Row i of chunk c is the same token in ``tokens-c`` and in every ``layer*-c`` file. Every file is a plain numpy
``.npz`` archive (``np.savez``, or ``np.savez_compressed`` with ``compress=True``) holding these arrays:

=================  ==========================  ==========================================================
file               array (shape)               dtype and meaning
=================  ==========================  ==========================================================
tokens-c           ``token_ids`` [T]           int64, vocabulary id of the token
tokens-c           ``positions`` [T]           int64, position of the token within its sequence (0-based)
tokens-c           ``sequence_ids`` [T]        int64, id of the sequence (document) the token came from
tokens-c           ``labels`` [T]              int64, user label (domain, language, ...); only when the
                                               manifest has ``"has_labels": true``
layer-l-c          ``expert_ids`` [T, K_l]     ``expert_dtype`` (int32 or int64), selected experts in
                                               [0, N_l + M_l), in the router's order (for PEER: head-major,
                                               head h owns columns [h*k, (h+1)*k)); ids N_l..N_l+M_l-1
                                               are null experts; ``-1`` (``EMPTY_SLOT``) pads a row with
                                               fewer selections than K_l (``variable`` layers only;
                                               the padding comes after the token's selections)
layer-l-c          ``gates`` [T, K_l]          ``gate_dtype`` (float16 or float32), the weight each
                                               selected expert's output got (0 on an empty slot; a null
                                               expert's gate as the router computed it, though its
                                               output is zero)
layer-l-c          ``hidden`` [T, D_l]         ``hidden_dtype``, the layer's input hidden state; only for
                                               layers whose ``hidden_size`` is not null (opt-in)
=================  ==========================  ==========================================================

``schema.json`` is a JSON object::

    {"format": "megatron_moe_ext.routing_trace", "version": 2, "created_by": "megatron_moe_ext 0.1.0",
     "complete": true,               # false while writing or after a crash: chunks listed are whole
     "compressed": false, "chunk_tokens": 65536, "has_labels": false,
     "token_dtype": "int64",
     "sample_p": 1.0, "seed": 0,     # token sampling (below)
     "byte_budget": null, "stopped_by_budget": false,
     "num_tokens_offered": 1000,     # tokens passed to append()
     "num_tokens": 1000,             # tokens kept (sum of chunk rows)
     "payload_bytes": 123456,        # sum of array nbytes written (what the budget counts)
     "layers": [{"layer": 3, "num_experts": 64, "top_k": 8, "num_heads": 1,
                 "null_experts": 2, "variable": true,    # version 2, written when used; absent = 0, false
                 "expert_dtype": "int32", "gate_dtype": "float16",
                 "hidden_size": null, "hidden_dtype": "float16"}, ...],
     "chunks": [{"index": 0, "num_tokens": 1000, "payload_bytes": 123456,
                 "tokens_file": "tokens-000000.npz",
                 "layer_files": {"3": "layer0003-000000.npz", ...}}, ...],
     "metadata": {...}}              # free-form, from the writer's caller

Guarantees
----------
* Atomic: every shard and the manifest are written to a temporary name in DIR and then ``os.replace``-d, so a
  reader never sees a half-written file, and a chunk appears in the manifest only once all its files exist.
* Bounded memory: the writer buffers at most ``chunk_tokens`` kept rows plus one ``append`` batch.
* Sampling: with ``sample_p`` < 1 the token with global index i (counting every token offered to ``append``,
  from 0) is kept iff ``u(seed, i) < sample_p``, with u a SplitMix64 hash mapped to [0, 1). Keeping depends
  only on (seed, i), never on how the stream was cut into batches, so a trace is reproducible.
* Byte budget: ``byte_budget`` caps ``payload_bytes`` (uncompressed array bytes; files add a few hundred
  bytes of header each). The chunk that would cross the budget is cut to the rows that fit, the writer stops,
  records ``"stopped_by_budget": true`` and ignores later tokens (still counting them as offered).
* Never overwrites: the writer refuses a DIR that exists and is not empty.

Version 2 (routers with variable experts per token, issue #22) adds per layer ``null_experts`` (M: ids N..N+M-1
are zero-computation experts, recorded from the router's ``last_null_selection``) and ``variable`` (rows may
hold fewer than K selections, padded with id -1 and gate 0). A version 1 trace is read as M = 0, fixed K.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np

FORMAT_NAME = "megatron_moe_ext.routing_trace"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EMPTY_SLOT = -1  # expert id of an unused slot of a variable layer (gate 0)
SCHEMA_FILE = "schema.json"

_TOKEN_DTYPE = np.dtype(np.int64)
_EXPERT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_GATE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_HIDDEN_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_TOKEN_COLUMNS = ("token_ids", "positions", "sequence_ids")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one traced MoE layer records. ``layer`` is the model's layer number (unique within a trace),
    ``top_k`` the selections per token (for PEER, heads * k per head, with ``num_heads`` = heads; for a
    ``variable`` layer the most a token can get, rows padded with ``EMPTY_SLOT``), ``null_experts`` M the
    zero-computation experts (ids ``num_experts``..``num_experts`` + M - 1), ``hidden_size`` not None opts this
    layer into recording its input hidden states."""

    layer: int
    num_experts: int
    top_k: int
    num_heads: int = 1
    hidden_size: int | None = None
    null_experts: int = 0
    variable: bool = False

    @property
    def num_outputs(self) -> int:
        """N + M: the ids a selection can take (real and null experts)."""
        return self.num_experts + self.null_experts

    def __post_init__(self) -> None:
        for name in ("layer", "num_experts", "top_k", "num_heads"):
            value = getattr(self, name)
            low = 0 if name == "layer" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LayerSpec.{name}={value!r}: expected an int >= {low}")
        if self.top_k % self.num_heads:
            raise ValueError(f"LayerSpec(layer={self.layer}): top_k={self.top_k} is not a multiple of "
                             f"num_heads={self.num_heads}; fix: top_k = heads * k per head")
        if isinstance(self.null_experts, bool) or not isinstance(self.null_experts, int) or self.null_experts < 0:
            raise ValueError(f"LayerSpec(layer={self.layer}).null_experts={self.null_experts!r}: expected an int >= 0")
        if self.top_k > self.num_outputs:
            raise ValueError(f"LayerSpec(layer={self.layer}): top_k={self.top_k} exceeds num_experts + null_experts "
                             f"= {self.num_outputs}; fix: at most one slot per expert")
        if self.hidden_size is not None and (isinstance(self.hidden_size, bool)
                                             or not isinstance(self.hidden_size, int) or self.hidden_size < 1):
            raise ValueError(f"LayerSpec(layer={self.layer}).hidden_size={self.hidden_size!r}: expected None "
                             f"(no hidden states) or an int >= 1")


@dataclasses.dataclass(frozen=True)
class LayerChunk:
    """One layer's rows of a chunk: expert_ids_TK, gates_TK and (opt-in) hidden_TD."""

    expert_ids_TK: np.ndarray
    gates_TK: np.ndarray
    hidden_TD: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class TraceChunk:
    """A chunk of rows: the token columns and the routing of the requested layers (by model layer number)."""

    index: int
    token_ids_T: np.ndarray
    positions_T: np.ndarray
    sequence_ids_T: np.ndarray
    labels_T: np.ndarray | None
    layers: dict[int, LayerChunk]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.shape[0])


def _variable_fields(spec: LayerSpec) -> dict[str, Any]:
    """The manifest's version-2 layer fields, written only when they differ from a version-1 layer."""
    return {"null_experts": spec.null_experts, "variable": spec.variable} if spec.null_experts or spec.variable else {}


def _splitmix64(x_T: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic is what the hash wants)."""
    z_T = x_T + np.uint64(0x9E3779B97F4A7C15)
    z_T = (z_T ^ (z_T >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z_T = (z_T ^ (z_T >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z_T ^ (z_T >> np.uint64(31))


def sample_mask(seed: int, start: int, count: int, p: float) -> np.ndarray:
    """keep_T (bool): which of the tokens with global indices [start, start + count) a trace keeps at rate p."""
    if p >= 1.0:
        return np.ones(count, dtype=bool)
    index_T = np.arange(start, start + count, dtype=np.uint64)
    # Mixing the seed through its own hash first keeps seeds s and s+1 from giving shifted copies of one stream.
    seed_hash = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
    u_T = (_splitmix64(index_T ^ seed_hash) >> np.uint64(11)).astype(np.float64) / float(2**53)
    return u_T < p


def _atomic_write_bytes(path: str, write: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _as_array(x: Any, name: str) -> np.ndarray:
    # Accept torch tensors without importing torch: trace capture hands over CPU tensors.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _int_column(x: Any, name: str, rows: int | None, ndim: int = 1) -> np.ndarray:
    a = _as_array(x, name)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer) or (rows is not None and a.shape[0] != rows):
        want = "[T]" if ndim == 1 else "[T, K]"
        raise ValueError(f"{name} of shape {a.shape} and dtype {a.dtype}: expected an integer {want} array"
                         + (f" with T={rows} rows (the batch's token count)" if rows is not None else "")
                         + "; fix: pass one entry per token of the batch")
    return a


class TraceWriter:
    """Streams a routing trace to ``out_dir`` (see the module docstring for the schema and guarantees).

    Use as a context manager, or call :meth:`close`; each :meth:`append` takes one batch of T tokens with the
    routing of every traced layer for those tokens.
    """

    def __init__(self, out_dir: str | os.PathLike[str], layers: Sequence[LayerSpec], *, has_labels: bool = False,
                 chunk_tokens: int = 65536, sample_p: float = 1.0, seed: int = 0, byte_budget: int | None = None,
                 expert_dtype: Any = np.int32, gate_dtype: Any = np.float16, hidden_dtype: Any = np.float16,
                 compress: bool = False, metadata: Mapping[str, Any] | None = None) -> None:
        layers = list(layers)
        if not layers or not all(isinstance(s, LayerSpec) for s in layers):
            raise ValueError(f"layers={layers!r}: expected a non-empty sequence of LayerSpec; fix: one LayerSpec "
                             f"per MoE layer to trace")
        numbers = [s.layer for s in layers]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"layer numbers {numbers} repeat; fix: one LayerSpec per model layer")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r}: expected an int >= 1 (rows per shard)")
        if not (isinstance(sample_p, (int, float)) and 0.0 < float(sample_p) <= 1.0):
            raise ValueError(f"sample_p={sample_p!r}: expected a probability in (0, 1]; fix: 1.0 keeps every token")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an int >= 0")
        if byte_budget is not None and (isinstance(byte_budget, bool) or not isinstance(byte_budget, int)
                                        or byte_budget < 1):
            raise ValueError(f"byte_budget={byte_budget!r}: expected None (unbounded) or an int >= 1 bytes")
        self._expert_dtype = self._pick_dtype(expert_dtype, _EXPERT_DTYPES, "expert_dtype")
        self._gate_dtype = self._pick_dtype(gate_dtype, _GATE_DTYPES, "gate_dtype")
        self._hidden_dtype = self._pick_dtype(hidden_dtype, _HIDDEN_DTYPES, "hidden_dtype")
        for s in layers:
            if s.num_outputs > np.iinfo(self._expert_dtype).max + 1:
                raise ValueError(f"layer {s.layer}: num_experts={s.num_experts} does not fit expert_dtype="
                                 f"{self._expert_dtype}; fix: expert_dtype=np.int64")
        out_dir = os.fspath(out_dir)
        if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
            raise ValueError(f"out_dir={out_dir!r} exists and is not an empty directory; a trace never "
                             f"overwrites one: fix: pick a new directory or remove the old trace yourself")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self._layers = layers
        self._has_labels = bool(has_labels)
        self._chunk_tokens = chunk_tokens
        self._sample_p = float(sample_p)
        self._seed = seed
        self._byte_budget = byte_budget
        self._compress = bool(compress)
        self._metadata = dict(metadata or {})
        self._buffer: dict[str, list[np.ndarray]] = {name: [] for name in self._column_names()}
        self._buffered = 0
        self._chunks: list[dict[str, Any]] = []
        self.num_tokens_offered = 0
        self.num_tokens = 0
        self.payload_bytes = 0
        self.stopped_by_budget = False
        self._dropped_total = 0  # kept rows thrown away when the budget stopped the writer
        self._closed = False
        self._complete = False
        self._write_manifest(complete=False)

    @staticmethod
    def _pick_dtype(value: Any, allowed: tuple[np.dtype, ...], name: str) -> np.dtype:
        dtype = np.dtype(value)
        if dtype not in allowed:
            raise ValueError(f"{name}={value!r}: expected one of {[str(d) for d in allowed]}")
        return dtype

    def _column_names(self) -> list[str]:
        names = list(_TOKEN_COLUMNS) + (["labels"] if self._has_labels else [])
        for s in self._layers:
            names += [f"{s.layer}/expert_ids", f"{s.layer}/gates"] + ([f"{s.layer}/hidden"] if s.hidden_size else [])
        return names

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            # Leave the whole chunks written so far readable, marked incomplete; the buffer is dropped because
            # the batch that raised may have left it inconsistent across layers.
            self._closed = True
            self._write_manifest(complete=False)

    def append(self, token_ids_T: Any, positions_T: Any, sequence_ids_T: Any,
               routing: Mapping[int, tuple[Any, Any]], labels_T: Any = None,
               hidden: Mapping[int, Any] | None = None) -> int:
        """Offers one batch of T tokens; returns how many were kept (sampling, budget).

        ``routing`` maps each traced layer number to (expert_ids_TK, gates_TK); ``hidden`` maps each layer with
        a ``hidden_size`` to hidden_TD. Arrays may be numpy or CPU torch tensors.
        """
        if self._closed:
            raise ValueError(f"append() on a closed TraceWriter ({self.out_dir!r}); fix: open a new writer")
        token_ids_T = _int_column(token_ids_T, "token_ids_T", None)
        T = token_ids_T.shape[0]
        columns = {"token_ids": token_ids_T,
                   "positions": _int_column(positions_T, "positions_T", T),
                   "sequence_ids": _int_column(sequence_ids_T, "sequence_ids_T", T)}
        if self._has_labels != (labels_T is not None):
            raise ValueError(f"labels_T is {'missing' if labels_T is None else 'given'} but the writer has "
                             f"has_labels={self._has_labels}; fix: match has_labels to whether you pass labels")
        if labels_T is not None:
            columns["labels"] = _int_column(labels_T, "labels_T", T)
        routing = dict(routing)
        hidden = dict(hidden or {})
        wanted = {s.layer for s in self._layers}
        if set(routing) != wanted:
            raise ValueError(f"routing has layers {sorted(routing)}, the trace has {sorted(wanted)}; fix: pass "
                             f"(expert_ids_TK, gates_TK) for exactly the traced layers")
        wanted_hidden = {s.layer for s in self._layers if s.hidden_size}
        if set(hidden) != wanted_hidden:
            raise ValueError(f"hidden has layers {sorted(hidden)}, the trace records hidden states for "
                             f"{sorted(wanted_hidden)}; fix: pass hidden_TD for exactly those layers")
        for s in self._layers:
            ids, gates = routing[s.layer]
            ids_TK = _int_column(ids, f"routing[{s.layer}] expert_ids_TK", T, ndim=2)
            gates_TK = _as_array(gates, f"routing[{s.layer}] gates_TK")
            if ids_TK.shape != (T, s.top_k) or gates_TK.shape != (T, s.top_k):
                raise ValueError(f"layer {s.layer}: expert_ids {ids_TK.shape} and gates {gates_TK.shape}, "
                                 f"expected both ({T}, top_k={s.top_k}); fix: pass the router's top-k output")
            if not np.issubdtype(gates_TK.dtype, np.floating):
                raise ValueError(f"layer {s.layer}: gates dtype {gates_TK.dtype}, expected floating point")
            low = EMPTY_SLOT if s.variable else 0
            if T and (ids_TK.min() < low or ids_TK.max() >= s.num_outputs):
                raise ValueError(f"layer {s.layer}: expert ids span [{ids_TK.min()}, {ids_TK.max()}], expected "
                                 f"[{low}, num_experts={s.num_experts} + null_experts={s.null_experts}); fix: "
                                 f"global expert ids "
                                 f"(null experts after the real ones), -1 only for the empty slots of a variable "
                                 f"layer, or a larger num_experts in the LayerSpec")
            if s.variable and T and (gates_TK[ids_TK == EMPTY_SLOT] != 0).any():
                raise ValueError(f"layer {s.layer}: an empty slot (id -1) has a non-zero gate; fix: gate 0 on "
                                 f"empty slots")
            columns[f"{s.layer}/expert_ids"] = ids_TK
            columns[f"{s.layer}/gates"] = gates_TK
            if s.hidden_size:
                h_TD = _as_array(hidden[s.layer], f"hidden[{s.layer}]")
                if h_TD.shape != (T, s.hidden_size):
                    raise ValueError(f"layer {s.layer}: hidden {h_TD.shape}, expected ({T}, "
                                     f"hidden_size={s.hidden_size})")
                columns[f"{s.layer}/hidden"] = h_TD
        start = self.num_tokens_offered
        self.num_tokens_offered += T
        if self.stopped_by_budget:
            return 0
        dropped_before = self._dropped_total
        keep_T = sample_mask(self._seed, start, T, self._sample_p)
        kept = int(keep_T.sum())
        if kept == 0:
            return 0
        for name, column in columns.items():
            self._buffer[name].append(column[keep_T].astype(self._dtype_of(name), copy=False))
        self._buffered += kept
        while self._buffered >= self._chunk_tokens and not self.stopped_by_budget:
            self._flush(self._chunk_tokens)
        # The buffer is FIFO, so rows dropped at a budget stop are this batch's last ones first.
        return max(0, kept - (self._dropped_total - dropped_before))

    def _dtype_of(self, name: str) -> np.dtype:
        if "/" not in name:
            return _TOKEN_DTYPE
        kind = name.split("/", 1)[1]
        return {"expert_ids": self._expert_dtype, "gates": self._gate_dtype, "hidden": self._hidden_dtype}[kind]

    def _take(self, rows: int) -> dict[str, np.ndarray]:
        """Pops the first ``rows`` buffered rows of every column."""
        out = {}
        for name, parts in self._buffer.items():
            joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out[name] = joined[:rows]
            self._buffer[name] = [joined[rows:]] if joined.shape[0] > rows else []
        self._buffered -= rows
        return out

    def _flush(self, rows: int) -> None:
        rows = min(rows, self._buffered)
        if rows == 0:
            return
        row_bytes = sum(parts[0].itemsize * int(np.prod(parts[0].shape[1:])) for parts in self._buffer.values())
        if self._byte_budget is not None:
            fit = (self._byte_budget - self.payload_bytes) // row_bytes
            if fit < rows:
                # Cut the chunk to what fits and stop; the rest of the buffer is dropped, never written.
                self._dropped_total += self._buffered - fit
                self.stopped_by_budget = True
                rows = fit
        if rows > 0:
            self._write_chunk(self._take(rows))
        if self.stopped_by_budget:
            self._buffer = {name: [] for name in self._buffer}
            self._buffered = 0
            self._write_manifest(complete=False)

    def _save(self, filename: str, arrays: dict[str, np.ndarray]) -> None:
        save = np.savez_compressed if self._compress else np.savez
        _atomic_write_bytes(os.path.join(self.out_dir, filename), lambda f: save(f, **arrays))

    def _write_chunk(self, columns: dict[str, np.ndarray]) -> None:
        index = len(self._chunks)
        rows = int(columns["token_ids"].shape[0])
        tokens_file = f"tokens-{index:06d}.npz"
        self._save(tokens_file, {n: columns[n] for n in list(_TOKEN_COLUMNS) + (["labels"] if self._has_labels
                                                                                 else [])})
        layer_files = {}
        for s in self._layers:
            name = f"layer{s.layer:04d}-{index:06d}.npz"
            arrays = {"expert_ids": columns[f"{s.layer}/expert_ids"], "gates": columns[f"{s.layer}/gates"]}
            if s.hidden_size:
                arrays["hidden"] = columns[f"{s.layer}/hidden"]
            self._save(name, arrays)
            layer_files[str(s.layer)] = name
        chunk_bytes = sum(int(a.nbytes) for a in columns.values())
        self._chunks.append({"index": index, "num_tokens": rows, "payload_bytes": chunk_bytes,
                             "tokens_file": tokens_file, "layer_files": layer_files})
        self.num_tokens += rows
        self.payload_bytes += chunk_bytes
        # The manifest goes last: a chunk is listed only once all its files are in place.
        self._write_manifest(complete=False)

    def manifest(self, complete: bool) -> dict[str, Any]:
        from megatron_moe_ext import __version__

        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "created_by": f"megatron_moe_ext {__version__}",
            "complete": complete, "compressed": self._compress, "chunk_tokens": self._chunk_tokens,
            "has_labels": self._has_labels, "token_dtype": str(_TOKEN_DTYPE),
            "sample_p": self._sample_p, "seed": self._seed,
            "byte_budget": self._byte_budget, "stopped_by_budget": self.stopped_by_budget,
            "num_tokens_offered": self.num_tokens_offered, "num_tokens": self.num_tokens,
            "payload_bytes": self.payload_bytes,
            "layers": [{"layer": s.layer, "num_experts": s.num_experts, "top_k": s.top_k, "num_heads": s.num_heads,
                        **_variable_fields(s), "expert_dtype": str(self._expert_dtype), "gate_dtype": str(self._gate_dtype),
                        "hidden_size": s.hidden_size, "hidden_dtype": str(self._hidden_dtype)}
                       for s in self._layers],
            "chunks": list(self._chunks),
            "metadata": self._metadata,
        }

    def _write_manifest(self, complete: bool) -> None:
        text = json.dumps(self.manifest(complete), indent=1).encode()
        _atomic_write_bytes(os.path.join(self.out_dir, SCHEMA_FILE), lambda f: f.write(text))

    def close(self) -> dict[str, Any]:
        """Writes the buffered rows as a last (short) chunk and the final manifest; returns the manifest."""
        if not self._closed:
            if not self.stopped_by_budget:
                self._flush(self._buffered)
            self._closed = True
            self._complete = True
            self._write_manifest(complete=True)
        return self.manifest(complete=self._complete)


class TraceReader:
    """Reads a trace written by :class:`TraceWriter`: :meth:`iter_chunks` streams, :meth:`load_layer` and
    :meth:`load_tokens` concatenate (for traces that fit in memory, guarded by ``max_bytes``)."""

    def __init__(self, path: str | os.PathLike[str], allow_incomplete: bool = False) -> None:
        self.path = os.fspath(path)
        schema = os.path.join(self.path, SCHEMA_FILE)
        if not os.path.isfile(schema):
            raise ValueError(f"{self.path!r} has no {SCHEMA_FILE}: not a routing trace; fix: pass the directory "
                             f"a TraceWriter wrote")
        with open(schema) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT_NAME or manifest.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{schema}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                             f"this reader reads {FORMAT_NAME!r} versions {list(READABLE_VERSIONS)}")
        if not manifest["complete"] and not allow_incomplete:
            raise ValueError(f"{self.path!r} is marked incomplete (still being written, or the writer crashed); "
                             f"fix: allow_incomplete=True reads the whole chunks it lists")
        self.manifest: dict[str, Any] = manifest
        self.layers = [LayerSpec(layer=d["layer"], num_experts=d["num_experts"], top_k=d["top_k"],
                                 num_heads=d.get("num_heads", 1), hidden_size=d["hidden_size"],
                                 null_experts=d.get("null_experts", 0), variable=d.get("variable", False))
                       for d in manifest["layers"]]
        self._by_layer = {s.layer: s for s in self.layers}

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_chunks(self) -> int:
        return len(self.manifest["chunks"])

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["has_labels"])

    def layer_spec(self, layer: int) -> LayerSpec:
        if layer not in self._by_layer:
            raise ValueError(f"layer {layer} is not in the trace; traced layers: {sorted(self._by_layer)}")
        return self._by_layer[layer]

    def _load(self, filename: str) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.path, filename), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}

    def iter_chunks(self, layers: Sequence[int] | None = None, hidden: bool = False) -> Iterator[TraceChunk]:
        """Yields chunks in order with the routing of ``layers`` (default: all); hidden states only when
        ``hidden`` and recorded. Holds one chunk in memory at a time."""
        wanted = [s.layer for s in self.layers] if layers is None else [self.layer_spec(l).layer for l in layers]
        for chunk in self.manifest["chunks"]:
            rows = chunk["num_tokens"]
            tok = self._load(chunk["tokens_file"])
            per_layer = {}
            for l in wanted:
                arrays = self._load(chunk["layer_files"][str(l)])
                spec = self._by_layer[l]
                if arrays["expert_ids"].shape != (rows, spec.top_k):
                    raise ValueError(f"{chunk['layer_files'][str(l)]}: expert_ids {arrays['expert_ids'].shape}, "
                                     f"manifest says ({rows}, {spec.top_k}): the trace is corrupt")
                per_layer[l] = LayerChunk(arrays["expert_ids"], arrays["gates"],
                                          arrays.get("hidden") if hidden else None)
            if tok["token_ids"].shape != (rows,):
                raise ValueError(f"{chunk['tokens_file']}: {tok['token_ids'].shape[0]} rows, manifest says {rows}")
            yield TraceChunk(chunk["index"], tok["token_ids"], tok["positions"], tok["sequence_ids"],
                             tok.get("labels"), per_layer)

    def _guard(self, row_bytes: int, max_bytes: int, what: str) -> None:
        need = row_bytes * self.num_tokens
        if need > max_bytes:
            raise ValueError(f"loading {what} needs {need} bytes > max_bytes={max_bytes}; fix: stream with "
                             f"iter_chunks() or raise max_bytes")

    def load_layer(self, layer: int, hidden: bool = False, max_bytes: int = 2**30) -> LayerChunk:
        """One layer's whole routing (and hidden states if ``hidden``), concatenated over chunks."""
        spec = self.layer_spec(layer)
        d = self.manifest["layers"][self.layers.index(spec)]
        row = spec.top_k * (np.dtype(d["expert_dtype"]).itemsize + np.dtype(d["gate_dtype"]).itemsize)
        if hidden and spec.hidden_size:
            row += spec.hidden_size * np.dtype(d["hidden_dtype"]).itemsize
        self._guard(row, max_bytes, f"layer {layer}")
        parts = [c.layers[layer] for c in self.iter_chunks([layer], hidden=hidden)]
        if not parts:
            return LayerChunk(np.zeros((0, spec.top_k), d["expert_dtype"]), np.zeros((0, spec.top_k), d["gate_dtype"]),
                              np.zeros((0, spec.hidden_size), d["hidden_dtype"]) if hidden and spec.hidden_size
                              else None)
        h = np.concatenate([p.hidden_TD for p in parts]) if hidden and spec.hidden_size else None
        return LayerChunk(np.concatenate([p.expert_ids_TK for p in parts]),
                          np.concatenate([p.gates_TK for p in parts]), h)

    def load_tokens(self, max_bytes: int = 2**30) -> TraceChunk:
        """The token columns of the whole trace (no layers), concatenated over chunks."""
        self._guard(8 * (3 + self.has_labels), max_bytes, "the token columns")
        parts = list(self.iter_chunks(layers=[]))
        if not parts:
            empty = np.zeros(0, np.int64)
            return TraceChunk(0, empty, empty, empty, empty if self.has_labels else None, {})

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return TraceChunk(0, cat("token_ids_T"), cat("positions_T"), cat("sequence_ids_T"),
                          cat("labels_T") if self.has_labels else None, {})
