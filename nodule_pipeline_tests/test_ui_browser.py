"""The Dagster UI that ``nodule-pipeline ui`` serves, driven by a real browser with real clicks.

Two generated patients are materialized with ``run_pipeline``; the UI is then served on that data
dir and Chromium checks the asset graph, the patient partitions, the runner's runs on their jobs'
pages and the Overview timeline, a materialization launched from the UI, and a lineage view. A
screenshot of each step goes to ``test-artifacts/ui/``.
"""

from __future__ import annotations

import re
import shutil
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from playwright import sync_api

from nodule_pipeline.cli import installed_workspace
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.runner import CODE_LOCATION, RUNNER_TAG, RunSummary, run_pipeline
from nodule_pipeline_tests.browser import UI_TIMEOUT_MS
from nodule_pipeline_tests.conftest import QUICK_TRAINING
from nodule_pipeline_tests.dagster_ui import REPO, DagsterUI, dagster_ui, processes_of

expect = sync_api.expect

PATIENTS = ("LIDC-IDRI-0957", "LIDC-IDRI-0078")  # 65 and 87 slices: small and quick
ASSETS = (
    "lidc_scan",
    "lung_mask",
    "nodule_rois",
    "roi_dataset",
    "hash_model",
    "hash_index",
    "retrieval_evaluation",
    "comparison_study",
)
SCREENSHOTS = REPO / "test-artifacts" / "ui"
RUN_TIMEOUT_MS = 300_000  # a run launched from the UI: a fresh process that imports torch and dagster


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RunSummary]:
    """Two generated patients run through the pipeline: scan root, data dir and run summary."""
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    summary = run_pipeline(root, data_dir, progress=lambda _: None, training=QUICK_TRAINING, report="none")
    assert not summary.failed, [o.error for o in summary.failed]
    assert summary.library_metadata["roi_dataset"], "roi_dataset was not materialized"
    return root, data_dir, summary


@pytest.fixture(scope="module")
def ui(pipeline: tuple[Path, Path, RunSummary]) -> Iterator[DagsterUI]:
    """``nodule-pipeline ui`` on the pipeline's data dir, stopped with everything it started."""
    root, data_dir, _ = pipeline
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for stale in SCREENSHOTS.glob("FAILED-*.png"):
        stale.unlink()
    log = data_dir / "dagster-dev.log"
    try:
        with dagster_ui(data_dir, root, log) as server:
            yield server
    finally:
        if log.exists():
            shutil.copyfile(log, SCREENSHOTS / "dagster-dev.log")
    assert not processes_of(data_dir / "dagster"), "a process of the Dagster UI outlived it"


