"""Hash index and retrieval against brute-force references written the simplest way possible."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.hashing import search as search_module
from nodule_pipeline.hashing.codes import pack_codes, unpack_codes
from nodule_pipeline.hashing.index import (
    FORMAT_VERSION,
    HashIndex,
    IndexFormatError,
    build_index,
    bytes_per_item,
    load_index,
    save_index,
)
from nodule_pipeline.hashing.network import HashNet, NetworkConfig, NormalisationStats
from nodule_pipeline.hashing.search import (
    JSON_KEYS,
    fold_batch,
    fold_hits,
    hamming_distances,
    hamming_distances_batch,
    nodule_of_rows,
    rows_for_nodules,
    search,
    search_batch,
)
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.hashing.training import TrainConfig, TrainedModel, encode


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the kernels to walk the database in many chunks (1024 rows), as at 10^6 items."""
    monkeypatch.setattr(search_module, "_CHUNK_BYTES", 1)


def _items(n: int, rng: np.random.Generator, patients: int = 40) -> pd.DataFrame:
    malignancy = rng.integers(1, 6, n).astype(float)
    malignancy[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "patient_id": [f"LIDC-IDRI-{i:04d}" for i in rng.integers(0, patients, n)],
            "nodule_id": [f"N{i}" for i in range(n)],
            "annotation_id": [str(1000 + i) for i in range(n)],
            "malignancy": malignancy,
            "spiculation": rng.integers(1, 6, n).astype("int8"),
            "series_uid": ["1.2.3." + str(i % 7) for i in range(n)],
            "center_i": rng.integers(0, 512, n).astype("int32"),
        }
    )


