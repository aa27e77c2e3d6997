"""New scans arriving: the completeness rule, the new-scan sensor and the library refresh.

The end-to-end test drives the real sensor and the real automation conditions against a
persistent Dagster instance, executing what they request as the daemon would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, build_sensor_context, evaluate_automation_conditions

from nodule_pipeline.arrivals import COMPLETE_MARKER, ArrivalState, content_fingerprint, find_arrivals, watch_folder
from nodule_pipeline.automation import SETTLE_SECONDS_ENV
from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.roi_table import roi_images, split_patients
from nodule_pipeline.runner import open_instance, run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import QUICK_TRAINING

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST = ("LIDC-IDRI-0957", "LIDC-IDRI-0078", "LIDC-IDRI-0312")  # three: the split has a test side
ARRIVING = "LIDC-IDRI-0171"  # 95 slices, 13 ROIs


def _folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / name


def _look(root: Path, state: ArrivalState, now: float, known: dict[str, str] | None = None) -> list[str]:
    watched = {p.name: watch_folder(p) for p in root.iterdir()}
    arrivals = find_arrivals(watched, state, settle_seconds=60, known_fingerprint=(known or {}).get, now=now)
    return [a.patient_id for a in arrivals]


def test_a_folder_counts_only_once_it_stopped_changing(tmp_path: Path) -> None:
    state = ArrivalState()
    folder = _folder(tmp_path, "P1", {"s/1.dcm": b"a"})
    assert _look(tmp_path, state, now=0) == []  # just appeared
    _folder(tmp_path, "P1", {"s/2.dcm": b"b"})  # still being copied
    assert _look(tmp_path, state, now=50) == []
    assert _look(tmp_path, state, now=100) == []  # unchanged for 50 s only
    assert _look(tmp_path, state, now=111) == ["P1"]  # unchanged for 61 s
    assert _look(tmp_path, state, now=500) == []  # nothing new since
    (folder / "s" / "2.dcm").write_bytes(b"changed")
    assert _look(tmp_path, state, now=600) == []
    assert _look(tmp_path, state, now=700) == ["P1"]  # changed content is ingested again


def test_a_completion_marker_counts_at_once_and_redelivery_is_recognised(tmp_path: Path) -> None:
    state = ArrivalState()
    files = {"s/1.dcm": b"a", "s/2.dcm": b"b", COMPLETE_MARKER: b""}
    folder = _folder(tmp_path, "P1", files)
    assert _look(tmp_path, state, now=0) == ["P1"]
    shutil.rmtree(folder)
    os.utime(_folder(tmp_path, "P1", files), (1, 1))  # the same files again, other timestamps
    assert _look(tmp_path, state, now=10) == []


def test_a_folder_ingested_before_the_sensor_ran_is_not_ingested_again(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "P1", {"s/1.dcm": b"a", COMPLETE_MARKER: b""})
    assert _look(tmp_path, ArrivalState(), now=0, known={"P1": content_fingerprint(folder)}) == []
    assert _look(tmp_path, ArrivalState(), now=0, known={"P1": "an older delivery"}) == ["P1"]


class Library:
    """A data dir built from FIRST, a scan root, and the sensor's cursor between ticks."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self.defs = build_definitions(data_dir, root)
        self.instance = open_instance(data_dir)
        self.cursor: str | None = None
        self.automation_cursor = None

    def sensor_tick(self):
        sensor = self.defs.resolve_sensor_def("new_scans")
        context = build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"scan_source": self.defs.resources["scan_source"]}
        )
        result = sensor(context)
        self.cursor = result.cursor
        for request in result.dynamic_partitions_requests or []:  # what the daemon does with them
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result

    def run_ingestion(self, request) -> None:
        result = self.defs.resolve_job_def("ingest_patient").execute_in_process(
            instance=self.instance, partition_key=request.partition_key, tags=request.tags
        )
        assert result.success

    def automation_tick(self) -> set[str]:
        result = evaluate_automation_conditions(self.defs, self.instance, cursor=self.automation_cursor)
        self.automation_cursor = result.cursor
        keys = [AssetKey(name) for name in ("roi_dataset", "hash_model", "hash_index", "retrieval_evaluation")]
        return {key.to_user_string() for key in keys if result.get_num_requested(key)}

    def materialization_count(self, name: str) -> int:
        return len(self.instance.fetch_materializations(AssetKey(name), limit=100).records)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in FIRST:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    summary = run_pipeline(root, data_dir, progress=lambda _: None, training=QUICK_TRAINING, report="none")
    assert not summary.failed and summary.library_ok
    return Library(root, data_dir)


