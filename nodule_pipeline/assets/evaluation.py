"""``retrieval_evaluation``: the deployed model through its index (the headline), then the paper's
tables and figures retrained under the same recipe: baselines, leakage and ablations."""

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, Config, Failure, MaterializeResult, MetadataValue, asset

from nodule_pipeline.assets.refresh import AFTER_RETRAIN
from nodule_pipeline.concurrency import GPU_POOL
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.evaluation import Deployed, EvaluationConfig, NotEnoughData, evaluate
from nodule_pipeline.hashing.index import HashIndex
from nodule_pipeline.hashing.report import (
    REPORT_JSON,
    leakage_summary,
    pathology_summary,
    reader_agreement_summary,
    render_markdown,
    write_report,
)
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.pictures import markdown_image
from nodule_pipeline.resources import OPTIONAL_INPUT, ReportStore
from nodule_pipeline.roi_table import table_fingerprint
from nodule_pipeline.storage import atomic_write


class EvaluationSettings(Config):
    """The comparison study's size: ``full`` (every configuration at the deployed recipe's epochs,
    3 seeds; about an hour on 2 CPU cores for the demo data) or ``quick`` (12 epochs, 3 seeds, no
    Table 2 variants). The deployed model's headline is measured either way."""

    profile: Literal["full", "quick"] = "full"
    bits: int = 256
    seeds: int | None = None
    epochs: int | None = None


@asset(
    group_name="evaluation",
    code_version="3",
    kinds={"json", "markdown"},
    ins={"lidc_diagnosis": AssetIn(metadata={OPTIONAL_INPUT: True})},
    automation_condition=AFTER_RETRAIN,
    pool=GPU_POOL,  # the comparison study trains networks on the same device as hash_model
)
def retrieval_evaluation(
    context: AssetExecutionContext,
    config: EvaluationSettings,
    reports: ReportStore,
    roi_dataset: pd.DataFrame,
    hash_model: ModelArtefact,
    hash_index: HashIndex,
    lidc_diagnosis: pd.DataFrame | None,
) -> MaterializeResult:
    """Headline: ``hash_model`` searched through ``hash_index`` with the users' search code, test
    split as queries. Then every method on the same split, retrained under the model's recipe,
    and, where TCIA's diagnosis sheet matches library nodules, how often the readers' label and
    ours agree with what the nodules really were (``pathology``; no sheet, no section).
    Writes ``reports/evaluation.{json,md}`` and figures, and shows them here."""
    if hash_index.model_version != hash_model.model_version:
        raise Failure(
            f"hash_index was built with model {hash_index.model_version} but hash_model is "
            f"{hash_model.model_version}: materialize hash_index first, the evaluation's headline is the model "
            "users search through its index"
        )
    lineage = {
        "model_version": hash_model.model_version,
        "index_version": hash_index.index_version,
        "data_version": table_fingerprint(roi_dataset),
        "patients": sorted(roi_dataset["patient_id"].unique().tolist()),
    }
    try:
        evaluation = evaluate(
            roi_dataset,
            EvaluationConfig.profile(config.profile, bits=config.bits, seeds=config.seeds, epochs=config.epochs),
            log=context.log.info,
            recipe=hash_model.model.config,
            network=hash_model.model.network,
            deployed=Deployed(NoduleSearcher(hash_model.model, hash_index, hash_model.model_version), hash_model.card),
            diagnosis=lidc_diagnosis if lidc_diagnosis is not None and len(lidc_diagnosis) else None,
        )
    except NotEnoughData as reason:
        context.log.warning(f"no evaluation: {reason}")
        payload = json.dumps({"skipped": str(reason), "lineage": lineage})
        atomic_write(Path(reports.folder) / REPORT_JSON, lambda tmp: tmp.write_text(payload))
        return MaterializeResult(
            metadata={"skipped": str(reason), "model_version": hash_model.model_version, "profile": config.profile}
        )
    report = evaluation.report
    report["lineage"] = lineage
    files = write_report(evaluation, Path(reports.folder))
    deployed = report["deployed"]
    hierarchical, hamming = deployed["modes"]["hierarchical"], deployed["modes"]["hamming"]
    leakage = report.get("leakage") or {}
    inflation = (leakage.get("inflation") or {}).get("map_at_10") or {}
    return MaterializeResult(
        metadata={
            "profile": config.profile,
            "accuracy": deployed["accuracy"],
            "p_at_10": hierarchical["p_at_10"],
            "map_at_10": hierarchical["map_at_k"]["10"],
            "map_at_10_codes_alone": hamming["map_at_k"]["10"],
            "ndcg_at_10": hierarchical["ndcg_at_10"],
            "distinct_codes": deployed["code_health"]["distinct_codes"],
            "study_map_at_10": report["ours"]["map_at_k"]["10"],
            "map_at_10_leakage_inflation": inflation.get("difference"),
            "map_at_10_leakage_interval": MetadataValue.json([inflation.get("low"), inflation.get("high")]),
            "leakage": leakage_summary(leakage) or "not measured",
            "reader_agreement": (report.get("reader_agreement") or {}).get("agreement"),
            "reader_agreement_summary": reader_agreement_summary(report.get("reader_agreement")),
            "pathology": pathology_summary(report.get("pathology")) or "no diagnosis sheet",
            "model_version": hash_model.model_version,
            "index_version": hash_index.index_version,
            "data_version": lineage["data_version"],
            "patient_ids": MetadataValue.json(lineage["patients"]),
            "report": MetadataValue.path(str(files["markdown"])),
            "tables": MetadataValue.md(render_markdown(report, figures=False)),
            "map_at_k": MetadataValue.md(markdown_image(files["map_at_k"].read_bytes(), "MAP@k")),
            "examples": MetadataValue.md(markdown_image(files["examples"].read_bytes(), "example queries")),
            "json": MetadataValue.json(deployed),
        }
    )
