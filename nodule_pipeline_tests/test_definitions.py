"""The project's one Definitions object: it loads the way `dagster dev -w workspace.yaml` and the dg
project (`dg check defs`, `dg list defs`) load it, and it is what the committed snapshot says."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline_tests.graph_snapshot import SNAPSHOT, UPDATE_ENV, definitions_snapshot, render

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


def test_the_comparison_study_is_its_own_job_off_the_production_path(tmp_path: Path) -> None:
    """The study never runs as part of a build or a retrain, and holds neither their pool nor
    their run stage; it runs on demand, or on a schedule a user starts."""
    defs = build_definitions(tmp_path, tmp_path / "lidc")
    graph = defs.resolve_asset_graph()

    def selected(job: str) -> set[str]:
        return {key.to_user_string() for key in defs.resolve_job_def(job).asset_layer.selected_asset_keys}

    for job in ("build_library", "retrain", "reindex", "ingest_patient"):
        assert "comparison_study" not in selected(job), job
    assert selected("study") == {"comparison_study"}
    study, model = (graph.get(defs.resolve_assets_def(name).key) for name in ("comparison_study", "hash_model"))
    assert study.pools == {"study"} and model.pools == {"gpu"} and not study.child_keys
    assert study.automation_condition is None  # a retrain does not start it
    assert (
        defs.resolve_job_def("study").tags["nodule_pipeline/stage"]
        != defs.resolve_job_def("retrain").tags["nodule_pipeline/stage"]
    )
    schedule = defs.resolve_schedule_def("monthly_study")
    assert schedule.job_name == "study" and schedule.default_status.value == "STOPPED"


def test_definitions_match_the_snapshot(tmp_path: Path) -> None:
    """Asset keys, deps, partitions, checks, automation conditions, pools, jobs, schedules and
    sensors as committed in snapshots/definitions.json (taken with no NODULE_PIPELINE_* overrides
    in the environment). A deliberate change: ``make snapshot``, then review the diff."""
    current = render(definitions_snapshot(build_definitions(tmp_path, tmp_path / "lidc")))
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(current)
    committed = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if current != committed:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), current.splitlines(True), "committed", "now"))
        pytest.fail(
            f"the definitions changed from {SNAPSHOT.relative_to(REPO)}:\n{diff[-6000:]}\n"
            "If the change is meant, update the snapshot with `make snapshot` and commit it with the change."
        )


def test_dg_checks_and_lists_the_same_definitions(tmp_path: Path) -> None:
    """The dg project of pyproject.toml: `dg check defs` passes and `dg list defs` shows the
    snapshot's assets, checks, jobs, schedules and sensors."""
    env = {**os.environ, "NODULE_PIPELINE_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    env["VIRTUAL_ENV"] = sys.prefix  # dg compares the active environment with the project's .venv
    dg = [sys.executable, "-m", "dagster_dg_cli.cli"]
    check = subprocess.run([*dg, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = subprocess.run(
        [*dg, "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    shown = json.loads(listed.stdout)
    snapshot = json.loads(SNAPSHOT.read_text())
    assert sorted(a["asset_key"] for a in shown["assets"]) == sorted(snapshot["assets"])
    checks = {f"{name}:{check}" for name, asset in snapshot["assets"].items() for check in asset["checks"]}
    assert {c["key"] for c in shown["asset_checks"]} == checks
    assert sorted(j["name"] for j in shown["jobs"]) == sorted(snapshot["jobs"])
    assert sorted(s["name"] for s in shown["schedules"]) == sorted(snapshot["schedules"])
    assert sorted(s["name"] for s in shown["sensors"]) == sorted(snapshot["sensors"])
