"""Offline byte-level training data in Megatron's indexed dataset format (.bin/.idx).

Every machine has a Python standard library, so its ``.py`` sources make a real text corpus that
needs no download. Text is tokenised one token per byte (ids 0..255) plus an end-of-document id
256, matching ``--tokenizer-type NullTokenizer --vocab-size 257``. Built datasets are cached under a
content-derived key and written atomically, so concurrent ranks or interrupted runs never leave a
prefix that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import struct
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy

EOD_ID: int = 256
VOCAB_SIZE: int = 257
# Bump when the on-disk layout or tokenisation changes, so stale caches are not reused.
_FORMAT_VERSION = "megatron-moe-ext-bytes-v1"
# Directory names never taken from the stdlib: tests are huge and repetitive, and site-packages
# differs between machines, which would break determinism across installs of the same Python.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # first 9 bytes of every Megatron .idx file
_PREFIX_HINT = (
    "expected PREFIX.bin and PREFIX.idx written by Megatron's preprocess_data or "
    "megatron-moe-ext; pass the path without extension"
)


def _indexed_dataset():  # noqa: ANN202 - returns a module
    """Import Megatron's indexed_dataset lazily: importing megatron.core takes seconds, and the
    byte codec and file selection here are useful without it."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def encode_bytes(data: bytes) -> numpy.ndarray:
    """Tokenise raw bytes: one uint16 token id per byte (0..255); no EOD is appended."""
    if isinstance(data, str):
        raise ValueError(
            f"encode_bytes got str {data[:40]!r}; encode it first, e.g. text.encode('utf-8')"
        )
    return numpy.frombuffer(bytes(data), dtype=numpy.uint8).astype(numpy.uint16)


def decode_bytes(ids: Iterable[int] | numpy.ndarray) -> bytes:
    """Invert encode_bytes, dropping EOD tokens so concatenated documents read back as text."""
    arr = numpy.asarray(ids if isinstance(ids, numpy.ndarray) else list(ids), dtype=numpy.int64)
    arr = arr[arr != EOD_ID]
    bad = arr[(arr < 0) | (arr > 255)]
    if bad.size:
        raise ValueError(
            f"decode_bytes got token id {int(bad[0])}; byte-level ids are 0..255 or EOD {EOD_ID}"
        )
    return arr.astype(numpy.uint8).tobytes()


def _stdlib_sources() -> tuple[pathlib.Path, list[tuple[str, int]]]:
    """All non-test stdlib .py files as (posix relative path, size), sorted by relative path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into tests or third-party packages.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            path = pathlib.Path(dirpath, name)
            if name.endswith(".py") and path.is_file():
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    found.sort()  # os.walk order depends on the filesystem; sorting makes the selection stable
    return root, found


def stdlib_corpus_files(max_bytes: int) -> list[pathlib.Path]:
    """The stdlib's own .py sources (tests and site-packages excluded) in relative-path order,
    taken until their total size reaches max_bytes (the last file may pass it)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}; pass a positive byte budget, e.g. 4_000_000")
    root, sources = _stdlib_sources()
    chosen, total = [], 0
    for rel, size in sources:
        if total >= max_bytes:
            break
        chosen.append(root / rel)
        total += size
    if not chosen:
        raise ValueError(f"no .py files under stdlib directory {root}; pass a data path instead")
    return chosen


def stdlib_package_files(package: str) -> list[pathlib.Path]:
    """The .py sources of one stdlib package (e.g. 'json'), tests excluded, in relative-path order."""
    root, sources = _stdlib_sources()
    chosen = [root / rel for rel, _ in sources if rel.startswith(package + "/") or rel == package + ".py"]
    if not chosen:
        raise ValueError(f"the standard library under {root} has no package {package!r}; pass data paths instead")
    return chosen