@pytest.fixture
def page(ui: DagsterUI, browser, request: pytest.FixtureRequest):
    """A fresh context per test, past the UI's welcome modal; a screenshot if the test fails."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    context.set_default_timeout(UI_TIMEOUT_MS)
    failed_before = request.session.testsfailed
    page = context.new_page()
    page.goto(ui.url + "/")
    expect(nav_link(page, "Runs")).to_be_visible()
    # the instance's first visitor gets a "join the community" modal, a second after the page shows
    skip = page.get_by_role("button", name="Skip", exact=True)
    if ui.graphql("{ shouldShowNux }")["shouldShowNux"]:
        skip.click()
        expect(skip).to_be_hidden()
    page.add_locator_handler(skip, lambda button: button.click())  # should it ever show again
    yield page
    if request.session.testsfailed > failed_before:
        page.screenshot(path=SCREENSHOTS / f"FAILED-{request.node.name}.png")
    context.close()


def nav_link(page, name: str):
    """A link of the left navigation (its accessible name starts with its icon's name)."""
    return page.get_by_role("link", name=re.compile(rf"(^|\s){name}$"))


def screenshot(page, name: str) -> None:
    page.screenshot(path=SCREENSHOTS / f"{name}.png", animations="disabled")  # toasts fully faded in


def graph_node(page, name: str):
    """An asset node of a graph (the graph draws nodes as HTML inside SVG foreignObjects). A
    zoomed-out graph middle-truncates long names ("retrie…_evaluation"): that form counts too."""
    start, end = re.escape(name[:3]), re.escape(name[-3:])
    label = re.compile(rf"^({re.escape(name)}|{start}\w*…\w*{end})$")
    return page.locator("svg foreignObject").get_by_text(label)


def test_the_ui_starts_as_dg_dev_without_a_supersession_warning(ui: DagsterUI) -> None:
    """``nodule-pipeline ui`` runs ``dg dev``; ``dagster dev`` is superseded in 1.13 and says so."""
    started = ui.log.read_text()
    assert "All component YAML validated successfully" in started  # dg's own check before it starts
    assert "SupersessionWarning" not in started and "superseded" not in started


def test_asset_graph_shows_every_asset(page, ui: DagsterUI) -> None:
    nav_link(page, "Lineage").click()
    expect(page.get_by_text("Global asset lineage", exact=True)).to_be_visible()
    expect(page.locator("svg foreignObject").first).to_be_visible()
    # more room for the graph: fold the group explorer, then expand every group to its assets
    page.locator("button").filter(has=page.get_by_role("img", name="panel_show_right", exact=True)).last.click()
    page.locator("button").filter(has=page.get_by_role("img", name="settings", exact=True)).last.click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    expect(page.get_by_role("menuitem")).to_have_count(0)
    for name in ASSETS:
        expect(graph_node(page, name)).to_be_visible()
    screenshot(page, "01-asset-graph")


def test_partitions_view_lists_the_patients(page, ui: DagsterUI, pipeline) -> None:
    page.goto(ui.url + "/assets/nodule_rois")
    page.get_by_role("tab", name="Partitions", exact=True).click()
    expect(page).to_have_url(re.compile(r"view=partitions"))
    expect(page.get_by_text(f"Materialized ({len(PATIENTS)})", exact=True)).to_be_visible()
    for patient_id in PATIENTS:
        expect(page.get_by_text(patient_id, exact=True).first).to_be_visible()
    page.get_by_text(PATIENTS[1], exact=True).first.click()  # one patient's materialization and metadata
    expect(page).to_have_url(re.compile(rf"partition={PATIENTS[1]}"))
    (outcome,) = [o for o in pipeline[2].outcomes if o.patient_id == PATIENTS[1]]
    expect(page.get_by_role("row", name=f"kept {outcome.metadata['kept']}", exact=True)).to_be_visible()
    screenshot(page, "02-nodule-rois-partitions")


JOB_RUNS = """
query($selector: PipelineSelector!) { pipelineOrError(params: $selector) { __typename ... on Pipeline {
  pipelineSnapshotId runs { runId pipelineSnapshotId repositoryOrigin { repositoryLocationName repositoryName } } } } }
"""


def test_the_runner_names_the_code_location_that_the_ui_serves() -> None:
    """The location the runner's runs name is the one workspace.yaml and pyproject.toml define."""
    (entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    names = {entry["python_module"]["location_name"], project["dagster"]["code_location_name"]}
    assert names | {project["dg"]["project"]["code_location_name"]} == {CODE_LOCATION}
    # `nodule-pipeline ui` without a checkout serves the same workspace
    assert yaml.safe_load(installed_workspace()) == yaml.safe_load((REPO / "workspace.yaml").read_text())


def test_runs_of_the_runner_are_listed_under_their_jobs(page, ui: DagsterUI, pipeline) -> None:
    """The runs that ``run_pipeline`` (``nodule-pipeline run``, ``make demo``) executed belong to
    their jobs in the code location, as runs launched from the UI do: each job lists them, of the
    job's own snapshot, and the Overview timeline shows them in the job's row (issue 21: the job
    pages and the timeline showed none of them)."""
    runner_runs: dict[str, set[str]] = {}
    for run in DagsterInstance.from_config(str(pipeline[1] / "dagster")).get_runs():
        if RUNNER_TAG in run.tags:
            runner_runs.setdefault(run.job_name, set()).add(run.run_id)
    assert runner_runs.keys() == {"ingest_patient", "build_library", "attach_diagnosis"}
    assert len(runner_runs["ingest_patient"]) == len(PATIENTS)
    for job, run_ids in runner_runs.items():
        selector = {
            "repositoryLocationName": "nodule_pipeline",
            "repositoryName": "__repository__",
            "pipelineName": job,
        }
        found = ui.graphql(JOB_RUNS, {"selector": selector})["pipelineOrError"]
        assert found["__typename"] == "Pipeline", found
        listed = {run["runId"]: run for run in found["runs"]}
        assert run_ids <= listed.keys(), f"{job}: the job lists {sorted(listed)}, not all of {sorted(run_ids)}"
        for run_id in run_ids:
            origin = listed[run_id]["repositoryOrigin"]
            assert origin == {"repositoryLocationName": "nodule_pipeline", "repositoryName": "__repository__"}
        if job == "ingest_patient":  # the whole job, no asset subset: the snapshot the location has
            assert {listed[run_id]["pipelineSnapshotId"] for run_id in run_ids} == {found["pipelineSnapshotId"]}

    page.goto(ui.url + "/locations/nodule_pipeline/jobs/ingest_patient/runs")
    for run_id in runner_runs["ingest_patient"]:
        expect(page.locator(f"a[href='/runs/{run_id}']").first).to_be_visible()
    screenshot(page, "02b-runner-runs-on-the-job-page")
    page.goto(ui.url + "/overview/activity/timeline")
    for job in runner_runs:
        expect(page.locator(f"a[href='/locations/nodule_pipeline/jobs/{job}']")).to_be_visible()
    screenshot(page, "02c-runner-runs-on-the-timeline")


def test_materialize_roi_dataset_from_the_ui(page, ui: DagsterUI) -> None:
    page.goto(ui.url + "/assets/roi_dataset")
    page.get_by_role("button", name=re.compile(r"\bMaterialize$")).click()
    expect(page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))).to_be_visible()
    view = page.locator("a[href^='/runs/']").filter(has_text=re.compile(r"^View$")).first  # the toast's link
    expect(view).to_be_visible()
    screenshot(page, "03-materialize-launched")
    run_id = view.get_attribute("href").removeprefix("/runs/").split("?")[0]

    view.click()  # the run's page follows the run live
    expect(page).to_have_url(re.compile(re.escape(run_id)))
    outcome = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(outcome).to_be_visible(timeout=RUN_TIMEOUT_MS)
    screenshot(page, "04-run-finished")
    expect(outcome).to_have_text("Success")

    page.goto(ui.url + "/runs?" + urllib.parse.urlencode({"q[]": f"id:{run_id}"}))
    row = page.locator("div").filter(has=page.locator(f"a[href='/runs/{run_id}']")).filter(has_text="Success").last
    expect(row).to_be_visible()
    expect(row.get_by_text("roi_dataset", exact=True).first).to_be_visible()
    screenshot(page, "05-runs-success")

    run = ui.graphql(
        "query($id: ID!) { runOrError(runId: $id) { ... on Run { status assetMaterializations "
        "{ assetKey { path } } } } }",
        {"id": run_id},
    )["runOrError"]
    assert run["status"] == "SUCCESS"
    assert {"path": ["roi_dataset"]} in [event["assetKey"] for event in run["assetMaterializations"]]


