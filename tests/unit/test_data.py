"""Unit tests for megatron_moe_ext.training.data (byte-level corpus in .bin/.idx format)."""

import os
import pathlib
import sysconfig

import numpy
import pytest

from megatron_moe_ext.training import data


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    docs = [numpy.array(ds[i]) for i in range(len(ds))]
    return docs, numpy.array(ds.sequence_lengths), numpy.array(ds.document_indices)


def test_constants_match_null_tokenizer():
    assert data.VOCAB_SIZE == 257 and data.EOD_ID == data.VOCAB_SIZE - 1


def test_encode_decode_round_trip():
    raw = bytes(range(256)) + "héllo wörld".encode("utf-8")
    ids = data.encode_bytes(raw)
    assert ids.dtype == numpy.uint16 and ids.shape == (len(raw),)
    assert data.decode_bytes(ids) == raw
    assert data.decode_bytes(list(ids) + [data.EOD_ID]) == raw  # EOD dropped
    with pytest.raises(ValueError, match="300"):
        data.decode_bytes([1, 300])
    with pytest.raises(ValueError, match="encode"):
        data.encode_bytes("text")


def test_stdlib_corpus_files_deterministic_bounded_no_tests():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    a = data.stdlib_corpus_files(300_000)
    assert a == data.stdlib_corpus_files(300_000)
    sizes = [p.stat().st_size for p in a]
    assert sum(sizes) >= 300_000 and sum(sizes[:-1]) < 300_000  # stops right after passing
    rels = [p.relative_to(root).as_posix() for p in a]
    assert rels == sorted(rels) and all(r.endswith(".py") for r in rels)
    # A large budget covers the whole stdlib: no test dirs or site-packages may appear.
    everything = [p.relative_to(root).parts for p in data.stdlib_corpus_files(10**12)]
    assert len(everything) > 100
    banned = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(banned & set(parts[:-1]) for parts in everything)
    with pytest.raises(ValueError, match="max_bytes=0"):
        data.stdlib_corpus_files(0)


def test_write_and_read_back(tmp_path):
    docs = [numpy.array([1, 2, 3, data.EOD_ID], numpy.uint16), numpy.array([65535, 0], numpy.int64)]
    prefix = data.write_indexed_dataset(docs, tmp_path / "tiny")
    assert prefix == str(tmp_path / "tiny")
    got, lengths, doc_idx = _read_back(prefix)
    assert [g.tolist() for g in got] == [d.tolist() for d in docs]
    assert all(g.dtype == numpy.uint16 for g in got)
    assert lengths.tolist() == [4, 2] and doc_idx.tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["tiny.bin", "tiny.idx"]
    data.check_dataset_prefix(prefix)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        data.write_indexed_dataset([], tmp_path / "empty")
    with pytest.raises(ValueError, match="0..65535"):
        data.write_indexed_dataset([numpy.array([70000])], tmp_path / "big")
    assert os.listdir(tmp_path) == []


def _no_leftovers(directory):
    assert os.listdir(directory) == []


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def docs():
        yield numpy.array([1, 2], numpy.uint16)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        data.write_indexed_dataset(docs(), tmp_path / "p")
    _no_leftovers(tmp_path)

    from megatron.core.datasets import indexed_dataset

    def boom(self, idx_path):
        raise OSError("finalize failed")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", boom)
    with pytest.raises(OSError, match="finalize failed"):
        data.write_indexed_dataset([numpy.array([1], numpy.uint16)], tmp_path / "p")
    _no_leftovers(tmp_path)


def test_write_failure_keeps_no_stale_index(tmp_path, monkeypatch):
    # An existing complete prefix must not survive as (new .bin, old .idx) after a failed rename.
    prefix = data.write_indexed_dataset([numpy.array([1, 2, 3], numpy.uint16)], tmp_path / "p")
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith(".idx"):
            raise OSError("crash before idx rename")
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", replace)
    with pytest.raises(OSError):
        data.write_indexed_dataset([numpy.array([9], numpy.uint16)], prefix)
    assert sorted(os.listdir(tmp_path)) == ["p.bin"]  # no .idx, so the prefix is not "complete"
    with pytest.raises(ValueError, match="missing"):
        data.check_dataset_prefix(prefix)


def test_write_unwritable_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "sub" / "prefix"
    with pytest.raises(ValueError, match=str(tmp_path / "afile" / "sub")):
        data.write_indexed_dataset([numpy.array([1], numpy.uint16)], bad)
    assert os.listdir(tmp_path) == ["afile"]