def write_indexed_dataset(documents: Iterable[numpy.ndarray], prefix: str | os.PathLike) -> str:
    """Write documents (one uint16 array each, EOD included by the caller) to prefix.bin/.idx.

    Files are written under temporary names and renamed .bin first, .idx last, so a crash never
    leaves a prefix whose .idx exists but describes other data. Returns the prefix as str."""
    prefix = os.fspath(prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    tmp_bin = tmp_idx = None
    builder = None
    try:
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp_bin = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".bin")
            os.close(fd)
            fd, tmp_idx = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".idx")
            os.close(fd)
        except OSError as exc:
            raise ValueError(
                f"cannot write dataset into directory {directory} ({exc}); pass a prefix in "
                f"an existing writable directory or fix its permissions"
            ) from exc
        ids = _indexed_dataset()
        builder = ids.IndexedDatasetBuilder(tmp_bin, dtype=numpy.uint16)
        count = 0
        for i, doc in enumerate(documents):
            arr = numpy.asarray(doc)
            # uint16 storage would silently wrap ids outside 0..65535, so refuse them.
            if not (arr.ndim == 1 and arr.size and arr.dtype.kind in "iu"
                    and 0 <= int(arr.min()) and int(arr.max()) <= 65535):
                raise ValueError(
                    f"document {i} for {prefix} (shape {arr.shape}, dtype {arr.dtype}) is not a "
                    f"non-empty 1-D integer array with ids in 0..65535; fix the tokenisation"
                )
            builder.add_document(arr.astype(numpy.uint16, copy=False), [arr.size])
            count += 1
        if count == 0:
            raise ValueError(f"no documents for {prefix}; pass at least one non-empty document")
        builder.finalize(tmp_idx)
        # Remove a stale .idx first: otherwise the new .bin would briefly pair with the old index.
        try:
            os.remove(prefix + ".idx")
        except FileNotFoundError:
            pass
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_idx, prefix + ".idx")
        tmp_bin = tmp_idx = None
        return prefix
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()  # the builder leaves its file open when adding fails
        for tmp in (tmp_bin, tmp_idx):
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


