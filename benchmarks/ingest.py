"""Per-patient ingestion cost next to pylidc's ``Scan.to_volume()`` on the same scans, same run.

Prints seconds per stage (load + validate, store, read back by the two later stages, lung
mask, ROIs) and the peak memory the chain
allocates (tracemalloc, which sees numpy buffers) against the int16 volume size. Targets (issue
2): whole chain within 3x pylidc's load time, peak memory within 4x the volume.

    python benchmarks/ingest.py [--lidc-root ../shared/lidc-sample] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from nodule_pipeline.lidc.lung_mask import pack_mask, segment_lungs
from nodule_pipeline.lidc.pylidc_compat import pylidc_dicom_root
from nodule_pipeline.lidc.rois import extract_rois
from nodule_pipeline.lidc.series import find_series_folders, load_series, open_scan, save_scan

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "lidc-sample"


def pylidc_seconds(root: Path, patient_id: str) -> float:
    with pylidc_dicom_root(root) as pl:
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).first()
        started = time.perf_counter()
        scan.to_volume(verbose=False)
        return time.perf_counter() - started


def chain(root: Path, patient_id: str, workdir: Path) -> dict[str, float]:
    """The work of lidc_scan, lung_mask and nodule_rois for one patient, stage by stage."""
    times: dict[str, float] = {}
    clock = time.perf_counter()
    series_list = [load_series(folder, patient_id) for folder in find_series_folders(root / patient_id, patient_id)]
    times["load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    save_scan(series_list, workdir / patient_id)
    times["store_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    for _ in range(2):  # lung_mask and nodule_rois each read the stored scan back
        series_list = open_scan(workdir / patient_id)
    times["reload_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    masks = [segment_lungs(s.hu, s.spacing_mm) for s in series_list]
    for mask in masks:
        pack_mask(mask)
    times["mask_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    for series, mask in zip(series_list, masks):
        extract_rois(series, mask)
    times["rois_s"] = time.perf_counter() - clock
    times["volume_mb"] = sum(s.hu.nbytes for s in series_list) / 2**20
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lidc-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    patients = sorted(p.name for p in args.lidc_root.iterdir() if p.is_dir())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for patient_id in patients:
            pylidc_s = min(pylidc_seconds(args.lidc_root, patient_id) for _ in range(args.repeat))
            runs = [chain(args.lidc_root, patient_id, Path(tmp)) for _ in range(args.repeat)]
            best = {key: min(r[key] for r in runs) for key in runs[0]}
            tracemalloc.start()
            chain(args.lidc_root, patient_id, Path(tmp))
            peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            total = sum(best[key] for key in ("load_s", "store_s", "reload_s", "mask_s", "rois_s"))
            results.append(
                {
                    "patient_id": patient_id,
                    **{k: round(v, 3) for k, v in best.items()},
                    "chain_s": round(total, 3),
                    "pylidc_to_volume_s": round(pylidc_s, 3),
                    "time_ratio": round(total / pylidc_s, 2),
                    "peak_mb": round(peak_mb, 1),
                    "memory_ratio": round(peak_mb / best["volume_mb"], 2),
                }
            )
    header = [
        "patient_id",
        "load_s",
        "store_s",
        "reload_s",
        "mask_s",
        "rois_s",
        "chain_s",
        "pylidc_to_volume_s",
        "time_ratio",
        "volume_mb",
        "peak_mb",
        "memory_ratio",
    ]
    print(" | ".join(header))
    for row in results:
        print(" | ".join(str(row[h]) for h in header))
    print(f"targets: time_ratio <= 3.0, memory_ratio <= 4.0; numpy {np.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
