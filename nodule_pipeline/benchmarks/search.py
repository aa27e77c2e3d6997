"""Search speed and memory at 10^3..10^7 items, next to FAISS and numpy in the same run, on one core.

For each database size n and code length (64 and 256 bits) the benchmark builds a random index
(random packed codes, random labels of ``classes`` classes, ``fc_dim`` float16 features per
item as the real index keeps) and measures, with every library held to one thread:

- single-query latency, p50 and p99 over ``queries`` random queries (k = 10): our
  :func:`~nodule_pipeline.hashing.search.search` in ``"hamming"`` and ``"hierarchical"``
  modes (the whole public call: kernel, re-rank on ``fc``, hit metadata), FAISS
  ``IndexBinaryFlat`` and plain numpy (``bitwise_xor`` + ``bitwise_count`` over uint64 words
  + ``argpartition``). The methods take turns query by query, so all see the same machine load,
  and a 64 MB read before each timed query leaves none of them the previous one's data in cache
  (at 10^6 x 256 bits the codes are as large as the L3 cache); numpy runs on the first few
  queries only where it is slow;
- batch throughput for ``batch_queries`` queries: our ``search_batch`` (hamming mode: one pass
  over the database for all queries) and FAISS ``search`` with all queries at once;
- codes scanned per second on the core (our batch) beside the popcount bound: the measured
  rate of a tight loop that XORs and popcounts the same words against the same queries in the
  same blocks and only sums the counts (no comparison, no selection; LLVM vectorises it), best
  of three;
- bytes per item: the index arrays (:func:`~nodule_pipeline.hashing.index.bytes_per_item`:
  code, float16 fc, label, prediction), plus what search adds (its layout: the codes regrouped
  by label and an int32 row number, which is all search reads once it is built).

The index is assembled directly (no content hash, no float16 copy of ``fc``) so that 10^7 x 1024
features fit: where the features would take more than ``fc_ram_bytes`` of RAM (20 GB at 10^7 x
1024) they live in a temporary memory-mapped file on disk (``fc_storage`` says which), as
:func:`~nodule_pipeline.hashing.index.load_index` serves a real index. Search reads ``fc`` only
for the re-ranked pool (20 rows a query), so a file larger than RAM costs those page reads.

Targets at 10^6 items x 256 bits (figures, never test assertions): single-query p50 within 5 ms
in both modes and no slower than FAISS flat; batch throughput within 2x the popcount bound;
memory at most the code plus the fc features per item plus small per-item metadata.

    python -m nodule_pipeline.benchmarks.search [--quick] [--sizes 1000 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

from nodule_pipeline.benchmarks import environment
from nodule_pipeline.hashing import search as search_module
from nodule_pipeline.hashing.index import HashIndex, bytes_per_item
from nodule_pipeline.hashing.search import _popcount, prepare_search, search, search_batch

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_SIZES = SIZES[:4]
BITS = (64, 256)
TARGET_N, TARGET_BITS = 10**6, 256
TARGETS = {"p50_ms": 5.0, "ours_over_faiss": 1.0, "batch_over_bound": 2.0}
EVICT_BYTES = 64 << 20  # read before every timed query: twice the development machine's 32 MB L3
NUMPY_SECONDS = 2.0  # time budget of the numpy baseline per (n, bits): at 10^7 one query takes ~1 s
RECORD_KEYS = (
    "n",
    "bits",
    "ours_hamming_p50_ms",
    "ours_hamming_p99_ms",
    "ours_hierarchical_p50_ms",
    "ours_hierarchical_p99_ms",
    "faiss_flat_p50_ms",
    "faiss_flat_p99_ms",
    "numpy_p50_ms",
    "ours_batch_qps",
    "faiss_batch_qps",
    "codes_per_s_per_core",
    "popcount_bound_codes_per_s",
    "bytes_per_item",
)
"""The keys every record has (it has more: see :func:`run_search_benchmark`)."""


def run_search_benchmark(
    sizes: Sequence[int] = SIZES,
    bits_list: Sequence[int] = BITS,
    queries: int = 200,
    batch_queries: int = 1000,
    k: int = 10,
    fc_dim: int = 1024,
    classes: int = 2,
    fc_ram_bytes: int = 4 << 30,
    tmp_dir: Path | str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Measure search at every size in ``sizes`` for every code length in ``bits_list``.

    Returns one JSON-ready record per (n, bits) with the keys of :data:`RECORD_KEYS` and also:
    ``numpy_queries`` (how many queries numpy ran), ``batch_queries``, ``ours_batch_s``,
    ``faiss_batch_s``, ``batch_over_bound`` (bound / ours codes per second),
    ``ours_over_faiss_hamming`` / ``ours_over_faiss_hierarchical`` (p50 ratios),
    ``search_extra_bytes_per_item`` (the search layout cached on the index: the codes regrouped by
    label plus an int32 row number; 4 where the rows are grouped by label already),
    ``faiss_bytes_per_item``,
    ``fc_dim``, ``fc_storage`` ("ram" or "memmap"), ``first_call_ms`` (the first search on the
    index: numba compiling the kernel, or loading it from its disk cache, when this code length
    is new to the process), ``jit`` ("compiled", "cached" or "warm"), ``layout_s``,
    ``faiss_add_s``, ``agree`` (our distances equal FAISS's and numpy's on every query) and
    ``load_average`` (the machine's, after the case: the figures are noisy when it is busy).
    """
    import faiss

    say = progress or (lambda _line: None)
    rng = np.random.default_rng(seed)
    records = []
    with _one_thread(faiss):
        for n in sizes:
            labels = rng.integers(0, classes, n).astype(np.int8)
            items = _items(n)
            with _features(rng, n, fc_dim, fc_ram_bytes, tmp_dir) as (fc, storage):
                say(f"n={n:,}: fc {fc_dim} float16 in {storage}")
                for bits in bits_list:
                    record = _measure(faiss, rng, n, bits, labels, items, fc, queries, batch_queries, k)
                    record.update(fc_dim=fc_dim, fc_storage=storage, load_average=_load_average())
                    records.append(record)
                    say(_line(record))
    return records


