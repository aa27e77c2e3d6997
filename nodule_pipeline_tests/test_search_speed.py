"""The compiled search kernel against brute force where it is hardest: ties everywhere, many
candidates accepted and dropped, runs cut by exclusions and blocks; and the search benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_pipeline.hashing import search as search_module
from nodule_pipeline.hashing.codes import pack_codes
from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.search import search, search_batch
from nodule_pipeline_tests.test_hash_search import _items, _ref_search

MODES = ("hamming", "rerank", "hierarchical")


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 codes, so every run crosses many block boundaries."""
    monkeypatch.setattr(search_module, "_CHUNK_BYTES", 1)


def _tie_heavy(rng: np.random.Generator, n: int, bits: int, classes: int = 3):
    """A handful of distinct codes and a few 1- and 2-bit variants: most distances are shared."""
    distinct = rng.random((6, bits)) < 0.5
    codes = distinct[rng.integers(0, len(distinct), n)]
    codes = codes ^ (rng.random((n, bits)) < 1.5 / bits)
    fc = rng.integers(0, 2, (n, 3)).astype(np.float32)  # exact float distances, ties in the re-rank too
    labels = rng.integers(0, classes, n)
    return build_index(codes, fc, labels, _items(n, rng, patients=25), model_version="m"), codes


def _assert_matches(index, codes_bits, q_bits, q_fc, q_class, k, mode, pool_factor, patient) -> None:
    want_rows, want_ham, want_eu, want_fallback = _ref_search(
        index, codes_bits, q_bits, q_fc, q_class, k, mode, pool_factor, patient
    )
    hits = search(
        index, pack_codes(q_bits[None])[0], q_fc, q_class, k=k, mode=mode, pool_factor=pool_factor,
        exclude_patient=patient,
    )  # fmt: skip
    assert [h.row for h in hits] == want_rows
    assert [h.hamming for h in hits] == want_ham
    assert all(h.class_fallback == want_fallback for h in hits)
    if want_eu is not None:
        np.testing.assert_allclose([h.euclidean for h in hits], want_eu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [64, 256])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_bruteforce_on_tie_heavy_codes(bits: int, mode: str, tiny_blocks: None) -> None:
    rng = np.random.default_rng(bits + len(mode))
    n = 1500
    index, codes_bits = _tie_heavy(rng, n, bits)
    patients = index.items["patient_id"].unique().tolist()
    for j, (k, pool_factor) in enumerate([(1, 1), (3, 2), (10, 2), (10, 3.5), (40, 2), (7, 1.5)] * 3):
        q_bits = codes_bits[rng.integers(0, n)].copy() if j % 2 else rng.random(bits) < 0.5
        q_fc = rng.integers(0, 2, 3).astype(np.float32)
        patient = patients[j % len(patients)] if j % 3 == 0 else None
        _assert_matches(index, codes_bits, q_bits, q_fc, int(rng.integers(0, 3)), k, mode, pool_factor, patient)


@pytest.mark.parametrize("bits", [64, 256])
@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_bruteforce_with_mixed_runs(bits: int, mode: str, tiny_blocks: None) -> None:
    """One pass for many queries: some gated to a class, some falling back to every class run."""
    rng = np.random.default_rng(100 + bits)
    n = 900
    index, codes_bits = _tie_heavy(rng, n, bits, classes=2)
    q = 30
    q_bits = codes_bits[rng.integers(0, n, q)] ^ (rng.random((q, bits)) < 2 / bits)
    q_fc = rng.integers(0, 2, (q, 3)).astype(np.float32)
    q_class = rng.integers(0, 3, q)  # class 2 has no library: those queries search everything
    patients = [None if i % 4 else index.items["patient_id"].iloc[i] for i in range(q)]
    batch = search_batch(index, pack_codes(q_bits), q_fc, q_class, k=12, mode=mode, exclude_patients=patients)
    for i in range(q):
        rows, ham, eu, fallback = _ref_search(
            index, codes_bits, q_bits[i], q_fc[i], q_class[i], 12, mode, 2, patients[i]
        )
        assert batch.rows[i, : len(rows)].tolist() == rows and (batch.rows[i, len(rows) :] == -1).all()
        assert batch.hamming[i, : len(rows)].tolist() == ham
        assert batch.class_fallback[i] == (fallback if mode == "hierarchical" else False)
        if eu is not None:
            np.testing.assert_allclose(batch.euclidean[i, : len(rows)], eu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [64, 256])
