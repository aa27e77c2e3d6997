"""Jobs: what a run materializes. Each carries a ``nodule_pipeline/stage`` tag that the
production run queue limits (deploy/dagster.yaml: a few ingestion runs, one training run); the
training jobs also ask Kubernetes for a GPU (see :mod:`nodule_pipeline.concurrency`)."""

from dagster import AssetSelection, define_asset_job

from nodule_pipeline.assets import DIAGNOSIS_ASSETS, INGESTION_ASSETS, LIBRARY_ASSETS
from nodule_pipeline.concurrency import INDEX, INGEST, STUDY, TRAIN
from nodule_pipeline.partitions import patients_partitions

ingest_patient_job = define_asset_job(
    "ingest_patient",
    selection=AssetSelection.assets(*INGESTION_ASSETS),
    partitions_def=patients_partitions,
    tags=INGEST,
    description="Scan to lung mask to ROIs for one patient partition.",
)
build_library_job = define_asset_job(
    "build_library",
    selection=AssetSelection.assets(*LIBRARY_ASSETS),
    tags=TRAIN,
    description="All patients' ROIs split, the hashing network trained on them, the hash index and its evaluation.",
)
retrain_job = define_asset_job(
    "retrain",
    selection=AssetSelection.assets("hash_model", "hash_index", "retrieval_evaluation"),
    tags=TRAIN,
    description="Retrain hash_model on the current roi_dataset, re-encode the index, re-run the evaluation.",
)
reindex_job = define_asset_job(
    "reindex",
    selection=AssetSelection.assets("roi_dataset", "hash_index"),
    tags=INDEX,
    description="Refresh roi_dataset with the patients ingested since, and re-encode the index with the current model.",
)
diagnosis_job = define_asset_job(
    "attach_diagnosis",
    selection=AssetSelection.assets(*DIAGNOSIS_ASSETS),
    tags=INDEX,
    description="Read TCIA's diagnosis sheet and match it to the library's nodules (what they really were).",
)
comparison_study_job = define_asset_job(
    "study",
    selection=AssetSelection.assets("comparison_study"),
    tags=STUDY,
    description="The paper's comparison: every method retrained on the library's split (on demand or monthly).",
)
ALL_JOBS = [ingest_patient_job, build_library_job, retrain_job, reindex_job, diagnosis_job, comparison_study_job]