def test_lineage_of_the_evaluation_shows_its_upstream(page, ui: DagsterUI) -> None:
    page.goto(ui.url + "/assets/retrieval_evaluation")
    page.get_by_role("tab", name="Lineage", exact=True).click()
    expect(page).to_have_url(re.compile(r"view=lineage"))
    page.get_by_role("button", name=re.compile(r"Upstream$")).click()
    for name in ("retrieval_evaluation", "roi_dataset", "hash_model"):
        expect(graph_node(page, name)).to_be_visible()
    screenshot(page, "06-evaluation-lineage")


LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def test_two_hash_model_runs_never_train_at_once(ui: DagsterUI, pipeline) -> None:
    """Two runs of hash_model submitted together, as the UI, a backfill or a sensor submits them:
    the queue, the daemon and the run launcher of ``nodule-pipeline ui`` start them, and the
    ``gpu`` pool (limit 1, the data dir's instance config) lets one train at a time."""
    assert ui.graphql("{ instance { poolConfig { defaultPoolLimit } } }")["instance"]["poolConfig"] == {
        "defaultPoolLimit": 1
    }
    params = {
        "selector": {
            "repositoryLocationName": "nodule_pipeline",
            "repositoryName": "__repository__",
            "jobName": "retrain",
            "assetSelection": [{"path": ["hash_model"]}],
        },
        "runConfigData": {"ops": {"hash_model": {"config": QUICK_TRAINING}}},
    }
    run_ids = []
    for _ in range(2):
        launched = ui.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_ids.append(launched["run"]["runId"])

    instance = DagsterInstance.from_config(str(pipeline[1] / "dagster"))
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000 * 2
    while time.monotonic() < deadline:
        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        if all(run.is_finished for run in runs):
            break
        time.sleep(2)
    assert [run.status for run in runs] == [DagsterRunStatus.SUCCESS] * 2, [run.status for run in runs]

    def training(run_id: str) -> tuple[float, float]:
        """When the run's hash_model step started and succeeded (event log timestamps)."""
        started, succeeded = (
            [e.timestamp for e in instance.all_logs(run_id, of_type=kind) if e.step_key == "hash_model"]
            for kind in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS)
        )
        assert len(started) == len(succeeded) == 1
        return started[0], succeeded[0]

    first, second = sorted(training(run_id) for run_id in run_ids)
    # The later run waited for the pool: held in the queue by the daemon, or at its step.
    waited_in_queue = [r for r in run_ids if f"Run {r} is blocked by global concurrency limits" in ui.log.read_text()]
    waited_at_step = [
        r
        for r in run_ids
        for e in instance.all_logs(r, of_type=DagsterEventType.ENGINE_EVENT)
        if e.message.startswith("Step blocked by limit for pool gpu")
    ]
    assert waited_in_queue or waited_at_step
    queued = [instance.get_run_record_by_id(run_id).create_timestamp.timestamp() for run_id in run_ids]
    assert max(queued) < first[1]  # both runs were in the instance while the first one trained
    assert second[0] >= first[1], f"hash_model trained in two runs at once: {first} and {second}"


