"""Render an evaluation as files people and tools read: ``evaluation.json`` (the shape other
tools rely on), ``evaluation.md`` (the tables), and PNG figures."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nodule_pipeline.hashing.evaluation import Evaluation
from nodule_pipeline.pictures import search_results, to_png
from nodule_pipeline.roi_table import roi_images
from nodule_pipeline.storage import atomic_write

OURS = "Ours (hierarchical)"
EXAMPLE_QUERIES = 4
REPORT_JSON = "evaluation.json"
"""The machine-readable report in the reports folder (what a rerun checks is still there)."""


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(report: dict[str, Any]) -> str:
    """The report's tables (values in percent)."""
    ours, baselines = report["ours"], report["baselines"]
    methods = {OURS: ours, **baselines}
    ks = list(ours["map_at_k"])
    classification = [
        [name, _pct(m.get("accuracy")), _pct(m.get("recall")), _pct(m.get("f1"))]
        for name, m in methods.items()
        if "accuracy" in m
    ]
    retrieval = [
        [name, _pct(m["p_at_10"]), _pct(m["recall_at_10"]), _pct(m["f1_at_10"])] + [_pct(m["map_at_k"][k]) for k in ks]
        for name, m in methods.items()
        if "map_at_k" in m
    ]
    bits = [
        [b, _pct(m["accuracy"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["map_at_10"])]
        for b, m in report["bits_sweep"].items()
    ]
    ablation = [[mode, _pct(m["p_at_10"]), _pct(m["map_at_k"]["10"])] for mode, m in report["ablation"].items()]
    spread = [
        [key, _pct(value["mean"]), _pct(value["std"]), str(len(value["values"]))]
        for key, value in ours["spread"].items()
    ]
    low, high = ours["map_at_10_bootstrap_95"]
    parts = [
        "# Retrieval evaluation",
        f"Split: **{report['split_mode']}**; {report['n_queries']} test queries against a database of "
        f"{report['n_database']} training ROIs; {report['bits']} bits. Relevance = same ground-truth label; "
        "metrics as DESIGN.md section 6 pins them. All numbers in percent.",
        "## Classification (Table 2 analogue)",
        _table(["method", "accuracy", "recall (malignant)", "F1 (malignant)"], classification),
        "## Retrieval (Figures 3 and 4 analogue)",
        _table(["method", "P@10", "R@10", "F1@10"] + [f"MAP@{k}" for k in ks], retrieval),
        "![MAP@k](map_at_k.png)",
        "## Hash bits (Table 3 analogue)",
        _table(["bits", "accuracy", "recall", "F1", "MAP@10"], bits),
        "## Search stages (ablation)",
        "Flat Hamming ranking, Hamming pool re-ranked by Euclidean distance on `fc`, and the paper's "
        "class-gated pipeline, on the same codes.",
        _table(["mode", "P@10", "MAP@10"], ablation),
        "## Spread of ours over seeds",
        _table(["metric", "mean", "std", "seeds"], spread),
        f"MAP@10 bootstrap 95% interval over queries (seed 0): {_pct(low)} to {_pct(high)}.",
        f"## Graded relevance\nnDCG@10 of ours: **{_pct(report['ndcg_at_10'])}**. Gain = same label x (1 - mean "
        "normalised difference of the readers' ratings; categorical ratings compared by equality), ideal DCG "
        "over the whole database (`nodule_pipeline.hashing.metrics.graded_gain`).",
    ]
    leakage = report.get("leakage")
    if leakage:
        rows = [
            [key, _pct(leakage["patient"][key]), _pct(leakage["roi"][key]), _pct(leakage["inflation"][key])]
            for key in leakage["patient"]
        ]
        parts += [
            "## Leakage: patient split against the paper's random ROI split",
            _table(["metric", "patient split", "ROI split", "inflation"], rows),
            f"The ROI split put {leakage['roi_patients_on_both_sides']} patients on both sides.",
        ]
    parts.append("## Example queries (ours)\n![examples](examples.png)")
    return "\n\n".join(parts) + "\n"


def map_at_k_figure(report: dict[str, Any]) -> bytes:
    """MAP@k against k for ours and every method that retrieves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=90)
    methods = {OURS: report["ours"], **report["baselines"]}
    for name, metrics in methods.items():
        if "map_at_k" not in metrics:
            continue
        ks = [int(k) for k in metrics["map_at_k"]]
        style = {"linewidth": 2.5, "color": "black"} if name == OURS else {"linewidth": 1}
        axis.plot(ks, list(metrics["map_at_k"].values()), marker="o", markersize=3, label=name, **style)
    axis.set_xlabel("k")
    axis.set_ylabel("MAP@k")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=6, ncol=2)
    axis.set_title(f"MAP@k, {report['split_mode']} split")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def examples_figure(evaluation: Evaluation) -> bytes:
    """A few test queries with their top 10 results, stacked."""
    queries, database = evaluation.query_rows, evaluation.database_rows
    query_images, database_images = roi_images(queries), roi_images(database)
    picks = np.linspace(0, len(queries) - 1, num=min(EXAMPLE_QUERIES, len(queries))).astype(int)
    rows = []
    for q in picks:
        ranked = [r for r in evaluation.example_rankings[q] if r >= 0]
        png = search_results(
            query_images[q],
            "Q " + ("malig." if int(queries["label"].iloc[q]) else "benign"),
            [database_images[r] for r in ranked],
            [int(database["label"].iloc[r]) for r in ranked],
            [f"#{i + 1} {database['nodule_id'].iloc[r].removeprefix('LIDC-IDRI-')}" for i, r in enumerate(ranked)],
            zoom=2,
        )
        rows.append(Image.open(io.BytesIO(png)).convert("RGB"))
    width = max(image.width for image in rows)
    canvas = Image.new("RGB", (width, sum(image.height for image in rows)), (20, 20, 20))
    y = 0
    for image in rows:
        canvas.paste(image, (0, y))
        y += image.height
    return to_png(canvas)


def write_report(evaluation: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Write JSON, markdown and figures into ``out_dir`` (each file atomically)."""
    files = {
        "json": out_dir / REPORT_JSON,
        "markdown": out_dir / "evaluation.md",
        "map_at_k": out_dir / "map_at_k.png",
        "examples": out_dir / "examples.png",
    }
    contents = {
        "json": json.dumps(evaluation.report, indent=2).encode(),
        "markdown": render_markdown(evaluation.report).encode(),
        "map_at_k": map_at_k_figure(evaluation.report),
        "examples": examples_figure(evaluation),
    }
    for key, path in files.items():
        atomic_write(path, lambda tmp, data=contents[key]: tmp.write_bytes(data))
    return files
