"""``retrieval_evaluation``: the deployed model through its index, as users search it (the
headline), beside how often the readers agree and, where TCIA's sheet is known, what the nodules
really were. No method is retrained here: the comparison study is ``comparison_study``."""

import json
from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, Failure, MaterializeResult, MetadataValue, asset

from nodule_pipeline.assets.refresh import AFTER_RETRAIN
from nodule_pipeline.concurrency import GPU_POOL
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.evaluation import Deployed, NotEnoughData, evaluate_model
from nodule_pipeline.hashing.index import HashIndex
from nodule_pipeline.hashing.report import (
    REPORT_JSON,
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


@asset(
    group_name="evaluation",
    code_version="4",  # 4: the deployed model alone; the study is comparison_study
    kinds={"json", "markdown"},
    ins={"lidc_diagnosis": AssetIn(metadata={OPTIONAL_INPUT: True})},
    automation_condition=AFTER_RETRAIN,
    pool=GPU_POOL,  # the pathology section trains its out-of-fold models on the training device
)
def retrieval_evaluation(
    context: AssetExecutionContext,
    reports: ReportStore,
    roi_dataset: pd.DataFrame,
    hash_model: ModelArtefact,
    hash_index: HashIndex,
    lidc_diagnosis: pd.DataFrame | None,
) -> MaterializeResult:
    """``hash_model`` searched through ``hash_index`` with the users' search code, the test split
    as queries: accuracy, each search mode, code health, the readers' agreement and, where TCIA's
    diagnosis sheet matches library nodules, how often the readers' label and ours agree with what
    the nodules really were (``pathology``; no sheet, no section). Writes
    ``reports/evaluation.{json,md}`` and the example queries, and shows them here."""
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
        evaluation = evaluate_model(
            roi_dataset,
            Deployed(NoduleSearcher(hash_model.model, hash_index, hash_model.model_version), hash_model.card),
            log=context.log.info,
            diagnosis=lidc_diagnosis if lidc_diagnosis is not None and len(lidc_diagnosis) else None,
        )
    except NotEnoughData as reason:
        context.log.warning(f"no evaluation: {reason}")
        payload = json.dumps({"skipped": str(reason), "lineage": lineage})
        atomic_write(Path(reports.folder) / REPORT_JSON, lambda tmp: tmp.write_text(payload))
        return MaterializeResult(metadata={"skipped": str(reason), "model_version": hash_model.model_version})
    report = evaluation.report
    report["lineage"] = lineage
    files = write_report(evaluation, Path(reports.folder))
    deployed = report["deployed"]
    hierarchical, hamming = deployed["modes"]["hierarchical"], deployed["modes"]["hamming"]
    return MaterializeResult(
        metadata={
            "accuracy": deployed["accuracy"],
            "p_at_10": hierarchical["p_at_10"],
            "map_at_10": hierarchical["map_at_k"]["10"],
            "trec_map_at_10": hierarchical["trec_map_at_k"]["10"],
            "map_at_10_codes_alone": hamming["map_at_k"]["10"],
            "ndcg_at_10": hierarchical["ndcg_at_10"],
            "ndcg_at_10_within_class": hierarchical["ndcg_at_10_within_class"],
            "distinct_codes": deployed["code_health"]["distinct_codes"],
            "reader_agreement": (report.get("reader_agreement") or {}).get("agreement"),
            "reader_agreement_summary": reader_agreement_summary(report.get("reader_agreement")),
            "pathology": pathology_summary(report.get("pathology")) or "no diagnosis sheet",
            "model_version": hash_model.model_version,
            "index_version": hash_index.index_version,
            "data_version": lineage["data_version"],
            "patient_ids": MetadataValue.json(lineage["patients"]),
            "report": MetadataValue.path(str(files["markdown"])),
            "tables": MetadataValue.md(render_markdown(report, figures=False)),
            "examples": MetadataValue.md(markdown_image(files["examples"].read_bytes(), "example queries")),
            "json": MetadataValue.json(deployed),
        }
    )
