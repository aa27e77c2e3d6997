"""Coarse-to-fine retrieval over a :class:`HashIndex` (Hao et al. 2022, section 2.3; DESIGN section 2).

Three modes, so the report can show what each stage adds (DESIGN section 3.3):

- ``"hamming"``: the k nearest database items by Hamming distance on the codes (flat).
- ``"rerank"``: the ``pool_factor * k`` nearest by Hamming, re-ranked by Euclidean distance on
  ``fc``; top k.
- ``"hierarchical"`` (the paper): only database items whose ground-truth label equals the
  query's *predicted* class (the "class library"), then Hamming pool, then Euclidean re-rank.
  When that library is empty (after exclusions) the whole database is searched instead and every
  hit carries ``class_fallback=True``.

Ties are never broken at random: at every stage equal distances go to the lower database row
(DESIGN section 6), and the candidate pool is selected exactly, ties at its boundary included.

Speed: on first use an index gets a search layout cached on it (codes as uint64 words,
column-major and grouped by label, so a class-gated query scans only its class and every step is
a long contiguous numpy loop). At 10^6 items x 256 bits that costs ~32 MB of RAM beside the codes
and makes one query a few milliseconds on one core.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from nodule_pipeline.hashing.codes import pack_codes
from nodule_pipeline.hashing.index import HashIndex

log = logging.getLogger(__name__)

Mode = Literal["hamming", "rerank", "hierarchical"]
MODES: tuple[str, ...] = ("hamming", "rerank", "hierarchical")
JSON_KEYS = ("rank", "patient_id", "nodule_id", "label", "malignancy", "hamming", "euclidean", "index_version")

_EXCLUDED = np.uint16(0xFFFF)  # a distance no real code reaches (bits <= 65520): "not a candidate"
_CHUNK_BYTES = 1 << 21  # per-chunk XOR buffer of the Hamming kernel (64K rows of 256 bits): about L2 size
_LAYOUT_KEY = "search_layout"
_PATIENTS_KEY = "search_patient_rows"
_layout_lock = threading.Lock()


# --------------------------------------------------------------------------- Hamming distances


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed codes (..., B) as uint64 words when B % 8 == 0 (8x fewer popcounts), else uint8."""
    if packed.shape[-1] % 8 == 0 and packed.shape[-1] > 0 and packed.flags.c_contiguous:
        return packed.view(np.uint64)
    return packed


