"""Does a training recipe hold on every kind of real table? Candidate recipes on tables cut
differently from the same real nodules, over several patient splits.

A default chosen on one table is tuned to it: on real LIDC tables built another way (nodules
segmented from their background, other crops) the recipe that won on the development table lost
to the paper's own. This benchmark builds those kinds of table from a table with a ``crop71``
column (71x71 HU around each nodule at its largest slice, as the real development table has)
and trains each candidate on each kind, split ``s`` and seed ``s`` for ``s`` in ``--splits``::

    python -m nodule_pipeline.benchmarks.robustness ../shared/lidc-real-nodules/rois.parquet --out robustness

Table kinds (each a 32x32 HU ROI per nodule, every other column unchanged):

- ``as given``: the table's own ``image`` (the centre of ``crop71``);
- ``off centre``: the 32x32 window moved 6 px right and 6 px down (a centre known only roughly);
- ``wide``: the central 48x48 scaled to 32 (more lung, a smaller nodule: another pixel spacing);
- ``close``: the central 20x20 scaled to 32 (the nodule fills the ROI);
- ``segmented``: the nodule cut from its background: the connected soft-tissue region
  (> -600 HU) at the centre, one pixel wider, everything else set to air (-1000 HU);
- ``HU +100``: every value shifted by 100 HU (another scanner's calibration).

A candidate is *clearly below* another on a kind when its paired difference over the splits is
negative by more than one point and by more than twice its standard error. Prints the table in
Markdown and writes ``robustness.json`` and ``robustness.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from nodule_pipeline.hashing.evaluation import EvaluationConfig, evaluate_recipe
from nodule_pipeline.hashing.training import TrainConfig
from nodule_pipeline.roi_table import ROI_SIZE, read_roi_table, roi_images

CROP = 71
CENTRE = CROP // 2
AIR_HU = -1000.0
SOFT_TISSUE_HU = -600.0
FIGURES = ("accuracy", "map_at_10", "ndcg_at_10", "ndcg_at_10_within_class")
CLEAR_POINTS = 0.01


def _window(crops: np.ndarray, size: int, down: int = 0, right: int = 0) -> np.ndarray:
    top, left = CENTRE - size // 2 + down, CENTRE - size // 2 + right
    return crops[:, top : top + size, left : left + size]


def _scaled(crops: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of each crop resampled (bilinear) to 32x32."""
    window = _window(crops, size).astype(np.float32)
    return np.stack([ndimage.zoom(view, ROI_SIZE / size, order=1, grid_mode=True, mode="nearest") for view in window])


def segmented(rois: np.ndarray) -> np.ndarray:
    """Each ROI with only its central soft-tissue region kept (the component above -600 HU
    nearest the centre, dilated by one pixel); the rest is air."""
    out = np.full(rois.shape, AIR_HU, dtype=np.float32)
    rows, cols = np.indices(rois.shape[1:])
    centre = (ROI_SIZE - 1) / 2
    distance = (rows - centre) ** 2 + (cols - centre) ** 2
    for i, roi in enumerate(rois):
        components, count = ndimage.label(roi > SOFT_TISSUE_HU)
        if count == 0:
            continue
        nearest = components[np.unravel_index(np.argmin(np.where(components > 0, distance, np.inf)), roi.shape)]
        keep = ndimage.binary_dilation(components == nearest)
        out[i][keep] = roi[keep]
    return out


TABLE_KINDS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "as given": lambda crops, images: images,
    "off centre": lambda crops, images: _window(crops, ROI_SIZE, down=6, right=6).astype(np.float32),
    "wide": lambda crops, images: _scaled(crops, 48),
    "close": lambda crops, images: _scaled(crops, 20),
    "segmented": lambda crops, images: segmented(images),
    "HU +100": lambda crops, images: images + 100.0,
}


