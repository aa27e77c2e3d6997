"""The project's one Definitions object loads the way `dagster dev -w workspace.yaml` loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nodule_pipeline.definitions import build_definitions

REPO = Path(__file__).resolve().parents[1]


def test_dagster_validates_the_workspace(tmp_path: Path) -> None:
    env = {**os.environ, "NODULE_PIPELINE_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_graph_holds_the_ingestion_chain(tmp_path: Path) -> None:
    defs = build_definitions(tmp_path, tmp_path / "lidc")
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"lidc_scan", "lung_mask", "nodule_rois", "roi_dataset", "hash_model", "hash_index"} <= keys
    parents = {k.to_user_string() for k in graph.get(defs.resolve_assets_def("nodule_rois").key).parent_keys}
    assert parents == {"lidc_scan", "lung_mask"}
    index_parents = {k.to_user_string() for k in graph.get(defs.resolve_assets_def("hash_index").key).parent_keys}
    assert index_parents == {"hash_model", "roi_dataset"}
    assert defs.resolve_job_def("ingest_patient").partitions_def.name == "patients"