def test_build_default_dataset_cached(tmp_path):
    cache = tmp_path / "cache"
    prefix = data.build_default_dataset(cache, max_bytes=200_000)
    assert os.path.basename(prefix).startswith("stdlib-")
    mtimes = [os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")]
    assert data.build_default_dataset(cache, max_bytes=200_000) == prefix
    assert [os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")] == mtimes
    docs, lengths, _ = _read_back(prefix)
    files = data.stdlib_corpus_files(200_000)
    assert len(docs) == len(files)
    for doc, path in zip(docs, files):
        assert doc[-1] == data.EOD_ID and data.EOD_ID not in doc[:-1]
        assert data.decode_bytes(doc) == path.read_bytes()
    # A different budget selects different files and therefore a different cache entry.
    assert data.build_default_dataset(cache, max_bytes=100_000) != prefix


def test_build_default_dataset_rebuilds_corrupt_cache(tmp_path):
    prefix = data.build_default_dataset(tmp_path, max_bytes=50_000)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    assert data.build_default_dataset(tmp_path, max_bytes=50_000) == prefix
    data.check_dataset_prefix(prefix)


def test_build_text_dataset(tmp_path):
    a, empty, b = tmp_path / "a.txt", tmp_path / "e.txt", tmp_path / "b.txt"
    a.write_text("first doc\n")
    empty.write_bytes(b"")
    b.write_bytes("zweite Datei ü".encode())
    prefix = data.build_text_dataset([a, empty, b], tmp_path / "cache")
    assert os.path.basename(prefix).startswith("text-")
    docs, _, _ = _read_back(prefix)
    assert [data.decode_bytes(d) for d in docs] == [a.read_bytes(), b.read_bytes()]
    assert all(d[-1] == data.EOD_ID for d in docs)
    assert data.build_text_dataset([a, empty, b], tmp_path / "cache") == prefix
    b.write_text("changed and longer")
    assert data.build_text_dataset([a, empty, b], tmp_path / "cache") != prefix
    with pytest.raises(ValueError, match="empty"):
        data.build_text_dataset([empty], tmp_path / "cache")
    with pytest.raises(ValueError, match="nope.txt"):
        data.build_text_dataset([tmp_path / "nope.txt"], tmp_path / "cache")


def test_check_dataset_prefix_rejects_bad(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing") as e:
        data.check_dataset_prefix(missing)
    assert missing in str(e.value) and "without extension" in str(e.value)

    good = data.write_indexed_dataset([numpy.arange(100, dtype=numpy.uint16)] * 3, tmp_path / "t")
    with open(good + ".bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(ValueError, match="truncated") as e:
        data.check_dataset_prefix(good)
    assert good in str(e.value)

    garbage = data.write_indexed_dataset([numpy.arange(5, dtype=numpy.uint16)], tmp_path / "g")
    (tmp_path / "g.idx").write_bytes(b"this is not an index at all, just garbage bytes")
    with pytest.raises(ValueError) as e:
        data.check_dataset_prefix(garbage)
    assert garbage in str(e.value)

    short = data.write_indexed_dataset([numpy.arange(5, dtype=numpy.uint16)], tmp_path / "s")
    raw = (tmp_path / "s.idx").read_bytes()
    (tmp_path / "s.idx").write_bytes(raw[:-4])  # header intact, arrays cut short
    with pytest.raises(ValueError, match="cannot open") as e:
        data.check_dataset_prefix(short)
    assert short in str(e.value)


def test_check_dataset_prefix_rejects_empty_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "zero")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="0 sequences") as e:
        data.check_dataset_prefix(prefix)
    assert prefix in str(e.value)


def test_resolve_data_paths(tmp_path):
    cache = tmp_path / "cache"
    ds = data.write_indexed_dataset([numpy.arange(10, dtype=numpy.uint16)], tmp_path / "ds")
    text = tmp_path / "corpus.txt"
    text.write_text("some raw text\n")
    out = data.resolve_data_paths(["0.3", ds, "0.7", str(text)], cache)
    assert out[:3] == ["0.3", ds, "0.7"]
    assert out[3].startswith(str(cache)) and os.path.basename(out[3]).startswith("text-")
    data.check_dataset_prefix(out[3])
    assert data.resolve_data_paths([ds], cache) == [ds]

    with pytest.raises(ValueError, match="no such text file") as e:
        data.resolve_data_paths(["1", str(tmp_path / "nothing")], cache)
    assert str(tmp_path / "nothing") in str(e.value)
    with pytest.raises(ValueError, match="without extension"):
        data.resolve_data_paths([ds + ".bin"], cache)
    os.remove(ds + ".idx")
    with pytest.raises(ValueError, match="missing"):
        data.resolve_data_paths([ds], cache)
