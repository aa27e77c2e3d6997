"""``retrieval_evaluation``: the paper's tables and figures, baselines, leakage and ablations."""

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from nodule_pipeline.assets.refresh import AFTER_RETRAIN
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.evaluation import EvaluationConfig, NotEnoughData, evaluate
from nodule_pipeline.hashing.report import REPORT_JSON, render_markdown, write_report
from nodule_pipeline.pictures import markdown_image
from nodule_pipeline.resources import ReportStore
from nodule_pipeline.roi_table import table_fingerprint
from nodule_pipeline.storage import atomic_write


class EvaluationSettings(Config):
    """``full`` is the whole report (paper-size training of every configuration, 3 seeds; about
    45 minutes on 2 CPU cores for the demo data); ``quick`` trains briefly with one seed."""

    profile: Literal["full", "quick"] = "full"
    bits: int = 256
    seeds: int | None = None
    epochs: int | None = None


@asset(group_name="evaluation", code_version="1", kinds={"json", "markdown"}, automation_condition=AFTER_RETRAIN)
def retrieval_evaluation(
    context: AssetExecutionContext,
    config: EvaluationSettings,
    reports: ReportStore,
    roi_dataset: pd.DataFrame,
    hash_model: ModelArtefact,
) -> MaterializeResult:
    """Every method on the same split: queries = test rows, database = training rows. Writes
    ``reports/evaluation.{json,md}`` and figures, and shows them here."""
    try:
        evaluation = evaluate(
            roi_dataset,
            EvaluationConfig.profile(config.profile, bits=config.bits, seeds=config.seeds, epochs=config.epochs),
            log=context.log.info,
        )
    except NotEnoughData as reason:
        context.log.warning(f"no evaluation: {reason}")
        payload = json.dumps({"skipped": str(reason), "model_version": hash_model.model_version})
        atomic_write(Path(reports.folder) / REPORT_JSON, lambda tmp: tmp.write_text(payload))
        return MaterializeResult(
            metadata={"skipped": str(reason), "model_version": hash_model.model_version, "profile": config.profile}
        )
    report = evaluation.report
    report["lineage"] = {
        "model_version": hash_model.model_version,
        "data_version": table_fingerprint(roi_dataset),
        "patients": sorted(roi_dataset["patient_id"].unique().tolist()),
        "production_model_test_metrics": hash_model.card.get("test_metrics", {}),
    }
    files = write_report(evaluation, Path(reports.folder))
    ours = report["ours"]
    leakage = report.get("leakage") or {}
    return MaterializeResult(
        metadata={
            "profile": config.profile,
            "accuracy": ours["accuracy"],
            "p_at_10": ours["p_at_10"],
            "map_at_10": ours["map_at_k"]["10"],
            "ndcg_at_10": report["ndcg_at_10"],
            "map_at_10_leakage_inflation": (leakage.get("inflation") or {}).get("map_at_10"),
            "model_version": hash_model.model_version,
            "data_version": report["lineage"]["data_version"],
            "patient_ids": MetadataValue.json(report["lineage"]["patients"]),
            "report": MetadataValue.path(str(files["markdown"])),
            "tables": MetadataValue.md(render_markdown(report).split("## Example queries")[0]),
            "map_at_k": MetadataValue.md(markdown_image(files["map_at_k"].read_bytes(), "MAP@k")),
            "examples": MetadataValue.md(markdown_image(files["examples"].read_bytes(), "example queries")),
            "json": MetadataValue.json(json.loads(files["json"].read_text())["ours"]),
        }
    )