PATIENT_CHECKS = {
    "lidc_scan": ["hu_range_plausible"],
    "lung_mask": ["lung_volume_plausible"],
    "nodule_rois": ["roi_centres_in_lung_or_outline", "rois_account_for_rated_annotations"],
}
CHECK_STATUSES = """
query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode { assetChecksOrError {
  ... on AssetChecks { checks { name partitionStatuses {
    ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions } } } } } } } }
"""


@pytest.mark.parametrize("asset", PATIENT_CHECKS)
def test_ingestion_checks_pass_per_patient_in_the_ui(page, ui: DagsterUI, asset: str) -> None:
    """Each per-patient check has a result per partition: the check's Partitions tab lists both
    patients as passed."""
    node = ui.graphql(CHECK_STATUSES, {"key": {"path": [asset]}})["assetNodeOrError"]
    statuses = {c["name"]: c["partitionStatuses"] for c in node["assetChecksOrError"]["checks"]}
    assert sorted(statuses) == PATIENT_CHECKS[asset]
    for check in PATIENT_CHECKS[asset]:
        assert statuses[check] == {"succeededPartitions": sorted(PATIENTS), "failedPartitions": []}
        page.goto(ui.url + f"/assets/{asset}?" + urllib.parse.urlencode({"view": "checks", "checkDetail": check}))
        expect(page.get_by_text(check, exact=True).filter(visible=True).first).to_be_visible()  # its detail
        page.get_by_role("tab", name="Partitions", exact=True).last.click()
        expect(page.get_by_text(f"Passed ({len(PATIENTS)})", exact=True)).to_be_visible()
        for patient_id in PATIENTS:
            expect(page.get_by_text(patient_id, exact=True).filter(visible=True).last).to_be_visible()
        screenshot(page, f"07-checks-{asset}-{check}")
