"""``comparison_study``: the paper's tables and figures, every method retrained from scratch on
the library's split under the deployed model's recipe (baselines, objectives, variants, hash
sizes, seeds, leakage). Its own job and schedule, in its own pool: it never blocks a retrain."""

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from nodule_pipeline.concurrency import STUDY_POOL
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.evaluation import EvaluationConfig, NotEnoughData, evaluate
from nodule_pipeline.hashing.report import REPORT_JSON, leakage_summary, render_markdown, write_report
from nodule_pipeline.pictures import markdown_image
from nodule_pipeline.resources import ReportStore
from nodule_pipeline.roi_table import table_fingerprint
from nodule_pipeline.storage import atomic_write

STUDY_FOLDER = "study"
"""Under the reports folder: the study's evaluation.{json,md} and figures."""


class StudySettings(Config):
    """The study's size: ``full`` (every configuration at the deployed recipe's epochs, 3 seeds;
    about an hour on 2 CPU cores for the demo data), ``quick`` (12 epochs, 3 seeds, no Table 2
    variants) or ``short`` (quick at one seed, one hash size, no leakage study)."""

    profile: Literal["full", "quick", "short"] = "full"
    bits: int = 256
    seeds: int | None = None
    epochs: int | None = None


@asset(group_name="evaluation", code_version="1", kinds={"json", "markdown"}, pool=STUDY_POOL)
def comparison_study(
    context: AssetExecutionContext,
    config: StudySettings,
    reports: ReportStore,
    roi_dataset: pd.DataFrame,
    hash_model: ModelArtefact,
) -> MaterializeResult:
    """Every method on the library's split, trained under ``hash_model``'s recipe and network:
    what the paper's tables and figures show, with leakage and seed spread. Writes
    ``reports/study/evaluation.{json,md}`` and figures, and shows them here."""
    out = Path(reports.folder) / STUDY_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    lineage = {"model_version": hash_model.model_version, "data_version": table_fingerprint(roi_dataset)}
    try:
        evaluation = evaluate(
            roi_dataset,
            EvaluationConfig.profile(config.profile, bits=config.bits, seeds=config.seeds, epochs=config.epochs),
            log=context.log.info,
            recipe=hash_model.model.config,
            network=hash_model.model.network,
        )
    except NotEnoughData as reason:
        context.log.warning(f"no study: {reason}")
        payload = json.dumps({"skipped": str(reason), "lineage": lineage})
        atomic_write(out / REPORT_JSON, lambda tmp: tmp.write_text(payload))
        return MaterializeResult(metadata={"skipped": str(reason), "profile": config.profile})
    report = evaluation.report
    report["lineage"] = lineage
    files = write_report(evaluation, out)
    ours = report["ours"]
    retrieving = {name: m["map_at_k"]["10"] for name, m in report["baselines"].items() if "map_at_k" in m}
    best = max(retrieving, key=retrieving.get) if retrieving else None
    return MaterializeResult(
        metadata={
            "profile": config.profile,
            "accuracy": ours["accuracy"],
            "map_at_10": ours["map_at_k"]["10"],
            "map_at_10_seed_mean": ours["spread"]["map_at_10"]["mean"],
            "ndcg_at_10": ours["ndcg_at_10"],
            "ndcg_at_10_within_class": ours["ndcg_at_10_within_class"],
            "map_at_10_codes_alone": report["ablation"]["hamming"]["map_at_k"]["10"],
            "best_baseline": f"{best} MAP@10 {retrieving[best]:.4f}" if best else "none",
            "leakage": leakage_summary(report.get("leakage")) or "not measured",
            "model_version": hash_model.model_version,
            "data_version": lineage["data_version"],
            "report": MetadataValue.path(str(files["markdown"])),
            "tables": MetadataValue.md(render_markdown(report, figures=False)),
            "map_at_k": MetadataValue.md(markdown_image(files["map_at_k"].read_bytes(), "MAP@k")),
            "examples": MetadataValue.md(markdown_image(files["examples"].read_bytes(), "example queries")),
        }
    )