def _tied_index(rng: np.random.Generator, n: int, bits: int, classes: int = 2) -> tuple[HashIndex, np.ndarray]:
    """Few distinct codes and integer fc rows (exact float distances), so ties are everywhere."""
    distinct = rng.random((max(2, n // 25), bits)) < 0.5
    codes = distinct[rng.integers(0, len(distinct), n)]
    flips = rng.random((n, bits)) < 0.5 / bits  # a few single-bit variants around each code
    codes = codes ^ flips
    fc = rng.integers(0, 3, (n, 4)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return build_index(codes, fc, labels, _items(n, rng), model_version="m1"), codes


def _ref_hamming(query_bits: np.ndarray, codes_bits: np.ndarray) -> np.ndarray:
    return (codes_bits != query_bits[None, :]).sum(axis=1)


def _ref_search(index, codes_bits, q_bits, q_fc, q_class, k, mode, pool_factor=2, exclude_patient=None):
    """Filter by class; the pool is every row within the Hamming distance of the m-th nearest
    (ties at that boundary included); sort by (distance, nodule_id, annotation_id); take k."""
    patients = index.items["patient_id"].tolist()
    tie = list(zip(index.items["nodule_id"].astype(str), index.items["annotation_id"].astype(str)))
    rows = [r for r in range(len(index)) if patients[r] != exclude_patient]
    fallback = False
    if mode == "hierarchical":
        gated = [r for r in rows if index.labels[r] == q_class]
        fallback = not gated
        rows = gated or rows
    ham = _ref_hamming(q_bits, codes_bits).tolist()
    by_hamming = sorted(rows, key=lambda r: (ham[r], tie[r]))
    if mode == "hamming":
        top = by_hamming[:k]
        return top, [ham[r] for r in top], None, fallback
    m = max(k, math.ceil(pool_factor * k))
    pool = [r for r in by_hamming if ham[r] <= ham[by_hamming[min(m, len(by_hamming)) - 1]]] if by_hamming else []
    q = np.asarray(q_fc, dtype=np.float16).astype(np.float64)
    eu = {r: float(np.sqrt(((index.fc[r].astype(np.float64) - q) ** 2).sum())) for r in pool}
    top = sorted(pool, key=lambda r: (eu[r], tie[r]))[:k]
    return top, [ham[r] for r in top], [eu[r] for r in top], fallback


# --------------------------------------------------------------------------- Hamming kernel


@pytest.mark.parametrize("nbytes", [4, 8, 16, 32, 64, 128, 1, 2, 3, 5, 7, 9, 12, 33])
def test_hamming_distances_match_bruteforce(nbytes: int, small_chunks: None) -> None:
    rng = np.random.default_rng(nbytes)
    bits = nbytes * 8
    codes = rng.random((2500, bits)) < 0.5
    codes[:40] = codes[40:80]  # duplicates
    queries = rng.random((5, bits)) < 0.5
    queries[0] = codes[7]  # distance 0 to at least two rows
    queries[1] = ~codes[3]  # the maximum distance, bits
    packed, qpacked = pack_codes(codes), pack_codes(queries)
    expected = np.stack([_ref_hamming(q, codes) for q in queries])
    for i in range(len(queries)):
        got = hamming_distances(qpacked[i], packed)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected[i])
    np.testing.assert_array_equal(hamming_distances_batch(qpacked, packed), expected)
    assert expected[1, 3] == bits and expected[0].min() == 0


def test_hamming_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="bytes"):
        hamming_distances(np.zeros(4, np.uint8), np.zeros((3, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        hamming_distances(np.zeros(8, bool), np.zeros((3, 8), np.uint8))


# --------------------------------------------------------------------------- search vs reference


def _check_against_reference(index, codes_bits, rng, mode, k, pool_factor=2, classes=2, n_queries=25):
    n = len(index)
    patients = index.items["patient_id"].unique().tolist()
    for j in range(n_queries):
        if j % 2:
            q_bits = codes_bits[rng.integers(0, n)].copy()  # a database code: many exact ties
            q_fc = index.fc[rng.integers(0, n)].astype(np.float32)
        else:
            q_bits = rng.random(index.bits) < 0.5
            q_fc = rng.integers(0, 3, index.fc_dim).astype(np.float32)
        q_class = int(rng.integers(0, classes))
        excl = patients[j % len(patients)] if j % 3 == 0 else None
        want_rows, want_ham, want_eu, want_fb = _ref_search(
            index, codes_bits, q_bits, q_fc, q_class, k, mode, pool_factor, excl
        )
        hits = search(
            index, pack_codes(q_bits[None])[0], q_fc, q_class, k=k, mode=mode, pool_factor=pool_factor,
            exclude_patient=excl,
        )  # fmt: skip
        assert [h.row for h in hits] == want_rows
        assert [h.hamming for h in hits] == want_ham
        assert [h.rank for h in hits] == list(range(1, len(want_rows) + 1))
        assert all(h.class_fallback == want_fb for h in hits)
        if excl is not None:
            assert all(h.patient_id != excl for h in hits)
        if want_eu is None:
            assert all(h.euclidean is None for h in hits)
        else:
            np.testing.assert_allclose([h.euclidean for h in hits], want_eu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["hierarchical", "rerank", "hamming"])
@pytest.mark.parametrize("bits", [16, 64, 24])
def test_search_matches_reference_with_many_ties(mode: str, bits: int, small_chunks: None) -> None:
    rng = np.random.default_rng(bits)
    index, codes_bits = _tied_index(rng, n=3000, bits=bits, classes=3)
    for k in (1, 5, 10):
        _check_against_reference(index, codes_bits, rng, mode, k, pool_factor=2, classes=3, n_queries=12)
    _check_against_reference(index, codes_bits, rng, mode, 7, pool_factor=3.5, classes=3, n_queries=6)


@pytest.mark.parametrize("mode", ["hierarchical", "rerank", "hamming"])
def test_search_matches_reference_on_random_256_bit_codes(mode: str, small_chunks: None) -> None:
    rng = np.random.default_rng(7)
    n = 2600
    codes_bits = rng.random((n, 256)) < 0.5
    codes_bits[100:130] = codes_bits[0]  # a block of identical codes
    fc = rng.integers(-3, 4, (n, 16)).astype(np.float32)
    fc[100:130] = fc[0]
    index = build_index(codes_bits, fc, rng.integers(0, 2, n), _items(n, rng), model_version="m")
    _check_against_reference(index, codes_bits, rng, mode, k=10)


def test_search_with_real_valued_features() -> None:
    rng = np.random.default_rng(3)
    n = 500
    codes_bits = rng.random((n, 32)) < 0.5
    fc = rng.normal(size=(n, 64)).astype(np.float32)
    index = build_index(codes_bits, fc, rng.integers(0, 2, n), _items(n, rng), model_version="m")
    for mode in ("hierarchical", "rerank"):
        _check_against_reference(index, codes_bits, rng, mode, k=10, n_queries=10)


def test_item_finds_itself_first_at_distance_zero() -> None:
    rng = np.random.default_rng(11)
    n = 400
    codes_bits = rng.random((n, 128)) < 0.5
    fc = rng.normal(size=(n, 32)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    index = build_index(codes_bits, fc, labels, _items(n, rng), model_version="m")
    row = 123
    hits = search(index, index.codes[row], fc[row], int(labels[row]), k=3)
    assert hits[0].row == row and hits[0].hamming == 0 and hits[0].euclidean == 0.0
    # Excluding the item's patient removes it and every other nodule of that patient.
    patient = index.items.loc[row, "patient_id"]
    hits = search(index, index.codes[row], fc[row], int(labels[row]), k=50, exclude_patient=patient)
    assert row not in [h.row for h in hits] and all(h.patient_id != patient for h in hits)
    hits = search(index, index.codes[row], fc[row], int(labels[row]), k=3, exclude_rows=[row])
    assert row not in [h.row for h in hits]


def test_hit_fields_and_json_contract() -> None:
    rng = np.random.default_rng(5)
    n = 60
    items = _items(n, rng)
    index = build_index(rng.random((n, 64)) < 0.5, rng.normal(size=(n, 8)), rng.integers(0, 2, n), items, "m")
    hits = search(index, index.codes[0], index.fc[0], 1, k=5)
    for hit in hits:
        doc = hit.to_json()
        assert tuple(doc) == JSON_KEYS
        assert json.loads(json.dumps(doc)) == doc
        assert doc["index_version"] == index.index_version
        assert doc["label"] == 1 and isinstance(doc["hamming"], int) and isinstance(doc["euclidean"], float)
        want = items.loc[hit.row, "malignancy"]
        assert doc["malignancy"] == (None if np.isnan(want) else float(want))
        assert doc["nodule_id"] == items.loc[hit.row, "nodule_id"]
    flat = search(index, index.codes[0], None, None, k=5, mode="hamming")
    assert all(h.euclidean is None and h.to_json()["euclidean"] is None for h in flat)


def test_k_larger_than_database_and_bad_arguments() -> None:
    rng = np.random.default_rng(2)
    n = 9
    index = build_index(rng.random((n, 32)) < 0.5, rng.normal(size=(n, 4)), np.zeros(n, int), _items(n, rng), "m")
    for mode in ("hamming", "rerank", "hierarchical"):
        hits = search(index, index.codes[0], index.fc[0], 0, k=50, mode=mode)
        assert sorted(h.row for h in hits) == list(range(n))
    batch = search_batch(index, index.codes[:2], index.fc[:2], [0, 0], k=12)
    assert batch.rows.shape == (2, 12)
    assert (batch.rows[:, n:] == -1).all() and (batch.hamming[:, n:] == -1).all()
    assert np.isnan(batch.euclidean[:, n:]).all() and (batch.rows[:, :n] >= 0).all()
    with pytest.raises(ValueError, match="k must be"):
        search(index, index.codes[0], index.fc[0], 0, k=0)
    with pytest.raises(ValueError, match="mode"):
        search(index, index.codes[0], index.fc[0], 0, mode="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="predicted class"):
        search(index, index.codes[0], index.fc[0], None)
    with pytest.raises(ValueError, match="query_fc"):
        search(index, index.codes[0], None, 0, mode="rerank")
    with pytest.raises(ValueError, match="bytes"):
        search(index, index.codes[0][:2], index.fc[0], 0)


def test_empty_class_library_falls_back_to_whole_database() -> None:
    rng = np.random.default_rng(4)
    n = 200
    codes_bits = rng.random((n, 64)) < 0.5
    fc = rng.normal(size=(n, 8))
    index = build_index(codes_bits, fc, np.zeros(n, int), _items(n, rng), "m")
    gated = search(index, index.codes[3], fc[3], 1, k=10, mode="hierarchical")
    flat = search(index, index.codes[3], fc[3], 1, k=10, mode="rerank")
    assert [h.row for h in gated] == [h.row for h in flat]
    assert all(h.class_fallback for h in gated) and not any(h.class_fallback for h in flat)
    # A class library emptied by the patient exclusion falls back too.
    labels = np.zeros(n, int)
    items = _items(n, rng)
    items.loc[:4, "patient_id"] = "LIDC-IDRI-9999"
    items.loc[5:, "patient_id"] = "LIDC-IDRI-0001"
    labels[:5] = 1
    index = build_index(codes_bits, fc, labels, items, "m")
    assert not search(index, index.codes[0], fc[0], 1, k=3)[0].class_fallback
    hits = search(index, index.codes[0], fc[0], 1, k=3, exclude_patient="LIDC-IDRI-9999")
    assert all(h.class_fallback and h.label == 0 for h in hits)
    batch = search_batch(index, index.codes[:2], fc[:2], [1, 0], k=3, exclude_patients=["LIDC-IDRI-9999", None])
    assert batch.class_fallback.tolist() == [True, False]


def test_search_batch_equals_single_searches(small_chunks: None) -> None:
    rng = np.random.default_rng(9)
    index, _ = _tied_index(rng, n=2100, bits=64)
    q = 15
    q_bits = rng.random((q, 64)) < 0.5
    q_fc = rng.integers(0, 3, (q, 4)).astype(np.float32)
    q_class = rng.integers(0, 2, q)
    excl = [None if i % 2 else index.items["patient_id"].iloc[i] for i in range(q)]
    for mode in ("hierarchical", "rerank", "hamming"):
        batch = search_batch(index, pack_codes(q_bits), q_fc, q_class, k=8, mode=mode, exclude_patients=excl)
        for i in range(q):
            hits = search(index, q_bits[i], q_fc[i], int(q_class[i]), k=8, mode=mode, exclude_patient=excl[i])
            assert batch.rows[i].tolist() == [h.row for h in hits]
            assert batch.hamming[i].tolist() == [h.hamming for h in hits]
            if mode != "hamming":
                np.testing.assert_array_equal(batch.euclidean[i], np.float32([h.euclidean for h in hits]))


# --------------------------------------------------------------------------- index build, save, load


def test_build_validates_inputs() -> None:
    rng = np.random.default_rng(0)
    items = _items(10, rng)
    codes = rng.random((10, 64)) < 0.5
    fc = rng.normal(size=(10, 8))
    labels = rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="number of items"):
        build_index(codes, fc[:9], labels, items, "m")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_index(codes[:, :12], fc, labels, items, "m")
    bad = fc.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*row 4"):
        build_index(codes, bad, labels, items, "m")
    with pytest.raises(ValueError, match=r"NaN.*row 4"):
        build_index(codes, bad.astype(np.float16), labels, items, "m")
    bad[4, 2] = -np.inf
    with pytest.raises(ValueError, match=r"infinite.*row 4"):
        build_index(codes, bad.astype(np.float16), labels, items, "m")
    with pytest.raises(ValueError, match="float16"):
        build_index(codes, fc * 1e6, labels, items, "m")
    with pytest.raises(ValueError, match="nodule_id"):
        build_index(codes, fc, labels, items.drop(columns="nodule_id"), "m")
    with pytest.raises(ValueError, match="integers"):
        build_index(codes, fc, labels.astype(float), items, "m")
    # Packed and boolean codes give the same index; the caller's arrays stay writeable.
    packed = pack_codes(codes)
    a = build_index(codes, fc, labels, items, "m")
    b = build_index(packed, fc, labels, items, "m")
    assert a.index_version == b.index_version and a.bits == 64 and packed.flags.writeable
    np.testing.assert_array_equal(unpack_codes(a.codes, 64), codes)
    assert a.fc.dtype == np.float16 and a.labels.dtype == np.int8 and (a.predicted == -1).all()
    assert bytes_per_item(a) == 8 + 8 * 2 + 2


def test_save_load_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    n = 300
    codes_bits = rng.random((n, 256)) < 0.5
    fc = rng.normal(size=(n, 512)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    predicted = labels.copy()
    predicted[:10] ^= 1
    items = _items(n, rng)
    index = build_index(codes_bits, fc, labels, items, model_version="model-abc", predicted=predicted)
    folder = tmp_path / "hash_index"
    save_index(index, folder)
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["count"] == n and manifest["bits"] == 256
    assert manifest["index_version"] == index.index_version and manifest["bytes_per_item"] == 32 + 1024 + 2

    loaded = load_index(folder, verify=True)
    assert isinstance(loaded.codes, np.memmap) and isinstance(loaded.fc, np.memmap)
    for name in ("codes", "fc", "labels", "predicted"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
        assert getattr(loaded, name).dtype == getattr(index, name).dtype
    pd.testing.assert_frame_equal(loaded.items, index.items)
    assert (loaded.index_version, loaded.model_version, loaded.bits) == (index.index_version, "model-abc", 256)
    copied = load_index(folder, mmap=False)
    assert not isinstance(copied.codes, np.memmap)
    for mode in ("hierarchical", "rerank", "hamming"):
        before = search(index, index.codes[5], fc[5], 1, k=10, mode=mode)
        after = search(loaded, index.codes[5], fc[5], 1, k=10, mode=mode)
        assert [h.to_json() for h in before] == [h.to_json() for h in after]

    # Saving again (from the memory-mapped copy, over the same folder) keeps the version.
    save_index(loaded, folder)
    assert load_index(folder, verify=True).index_version == index.index_version


def _searcher_of_rois(rois: np.ndarray, rng: np.random.Generator) -> NoduleSearcher:
    """A searcher over ``rois`` with an untrained small network, one patient per ROI: what the
    library stores its images as is the point here, not how well they are found."""
    network = NetworkConfig(bits=32, lstm_hidden=16, attention_dim=16, fc_dim=64)
    model = TrainedModel(HashNet(network).eval(), network, TrainConfig(), NormalisationStats("percentile", 0.0, 1.0))
    encoded = encode(model, rois)
    items = _items(len(rois), rng).assign(patient_id=[f"P{i}" for i in range(len(rois))])
    index = build_index(encoded.codes, encoded.fc, rng.integers(0, 2, len(rois)), items, "m", rois=rois)
    return NoduleSearcher(model, index, "m")


def test_library_rois_keep_their_values_through_save_and_load(tmp_path) -> None:
    """A table not in HU (0..1) keeps its float32 values, and search by nodule re-encodes exactly
    those; whole HU stay int16 (half the bytes); half HU and whole numbers beyond int16 stay float32."""
    rng = np.random.default_rng(9)
    hu = rng.integers(-1024, 1500, (6, 32, 32)).astype(np.float32)
    wide = hu.copy()
    wide[2, 3, 4] = 40000
    tables = {
        "unit": (rng.random((6, 32, 32)).astype(np.float32), np.float32),
        "hu": (hu, np.int16),
        "half_hu": (hu + np.float32(0.5), np.float32),
        "wide": (wide, np.float32),
    }
    for name, (rois, dtype) in tables.items():
        searcher = _searcher_of_rois(rois, rng)
        assert searcher.index.rois.dtype == dtype and np.array_equal(searcher.index.rois, rois)
        save_index(searcher.index, tmp_path / name)
        loaded = load_index(tmp_path / name, verify=True)
        assert loaded.rois.dtype == dtype and np.array_equal(loaded.rois, rois)
        response = NoduleSearcher(searcher.model, loaded, "m").search_nodule("N1", k=3)
        assert np.array_equal(response.query_image, rois[1]), name
    np.save(tmp_path / "unit" / "rois.npy", tables["unit"][0].astype(np.float64))
    with pytest.raises(IndexFormatError, match="rois must be int16 or float32, got float64"):
        load_index(tmp_path / "unit")


def test_index_version_changes_with_content() -> None:
    rng = np.random.default_rng(6)
    n = 50
    codes = rng.random((n, 64)) < 0.5
    fc = rng.normal(size=(n, 8))
    labels = rng.integers(0, 2, n)
    items = _items(n, rng)
    base = build_index(codes, fc, labels, items, "m").index_version
    assert build_index(codes, fc, labels, items, "other-model").index_version == base
    flipped = codes.copy()
    flipped[3, 5] ^= True
    other_fc = fc.copy()
    other_fc[2, 1] += 0.5
    other_items = items.copy()
    other_items.loc[7, "nodule_id"] = "changed"
    other_labels = labels.copy()
    other_labels[0] ^= 1
    versions = {
        build_index(flipped, fc, labels, items, "m").index_version,
        build_index(codes, other_fc, labels, items, "m").index_version,
        build_index(codes, fc, labels, other_items, "m").index_version,
        build_index(codes, fc, other_labels, items, "m").index_version,
    }
    assert base not in versions and len(versions) == 4


def test_load_refuses_unknown_format_and_missing_files(tmp_path) -> None:
    rng = np.random.default_rng(8)
    index = build_index(rng.random((5, 32)) < 0.5, rng.normal(size=(5, 4)), [0, 1, 0, 1, 1], _items(5, rng), "m")
    folder = tmp_path / "idx"
    save_index(index, folder)
    manifest_path = folder / "index.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=rf"{folder}.*format version {FORMAT_VERSION + 1}"):
        load_index(folder)

    save_index(index, folder)
    (folder / "fc.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"idx lacks fc\.npy"):
        load_index(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_index(tmp_path / "nowhere")

    save_index(index, folder)
    np.save(folder / "codes.npy", np.zeros((5, 4), np.uint8))  # files no longer match the manifest
    assert load_index(folder).index_version == index.index_version
    with pytest.raises(IndexFormatError, match="does not match"):
        load_index(folder, verify=True)


def test_empty_index_returns_no_hits(tmp_path) -> None:
    items = pd.DataFrame({"patient_id": pd.Series(dtype=str), "nodule_id": pd.Series(dtype=str)})
    index = build_index(np.zeros((0, 64), bool), np.zeros((0, 8)), np.zeros(0, int), items, "m")
    assert search(index, np.zeros(8, np.uint8), np.zeros(8), 0, k=5) == []
    batch = search_batch(index, np.zeros((2, 8), np.uint8), None, None, k=3, mode="hamming")
    assert (batch.rows == -1).all() and batch.rows.shape == (2, 3)
    save_index(index, tmp_path / "empty")
    assert len(load_index(tmp_path / "empty", verify=True)) == 0


@pytest.mark.parametrize("mode", ["hierarchical", "rerank", "hamming"])
def test_permuting_the_database_rows_returns_the_same_nodules(mode: str) -> None:
    """Collapsed codes (whole classes at Hamming 0) and tied features: row order must not decide."""
    rng = np.random.default_rng(21)
    n, bits = 800, 64
    labels = rng.integers(0, 2, n)
    codes = np.repeat((rng.random((2, bits)) < 0.5), n, axis=0)[labels * n + np.arange(n)]  # one code per class
    codes[: n // 4] ^= rng.random((n // 4, bits)) < 2 / bits  # a quarter a bit or two away
    fc = rng.integers(0, 2, (n, 3)).astype(np.float32)
    items = _items(n, rng).sort_values("malignancy", kind="stable").reset_index(drop=True)
    original = build_index(codes, fc, labels, items, model_version="m")
    order = rng.permutation(n)
    permuted = build_index(codes[order], fc[order], labels[order], items.iloc[order].reset_index(drop=True), "m")
    queries = rng.integers(0, n, 20)
    for q in queries:
        q_code, q_fc, q_class = pack_codes(codes[q][None])[0], fc[q], int(labels[q])
        for k in (1, 10, 37):
            first = search(original, q_code, q_fc, q_class, k=k, mode=mode)
            second = search(permuted, q_code, q_fc, q_class, k=k, mode=mode)
            assert [h.nodule_id for h in first] == [h.nodule_id for h in second]
            assert [h.hamming for h in first] == [h.hamming for h in second]
    batch = [
        search_batch(ix, pack_codes(codes[queries]), fc[queries], labels[queries], k=10, mode=mode)
        for ix in (original, permuted)
    ]
    ids = [ix.items["nodule_id"].to_numpy()[b.rows] for ix, b in zip((original, permuted), batch)]
    np.testing.assert_array_equal(ids[0], ids[1])


def test_the_pool_holds_every_row_tied_at_its_boundary() -> None:
    """k=2, pool 4: one row at distance 0 and 30 at distance 1. All 30 are re-ranked by fc, so the
    row nearest in fc wins even though 26 rows of its Hamming distance precede it."""
    n, bits = 31, 16
    codes = np.zeros((n, bits), dtype=bool)
    codes[1:, 0] = True
    fc = np.full((n, 2), 5.0, dtype=np.float32)
    fc[0] = 3.0
    fc[30] = 0.0  # the last row of the tied group is nearest to the query in fc
    rng = np.random.default_rng(0)
    index = build_index(codes, fc, np.zeros(n, int), _items(n, rng), model_version="m")
    hits = search(index, pack_codes(np.zeros((1, bits), bool))[0], np.zeros(2), 0, k=2, mode="rerank")
    assert [h.row for h in hits] == [30, 0]


def _annotated_index(rng: np.random.Generator, n: int, bits: int) -> tuple[HashIndex, np.ndarray]:
    """A tied index whose nodules have 1 to 5 reader annotations each (rows of one nodule share
    its patient), as a library of reader annotations has."""
    index, codes = _tied_index(rng, n, bits)
    items = index.items.copy()
    readers = rng.integers(1, 6, n)
    nodule = np.repeat(np.arange(n), readers)[:n]
    items["nodule_id"] = [f"N{i:04d}" for i in nodule]
    items["patient_id"] = [f"LIDC-IDRI-{i % 60:04d}" for i in nodule]
    return build_index(codes, index.fc, index.labels, items, model_version="m1"), codes


@pytest.mark.parametrize("mode", ["hierarchical", "rerank", "hamming"])
def test_nodule_hits_are_the_first_place_of_each_nodule_in_the_whole_ranking(mode: str, small_chunks: None) -> None:
    """A nodule stands where its best annotation ranks among the k x (most annotations) rows asked
    for; in Hamming order (a ranking that does not depend on k) that is exactly the first k nodules
    of the whole ranking. (The Euclidean rerank reorders a pool that grows with the rows asked for,
    so there the nodule search reranks a larger pool than an annotation search of k.) The batch
    fold agrees, and row order does not matter."""
    rng = np.random.default_rng(31)
    index, codes = _annotated_index(rng, n=900, bits=32)
    nodules = nodule_of_rows(index)
    assert np.bincount(nodules).max() == 5
    order = rng.permutation(len(index))
    permuted = build_index(
        codes[order], index.fc[order], index.labels[order], index.items.iloc[order].reset_index(drop=True), "m1"
    )
    queries = rng.integers(0, len(index), 12)
    q_code, q_fc, q_class = pack_codes(codes[queries]), np.asarray(index.fc[queries]), index.labels[queries]
    for k in (1, 7, 40):
        batch = fold_batch(
            search_batch(index, q_code, q_fc, q_class, k=rows_for_nodules(nodules, k), mode=mode), nodules, k
        )
        for i in range(len(queries)):
            asked = search(index, q_code[i], q_fc[i], int(q_class[i]), k=rows_for_nodules(nodules, k), mode=mode)
            expected = list(dict.fromkeys(hit.nodule_id for hit in asked))[:k]
            assert len(expected) == min(k, len(set(index.items["nodule_id"])))  # the rows asked hold k nodules
            if mode == "hamming":
                whole = search(index, q_code[i], q_fc[i], int(q_class[i]), k=len(index), mode=mode)
                assert expected == list(dict.fromkeys(hit.nodule_id for hit in whole))[:k]
            folded = fold_hits(asked, nodules, k)
            assert [hit.nodule_id for hit in folded] == expected
            assert [hit.rank for hit in folded] == list(range(1, len(expected) + 1))
            best = {hit.nodule_id: hit.row for hit in reversed(asked)}
            assert [hit.row for hit in folded] == [best[nodule] for nodule in expected]
            assert batch.rows[i, : len(folded)].tolist() == [hit.row for hit in folded]
            assert (batch.rows[i, len(folded) :] == -1).all()
            other = search(
                permuted,
                q_code[i],
                q_fc[i],
                int(q_class[i]),
                k=rows_for_nodules(nodule_of_rows(permuted), k),
                mode=mode,
            )
            assert [hit.nodule_id for hit in fold_hits(other, nodule_of_rows(permuted), k)] == expected
