"""Thin asset modules, one per stage of the chain: load inputs, call the core, attach metadata."""

from nodule_pipeline.assets.dataset import roi_dataset
from nodule_pipeline.assets.diagnosis import lidc_diagnosis, nodule_diagnosis
from nodule_pipeline.assets.evaluation import retrieval_evaluation
from nodule_pipeline.assets.index import hash_index, index_rows_match_database, index_uses_current_model
from nodule_pipeline.assets.lung_masks import lung_mask
from nodule_pipeline.assets.model import hash_model
from nodule_pipeline.assets.rois import nodule_rois
from nodule_pipeline.assets.scans import lidc_scan
from nodule_pipeline.assets.split_leak import (
    evaluation_model_not_trained_on_test_patients,
    index_model_not_trained_on_test_patients,
)
from nodule_pipeline.assets.study import comparison_study

INGESTION_ASSETS = [lidc_scan, lung_mask, nodule_rois]
LIBRARY_ASSETS = [roi_dataset, hash_model, hash_index, retrieval_evaluation]
DIAGNOSIS_ASSETS = [lidc_diagnosis, nodule_diagnosis]
STUDY_ASSETS = [comparison_study]
ALL_ASSETS = [*INGESTION_ASSETS, *LIBRARY_ASSETS, *DIAGNOSIS_ASSETS, *STUDY_ASSETS]
ALL_CHECKS = [
    index_rows_match_database,
    index_uses_current_model,
    index_model_not_trained_on_test_patients,
    evaluation_model_not_trained_on_test_patients,
]
