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
from nodule_pipeline.pictures import hit_caption, search_results, to_png
from nodule_pipeline.roi_table import roi_images
from nodule_pipeline.storage import atomic_write

OURS = "Ours (hierarchical)"
EXAMPLE_QUERIES = 4
REPORT_JSON = "evaluation.json"
"""The machine-readable report in the reports folder (what a rerun checks is still there)."""
HEALTH_COLUMNS = (
    ("distinct_codes", "distinct codes"),
    ("mean_bit_entropy", "mean bit entropy"),
    ("constant_bits", "constant bits"),
    ("intra_class_hamming", "intra-class Hamming"),
    ("inter_class_hamming", "inter-class Hamming"),
)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{float(value):.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _methods(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every method of the comparison study, ours first."""
    return {OURS: report["ours"], **report.get("objectives", {}), **report["baselines"]}


def _retrieval_rows(methods: dict[str, dict[str, Any]], ks: list[str]) -> list[list[str]]:
    return [
        [name, _pct(m["p_at_10"]), _pct(m["recall_at_10"]), _pct(m["f1_at_10"]), _pct(m.get("ndcg_at_10"))]
        + [_pct(m.get("ndcg_at_10_within_class"))]
        + [_pct(m["map_at_k"][k]) for k in ks]
        + [_pct((m.get("trec_map_at_k") or {}).get("10"))]
        for name, m in methods.items()
        if "map_at_k" in m
    ]


def _health_rows(items: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[name, *(_num(health.get(key)) for key, _ in HEALTH_COLUMNS)] for name, health in items.items()]


def leakage_summary(leakage: dict[str, Any] | None, key: str = "map_at_10") -> str | None:
    """One line on the leak of the paper's ROI split: the difference of the seed means with its
    interval, or that this data set is too small to tell it from seed noise."""
    if not leakage:
        return None
    inflation = leakage["inflation"][key]
    difference, low, high = inflation["difference"], inflation["low"], inflation["high"]
    seeds = leakage["seeds"]
    name = key.replace("map_at_10", "MAP@10").replace("p_at_10", "P@10")
    measured = f"{name} {difference:+.3f} (95% interval {low:+.3f}..{high:+.3f}, {seeds} seeds a split)"
    if low <= 0 <= high:
        return f"ROI-split leak too small to tell from seed noise on this data: {measured}"
    return f"ROI-split leak: {measured}"


NO_READER_AGREEMENT = "reader agreement not measured: no test nodule carries the ratings of 3 or more readers"


def reader_agreement_summary(agreement: dict[str, Any] | None) -> str:
    """One line: how often a reader agrees with the other readers, and the models on the same rows."""
    if not agreement:
        return NO_READER_AGREEMENT
    models = ", ".join(
        f"{name} {_pct(accuracy)}%" for name, accuracy in agreement["model_accuracy"].items() if accuracy is not None
    )
    return (
        f"readers agree with the other readers' median on {_pct(agreement['agreement'])}% of {agreement['calls']} "
        f"calls ({agreement['nodules']} test nodules with >= {agreement['min_readers']} readers); "
        f"the models agree with the label on those nodules' {agreement['rows']} test rows: {models}"
    )


def _reader_agreement_section(agreement: dict[str, Any]) -> list[str]:
    rows = [["one reader, with the median of the others", _pct(agreement["agreement"]), f"{agreement['calls']} calls"]]
    rows += [
        [f"{name}, with the label", _pct(accuracy), f"{agreement['rows']} rows"]
        for name, accuracy in agreement["model_accuracy"].items()
        if accuracy is not None
    ]
    return [
        "## How often the readers agree (the labels' own noise)",
        "Labels come from readers' malignancy ratings, and readers disagree. Leaving one reader out at a time, "
        f"over the {agreement['nodules']} test nodules read by {agreement['min_readers']} or more readers, a "
        "reader's call (rating not 3) is compared with the median of the others (when that is not 3). The models "
        "are scored against the table's label on the same nodules' test rows: the readers' median in a table of "
        "one row per nodule, the reader's own rating in the pipeline's rows per annotation. A model near the "
        "readers' figure has learnt about as much as these labels can teach.",
        _table(["who agrees", "%", "counted"], rows),
    ]


def pathology_summary(section: dict[str, Any] | None) -> str | None:
    """One line of the pathology section for the command line (None without a diagnosis sheet)."""
    if not section:
        return None
    if "skipped" in section:
        return f"against the confirmed diagnosis: {section['skipped']}"
    readers, ours = section["readers"], section["ours"]
    return (
        f"against the confirmed diagnosis ({section['matched_nodules']} nodules): readers agree "
        f"{_pct(readers['agreement'])} [{_pct(readers['low'])}-{_pct(readers['high'])}], ours (out of fold) "
        f"{_pct(ours['agreement'])} [{_pct(ours['low'])}-{_pct(ours['high'])}], P@10 "
        f"{_pct(section['retrieval']['p_at_10'])}"
    )


def _pathology_section(section: dict[str, Any]) -> list[str]:
    """What the nodules really were (TCIA's diagnosis sheet) against the readers' label and ours."""
    lines = [
        "## Against the confirmed diagnosis",
        f"{section['matched_nodules']} nodules of {section['matched_patients']} patients have a confirmed diagnosis "
        f"under the matching rule: {section['rule']} {section['note']}",
    ]
    if "skipped" in section:
        return [*lines, section["skipped"]]

    def row(name: str, figure: dict[str, Any]) -> list[str]:
        return [name, _pct(figure["agreement"]), f"{_pct(figure['low'])}-{_pct(figure['high'])}", str(figure["n"])]

    retrieval = section["retrieval"]
    return [
        *lines,
        _table(
            ["label", "agrees with the diagnosis", "95% interval", "nodules"],
            [
                row("readers' malignancy rating (median)", section["readers"]),
                row("ours (out of fold)", section["ours"]),
            ],
        ),
        f"Ours is scored out of fold ({section['folds']} patient folds: each nodule by a model that never saw its "
        f"patient). Search by our codes among the other patients' matched nodules: P@10 {_pct(retrieval['p_at_10'])} "
        f"over {retrieval['n_queries']} queries (relevant: {retrieval['relevance']}).",
    ]


def _deployed_section(deployed: dict[str, Any]) -> list[str]:
    modes = deployed["modes"]
    rows = [
        [
            mode,
            _pct(m["p_at_10"]),
            _pct(m["map_at_k"]["10"]),
            _pct((m.get("trec_map_at_k") or {}).get("10")),
            _pct(m["ndcg_at_10"]),
            _pct(m.get("ndcg_at_10_within_class")),
        ]
        for mode, m in modes.items()
    ]
    training = deployed.get("training") or {}
    return [
        "## Deployed model (the headline)",
        f"`hash_model` {deployed['model_version']} searched through `hash_index` {deployed['index_version']} "
        f"with the users' search code: {deployed['n_queries']} test queries against "
        f"{deployed.get('n_database_nodules', '?')} indexed nodules ({deployed['n_database']} reader annotations, "
        f"{deployed['database']} rows), each hit a distinct nodule as users see them (a nodule's annotations "
        f"folded into one hit where its best one ranks). Accuracy {_pct(deployed['accuracy'])} (the model card's), "
        f"recall (malignant) {_pct(deployed['recall'])}, F1 {_pct(deployed['f1'])}; trained "
        f"{training.get('epochs', '?')} epochs at most, epoch {deployed.get('selected_epoch')} kept.",
        _table(["search mode", "P@10", "MAP@10", "TREC MAP@10", "nDCG@10", "within class"], rows),
        _table(["codes", *(label for _, label in HEALTH_COLUMNS)], _health_rows({"index": deployed["code_health"]})),
    ]


def _leakage_section(leakage: dict[str, Any]) -> list[str]:
    def cell(side: str, key: str) -> str:
        spread = leakage[side][key]
        return f"{_pct(spread['mean'])} ± {_pct(spread['std'])}"

    rows = []
    for key in leakage["inflation"]:
        inflation = leakage["inflation"][key]
        interval = f"{_pct(inflation['difference'])} [{_pct(inflation['low'])}, {_pct(inflation['high'])}]"
        rows.append([key, cell("patient", key), cell("roi", key), interval])
    knn = leakage["raw_knn"]
    for key in ("p_at_10", "map_at_10"):
        rows.append([f"{key} (raw-pixel kNN)", _pct(knn["patient"][key]), _pct(knn["roi"][key]), _pct(knn[key])])
    return [
        "## Leakage: patient split against the paper's random ROI split",
        f"Ours trained with {leakage['seeds']} seeds on each split (mean ± std over seeds); the difference of the "
        "means with its 95% Welch interval. The raw-pixel kNN has no seed: it is the deterministic reference.",
        _table(["metric", "patient split", "ROI split", "ROI - patient [95%]"], rows),
        f"The ROI split put {leakage['roi_patients_on_both_sides']} patients on both sides. "
        + (leakage_summary(leakage) or ""),
    ]


def render_markdown(report: dict[str, Any], figures: bool = True) -> str:
    """The report's tables (values in percent): the deployed model's evaluation
    (``retrieval_evaluation``) or the comparison study (``comparison_study``, ``evaluate-rois``),
    whichever ``report`` holds. ``figures``: with its pictures, linked as the files
    :func:`write_report` puts beside it; without them where the markdown is shown elsewhere (the
    Dagster UI, which cannot follow a relative link and shows the pictures as their own entries)."""
    parts = ["# Comparison study" if "ours" in report else "# Retrieval evaluation"]
    if report.get("deployed"):
        parts += _deployed_section(report["deployed"])
    if report.get("reader_agreement"):
        parts += _reader_agreement_section(report["reader_agreement"])
    if report.get("pathology"):
        parts += _pathology_section(report["pathology"])
    if "ours" in report:
        parts += _study_section(report, figures)
    if figures:
        parts.append("## Example queries\n![examples](examples.png)")
    return "\n\n".join(parts) + "\n"


def _study_section(report: dict[str, Any], figures: bool) -> list[str]:
    """Every method trained from scratch on the training split: the paper's tables and figures."""
    ours = report["ours"]
    methods = _methods(report)
    ks = list(ours["map_at_k"])
    recipe = report.get("recipe", {})
    classification = [
        [name, _pct(m.get("accuracy")), _pct(m.get("recall")), _pct(m.get("f1"))]
        for name, m in methods.items()
        if "accuracy" in m
    ]
    bits = [
        [b, _pct(m["accuracy"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["map_at_10"]), str(m["distinct_codes"])]
        for b, m in report["bits_sweep"].items()
    ]
    ablation = [
        [mode, _pct(m["p_at_10"]), _pct(m["map_at_k"]["10"]), _pct(m["ndcg_at_10"])]
        for mode, m in report["ablation"].items()
    ]
    spread = [
        [key, _pct(value["mean"]), _pct(value["std"]), str(len(value["values"]))]
        for key, value in ours["spread"].items()
    ]
    health = {name: m["code_health"] for name, m in methods.items() if "code_health" in m}
    low, high = ours["map_at_10_bootstrap_95"]
    parts = [
        "## Comparison study",
        f"Every method below was trained from scratch on the training split (split **{report['split_mode']}**, "
        f"{report['n_queries']} test queries against {report['n_database']} training ROIs, {report['bits']} bits; "
        "each hit a reader annotation, the paper's unit, so a nodule read by four readers can fill four places) "
        f"under the same recipe as the deployed model (at most {recipe.get('epochs', '?')} epochs, "
        f"augmentation {'on' if recipe.get('augment') else 'off'}, validation "
        f"{report.get('study_validation') or recipe.get('validation_fraction', '?')}); its figures are not the "
        "deployed model's. "
        f"{PAPER_OBJECTIVE_NOTE} Relevance = the same readers' label; metrics as docs/metrics.md defines them; "
        "equal distances are settled by nodule id. All numbers in percent.",
        "### Classification (Table 2 analogue)",
        _table(["method", "accuracy", "recall (malignant)", "F1 (malignant)"], classification),
        "### Retrieval (Figures 3 and 4 analogue)",
        "MAP@k is the pinned AP (divided by the relevant items retrieved); TREC MAP@10 divides by "
        "min(10, the relevant items in the database), the textbook AP (docs/metrics.md).",
        _table(
            ["method", "P@10", "R@10", "F1@10", "nDCG@10", "within class"] + [f"MAP@{k}" for k in ks] + ["TREC MAP@10"],
            _retrieval_rows(methods, ks),
        ),
        *(["![MAP@k](map_at_k.png)"] if figures else []),
        "### Code health (database codes)",
        "Collapsed codes rank nothing: few distinct codes, constant bits, a whole class at Hamming 0.",
        _table(["method", *(label for _, label in HEALTH_COLUMNS)], _health_rows(health)),
        *(
            [
                "### Hash bits (Table 3 analogue)",
                _table(["bits", "accuracy", "recall", "F1", "MAP@10", "distinct codes"], bits),
            ]
            if bits
            else []
        ),
        "### Search stages (ablation)",
        "Flat Hamming ranking (the codes alone), Hamming pool re-ranked by Euclidean distance on `fc`, and the "
        "paper's class-gated pipeline, on the same codes.",
        _table(["mode", "P@10", "MAP@10", "nDCG@10"], ablation),
        "### Spread of ours over seeds",
        _table(["metric", "mean", "std", "seeds"], spread),
        f"MAP@10 bootstrap 95% interval over queries (seed 0): {_pct(low)} to {_pct(high)}.",
        f"### Graded relevance\nnDCG@10 of ours: **{_pct(report['ndcg_at_10'])}**. Gain = same label x (1 - mean "
        "normalised difference of the readers' ratings; categorical ratings compared by equality), ideal DCG "
        "over the whole database (`nodule_pipeline.hashing.metrics.graded_gain`). *Within class* "
        "(`ndcg_at_10_within_class`): the same method ranking only the database items of the query's true "
        "label, so it measures the order by appearance alone, not the label; the hierarchical search "
        "gated at the true class for ours.",
    ]
    if report.get("leakage"):
        parts += _leakage_section(report["leakage"])
    return parts


PAPER_OBJECTIVE_NOTE = (
    "*Paper objective (CE only)*: the same recipe without the pairwise, quantization, balance and decorrelation "
    "terms; *Paper recipe*: the paper's whole training (cross-entropy only, no augmentation, constant learning "
    "rate, no validation)."
)


def map_at_k_figure(report: dict[str, Any]) -> bytes:
    """MAP@k against k for ours and every method that retrieves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=90)
    for name, metrics in _methods(report).items():
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
        montage = search_results(
            query_images[q],
            f"query, {'malignant' if int(queries['label'].iloc[q]) else 'benign'}\n{queries['nodule_id'].iloc[q]}",
            [database_images[r] for r in ranked],
            [int(database["label"].iloc[r]) for r in ranked],
            [hit_caption(i + 1, database["nodule_id"].iloc[r]) for i, r in enumerate(ranked)],
        )
        rows.append(montage.image)
    width = max(image.width for image in rows)
    canvas = Image.new("RGB", (width, sum(image.height for image in rows)), (20, 20, 20))
    y = 0
    for image in rows:
        canvas.paste(image, (0, y))
        y += image.height
    return to_png(canvas)


def write_report(evaluation: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Write JSON, markdown and figures into ``out_dir`` (each file atomically); the MAP@k curves
    only for a comparison study (the deployed model's evaluation has one method)."""
    contents = {
        "json": (REPORT_JSON, json.dumps(evaluation.report, indent=2).encode()),
        "markdown": ("evaluation.md", render_markdown(evaluation.report).encode()),
        "examples": ("examples.png", examples_figure(evaluation)),
    }
    if "ours" in evaluation.report:
        contents["map_at_k"] = ("map_at_k.png", map_at_k_figure(evaluation.report))
    files = {key: out_dir / name for key, (name, _) in contents.items()}
    for key, (_, data) in contents.items():
        atomic_write(files[key], lambda tmp, data=data: tmp.write_bytes(data))
    return files