def _chunk_rows(words_per_code: int, itemsize: int) -> int:
    return max(1024, _CHUNK_BYTES // max(1, words_per_code * itemsize))


def _check_packed(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"{what} must be packed uint8 codes (np.packbits), got dtype {codes.dtype}")
    return np.ascontiguousarray(codes)


def hamming_distances(query_packed: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance (int32, (n,)) from one packed query (B,) to every packed code (n, B).

    XOR + ``np.bitwise_count`` over uint64 words, chunked so the temporaries stay in cache.
    """
    codes = _check_packed(codes, "codes")
    query = _check_packed(query_packed, "query").reshape(-1)
    if codes.ndim != 2 or codes.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} bytes but codes have shape {codes.shape}")
    words, qwords = _as_words(codes), _as_words(query)
    n, width = words.shape
    out = np.empty(n, dtype=np.uint16)
    step = _chunk_rows(width, words.itemsize)
    xor = np.empty((width, min(step, n)), dtype=words.dtype)
    counts = np.empty(xor.shape, dtype=np.uint8)
    for start in range(0, n, step):
        stop = min(start + step, n)
        m = stop - start
        # Transposing the chunk makes each ufunc loop run over rows (long), not over words (short).
        np.bitwise_xor(words[start:stop].T, qwords[:, None], out=xor[:, :m])
        np.bitwise_count(xor[:, :m], out=counts[:, :m])
        np.add.reduce(counts[:, :m], axis=0, dtype=np.uint16, out=out[start:stop])
    return out.astype(np.int32)


def hamming_distances_batch(queries_packed: np.ndarray, codes: np.ndarray, query_block: int = 16) -> np.ndarray:
    """Hamming distances (int32, (q, n)) from many packed queries (q, B) to packed codes (n, B).

    The database is walked in chunks, each transposed once and compared against every query while
    it is in cache, so the cost grows with q * n without re-reading the codes q times from memory.
    """
    codes = _check_packed(codes, "codes")
    queries = _check_packed(queries_packed, "queries")
    if queries.ndim != 2 or codes.ndim != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"queries {queries.shape} and codes {codes.shape} must both be (rows, same bytes)")
    words, qwords = _as_words(codes), _as_words(queries)
    n, width = words.shape
    nq = qwords.shape[0]
    out = np.empty((nq, n), dtype=np.int32)
    step = max(256, _chunk_rows(width, words.itemsize) // max(1, query_block))
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = np.ascontiguousarray(words[start:stop].T)  # (width, m)
        for q0 in range(0, nq, query_block):
            q1 = min(q0 + query_block, nq)
            counts = np.bitwise_count(qwords[q0:q1, :, None] ^ block[None, :, :])
            out[q0:q1, start:stop] = counts.sum(axis=1, dtype=np.uint16)
    return out


# --------------------------------------------------------------------------- search layout


@dataclass(frozen=True)
class _Layout:
    """Codes regrouped for fast scans; position p holds database row ``row_of_pos[p]``."""

    words_t: np.ndarray  # (width, n) uint64 (or uint8) words, column-major, rows grouped by label
    row_of_pos: np.ndarray  # int64 (n,); ascending within each label segment
    pos_of_row: np.ndarray  # int64 (n,)
    segments: dict[int, tuple[int, int]]  # label -> [start, stop) positions


def prepare_search(index: HashIndex) -> None:
    """Build the search layout now (it is otherwise built by the first query): ~0.1 s per 10^6 items."""
    _layout(index)


def _layout(index: HashIndex) -> _Layout:
    layout = index._cache.get(_LAYOUT_KEY)
    if layout is not None:
        return layout
    with _layout_lock:
        layout = index._cache.get(_LAYOUT_KEY)
        if layout is None:
            layout = _build_layout(index)
            index._cache[_LAYOUT_KEY] = layout
    return layout


def _build_layout(index: HashIndex) -> _Layout:
    labels = np.asarray(index.labels)
    n = len(labels)
    order = np.argsort(labels, kind="stable").astype(np.int64)
    pos_of_row = np.empty(n, dtype=np.int64)
    pos_of_row[order] = np.arange(n, dtype=np.int64)
    words = _as_words(np.ascontiguousarray(index.codes))
    words_t = np.empty((words.shape[1], n), dtype=words.dtype)
    for w in range(words.shape[1]):
        words_t[w] = words[:, w][order]
    sorted_labels = labels[order]
    values, starts = np.unique(sorted_labels, return_index=True)
    stops = [*starts[1:].tolist(), n]
    segments = {int(v): (int(a), int(b)) for v, a, b in zip(values, starts, stops)}
    return _Layout(words_t, order, pos_of_row, segments)


@dataclass(frozen=True)
class _PatientRows:
    """Rows grouped by patient (built on the first ``exclude_patient``), one lookup per query."""

    patients: pd.Index
    by_patient: np.ndarray  # int64 rows, grouped by patient, ascending within a patient
    bounds: np.ndarray  # group i is by_patient[bounds[i]:bounds[i + 1]]

    def rows(self, patient_id: str) -> np.ndarray:
        i = int(self.patients.get_indexer([patient_id])[0])
        if i < 0:
            return np.empty(0, dtype=np.int64)
        return self.by_patient[self.bounds[i] : self.bounds[i + 1]]


def _patient_rows(index: HashIndex) -> _PatientRows:
    cached = index._cache.get(_PATIENTS_KEY)
    if cached is None:
        codes, patients = pd.factorize(index.items["patient_id"].astype(str).to_numpy(), sort=False)
        by_patient = np.argsort(codes, kind="stable").astype(np.int64)
        bounds = np.searchsorted(codes[by_patient], np.arange(len(patients) + 1))
        cached = _PatientRows(pd.Index(patients), by_patient, bounds)
        index._cache[_PATIENTS_KEY] = cached
    return cached


# --------------------------------------------------------------------------- exact top-m selection


def _smallest(rows: np.ndarray, dist: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m smallest by (dist, row), unordered: partition for the threshold, ties by lowest row."""
    if len(rows) <= m:
        return rows, dist
    t = np.partition(dist, m - 1)[m - 1]
    below = np.flatnonzero(dist < t)
    ties = np.flatnonzero(dist == t)
    need = m - len(below)
    if len(ties) > need:
        ties = ties[np.argsort(rows[ties], kind="stable")[:need]]
    keep = np.concatenate([below, ties])
    return rows[keep], dist[keep]


def _sorted(rows: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, dist))
    return rows[order], dist[order]


def _hamming_pool(
    layout: _Layout, qwords: np.ndarray, spans: list[tuple[int, int]], excluded_pos: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact m nearest rows by (Hamming, row) among the positions in ``spans``, sorted.

    Distances are computed chunk by chunk and filtered against the running m-th distance while
    the chunk is in cache, so only a handful of candidates ever leave the kernel.
    """
    words_t, row_of_pos = layout.words_t, layout.row_of_pos
    width = words_t.shape[0]
    step = _chunk_rows(width, words_t.itemsize)
    xor = np.empty((width, step), dtype=words_t.dtype)
    counts = np.empty((width, step), dtype=np.uint8)
    dist = np.empty(step, dtype=np.uint16)
    mask = np.empty(step, dtype=bool)
    qcol = qwords[:, None]
    best_rows = np.empty(0, dtype=np.int64)
    best_dist = np.empty(0, dtype=np.uint16)
    full, worst, worst_row = False, 0, -1  # worst_row: highest kept row at the worst kept distance
    for span_start, span_stop in spans:
        for start in range(span_start, span_stop, step):
            stop = min(start + step, span_stop)
            k = stop - start
            d, keep = dist[:k], mask[:k]
            np.bitwise_xor(words_t[:, start:stop], qcol, out=xor[:, :k])
            np.bitwise_count(xor[:, :k], out=counts[:, :k])
            np.add.reduce(counts[:, :k], axis=0, dtype=np.uint16, out=d)
            if excluded_pos.size:
                lo, hi = np.searchsorted(excluded_pos, (start, stop))
                d[excluded_pos[lo:hi] - start] = _EXCLUDED
            if not full:
                need = m - len(best_rows)
                if k > need:  # only the chunk's `need` nearest (ties included) can be kept
                    np.less_equal(d, min(int(np.partition(d, need - 1)[need - 1]), _EXCLUDED - 1), out=keep)
                else:
                    np.not_equal(d, _EXCLUDED, out=keep)
            elif row_of_pos[start] > worst_row:
                # Rows ascend within a span: this chunk's rows all lose a tie at the worst distance.
                np.less(d, worst, out=keep)
            else:
                np.less_equal(d, worst, out=keep)
            sel = keep.nonzero()[0]
            if sel.size:
                best_rows, best_dist = _smallest(
                    np.concatenate([best_rows, row_of_pos[start:stop][sel]]), np.concatenate([best_dist, d[sel]]), m
                )
                if len(best_rows) >= m:
                    full, worst = True, int(best_dist.max())
                    worst_row = int(best_rows[best_dist == worst].max())
    return _sorted(best_rows, best_dist)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchHit:
    """One retrieved nodule; ``to_json`` gives the contract of DESIGN section 6."""

    rank: int  # 1-based
    row: int  # row in the index (and in index.items)
    patient_id: str
    nodule_id: str
    label: int  # ground truth of the database item
    malignancy: float | None
    hamming: int
    euclidean: float | None  # None in "hamming" mode
    index_version: str
    class_fallback: bool = False  # gating asked for, class library empty: searched the whole database

    def to_json(self) -> dict[str, Any]:
        """Exactly the keys of the search-result contract, as plain JSON types."""
        return {
            "rank": self.rank,
            "patient_id": self.patient_id,
            "nodule_id": self.nodule_id,
            "label": self.label,
            "malignancy": self.malignancy,
            "hamming": self.hamming,
            "euclidean": self.euclidean,
            "index_version": self.index_version,
        }


def hits_to_json(hits: Iterable[SearchHit]) -> list[dict[str, Any]]:
    """A search result as the JSON list of ``nodule-pipeline search --json`` (best first)."""
    return [hit.to_json() for hit in hits]


@dataclass(frozen=True)
class BatchResult:
    """Many queries at once, for evaluation; rows beyond the database size are padded."""

    rows: np.ndarray  # int64 (q, k), -1 where fewer than k items were searchable
    hamming: np.ndarray  # int32 (q, k), -1 in padding
    euclidean: np.ndarray  # float32 (q, k), NaN in padding and in "hamming" mode
    class_fallback: np.ndarray  # bool (q,)


# --------------------------------------------------------------------------- search


def _query_words(index: HashIndex, query_code: np.ndarray) -> np.ndarray:
    """A query code as the index's word type; accepts packed uint8 (B,) or boolean/0-1 bits (bits,)."""
    code = np.asarray(query_code).reshape(-1)
    if code.dtype != np.uint8:
        if code.shape[0] != index.bits:
            raise ValueError(f"query code has {code.shape[0]} bits but the index has {index.bits}-bit codes")
        code = pack_codes(code.reshape(1, -1).astype(bool)).reshape(-1)
    if code.shape[0] != index.bits // 8:
        raise ValueError(f"packed query code has {code.shape[0]} bytes but the index codes have {index.bits // 8}")
    return _as_words(np.ascontiguousarray(code))


def _query_fc(index: HashIndex, query_fc: np.ndarray | None) -> np.ndarray:
    """Query features rounded through float16 like the database, so an item finds itself at 0."""
    if query_fc is None:
        raise ValueError("re-ranking needs the query's fc features (query_fc)")
    fc = np.asarray(query_fc, dtype=np.float64).reshape(-1)
    if fc.shape[0] != index.fc_dim:
        raise ValueError(f"query_fc has {fc.shape[0]} values but the index features have {index.fc_dim}")
    fc32 = fc.astype(np.float16).astype(np.float32)
    if not np.isfinite(fc32).all():
        raise ValueError("query_fc holds NaN/inf or values beyond the float16 range")
    return fc32


def _euclidean(index: HashIndex, rows: np.ndarray, query_fc32: np.ndarray) -> np.ndarray:
    """float32 Euclidean distances for the pool's rows only (never converts the whole fc matrix)."""
    diff = np.asarray(index.fc[rows], dtype=np.float32) - query_fc32
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _check_args(k: int, mode: str, pool_factor: float) -> int:
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; use one of {MODES}")
    if int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not pool_factor >= 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor!r}")
    return int(k)


def _excluded_positions(
    index: HashIndex, layout: _Layout, exclude_patient: str | None, exclude_rows: Iterable[int] | None
) -> np.ndarray:
    parts = []
    if exclude_patient is not None:
        parts.append(_patient_rows(index).rows(str(exclude_patient)))
    if exclude_rows is not None:
        rows = np.asarray(list(exclude_rows) if not isinstance(exclude_rows, np.ndarray) else exclude_rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(index)):
            raise ValueError(f"exclude_rows must be rows of the index (0..{len(index) - 1})")
        parts.append(rows)
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.unique(layout.pos_of_row[np.concatenate(parts)])


def _search_rows(
    index: HashIndex,
    qwords: np.ndarray,
    query_fc32: np.ndarray | None,
    query_class: int | None,
    k: int,
    mode: str,
    pool_factor: float,
    exclude_patient: str | None,
    exclude_rows: Iterable[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """Rows, Hamming and Euclidean distances of the top k (best first), and the fallback flag."""
    if len(index) == 0:
        return (
            np.empty(0, np.int64),
            np.empty(0, np.uint16),
            None if mode == "hamming" else np.empty(0, np.float32),
            False,
        )
    layout = _layout(index)
    excluded = _excluded_positions(index, layout, exclude_patient, exclude_rows)
    everything = [layout.segments[c] for c in sorted(layout.segments)]
    spans, fallback = everything, False
    if mode == "hierarchical":
        segment = layout.segments.get(int(query_class))  # type: ignore[arg-type]
        if segment is not None:
            lo, hi = np.searchsorted(excluded, segment)
            if segment[1] - segment[0] > hi - lo:
                spans = [segment]
        fallback = spans is everything
    if mode == "hamming":
        rows, ham = _hamming_pool(layout, qwords, spans, excluded, k)
        return rows, ham, None, fallback
    pool = max(k, math.ceil(pool_factor * k))
    rows, ham = _hamming_pool(layout, qwords, spans, excluded, pool)
    assert query_fc32 is not None
    eu = _euclidean(index, rows, query_fc32)
    order = np.lexsort((rows, eu))[:k]
    return rows[order], ham[order], eu[order], fallback


def search(
    index: HashIndex,
    query_code_packed: np.ndarray,
    query_fc: np.ndarray | None,
    query_class: int | None,
    k: int = 10,
    mode: Mode = "hierarchical",
    pool_factor: float = 2,
    exclude_patient: str | None = None,
    exclude_rows: Iterable[int] | None = None,
) -> list[SearchHit]:
    """The k most similar database items to one query, best first (fewer if the database is smaller).

    ``query_class`` is the model's predicted class for the query (needed by ``"hierarchical"``,
    ignored otherwise); ``query_fc`` is needed by ``"rerank"`` and ``"hierarchical"``.
    ``exclude_patient`` drops every item of that patient (a query from a database patient must
    not find its own nodule); ``exclude_rows`` drops given rows.
    """
    k = _check_args(k, mode, pool_factor)
    if mode == "hierarchical" and query_class is None:
        raise ValueError("hierarchical search needs the query's predicted class (query_class)")
    qwords = _query_words(index, query_code_packed)
    fc32 = None if mode == "hamming" else _query_fc(index, query_fc)
    rows, ham, eu, fallback = _search_rows(
        index, qwords, fc32, query_class, k, mode, pool_factor, exclude_patient, exclude_rows
    )
    if fallback:
        log.warning(
            "no item of class %s is searchable in index %s: searched the whole database",
            query_class,
            index.index_version,
        )
    items = index.items
    # ExtensionArray.take: a few microseconds, where Series.iloc costs ~0.1 ms per column.
    patients = [str(v) for v in items["patient_id"].array.take(rows)]
    nodules = [str(v) for v in items["nodule_id"].array.take(rows)]
    if "malignancy" in items.columns:
        malignancy = [None if pd.isna(v) else float(v) for v in items["malignancy"].array.take(rows)]
    else:
        malignancy = [None] * len(rows)
    labels = np.asarray(index.labels)[rows]
    return [
        SearchHit(
            rank=i + 1,
            row=int(rows[i]),
            patient_id=patients[i],
            nodule_id=nodules[i],
            label=int(labels[i]),
            malignancy=malignancy[i],
            hamming=int(ham[i]),
            euclidean=None if eu is None else float(eu[i]),
            index_version=index.index_version,
            class_fallback=fallback,
        )
        for i in range(len(rows))
    ]


def search_batch(
    index: HashIndex,
    query_codes_packed: np.ndarray,
    query_fc: np.ndarray | None,
    query_classes: Sequence[int] | np.ndarray | None,
    k: int = 10,
    mode: Mode = "hierarchical",
    pool_factor: float = 2,
    exclude_patients: Sequence[str | None] | None = None,
) -> BatchResult:
    """:func:`search` for q queries (packed codes (q, B), fc (q, d), predicted classes (q,)).

    Returns row indices and distances as arrays padded to k, the shape evaluation metrics want.
    """
    k = _check_args(k, mode, pool_factor)
    codes = np.asarray(query_codes_packed)
    if codes.ndim != 2:
        raise ValueError(f"query codes must be 2-D (q, bytes) or (q, bits), got shape {codes.shape}")
    nq = codes.shape[0]
    if mode != "hamming" and (query_fc is None or len(query_fc) != nq):
        raise ValueError(f"{mode} search needs query_fc with one row per query ({nq})")
    if mode == "hierarchical" and (query_classes is None or len(query_classes) != nq):
        raise ValueError(f"hierarchical search needs one predicted class per query ({nq})")
    if exclude_patients is not None and len(exclude_patients) != nq:
        raise ValueError(f"exclude_patients must hold one entry (or None) per query ({nq})")
    rows_out = np.full((nq, k), -1, dtype=np.int64)
    ham_out = np.full((nq, k), -1, dtype=np.int32)
    eu_out = np.full((nq, k), np.nan, dtype=np.float32)
    fallback_out = np.zeros(nq, dtype=bool)
    for i in range(nq):
        qwords = _query_words(index, codes[i])
        fc32 = None if mode == "hamming" else _query_fc(index, query_fc[i])  # type: ignore[index]
        qclass = None if query_classes is None else int(query_classes[i])
        patient = None if exclude_patients is None else exclude_patients[i]
        rows, ham, eu, fallback = _search_rows(index, qwords, fc32, qclass, k, mode, pool_factor, patient, None)
        rows_out[i, : len(rows)] = rows
        ham_out[i, : len(rows)] = ham
        if eu is not None:
            eu_out[i, : len(rows)] = eu
        fallback_out[i] = fallback
    return BatchResult(rows_out, ham_out, eu_out, fallback_out)