def format_search_table(records: Sequence[dict[str, Any]]) -> str:
    """The records of :func:`run_search_benchmark` as a plain-text table, with the targets' verdict."""
    header = [
        "n",
        "bits",
        "ham p50/p99 ms",
        "hier p50/p99 ms",
        "faiss p50/p99 ms",
        "numpy p50 ms",
        "batch qps ours/faiss",
        "codes/s ours",
        "bound",
        "bound/ours",
        "bytes/item",
    ]
    lines = [" | ".join(header)]
    for r in records:
        lines.append(
            " | ".join(
                [
                    f"{r['n']:,}",
                    str(r["bits"]),
                    f"{r['ours_hamming_p50_ms']:.3f}/{r['ours_hamming_p99_ms']:.3f}",
                    f"{r['ours_hierarchical_p50_ms']:.3f}/{r['ours_hierarchical_p99_ms']:.3f}",
                    f"{r['faiss_flat_p50_ms']:.3f}/{r['faiss_flat_p99_ms']:.3f}",
                    f"{r['numpy_p50_ms']:.2f}",
                    f"{r['ours_batch_qps']:.0f}/{r['faiss_batch_qps']:.0f}",
                    f"{r['codes_per_s_per_core']:.3g}",
                    f"{r['popcount_bound_codes_per_s']:.3g}",
                    f"{r['batch_over_bound']:.2f}",
                    f"{r['bytes_per_item']}+{r['search_extra_bytes_per_item']:g}",
                ]
            )
        )
    target = [r for r in records if r["n"] == TARGET_N and r["bits"] == TARGET_BITS]
    if target:
        r = target[0]
        lines.append(
            f"targets at {TARGET_N:,} x {TARGET_BITS} bits: p50 <= {TARGETS['p50_ms']} ms "
            f"(hamming {r['ours_hamming_p50_ms']:.2f}, hierarchical {r['ours_hierarchical_p50_ms']:.2f}); "
            f"ours/faiss p50 <= {TARGETS['ours_over_faiss']} (hamming {r['ours_over_faiss_hamming']:.2f}, "
            f"hierarchical {r['ours_over_faiss_hierarchical']:.2f}); bound/ours codes per s <= "
            f"{TARGETS['batch_over_bound']} ({r['batch_over_bound']:.2f}); "
            f"{'met' if meets_targets(r) else 'NOT met'}"
        )
    lines.append(
        "one thread everywhere; latencies: methods take turns query by query, caches flushed before each; "
        "bytes/item: index arrays + what search caches (codes regrouped by class, row numbers)"
    )
    return "\n".join(lines)


