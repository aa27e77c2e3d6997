"""``model_not_trained_on_test_patients``: a blocking check on the assets that report on the test
split. A redrawn split (``resplit``, another seed or fraction) can put patients the current model
learned from on the test side; its index and evaluation would then be measured on them."""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    asset_check,
)

from nodule_pipeline.assets.evaluation import retrieval_evaluation
from nodule_pipeline.assets.index import hash_index
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.roi_table import split_settings, training_patients_in_test

MODEL_NOT_TRAINED_ON_TEST_PATIENTS = "model_not_trained_on_test_patients"
NAMED = 10
"""Patients the check's description names (its metadata lists them all)."""


def leak_verdict(leaked: list[str]) -> str:
    """What the check says: the leaked patients (partition keys: pseudonyms under pseudonymisation)
    and what to do."""
    if not leaked:
        return "no patient the model was trained on is on the test side of the split"
    more = f" and {len(leaked) - NAMED} more" if len(leaked) > NAMED else ""
    return (
        f"hash_model was trained on {len(leaked)} patient(s) now on the test side of roi_dataset's split: "
        f"{', '.join(leaked[:NAMED])}{more}. Its test figures would be measured on patients it learned from: "
        "retrain hash_model on the current split (the retrain job: hash_model, hash_index, retrieval_evaluation)"
    )


def split_leak_check(asset: AssetsDefinition) -> AssetChecksDefinition:
    """The check on ``asset``: the current model's training patients against the current split.
    Blocking in patient mode; a warning in roi mode, whose split sends patients to both sides by design."""

    @asset_check(
        asset=asset,
        name=MODEL_NOT_TRAINED_ON_TEST_PATIENTS,
        blocking=True,
        additional_ins={"hash_model": AssetIn("hash_model"), "roi_dataset": AssetIn("roi_dataset")},
        description="No patient hash_model was trained on is on the test side of the current roi_dataset split.",
    )
    def check(hash_model: ModelArtefact, roi_dataset: pd.DataFrame) -> AssetCheckResult:
        leaked = training_patients_in_test(hash_model.card["split"]["train_patients"], roi_dataset)
        mode = (split_settings(roi_dataset) or {}).get("mode", "patient")
        return AssetCheckResult(
            passed=not leaked,
            severity=AssetCheckSeverity.WARN if mode == "roi" else AssetCheckSeverity.ERROR,
            description=leak_verdict(leaked),
            metadata={
                "training_patients_in_test": len(leaked),
                "patients": MetadataValue.json(leaked),
                "model_version": hash_model.model_version,
                "split_mode": mode,
            },
        )

    return check


index_model_not_trained_on_test_patients = split_leak_check(hash_index)
evaluation_model_not_trained_on_test_patients = split_leak_check(retrieval_evaluation)
