"""When the library assets refresh by themselves (declarative automation).

New patients' ROIs refresh ``roi_dataset`` and then ``hash_index`` with the current model, with
no retraining; ``hash_model`` retrains only on its schedule or by hand, and the evaluation
follows a retrain. Unlike ``AutomationCondition.eager()`` a patient whose ingestion failed
(a missing partition upstream) does not hold the library back.
"""

from dagster import AssetSelection, AutomationCondition

_SETTLED = ~AutomationCondition.any_deps_in_progress() & ~AutomationCondition.in_progress()

WHEN_NEW_ROIS = (AutomationCondition.any_deps_updated().since_last_handled() & _SETTLED).with_label(
    "new or changed patient ROIs"
)
"""``roi_dataset``: any patient partition of ``nodule_rois`` updated, and no ingestion running."""

WHEN_DATASET_OR_MODEL_CHANGES = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & _SETTLED
    & ~AutomationCondition.any_deps_missing()
    & AutomationCondition.all_deps_blocking_checks_passed()
).with_label("dataset or model changed, model passed its checks")
"""``hash_index``: re-encode the database with the current model, never a model that failed a
blocking check (such as the test-accuracy floor)."""

_MODEL_UPDATED = AutomationCondition.any_deps_updated().allow(AssetSelection.assets("hash_model"))
_INDEX_UPDATED = AutomationCondition.any_deps_updated().allow(AssetSelection.assets("hash_index"))
_OPTIONAL_DEPS = AssetSelection.assets("lidc_diagnosis")
"""Inputs an asset can do without (the diagnosis sheet): never missing, never holding a refresh back."""

AFTER_RETRAIN = (
    _MODEL_UPDATED.since_last_handled()
    & _INDEX_UPDATED.since(_MODEL_UPDATED)
    & _SETTLED
    & ~AutomationCondition.any_deps_missing().ignore(_OPTIONAL_DEPS)
    & AutomationCondition.all_deps_blocking_checks_passed()
).with_label("model retrained and indexed")
"""``retrieval_evaluation``: a new model is evaluated once ``hash_index`` has been re-encoded with
it (the report's headline is the model users search, through its index); new database patients
alone, or a new diagnosis sheet, do not re-run the (long) evaluation: its pathology section follows
the sheet at the next retrain, or at once from ``nodule-pipeline run``."""
