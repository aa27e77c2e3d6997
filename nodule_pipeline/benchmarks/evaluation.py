"""How the evaluation report's cost grows with the ROI table: ``evaluate-rois`` timed at several sizes.

A table is grown to N rows the way LIDC grows when every reader's annotation is a row: each real
nodule gets more rows, its ROI seen in another of the square's 8 symmetries (a new annotation of
the same nodule, same patient, same label), so patients and the split stay as they were and the
learning problem keeps its size. Prints seconds and seconds per 1,000 rows for each size::

    python -m nodule_pipeline.benchmarks.evaluation ../shared/lidc-real-nodules/rois.parquet --rows 1733 5000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nodule_pipeline.hashing.evaluation import EvaluationConfig, evaluate
from nodule_pipeline.roi_table import ROI_SIZE, assign_split, read_roi_table, roi_images


def grow_table(table: pd.DataFrame, rows: int) -> pd.DataFrame:
    """``table`` with extra annotation rows of its own nodules (rotated/flipped ROIs) up to ``rows``."""
    if rows <= len(table):
        return table.iloc[:rows].reset_index(drop=True)
    images = roi_images(table)
    parts = [table]
    copy = 1
    while sum(len(p) for p in parts) < rows:
        extra = table.copy()
        view = np.rot90(images, copy % 4, axes=(1, 2))
        view = view[:, :, ::-1] if copy % 8 >= 4 else view
        extra["image"] = list(np.ascontiguousarray(view).reshape(-1, ROI_SIZE * ROI_SIZE))
        extra["nodule_id"] = extra["nodule_id"].astype(str) + f"-view{copy}"
        parts.append(extra)
        copy += 1
    return pd.concat(parts, ignore_index=True).iloc[:rows].reset_index(drop=True)


def time_evaluation(table: pd.DataFrame, profile: str) -> dict[str, float]:
    started = time.perf_counter()
    evaluation = evaluate(assign_split(table, mode="patient", seed=0), EvaluationConfig.profile(profile))
    seconds = time.perf_counter() - started
    ours = evaluation.report["ours"]
    return {
        "rows": len(table),
        "seconds": round(seconds, 1),
        "seconds_per_1000_rows": round(1000 * seconds / len(table), 1),
        "map_at_10": round(ours["map_at_k"]["10"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rois", type=Path, help="ROI table to grow (parquet)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1733, 5000])
    parser.add_argument("--profile", choices=["quick", "full"], default="quick")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    base = read_roi_table(args.rois)
    figures = []
    for rows in args.rows:
        figure = time_evaluation(grow_table(base, rows), args.profile)
        figures.append(figure)
        print(json.dumps(figure), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