def test_a_new_patient_arrives_is_ingested_indexed_and_found(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SETTLE_SECONDS_ENV, "0")
    assert library.automation_tick() == set()  # the library is up to date
    split_before = split_patients(load_artefact(artefact_folder(artefacts_dir(library.data_dir), ["roi_dataset"])))

    staging = tmp_path / "staging"
    generate_patient(ARRIVING, staging, seed=0)
    shutil.copytree(staging / ARRIVING, library.root / ARRIVING)
    first = library.sensor_tick()  # every folder is new to the sensor: each must settle first
    assert not first.run_requests
    second = library.sensor_tick()  # the CLI already ingested FIRST with this content
    assert [r.partition_key for r in second.run_requests] == [ARRIVING]
    assert ARRIVING in library.instance.get_dynamic_partitions(patients_partitions.name)
    library.run_ingestion(second.run_requests[0])

    assert library.automation_tick() == {"roi_dataset", "hash_index"}  # no retraining, no evaluation
    result = library.defs.resolve_job_def("reindex").execute_in_process(instance=library.instance)
    assert result.success
    assert library.automation_tick() == set()
    assert library.materialization_count("hash_model") == 1

    base = artefacts_dir(library.data_dir)
    split_after = split_patients(load_artefact(artefact_folder(base, ["roi_dataset"])))
    assert split_after["test"] == split_before["test"]  # the new patient joined the database side
    assert split_after["train"] == sorted([*split_before["train"], ARRIVING])
    arrived = load_artefact(artefact_folder(base, ["nodule_rois"], ARRIVING))
    searcher = NoduleSearcher.from_data_dir(library.data_dir)
    held = searcher.index.items
    assert set(held.loc[held["patient_id"] == ARRIVING, "annotation_id"]) == set(arrived["annotation_id"])
    assert searcher.index.lineage["patients"] == split_after["train"]
    query = arrived.iloc[0]
    response = searcher.search_roi(roi_images(arrived)[0], k=len(searcher.index), mode="rerank")
    best = response.hits[0]
    assert (best.patient_id, best.nodule_id, best.hamming) == (ARRIVING, query["nodule_id"], 0)
    assert best.euclidean == pytest.approx(0, abs=1e-2) and best.index_version == searcher.index.index_version

    # the same folder delivered again: new timestamps, same files
    shutil.rmtree(library.root / ARRIVING)
    shutil.copytree(staging / ARRIVING, library.root / ARRIVING, copy_function=shutil.copyfile)
    assert not library.sensor_tick().run_requests
    assert not library.sensor_tick().run_requests
    assert library.materialization_count("nodule_rois") == len(FIRST) + 1
    assert library.automation_tick() == set()


def test_changed_content_of_a_known_patient_is_ingested_again(library: Library, monkeypatch) -> None:
    monkeypatch.setenv(SETTLE_SECONDS_ENV, "0")
    library.sensor_tick()
    xml = next((library.root / FIRST[0]).rglob("*.xml"))
    xml.write_text(xml.read_text() + "\n")  # a corrected annotation file
    library.sensor_tick()
    requests = library.sensor_tick().run_requests
    assert [r.partition_key for r in requests] == [FIRST[0]]
    assert requests[0].run_key.startswith(f"{FIRST[0]}:") and requests[0].tags["nodule_pipeline/stage"] == "ingest"
    library.run_ingestion(requests[0])
    assert library.automation_tick() == {"roi_dataset", "hash_index"}
    assert library.materialization_count("lidc_scan") == len(FIRST) + 2


def test_a_model_below_the_accuracy_floor_never_reaches_the_index(library: Library) -> None:
    index_before = NoduleSearcher.from_data_dir(library.data_dir).index.index_version
    result = library.defs.resolve_job_def("retrain").execute_in_process(
        instance=library.instance,
        run_config={"ops": {"hash_model": {"config": {"epochs": 1, "accuracy_floor": 1.01}}}},
        raise_on_error=False,
    )
    assert not result.success
    (floor,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "test_accuracy_floor"]
    assert not floor.passed and floor.metadata["floor"].value == 1.01 and floor.metadata["measured"].value
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"hash_model"}  # stored and on record, but blocked from going further
    assert library.automation_tick() == set()  # the refresh does not pick the failed model up either
    searcher = NoduleSearcher.from_data_dir(library.data_dir)  # the index's own model, kept by version
    assert searcher.index.index_version == index_before
    assert searcher.model_version == searcher.index.model_version
    current = load_artefact(artefact_folder(artefacts_dir(library.data_dir), ["hash_model"]))
    assert current.card["model_version"] != searcher.model_version


def test_a_retrain_by_hand_is_followed_by_the_index_and_the_evaluation(library: Library) -> None:
    library.automation_tick()
    result = library.defs.resolve_job_def("retrain").execute_in_process(
        instance=library.instance,
        run_config={"ops": {"hash_model": {"config": {"epochs": 1, "accuracy_floor": 0.0}}}},
        asset_selection=[AssetKey("hash_model")],
    )
    assert result.success
    assert library.automation_tick() == {"hash_index"}  # the evaluation waits for the model's index
    result = library.defs.resolve_job_def("reindex").execute_in_process(
        instance=library.instance, asset_selection=[AssetKey("hash_index")]
    )
    assert result.success
    assert library.automation_tick() == {"retrieval_evaluation"}
    assert library.automation_tick() == set()