def meets_targets(record: dict[str, Any]) -> bool:
    """Whether a record meets the speed targets of the issue (meant for the 10^6 x 256-bit case)."""
    return (
        max(record["ours_hamming_p50_ms"], record["ours_hierarchical_p50_ms"]) <= TARGETS["p50_ms"]
        and max(record["ours_over_faiss_hamming"], record["ours_over_faiss_hierarchical"]) <= TARGETS["ours_over_faiss"]
        and record["batch_over_bound"] <= TARGETS["batch_over_bound"]
    )


# --------------------------------------------------------------------------------------------
# One (n, bits) case


def _measure(
    faiss: Any,
    rng: np.random.Generator,
    n: int,
    bits: int,
    labels: np.ndarray,
    items: pd.DataFrame,
    fc: np.ndarray,
    queries: int,
    batch_queries: int,
    k: int,
) -> dict[str, Any]:
    nbytes = bits // 8
    codes = _random_codes(rng, n, nbytes)
    index = HashIndex(
        codes=codes,
        fc=fc,
        labels=labels,
        predicted=np.full(n, -1, dtype=np.int8),
        items=items,
        bits=bits,
        model_version="benchmark",
        index_version=f"benchmark-{n}-{bits}",
    )
    clock = time.perf_counter()
    prepare_search(index)
    layout_s = time.perf_counter() - clock
    clock = time.perf_counter()
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    faiss_add_s = time.perf_counter() - clock

    q_codes = _random_codes(rng, queries, nbytes)
    q_fc = rng.standard_normal((queries, fc.shape[1])).astype(np.float32)
    q_class = rng.integers(0, int(labels.max(initial=0)) + 1, queries)
    words = codes.view(np.uint64)

    kernel = search_module._topk_kernel
    misses, loaded = sum(kernel.stats.cache_misses.values()), len(kernel.overloads)
    clock = time.perf_counter()
    search(index, q_codes[0], None, None, k=k, mode="hamming")
    first_call_ms = (time.perf_counter() - clock) * 1e3
    if sum(kernel.stats.cache_misses.values()) > misses:
        jit = "compiled"
    else:
        jit = "cached" if len(kernel.overloads) > loaded else "warm"
    search(index, q_codes[0], q_fc[0], int(q_class[0]), k=k, mode="hierarchical")  # warm-up, untimed
    flat.search(q_codes[:1], k)
    clock = time.perf_counter()
    _numpy_search(words, q_codes[0].view(np.uint64), k)
    numpy_queries = max(3, min(queries, int(NUMPY_SECONDS / max(time.perf_counter() - clock, 1e-6))))

    times: dict[str, list[float]] = {"hamming": [], "hierarchical": [], "faiss": [], "numpy": []}
    agree = True
    flush = np.ones(EVICT_BYTES // 8, dtype=np.int64)
    for i in range(queries):
        code, qwords = q_codes[i], q_codes[i].view(np.uint64)
        flush.sum()  # each method starts from main memory, not from what the one before left in cache
        start = time.perf_counter()
        hits = search(index, code, None, None, k=k, mode="hamming")
        times["hamming"].append(time.perf_counter() - start)
        flush.sum()
        start = time.perf_counter()
        search(index, code, q_fc[i], int(q_class[i]), k=k, mode="hierarchical")
        times["hierarchical"].append(time.perf_counter() - start)
        flush.sum()
        start = time.perf_counter()
        distances, _ = flat.search(q_codes[i : i + 1], k)
        times["faiss"].append(time.perf_counter() - start)
        ours = [h.hamming for h in hits]
        agree &= ours == distances[0].tolist()
        if i < numpy_queries:
            flush.sum()
            start = time.perf_counter()
            _, np_distances = _numpy_search(words, qwords, k)
            times["numpy"].append(time.perf_counter() - start)
            agree &= ours == np_distances.tolist()

    batch = _random_codes(rng, batch_queries, nbytes)
    rounds = 3 if n * batch_queries <= 10**9 else 1
    ours_batch_s = faiss_batch_s = float("inf")
    for _ in range(rounds):  # best of the rounds, ours and FAISS in turn
        start = time.perf_counter()
        result = search_batch(index, batch, None, None, k=k, mode="hamming")
        ours_batch_s = min(ours_batch_s, time.perf_counter() - start)
        start = time.perf_counter()
        distances, _ = flat.search(batch, k)
        faiss_batch_s = min(faiss_batch_s, time.perf_counter() - start)
        agree &= bool((result.hamming == distances).all())
    codes_per_s = n * batch_queries / ours_batch_s
    bound = _popcount_bound(index, batch, target_s=min(1.0, ours_batch_s))

    layout = index._cache[search_module._LAYOUT_KEY]
    extra = (layout.words.nbytes + layout.row_of_pos.nbytes) / max(n, 1)
    p50 = {name: _percentile(values, 50) for name, values in times.items()}
    return {
        "n": n,
        "bits": bits,
        "ours_hamming_p50_ms": p50["hamming"],
        "ours_hamming_p99_ms": _percentile(times["hamming"], 99),
        "ours_hierarchical_p50_ms": p50["hierarchical"],
        "ours_hierarchical_p99_ms": _percentile(times["hierarchical"], 99),
        "faiss_flat_p50_ms": p50["faiss"],
        "faiss_flat_p99_ms": _percentile(times["faiss"], 99),
        "numpy_p50_ms": p50["numpy"],
        "ours_batch_qps": round(batch_queries / ours_batch_s, 1),
        "faiss_batch_qps": round(batch_queries / faiss_batch_s, 1),
        "codes_per_s_per_core": round(codes_per_s),
        "popcount_bound_codes_per_s": round(bound),
        "bytes_per_item": bytes_per_item(index),
        "ours_over_faiss_hamming": round(p50["hamming"] / p50["faiss"], 3),
        "ours_over_faiss_hierarchical": round(p50["hierarchical"] / p50["faiss"], 3),
        "batch_over_bound": round(bound / codes_per_s, 3),
        "queries": queries,
        "numpy_queries": numpy_queries,
        "batch_queries": batch_queries,
        "ours_batch_s": round(ours_batch_s, 4),
        "faiss_batch_s": round(faiss_batch_s, 4),
        "search_extra_bytes_per_item": round(extra, 2),
        "faiss_bytes_per_item": nbytes,
        "first_call_ms": round(first_call_ms, 1),
        "jit": jit,
        "layout_s": round(layout_s, 4),
        "faiss_add_s": round(faiss_add_s, 4),
        "agree": bool(agree),
    }


def _numpy_search(words: np.ndarray, qwords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy brute force: XOR, popcount, sum per code, argpartition, sort the k (ties at the
    k-th distance fall as argpartition leaves them, as in FAISS)."""
    distances = np.bitwise_count(np.bitwise_xor(words, qwords)).sum(axis=1, dtype=np.int64)
    top = np.argpartition(distances, k - 1)[:k] if len(distances) > k else np.arange(len(distances))
    top = top[np.lexsort((top, distances[top]))]
    return top, distances[top]


@njit(cache=True, nogil=True)
def _popcount_peak(words, tag, qwords, block):  # type: ignore[no-untyped-def]
    """XOR + popcount of every word against every query, summed: the search kernel's words, blocks
    and queries with nothing else to do (no comparison, no selection)."""
    width = len(tag) if len(tag) else words.shape[1]
    flat = words.reshape(-1)
    n = words.shape[0]
    total = 0
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        for qi in range(qwords.shape[0]):
            s = 0
            for r in range(b0, b1):
                base = np.uint64(r) * np.uint64(width)
                for w in range(width):
                    s += _popcount(flat[base + np.uint64(w)] ^ qwords[qi, w])
            total += s
    return total


def _popcount_bound(index: HashIndex, batch: np.ndarray, target_s: float) -> float:
    """Codes per second of :func:`_popcount_peak` on the index's words, best of three rounds of
    enough queries (from ``batch``) to run about ``target_s``."""
    words = search_module._layout(index).words
    tag = search_module._width_tag(words)
    block = search_module._block_rows(words)
    qwords = np.ascontiguousarray(batch.view(words.dtype))
    _popcount_peak(words[:64], tag, qwords[:1], block)  # compile (or load) outside the clock
    n = max(words.shape[0], 1)
    start = time.perf_counter()
    _popcount_peak(words, tag, qwords[:1], block)
    per_query = max(time.perf_counter() - start, 1e-7)
    count = int(min(len(qwords), max(1, target_s / per_query)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _popcount_peak(words, tag, qwords[:count], block)
        best = min(best, time.perf_counter() - start)
    return n * count / best


# --------------------------------------------------------------------------------------------
# Data


def _random_codes(rng: np.random.Generator, n: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * nbytes), dtype=np.uint8).reshape(n, nbytes)


def _items(n: int) -> pd.DataFrame:
    """Item metadata as a loaded index has it (pandas' Arrow-backed strings); ~3 nodules a patient."""
    ids = pd.Series(np.arange(n)).astype(str)
    patients = pd.Series(np.arange(n) // 3).astype(str)
    return pd.DataFrame({"patient_id": "LIDC-" + patients, "nodule_id": "N" + ids})


@contextmanager
def _features(
    rng: np.random.Generator, n: int, fc_dim: int, ram_bytes: int, tmp_dir: Path | str | None
) -> Iterator[tuple[np.ndarray, str]]:
    """(n, fc_dim) float16 features: in RAM, or in a temporary memory-mapped file when larger than
    ``ram_bytes``. The values are one random block of rows repeated (search never looks at them
    beyond the re-ranked pool, and writing 20 GB of fresh random numbers would dominate the run)."""
    block = rng.standard_normal((min(n, 4096), fc_dim)).astype(np.float16)
    if n * fc_dim * 2 <= ram_bytes:
        yield np.resize(block, (n, fc_dim)), "ram"
        return
    with tempfile.TemporaryDirectory(prefix="search-benchmark-", dir=tmp_dir) as folder:
        fc = np.lib.format.open_memmap(Path(folder) / "fc.npy", mode="w+", dtype=np.float16, shape=(n, fc_dim))
        for start in range(0, n, len(block)):
            stop = min(start + len(block), n)
            fc[start:stop] = block[: stop - start]
        fc.flush()
        del fc
        fc = np.load(Path(folder) / "fc.npy", mmap_mode="r")
        try:
            yield fc, "memmap"
        finally:
            del fc


# --------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _one_thread(faiss: Any) -> Iterator[None]:
    """FAISS (OpenMP) and torch, if loaded, held to one thread; numba's kernels are serial and numpy's
    ufuncs single-threaded already."""
    faiss_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(faiss_threads)
        if torch is not None:
            torch.set_num_threads(torch_threads)


def _percentile(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 4) if seconds else float("nan")


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _line(r: dict[str, Any]) -> str:
    return (
        f"n={r['n']:,} bits={r['bits']}: p50 ms hamming {r['ours_hamming_p50_ms']:.3f}, hierarchical "
        f"{r['ours_hierarchical_p50_ms']:.3f}, faiss {r['faiss_flat_p50_ms']:.3f}, numpy {r['numpy_p50_ms']:.2f}; "
        f"batch qps {r['ours_batch_qps']:.0f} vs faiss {r['faiss_batch_qps']:.0f}; codes/s "
        f"{r['codes_per_s_per_core']:.3g} (bound {r['popcount_bound_codes_per_s']:.3g}); "
        f"first call {r['first_call_ms']:.0f} ms ({r['jit']}); load {r['load_average']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", help=f"database sizes (default {SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (no 10^7)")
    parser.add_argument("--bits", type=int, nargs="*", default=list(BITS))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch-queries", type=int, default=1000)
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    import faiss
    import numba

    print(json.dumps({**environment(), "numba": numba.__version__, "faiss": faiss.__version__}))
    records = run_search_benchmark(
        sizes, args.bits, queries=args.queries, batch_queries=args.batch_queries, fc_dim=args.fc_dim
    )
    print(format_search_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
