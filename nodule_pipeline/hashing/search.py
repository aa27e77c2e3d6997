"""Coarse-to-fine retrieval over a :class:`HashIndex` (Hao et al. 2022, section 2.3; DESIGN section 2).

Three modes, so the report can show what each stage adds (DESIGN section 3.3):

- ``"hamming"``: the k nearest database items by Hamming distance on the codes (flat).
- ``"rerank"``: the ``pool_factor * k`` nearest by Hamming, re-ranked by Euclidean distance on
  ``fc``; top k.
- ``"hierarchical"`` (the paper): only database items whose ground-truth label equals the
  query's *predicted* class (the "class library"), then Hamming pool, then Euclidean re-rank.
  When that library is empty (after exclusions) the whole database is searched instead and every
  hit carries ``class_fallback=True``. Where the library holds the readers' ratings (its items'
  characteristic columns) and the query comes with the model's predicted ratings, the pool is
  :data:`RATING_POOL_FACTOR` x k and re-ranked by expected rating distance
  (:mod:`~nodule_pipeline.hashing.characteristics`), Euclidean distance settling ties: the order
  follows how readers describe nodules, which the graded nDCG measures. A library item that is
  the query's own nodule (the same code, features far closer than the rest of the pool: see
  :data:`SAME_NODULE_FRACTION`) still comes first.

Results never depend on database row order (DESIGN section 6): a candidate pool holds every item
tied at its boundary distance (so "the 2k nearest" may be more than 2k items), and final ties go
by a stable key, the item's ``nodule_id`` (then ``annotation_id`` where the items have one), never
by row position or at random. Permuting an index's rows therefore returns the same nodules.

Speed: the Hamming stage is one numba kernel (compiled on first use, cached on disk). On first
use an index gets a search layout cached on it: the codes as uint64 words, regrouped by label
so that every class library is one contiguous run with its rows ascending: a copy of the codes
plus an int32 row number per item, 36 bytes per item at 256 bits (only the row numbers when the
rows are grouped by label already). For a memory-mapped index search reads only this layout
once it is built. The kernel scans a run XOR + popcount per code and keeps the exact top m with a
per-distance histogram: a code is looked at twice only when it beats the current m-th best,
which after the first few thousand codes almost never happens, and since rows ascend within a
run "lower row wins a tie" is "first seen wins". A whole-database query scans every class run
and merges them by (distance, row). Many queries (``search_batch``) share one pass over the
codes, block by block while a block is in cache. At 10^6 items x 256 bits a flat query costs
about one read of the 32 MB of codes from memory (~2 ms on one core of the development machine,
caches cold) and a class-gated one its class's share. ``python -m nodule_pipeline.benchmarks.search``
measures it beside FAISS.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from nodule_pipeline.hashing.characteristics import ENCODED_WIDTH, encode_ratings, has_ratings, rating_distances
from nodule_pipeline.hashing.codes import pack_codes
from nodule_pipeline.hashing.index import HashIndex
from nodule_pipeline.hashing.metrics import RATING_NAMES, ratings_matrix

log = logging.getLogger(__name__)

Mode = Literal["hamming", "rerank", "hierarchical"]
MODES: tuple[str, ...] = ("hamming", "rerank", "hierarchical")
JSON_KEYS = ("rank", "patient_id", "nodule_id", "label", "malignancy", "hamming", "euclidean", "index_version")

_CHUNK_BYTES = 1 << 18  # codes per kernel block: 256 KB stays in L2 while every query of a batch scans it
_LAYOUT_KEY = "search_layout"
_PATIENTS_KEY = "search_patient_rows"
_ITEMS_KEY = "search_item_columns"
_STABLE_KEY = "search_stable_key"
TIE_KEY_COLUMNS = ("nodule_id", "annotation_id")
"""The item columns that settle equal distances, in order (those an index's items have)."""
_RATINGS_KEY = "search_reader_ratings"
RATING_POOL_FACTOR = 10
"""Pool of a rating re-rank, in multiples of k: on the real nodules the rating order inside the
class ranks best over the whole class library, and a Hamming pool of 10k keeps all but a point
of that at any library size (2k, the Euclidean pool, keeps less)."""
SAME_NODULE_FRACTION = 0.05
"""A pool item with the query's code whose ``fc`` distance is below this fraction of the pool's
median is the query's own nodule, ranked first by the rating re-rank: on the real sample a click
within a voxel of a library nodule's centre lands at 0.04-0.3 from it and 9-19 from every other
nodule, where the predicted ratings alone would put another nodule first."""
_layout_lock = threading.Lock()


# --------------------------------------------------------------------------- compiled kernels


def _jit(func):  # type: ignore[no-untyped-def]
    """``numba.njit`` with the compiled code cached on disk (where a cache folder is writable)."""
    try:
        return njit(cache=True, nogil=True)(func)
    except RuntimeError:  # no writable cache location (read-only install): compile per process
        return njit(nogil=True)(func)


@intrinsic
def _popcount(typingctx, x):  # type: ignore[no-untyped-def]
    """Number of set bits of an integer, as int64 (one POPCNT instruction)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        count = builder.ctpop(args[0])
        if x.bitwidth < 64:
            count = builder.zext(count, ir.IntType(64))
        return count

    return types.int64(x), codegen


@njit(inline="always")
def _distance(flat, base, qwords, qi, width):  # type: ignore[no-untyped-def]
    """Hamming distance from query ``qi`` to the code at ``flat[base:base + width]`` (base unsigned:
    no negative-index wraparound in the loop)."""
    d = 0
    for w in range(width):
        d += _popcount(flat[base + np.uint64(w)] ^ qwords[qi, w])
    return d


@njit(inline="always")
def _next_direct(flat, k, stop, qwords, qi, width, limit):  # type: ignore[no-untyped-def]
    """The first position k' in [k, stop) whose code is nearer than ``limit``, and its distance
    (``stop`` and 0 if none).

    A loop with no stores, so the query words stay in registers while the codes stream by; four
    codes a step, one branch for the four (~25% faster on 64-bit codes, the same on 256).
    """
    step = np.uint64(width)
    while k + 4 <= stop:
        base = np.uint64(k) * step
        d0 = _distance(flat, base, qwords, qi, width)
        d1 = _distance(flat, base + step, qwords, qi, width)
        d2 = _distance(flat, base + np.uint64(2) * step, qwords, qi, width)
        d3 = _distance(flat, base + np.uint64(3) * step, qwords, qi, width)
        if min(min(d0, d1), min(d2, d3)) < limit:
            if d0 < limit:
                return k, d0
            if d1 < limit:
                return k + 1, d1
            if d2 < limit:
                return k + 2, d2
            return k + 3, d3
        k += 4
    while k < stop:
        d = _distance(flat, np.uint64(k) * step, qwords, qi, width)
        if d < limit:
            return k, d
        k += 1
    return k, 0


@_jit
def _distances_kernel(words, tag, qwords, block, out):  # type: ignore[no-untyped-def]
    """out[q, r] = Hamming distance from query q to code r; the codes walked block by block."""
    n = words.shape[0]
    width = len(tag) if len(tag) else words.shape[1]
    flat = words.reshape(-1)
    step = np.uint64(width)
    for b0 in range(0, n, block):
        for qi in range(qwords.shape[0]):
            for r in range(b0, min(b0 + block, n)):
                out[qi, r] = _distance(flat, np.uint64(r) * step, qwords, qi, width)


@_jit
def _accept(v, pos, d, m, limit, hist, below, fill, buf_pos, buf_dist):  # type: ignore[no-untyped-def]
    """Keep a candidate of run ``v`` at distance ``d < limit``; returns the run's new limit.

    ``limit`` is the smallest distance L with at least m kept candidates at distance <= L (or
    bits + 1): a later code at a distance >= L can never enter the top m, since it loses to
    those m on distance or, being scanned later, on position. ``below`` counts kept candidates
    under the limit (always < m), ``hist`` kept candidates by distance.
    """
    f = fill[v]
    if f == buf_pos.shape[1]:  # full: drop candidates above the limit (at most 2m - 1 remain)
        g = 0
        for t in range(f):
            if buf_dist[v, t] <= limit:
                buf_pos[v, g] = buf_pos[v, t]
                buf_dist[v, g] = buf_dist[v, t]
                g += 1
        f = g
    buf_pos[v, f] = pos
    buf_dist[v, f] = d
    fill[v] = f + 1
    hist[v, d] += 1
    c = below[v] + 1
    while c >= m:
        limit -= 1
        c -= hist[v, limit]
    below[v] = c
    return limit


@_jit
def _topk_kernel(words, tag, row_of_pos, plan, qwords, m, block):  # type: ignore[no-untyped-def]
    """Exact m nearest rows by (Hamming, row) for each query: rows (q, m), distances (q, m), both
    sorted and padded with -1, and how many per query (q,).

    ``words`` (n, width) are the codes, position p holding row ``row_of_pos[p]``; ``tag`` is a
    tuple of ``width`` zeros, so that numba compiles the loops for that exact width (fully
    unrolled), or ``()`` for any width. ``plan`` is ``[nv, owner (nv), rptr (nv + 1), rlo,
    rhi]``: run ``v`` scans, for query ``owner[v]``, the positions ``[rlo[j], rhi[j])`` for ``j``
    in ``rptr[v]:rptr[v + 1]``; rows must ascend with positions within a run. Positions are
    walked block by block; within a block every run scans its part while the block is in cache.
    A query's runs are merged at the end by (distance, row).
    """
    nv = plan[0]
    owner = plan[1 : 1 + nv]
    rptr = plan[1 + nv : 2 + 2 * nv]
    nr = rptr[nv]
    rlo = plan[2 + 2 * nv : 2 + 2 * nv + nr]
    rhi = plan[2 + 2 * nv + nr : 2 + 2 * nv + 2 * nr]
    nq = qwords.shape[0]
    width = len(tag) if len(tag) else words.shape[1]
    flat = words.reshape(-1)
    bits = 8 * words.shape[1] * words.itemsize
    cap = 3 * m + 64
    hist = np.zeros((nv, bits + 2), np.int32)
    limit = np.full(nv, bits + 1, np.int64)
    below = np.zeros(nv, np.int64)
    fill = np.zeros(nv, np.int64)
    buf_pos = np.empty((nv, cap), np.int64)
    buf_dist = np.empty((nv, cap), np.int64)
    cur = rptr[:nv].copy()
    total = words.shape[0]
    for b0 in range(0, total, block):
        b1 = min(b0 + block, total)
        for v in range(nv):
            lim = limit[v]
            j = cur[v]
            while j < rptr[v + 1] and rlo[j] < b1:
                k, stop = max(rlo[j], b0), min(rhi[j], b1)
                while True:
                    k, d = _next_direct(flat, k, stop, qwords, owner[v], width, lim)
                    if k >= stop:
                        break
                    lim = _accept(v, k, d, m, lim, hist, below, fill, buf_pos, buf_dist)
                    k += 1
                if rhi[j] > b1:
                    break
                j += 1
            cur[v] = j
            limit[v] = lim
    # Each run's candidates at or under its limit (its exact top m is among them, fewer than 2m),
    # all of a query's runs together, sorted by (distance, row): the first m are the answer.
    runs = np.bincount(owner, minlength=nq)
    keys = np.empty((nq, 2 * m * max(1, runs.max())), np.int64)
    counts = np.zeros(nq, np.int64)
    for v in range(nv):
        qi = owner[v]
        for t in range(fill[v]):
            if buf_dist[v, t] <= limit[v]:
                keys[qi, counts[qi]] = buf_dist[v, t] * (total + 1) + row_of_pos[buf_pos[v, t]]
                counts[qi] += 1
    out_rows = np.full((nq, m), -1, np.int64)
    out_dist = np.full((nq, m), -1, np.int64)
    for qi in range(nq):
        chosen = np.sort(keys[qi, : counts[qi]])[:m]
        counts[qi] = len(chosen)
        for t in range(len(chosen)):
            out_dist[qi, t] = chosen[t] // (total + 1)
            out_rows[qi, t] = chosen[t] % (total + 1)
    return out_rows, out_dist, counts


# --------------------------------------------------------------------------- Hamming distances


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed codes (..., B) as uint64 words when B % 8 == 0 (8x fewer popcounts), else uint8."""
    if packed.shape[-1] % 8 == 0 and packed.shape[-1] > 0 and packed.flags.c_contiguous:
        return packed.view(np.uint64)
    return packed


def _read_only(words: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view: the kernels are compiled once for that array type."""
    view = np.asarray(words).view()
    view.flags.writeable = False
    return view


def _width_tag(words: np.ndarray) -> tuple[int, ...]:
    """Compile the kernels for this exact width where it is a common one (up to 512-bit codes)."""
    return (0,) * words.shape[1] if words.dtype == np.uint64 and words.shape[1] <= 8 else ()


def _block_rows(words: np.ndarray) -> int:
    return max(64, _CHUNK_BYTES // max(1, words.shape[1] * words.itemsize))


def _check_packed(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"{what} must be packed uint8 codes (np.packbits), got dtype {codes.dtype}")
    return np.ascontiguousarray(codes)


def hamming_distances(query_packed: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance (int32, (n,)) from one packed query (B,) to every packed code (n, B)."""
    query = _check_packed(query_packed, "query").reshape(-1)
    codes = _check_packed(codes, "codes")
    if codes.ndim != 2 or codes.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} bytes but codes have shape {codes.shape}")
    return hamming_distances_batch(query[None, :], codes)[0]


def hamming_distances_batch(queries_packed: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances (int32, (q, n)) from many packed queries (q, B) to packed codes (n, B).

    The database is walked block by block, each block compared against every query while it is
    in cache.
    """
    codes = _check_packed(codes, "codes")
    queries = _check_packed(queries_packed, "queries")
    if queries.ndim != 2 or codes.ndim != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"queries {queries.shape} and codes {codes.shape} must both be (rows, same bytes)")
    out = np.empty((queries.shape[0], codes.shape[0]), dtype=np.int32)
    if out.size and codes.shape[1]:
        words = _read_only(_as_words(codes))
        qwords = np.array(_as_words(queries), copy=True)
        _distances_kernel(words, _width_tag(words), qwords, _block_rows(words), out)
    elif out.size:
        out[:] = 0
    return out


# --------------------------------------------------------------------------- search layout


@dataclass(frozen=True)
class _Layout:
    """The codes regrouped by label, each class library a contiguous run; position p holds row
    ``row_of_pos[p]``, rows ascending within a class. Search reads only this after building it."""

    words: np.ndarray  # (n, width) uint64 (or uint8) words, read-only
    row_of_pos: np.ndarray  # (n,) int32 (int64 beyond 2^31 items)
    segments: dict[int, tuple[int, int]]  # label -> [start, stop) positions
    runs: tuple[tuple[int, int], ...]  # every class library in position order: what a flat query scans
    tag: tuple[int, ...]  # see _width_tag
    plans: dict[int | None, np.ndarray] = field(default_factory=dict)  # the kernel plan of a plain query

    def positions(self, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sorted positions of the given (unique) rows."""
        out = np.empty(len(rows), dtype=np.int64)
        row_labels = labels[rows]
        for label in np.unique(row_labels):
            start, stop = self.segments[int(label)]
            these = row_labels == label
            out[these] = start + np.searchsorted(self.row_of_pos[start:stop], rows[these])
        return np.sort(out)


def prepare_search(index: HashIndex) -> None:
    """Build the search layout and the tie-breaking keys now (they are otherwise built by the
    first query): ~0.05 s and ~2 s per 10^6 items.

    The first search in a process also compiles the kernel (or loads it from numba's disk cache).
    """
    _layout(index)
    _stable_keys(index)


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
    row_type = np.int32 if n < 2**31 else np.int64
    words = _as_words(np.ascontiguousarray(index.codes))
    if n < 2 or bool((labels[1:] >= labels[:-1]).all()):  # rows already grouped by label: no copy
        order = np.arange(n, dtype=row_type)
    else:
        order = np.argsort(labels, kind="stable").astype(row_type)
        words = words[order]
    values, starts = np.unique(labels[order], return_index=True)
    stops = [*starts[1:].tolist(), n]
    segments = {int(v): (int(a), int(b)) for v, a, b in zip(values, starts, stops)}
    runs = tuple(sorted(segments.values()))
    return _Layout(_read_only(words), order, segments, runs, _width_tag(words))


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


def stable_keys(items: pd.DataFrame) -> np.ndarray:
    """Each row's rank (int64) in the order of :data:`TIE_KEY_COLUMNS`: what settles equal distances.

    Rows equal in every key column (the same annotation listed twice) keep their relative row
    order, but they name the same nodule, so the nodules a search returns never depend on it.
    """
    columns = [c for c in TIE_KEY_COLUMNS if c in items.columns]
    if not columns or not len(items):
        return np.arange(len(items), dtype=np.int64)
    # factorize(sort=True) gives each string its sorted rank; a later column only matters when
    # the earlier ones repeat (lexsort's last key is the primary one)
    codes: list[np.ndarray] = []
    for column in columns:
        ranks, uniques = pd.factorize(items[column].astype(str).to_numpy(), sort=True)
        codes.insert(0, ranks)
        if len(uniques) == len(items):
            break
    order = np.lexsort(codes)
    ranks = np.empty(len(items), dtype=np.int64)
    ranks[order] = np.arange(len(items))
    return ranks


def _stable_keys(index: HashIndex) -> np.ndarray:
    keys = index._cache.get(_STABLE_KEY)
    if keys is None:
        keys = index._cache[_STABLE_KEY] = stable_keys(index.items)
    return keys


def rank_by_distance(distances: np.ndarray, keys: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Database rows of the k smallest distances per query ((q, n) distances), equal distances
    settled by ``keys`` (see :func:`stable_keys`), padded with -1 to k columns. ``allowed``
    ((q, n) bool): rank only those items (a query's own class, for the evaluation's within-class
    order), padding where they run out."""
    if allowed is not None:
        distances = np.where(allowed, distances, np.inf)
    keys = np.broadcast_to(np.asarray(keys, dtype=np.int64), distances.shape)
    order = np.lexsort((keys, distances), axis=1)[:, :k]
    if allowed is not None:
        order = np.where(np.take_along_axis(allowed, order, axis=1), order, -1)
    if order.shape[1] < k:
        order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
    return order


def rank_by_hamming(
    query_codes: np.ndarray, database_codes: np.ndarray, keys: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> np.ndarray:
    """The flat Hamming ranking of boolean codes (q, bits) against (n, bits) that the hashing
    baselines are scored with: :func:`rank_by_distance` on Hamming distances."""
    distances = hamming_distances_batch(pack_codes(query_codes), pack_codes(database_codes))
    return rank_by_distance(distances, keys, k, allowed)


# --------------------------------------------------------------------------- exact top-m selection


def _hamming_pools(
    layout: _Layout, qwords: np.ndarray, spaces: Sequence[int | None], excluded: Sequence[np.ndarray], m: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query (words (q, width)): the rows within the Hamming distance of its m-th nearest, every
    row tied at that boundary included, and their distances (unsorted beyond that guarantee).

    ``spaces[i]`` is the class library query i searches (its label), or None for the whole
    database; ``excluded[i]`` holds the sorted positions it must skip. The kernel returns the
    exact top m' by (distance, row); when its last row is still at the m-th distance more rows
    may tie there, so that query is asked again with m' doubled.
    """
    pools: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(spaces)
    pending = list(range(len(spaces)))
    wanted = m + max(8, m // 2)
    while pending:
        rows, dist, counts = _top_rows(
            layout, qwords[pending], [spaces[i] for i in pending], [excluded[i] for i in pending], wanted
        )
        again = []
        for j, i in enumerate(pending):
            count = int(counts[j])
            if count == wanted and dist[j, count - 1] == dist[j, m - 1]:
                again.append(i)  # the boundary distance may hold more rows than were returned
                continue
            bound = dist[j, min(m, count) - 1] if count else -1
            keep = dist[j, :count] <= bound
            pools[i] = (rows[j, :count][keep], dist[j, :count][keep])
        pending, wanted = again, 2 * wanted
    return pools  # type: ignore[return-value]


def _top_rows(
    layout: _Layout, qwords: np.ndarray, spaces: Sequence[int | None], excluded: Sequence[np.ndarray], m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact m nearest rows by (Hamming, row) for each query (words (q, width)), sorted: rows and
    distances (q, m), valid up to the per-query counts (q,), padded with -1 (see ``_topk_kernel``)."""
    if len(spaces) == 1 and not len(excluded[0]):  # the common single query: its plan is cached
        plan = layout.plans.get(spaces[0])
        if plan is None:
            plan = layout.plans[spaces[0]] = _plan(layout, spaces, excluded)
    else:
        plan = _plan(layout, spaces, excluded)
    qwords = np.ascontiguousarray(qwords, dtype=layout.words.dtype)
    return _topk_kernel(layout.words, layout.tag, layout.row_of_pos, plan, qwords, m, _block_rows(layout.words))


def _plan(layout: _Layout, spaces: Sequence[int | None], excluded: Sequence[np.ndarray]) -> np.ndarray:
    """The kernel's runs: one per class library searched by each query, cut at excluded positions."""
    owner: list[int] = []
    starts: list[int] = []
    stops: list[int] = []
    ptr = [0]
    for i, space in enumerate(spaces):
        for start, stop in layout.runs if space is None else (layout.segments[space],):
            if len(excluded[i]):  # cut the run at each excluded position
                skip = excluded[i][(excluded[i] >= start) & (excluded[i] < stop)].tolist()
                pairs = [(a, b) for a, b in zip([start, *(p + 1 for p in skip)], [*skip, stop]) if a < b]
            else:
                pairs = [(start, stop)]
            starts.extend(a for a, _ in pairs)
            stops.extend(b for _, b in pairs)
            ptr.append(ptr[-1] + len(pairs))
            owner.append(i)
    return np.array([len(owner), *owner, *ptr, *starts, *stops], dtype=np.int64)


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
    rating_distance: float | None = None  # expected rating distance (0..1), where the re-rank used it

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
    rating_distance: np.ndarray | None = None  # float32 (q, k) where the rating re-rank ran, NaN in padding


def nodule_of_rows(index: HashIndex) -> np.ndarray:
    """Each index row's nodule as a small integer (rows of one nodule share it): one nodule has
    one row per reader annotation, and a search that answers nodules folds them."""
    return pd.factorize(index.items["nodule_id"].astype(str), sort=False)[0].astype(np.int64)


def first_of_each_nodule(ranked_rows: np.ndarray, nodule_of_row: np.ndarray, k: int) -> np.ndarray:
    """Positions, in a ranking of rows (best first, -1 padding at the end), of each nodule's best
    row, for the first ``k`` nodules: a nodule stands where its best annotation stands. The first
    ``k x (most annotations)`` rows always hold k nodules (when the library has them), and in an
    order that does not depend on how many rows are asked (Hamming) they are exactly the whole
    ranking's first k nodules; a Euclidean rerank orders the larger pool those rows come from."""
    valid = np.flatnonzero(np.asarray(ranked_rows) >= 0)
    _, first = np.unique(nodule_of_row[np.asarray(ranked_rows)[valid]], return_index=True)
    return valid[np.sort(first)[:k]]


def rows_for_nodules(nodule_of_row: np.ndarray, k: int) -> int:
    """Rows to ask the search for so that they hold k nodules: k times the most reader
    annotations one nodule has."""
    return k * (int(np.bincount(nodule_of_row).max()) if len(nodule_of_row) else 1)


def fold_hits(hits: Sequence[SearchHit], nodule_of_row: np.ndarray, k: int) -> list[SearchHit]:
    """One hit per nodule, the first ``k`` nodules, ranks counted again."""
    keep = first_of_each_nodule(np.array([hit.row for hit in hits], dtype=np.int64), nodule_of_row, k)
    return [replace(hits[position], rank=rank) for rank, position in enumerate(keep, start=1)]


def fold_batch(result: BatchResult, nodule_of_row: np.ndarray, k: int) -> BatchResult:
    """:func:`fold_hits` for each query of a batch, padded to ``k`` as batches are."""
    nq = len(result.rows)
    rows = np.full((nq, k), -1, dtype=np.int64)
    hamming = np.full((nq, k), -1, dtype=np.int32)
    euclidean = np.full((nq, k), np.nan, dtype=np.float32)
    ratings = None if result.rating_distance is None else np.full((nq, k), np.nan, dtype=np.float32)
    for query in range(nq):
        keep = first_of_each_nodule(result.rows[query], nodule_of_row, k)
        rows[query, : len(keep)] = result.rows[query, keep]
        hamming[query, : len(keep)] = result.hamming[query, keep]
        euclidean[query, : len(keep)] = result.euclidean[query, keep]
        if ratings is not None:
            ratings[query, : len(keep)] = result.rating_distance[query, keep]
    return BatchResult(rows, hamming, euclidean, result.class_fallback, ratings)


# --------------------------------------------------------------------------- search


def _query_words(index: HashIndex, query_codes: np.ndarray) -> np.ndarray:
    """Query codes (q, B) packed uint8 or (q, bits) boolean/0-1 as the index's words, a fresh array."""
    codes = np.asarray(query_codes)
    if codes.dtype != np.uint8:
        if codes.shape[1] != index.bits:
            raise ValueError(f"query code has {codes.shape[1]} bits but the index has {index.bits}-bit codes")
        codes = pack_codes(codes.astype(bool))
    if codes.shape[1] != index.bits // 8:
        raise ValueError(f"packed query code has {codes.shape[1]} bytes but the index codes have {index.bits // 8}")
    return _as_words(np.array(codes, dtype=np.uint8, order="C", copy=True))


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


def fc_rounding_bound(stored_fc: np.ndarray) -> float:
    """The largest Euclidean distance that float16 storage alone puts between a library item and
    a query cut from the same image: the query is encoded alone, the library in batches (another
    summation order), so features equal to float32 precision may round to neighbouring float16
    values, at most one float16 step per feature."""
    steps = np.spacing(np.abs(np.asarray(stored_fc, dtype=np.float16))).astype(np.float64)
    return float(np.sqrt(np.sum(steps**2)))


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


def _excluded_rows(index: HashIndex, exclude_patient: str | None, exclude_rows: Iterable[int] | None) -> np.ndarray:
    """Sorted unique rows a query must not return."""
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
    return np.unique(np.concatenate(parts))


def reader_ratings(index: HashIndex) -> np.ndarray | None:
    """The library's reader ratings encoded for the rating re-rank, from its items'
    characteristic columns (cached on the index), or None when the items hold no ratings."""
    if _RATINGS_KEY not in index._cache:
        encoded = None
        if any(name in index.items.columns for name in RATING_NAMES):
            encoded = encode_ratings(ratings_matrix(index.items))
            encoded = encoded if has_ratings(encoded) else None
        index._cache[_RATINGS_KEY] = encoded
    return index._cache[_RATINGS_KEY]


def _rating_query(index: HashIndex, query_ratings: np.ndarray | None, mode: str, nq: int) -> np.ndarray | None:
    """The queries' predicted ratings when this search re-ranks by them (hierarchical mode, a
    library with reader ratings), else None."""
    if query_ratings is None or mode != "hierarchical" or reader_ratings(index) is None:
        return None
    ratings = np.asarray(query_ratings, dtype=np.float32).reshape(nq, -1)
    if ratings.shape[1] != ENCODED_WIDTH or not np.isfinite(ratings).all():
        raise ValueError(f"query_ratings must be finite, one row of {ENCODED_WIDTH} per query")
    return ratings


class _Ranked(NamedTuple):
    """Top k of q queries: rows (q, k), Hamming (q, k), Euclidean (q, k) or None, rating distance
    (q, k) or None, hits per query (q,), class-fallback flags (q,). Padding is -1 / NaN."""

    rows: np.ndarray
    hamming: np.ndarray
    euclidean: np.ndarray | None
    rating_distance: np.ndarray | None
    counts: np.ndarray
    fallback: np.ndarray


def _search_many(
    index: HashIndex,
    qwords: np.ndarray,
    query_fc32: Sequence[np.ndarray] | None,
    query_classes: Sequence[int | None],
    k: int,
    mode: str,
    pool_factor: float,
    excluded: Sequence[np.ndarray],
    query_ratings: np.ndarray | None = None,
) -> _Ranked:
    """Top k of q queries, best first. The Hamming pool holds every row tied at its boundary;
    final ties go by the stable key. ``query_ratings``: see :func:`_rating_query`."""
    nq = qwords.shape[0]
    by_ratings = query_ratings is not None
    if by_ratings:
        pool_factor = max(pool_factor, RATING_POOL_FACTOR)
    m = k if mode == "hamming" else max(k, math.ceil(pool_factor * k))
    fallback = np.zeros(nq, dtype=bool)
    out_rows = np.full((nq, k), -1, dtype=np.int64)
    out_ham = np.full((nq, k), -1, dtype=np.int64)
    out_eu = None if mode == "hamming" else np.full((nq, k), np.nan, dtype=np.float32)
    out_ratings = np.full((nq, k), np.nan, dtype=np.float32) if by_ratings else None
    counts = np.zeros(nq, dtype=np.int64)
    if len(index) == 0 or nq == 0:
        return _Ranked(out_rows, out_ham, out_eu, out_ratings, counts, fallback)
    layout = _layout(index)
    labels = np.asarray(index.labels)
    spaces: list[int | None] = [None] * nq
    if mode == "hierarchical":
        for i, qclass in enumerate(query_classes):
            segment = layout.segments.get(int(qclass))  # type: ignore[arg-type]
            if segment is not None and segment[1] - segment[0] > np.count_nonzero(labels[excluded[i]] == qclass):
                spaces[i] = int(qclass)  # type: ignore[arg-type]
            else:
                fallback[i] = True
    positions = [layout.positions(labels, ex) if len(ex) else ex for ex in excluded]
    pools = _hamming_pools(layout, qwords, spaces, positions, m)
    keys = _stable_keys(index)
    library_ratings = reader_ratings(index) if by_ratings else None
    for i, (pool, ham) in enumerate(pools):
        if out_eu is None:
            order = np.lexsort((keys[pool], ham))[:k]
        else:
            eu = _euclidean(index, pool, query_fc32[i])  # type: ignore[index]
            if library_ratings is None:
                order = np.lexsort((keys[pool], eu))[:k]
            else:  # the query's own nodule first; items without ratings after every rated one
                rated = rating_distances(query_ratings[i : i + 1], library_ratings[pool])[0]
                itself = (ham == 0) & (eu <= SAME_NODULE_FRACTION * np.median(eu))
                by_rating = np.where(itself, eu, np.nan_to_num(rated, nan=np.inf))  # its own rows in fc order
                order = np.lexsort((keys[pool], eu, by_rating, ~itself))[:k]
                out_ratings[i, : len(order)] = rated[order]  # type: ignore[index]
            out_eu[i, : len(order)] = eu[order]
        out_rows[i, : len(order)] = pool[order]
        out_ham[i, : len(order)] = ham[order]
        counts[i] = len(order)
    return _Ranked(out_rows, out_ham, out_eu, out_ratings, counts, fallback)


def _item_columns(index: HashIndex) -> dict[str, Any]:
    """The item columns a hit reports, cached on the index in the form quickest to read a few rows of.

    Looking rows up through pandas or Arrow's ``take`` costs ~100-250 us per column when the
    caches are cold (as after a scan of the codes): a visible share of a 2 ms search. So Arrow
    string columns (pandas' default) are read from their buffers, numbers from numpy.
    """
    columns = index._cache.get(_ITEMS_KEY)
    if columns is None:
        columns = {}
        for name in ("patient_id", "nodule_id", "malignancy"):
            if name in index.items.columns:
                columns[name] = _fast_column(index.items[name].array)
        index._cache[_ITEMS_KEY] = columns
    return columns


def _fast_column(array: Any) -> Any:
    """(data bytes, offsets) of an Arrow string column without missing values, a numpy array of
    numbers, or else the pandas array itself."""
    arrow = array.__arrow_array__() if hasattr(array, "__arrow_array__") else None
    if (
        arrow is not None
        and not arrow.null_count
        and (pa.types.is_string(arrow.type) or pa.types.is_large_string(arrow.type))
    ):
        chunk = arrow.chunk(0) if arrow.num_chunks == 1 else arrow.combine_chunks()
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(chunk.type) else np.int32)
        return memoryview(data if data is not None else b""), offsets[chunk.offset : chunk.offset + len(chunk) + 1]
    if isinstance(array, pd.arrays.NumpyExtensionArray) and array.dtype.kind in ("b", "i", "u", "f"):
        return array.to_numpy()
    return array


def _take(column: Any, rows: np.ndarray) -> list[Any]:
    """The values of a :func:`_fast_column` at ``rows``."""
    if isinstance(column, tuple):
        data, offsets = column
        return [str(data[offsets[r] : offsets[r + 1]], "utf-8") for r in rows.tolist()]
    if isinstance(column, np.ndarray):
        return column[rows].tolist()
    return list(column.take(rows))  # missing values, other types: as pandas renders them


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
    query_ratings: np.ndarray | None = None,
) -> list[SearchHit]:
    """The k most similar database items to one query, best first (fewer if the database is smaller).

    ``query_class`` is the model's predicted class for the query (needed by ``"hierarchical"``,
    ignored otherwise); ``query_fc`` is needed by ``"rerank"`` and ``"hierarchical"``.
    ``exclude_patient`` drops every item of that patient (a query from a database patient must
    not find its own nodule); ``exclude_rows`` drops given rows. ``query_ratings``: the model's
    predicted ratings of the query (45 values); the hierarchical mode re-ranks by them where the
    library holds reader ratings.
    """
    # at most the library: no k asked for costs more work or memory than the whole library
    k = min(_check_args(k, mode, pool_factor), max(1, len(index)))
    if mode == "hierarchical" and query_class is None:
        raise ValueError("hierarchical search needs the query's predicted class (query_class)")
    qwords = _query_words(index, np.asarray(query_code_packed).reshape(1, -1))
    fc32 = None if mode == "hamming" else [_query_fc(index, query_fc)]
    excluded = [_excluded_rows(index, exclude_patient, exclude_rows)]
    ratings = _rating_query(index, query_ratings, mode, 1)
    ranked = _search_many(index, qwords, fc32, [query_class], k, mode, pool_factor, excluded, ratings)
    count, fallback = int(ranked.counts[0]), bool(ranked.fallback[0])
    rows, ham = ranked.rows[0, :count], ranked.hamming[0, :count]
    eu = None if ranked.euclidean is None else ranked.euclidean[0, :count]
    rated = None if ranked.rating_distance is None else ranked.rating_distance[0, :count]
    if fallback:
        log.warning(
            "no item of class %s is searchable in index %s: searched the whole database",
            query_class,
            index.index_version,
        )
    columns = _item_columns(index)
    patients = [str(v) for v in _take(columns["patient_id"], rows)]
    nodules = [str(v) for v in _take(columns["nodule_id"], rows)]
    if "malignancy" in columns:
        malignancy = [None if pd.isna(v) else float(v) for v in _take(columns["malignancy"], rows)]
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
            rating_distance=None if rated is None or np.isnan(rated[i]) else float(rated[i]),
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
    query_ratings: np.ndarray | None = None,
) -> BatchResult:
    """:func:`search` for q queries (packed codes (q, B), fc (q, d), predicted classes (q,),
    predicted ratings (q, 45) or None).

    Returns row indices and distances as arrays padded to k, the shape evaluation metrics want.
    All queries share one pass over the codes, block by block while a block is in cache.
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
    qwords = _query_words(index, codes)
    fc32 = None if mode == "hamming" else [_query_fc(index, query_fc[i]) for i in range(nq)]  # type: ignore[index]
    classes: list[int | None] = [None] * nq if query_classes is None else [int(c) for c in query_classes]
    excluded = [
        _excluded_rows(index, None if exclude_patients is None else exclude_patients[i], None) for i in range(nq)
    ]
    ratings = _rating_query(index, query_ratings, mode, nq)
    ranked = _search_many(index, qwords, fc32, classes, k, mode, pool_factor, excluded, ratings)
    eu = np.full((nq, k), np.nan, dtype=np.float32) if ranked.euclidean is None else ranked.euclidean
    return BatchResult(ranked.rows, ranked.hamming.astype(np.int32), eu, ranked.fallback, ranked.rating_distance)