def _cache_key(*parts: object) -> str:
    """Short stable hash of the format version, Python version and the given parts."""
    text = "\n".join(map(str, (_FORMAT_VERSION, platform.python_version(), *parts)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _byte_documents(paths: Iterable[pathlib.Path]) -> Iterator[numpy.ndarray]:
    """Each file's bytes followed by EOD, read lazily so the whole corpus is never in memory."""
    for path in paths:
        yield numpy.append(encode_bytes(path.read_bytes()), numpy.uint16(EOD_ID))


def _cached(prefix: str, paths: list[pathlib.Path]) -> str:
    """Reuse prefix if it is a valid dataset; otherwise (re)build it from paths."""
    try:
        check_dataset_prefix(prefix)
        return prefix
    except ValueError:
        return write_indexed_dataset(_byte_documents(paths), prefix)


def build_default_dataset(cache_dir: str | os.PathLike, max_bytes: int = 4_000_000) -> str:
    """Build (or reuse) the stdlib corpus dataset under cache_dir; each file is one document.

    The cache key covers the selected files' relative paths and sizes, so a different Python
    install or budget gets its own prefix. Returns the prefix cache_dir/stdlib-<key>."""
    files = stdlib_corpus_files(max_bytes)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    listing = [f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files]
    prefix = os.path.join(os.fspath(cache_dir), f"stdlib-{_cache_key(*listing)}")
    return _cached(prefix, files)


# Bytes read to tell text from binary data; NUL never occurs in text (UTF-8 or otherwise) but is common in binaries.
_SNIFF_BYTES = 1 << 16


def _check_text(path: pathlib.Path) -> None:
    """Refuse a file that is binary (a NUL byte in its first 64 KiB), e.g. a checkpoint or an archive."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"data path {os.fspath(path)} looks binary (a NUL byte at offset {nul}), not text; fix: pass a text file, "
            "or a tokenised dataset's prefix (PREFIX for PREFIX.bin/PREFIX.idx)"
        )


def build_text_dataset(paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike) -> str:
    """Build (or reuse) a dataset with one document per raw text file (bytes + EOD).

    Cached by (absolute path, size, mtime_ns) so an edited file is re-tokenised. Empty files are
    skipped. Returns the prefix cache_dir/text-<key>."""
    if not paths:
        raise ValueError("build_text_dataset got no paths; pass at least one text file")
    files, listing = [], []
    for raw in paths:
        path = pathlib.Path(raw).absolute()
        if not path.is_file():
            raise ValueError(f"text file {raw} is missing or not a regular file; pass a file")
        st = path.stat()
        listing.append(f"{path.as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
        _check_text(path)
        if st.st_size > 0:
            files.append(path)
    if not files:
        names = [os.fspath(p) for p in paths]
        raise ValueError(f"all text files are empty: {names}; pass files with content")
    prefix = os.path.join(os.fspath(cache_dir), f"text-{_cache_key(*listing)}")
    return _cached(prefix, files)


def check_dataset_prefix(prefix: str | os.PathLike) -> None:
    """Raise ValueError unless prefix.bin/prefix.idx form a readable, non-empty, untruncated
    Megatron indexed dataset; catches bad data paths before training starts."""
    prefix = os.fspath(prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"dataset prefix {prefix}: missing {' and '.join(missing)}; {_PREFIX_HINT}"
        )
    ids = _indexed_dataset()
    # Validate the header and index size ourselves first: IndexedDataset reports a corrupt index
    # with bare asserts and noisy __del__ errors, and cannot say which file is wrong.
    try:
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(34)  # magic(9) + version(8) + dtype code(1) + seq/doc counts(8+8)
        if len(head) < 34 or head[:9] != _INDEX_MAGIC:
            raise ValueError("not a Megatron index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ValueError(f"unsupported index version {version}")
        itemsize = ids.DType.size(ids.DType.dtype_from_code(code))
        expected_idx = 34 + n_seq * 12 + n_doc * 8
        if idx_size not in (expected_idx, expected_idx + n_seq):  # + n_seq: multimodal modes
            raise ValueError(f"index is {idx_size} bytes but its header implies {expected_idx}")
        dataset = ids.IndexedDataset(prefix, mmap=False)  # no mmap: only the index is read
        n_seq, n_doc = len(dataset), len(dataset.document_indices) - 1
        expected_bin = int(dataset.sequence_lengths.sum(dtype=numpy.int64)) * itemsize
        del dataset
    except Exception as exc:  # corrupt or unreadable index: wrap whatever was raised
        raise ValueError(
            f"dataset prefix {prefix}: cannot open {idx_path}: {exc}; {_PREFIX_HINT}, or rebuild it"
        ) from exc
    if n_seq == 0 or n_doc <= 0:
        raise ValueError(
            f"dataset prefix {prefix} has {n_seq} sequences and {n_doc} documents; "
            f"rebuild it with at least one document"
        )
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        raise ValueError(
            f"dataset prefix {prefix}: {bin_path} is {bin_size} bytes but the index describes "
            f"{expected_bin}; the files are truncated or from different builds, rebuild them"
        )


def sequence_lengths(prefix: str | os.PathLike) -> numpy.ndarray:
    """Token count of each sequence of a checked dataset (``check_dataset_prefix``), read from the .idx alone:
    after the 34-byte header come ``n_seq`` int32 lengths (Megatron's ``_IndexReader``)."""
    idx_path = os.fspath(prefix) + ".idx"
    with open(idx_path, "rb") as f:
        head = f.read(34)
        (n_seq,) = struct.unpack("<Q", head[18:26])
        return numpy.fromfile(f, dtype=numpy.int32, count=n_seq)


def _is_number(entry: str) -> bool:
    """Whether a --data-path entry is a blend weight rather than a path."""
    try:
        float(entry)
        return True
    except ValueError:
        return False


def resolve_data_paths(data_path: list[str], cache_dir: str | os.PathLike) -> list[str]:
    """Map Megatron --data-path entries (prefixes, optionally interleaved with weights) to valid
    dataset prefixes, tokenising raw text files into cache_dir. Weights pass through unchanged."""
    resolved = []
    for entry in data_path:
        entry = os.fspath(entry)
        if _is_number(entry):
            resolved.append(entry)
        elif os.path.isfile(entry + ".bin") or os.path.isfile(entry + ".idx"):
            check_dataset_prefix(entry)  # names the missing half if only one exists
            resolved.append(entry)
        elif entry.endswith((".bin", ".idx")) and os.path.isfile(entry[:-4] + ".idx"):
            # Without this, a .bin file would be tokenised as if it were text.
            raise ValueError(
                f"data path {entry} is an indexed dataset file; pass the prefix {entry[:-4]} "
                f"without extension"
            )
        elif os.path.isfile(entry):
            resolved.append(build_text_dataset([entry], cache_dir))
        else:
            raise ValueError(
                f"data path {entry}: no {entry}.bin / {entry}.idx and no such text file; fix: "
                f"pass a dataset prefix (without .bin/.idx) or an existing text file"
            )
    return resolved