def table_kinds(table: pd.DataFrame, kinds: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """The table cut each way of :data:`TABLE_KINDS`, or the ``kinds`` named, in their order."""
    if "crop71" not in table.columns:
        raise ValueError("the table has no crop71 column (71x71 HU around each nodule) to cut other kinds from")
    crops = np.stack(table["crop71"].to_numpy()).reshape(len(table), CROP, CROP)
    images = roi_images(table).astype(np.float32)
    out = {}
    for name in kinds or TABLE_KINDS:
        rois = TABLE_KINDS[name](crops, images)
        out[name] = table.assign(image=list(rois.reshape(len(table), -1).astype(np.float32)))
    return out


def candidates() -> dict[str, TrainConfig]:
    """The recipes compared: the default, its parts taken away, and the paper's."""
    default = TrainConfig()
    no_ratings = replace(default, ratings_weight=0.0, graded_pairwise=False)
    no_hashing = dict(pairwise_weight=0.0, quantization_weight=0.0, balance_weight=0.0, decorrelation_weight=0.0)
    return {
        "default": default,
        "default without ratings": no_ratings,
        "CE + ratings": replace(default, **no_hashing),
        "CE only": replace(no_ratings, **no_hashing),
        "paper recipe": TrainConfig.paper(),
    }


def clearly_below(ours: list[float], other: list[float]) -> bool:
    """Whether ``ours`` is below ``other`` by more than a point and two standard errors (paired)."""
    difference = np.asarray(ours) - np.asarray(other)
    if len(difference) < 2:
        return bool(difference.mean() < -CLEAR_POINTS)
    error = difference.std(ddof=1) / np.sqrt(len(difference))
    return bool(difference.mean() < -max(CLEAR_POINTS, 2 * error))


def run(
    table: pd.DataFrame,
    splits: int = 3,
    kinds: list[str] | None = None,
    names: list[str] | None = None,
    epochs: int = 12,
    log: Callable[[str], None] = print,
    on_kind: Callable[[dict], None] = lambda _: None,
) -> dict:
    """Every candidate on every kind over ``splits`` patient splits: the figures per split;
    ``on_kind`` gets the report so far after each kind (a long sweep keeps what it finished)."""
    recipes = {name: recipe for name, recipe in candidates().items() if names is None or name in names}
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    config = EvaluationConfig.quick(epochs=epochs)
    for kind, cut in table_kinds(table, kinds).items():
        results[kind] = {}
        for name, recipe in recipes.items():
            figures: dict[str, list[float]] = {key: [] for key in FIGURES}
            for split in range(splits):
                started = time.perf_counter()
                metrics = evaluate_recipe(cut, recipe, split_seed=split, seed=split, config=config)
                figures["accuracy"].append(metrics["accuracy"])
                figures["map_at_10"].append(metrics["map_at_k"]["10"])
                figures["ndcg_at_10"].append(metrics["ndcg_at_10"])
                figures["ndcg_at_10_within_class"].append(metrics["ndcg_at_10_within_class"])
                log(
                    f"{kind} / {name} / split {split}: accuracy {metrics['accuracy']:.3f}, "
                    f"nDCG@10 {metrics['ndcg_at_10']:.3f}, within class {metrics['ndcg_at_10_within_class']:.3f} "
                    f"({time.perf_counter() - started:.0f} s)"
                )
            results[kind][name] = figures
        on_kind({"splits": splits, "epochs": epochs, "results": results})
    return {"splits": splits, "epochs": epochs, "results": results}


def markdown(report: dict) -> str:
    """Accuracy and nDCG@10 (gated, within class) per kind and candidate, mean ± std over the
    splits, and whether the default is clearly below the paper's recipe or CE only anywhere."""
    results = report["results"]
    names = list(next(iter(results.values())))
    lines = [
        f"Mean ± std over {report['splits']} patient splits ({report['epochs']} epochs). "
        "Each cell: accuracy / nDCG@10 / within-class nDCG@10.",
        "",
        "| table kind | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    verdicts = []
    for kind, by_name in results.items():
        cells = []
        for name in names:
            parts = [f"{np.mean(by_name[name][key]):.3f}" for key in ("accuracy", "ndcg_at_10")]
            within = by_name[name]["ndcg_at_10_within_class"]
            spread = np.std(by_name[name]["accuracy"])
            cells.append(f"{parts[0]} ± {spread:.3f} / {parts[1]} / {np.mean(within):.3f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        if "default" in by_name:
            for other in ("CE only", "paper recipe"):
                for key in FIGURES:
                    if other in by_name and clearly_below(by_name["default"][key], by_name[other][key]):
                        verdicts.append(f"- {kind}: the default is clearly below {other} on {key}")
    lines += ["", *(verdicts or ["The default is never clearly below CE only or the paper's recipe."])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rois", type=Path, help="ROI table with a crop71 column (parquet)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--kinds", nargs="+", choices=list(TABLE_KINDS))
    parser.add_argument("--candidates", nargs="+", choices=list(candidates()))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:
        (args.out / "robustness.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "robustness.md").write_text(markdown(report))

    report = run(read_roi_table(args.rois), args.splits, args.kinds, args.candidates, args.epochs, on_kind=write)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