def test_nearer_and_nearer_codes_fill_and_compact_the_candidates(bits: int, tiny_blocks: None) -> None:
    """Each row is at most as far from the query as the one before: nearly every code is a new
    candidate, so the candidate buffer fills and is compacted again and again."""
    rng = np.random.default_rng(bits)
    n = 4000
    ones = bits - (np.arange(n) * (bits + 1)) // n  # descending, each distance held by a run of rows
    codes_bits = np.arange(bits)[None, :] < ones[:, None]
    codes_bits = codes_bits[:, rng.permutation(bits)]
    index = build_index(codes_bits, np.zeros((n, 2)), np.arange(n) % 2, _items(n, rng), model_version="m")
    query = np.zeros(bits, dtype=bool)
    for k in (1, 5, 50, 300):
        for mode in ("hamming", "hierarchical"):
            _assert_matches(index, codes_bits, query, np.zeros(2), 1, k, mode, 1, None)


def test_compaction_keeps_candidates_at_the_limit() -> None:
    """Eight runs of 10 rows, each nearer than the last (dead candidates pile up), then 10 rows at
    distance 20 and 5 at distance 10: the buffer (3m + 64 = 94) fills with the 5th row at 10, and
    the rows at 20, accepted long before, must survive that compaction: 5 of them are in the answer."""
    distances = [64 - r // 10 for r in range(80)] + [20] * 10 + [10] * 5 + [30] * 50
    n, bits = len(distances), 64
    codes_bits = np.arange(bits)[None, :] < np.asarray(distances)[:, None]
    rng = np.random.default_rng(0)
    index = build_index(codes_bits, np.zeros((n, 2)), np.zeros(n, int), _items(n, rng), model_version="m")
    hits = search(index, np.zeros(bits // 8, np.uint8), None, None, k=10, mode="hamming")
    assert [h.row for h in hits] == [90, 91, 92, 93, 94, 80, 81, 82, 83, 84]
    assert [h.hamming for h in hits] == [10] * 5 + [20] * 5


def test_rows_grouped_by_label_are_searched_in_place() -> None:
    rng = np.random.default_rng(5)
    n = 600
    codes_bits = rng.random((n, 256)) < 0.5
    labels = np.repeat([0, 1, 2], n // 3)
    index = build_index(codes_bits, rng.normal(size=(n, 4)), labels, _items(n, rng), model_version="m")
    search_module.prepare_search(index)
    layout = index._cache[search_module._LAYOUT_KEY]
    assert np.shares_memory(layout.words, index.codes)  # no copy of the codes
    for mode in MODES:
        for j in range(6):
            q_bits = rng.random(256) < 0.5
            _assert_matches(index, codes_bits, q_bits, rng.normal(size=4), j % 3, 10, mode, 2, None)


def test_exclude_rows_cut_the_runs() -> None:
    rng = np.random.default_rng(8)
    n = 700
    index, codes_bits = _tie_heavy(rng, n, 64)
    query = codes_bits[10]
    everything = [h.row for h in search(index, pack_codes(query[None])[0], None, None, k=n, mode="hamming")]
    dropped = everything[:25:2]
    hits = search(index, pack_codes(query[None])[0], None, None, k=20, mode="hamming", exclude_rows=dropped)
    assert [h.row for h in hits] == [r for r in everything if r not in dropped][:20]


def test_search_benchmark_records(tmp_path) -> None:
    pytest.importorskip("faiss")
    from nodule_pipeline.benchmarks.search import RECORD_KEYS, format_search_table, run_search_benchmark

    records = run_search_benchmark(
        [1000], bits_list=(64, 256), queries=4, batch_queries=6, fc_dim=8, fc_ram_bytes=0, tmp_dir=tmp_path,
        progress=None,
    )  # fmt: skip
    assert [(r["n"], r["bits"]) for r in records] == [(1000, 64), (1000, 256)]
    for record in records:
        assert set(RECORD_KEYS) <= set(record)
        assert record["agree"] and record["fc_storage"] == "memmap"
        assert record["bytes_per_item"] == record["bits"] // 8 + 8 * 2 + 2
        assert record["ours_batch_qps"] > 0 and record["popcount_bound_codes_per_s"] > 0
    assert "1,000" in format_search_table(records)
    assert list(tmp_path.iterdir()) == []  # the memory-mapped features are gone
