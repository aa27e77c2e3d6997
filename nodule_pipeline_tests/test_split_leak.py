"""The split cannot leak: the kept split is read from the stored ``roi_dataset`` table, so a new
instance keeps it, and a split redrawn under a stored model (``resplit``, another seed) fails the
blocking ``model_not_trained_on_test_patients`` check on ``hash_index`` and
``retrieval_evaluation`` until ``hash_model`` is retrained.

One small library (an external table of 20 patients, a 2-epoch model) is built once; each test
works on a hard-linked copy of its data dir (the stores replace files and folders, never write
into them) with a fresh instance of its own: the old model artefacts on a new event log, as after
the README's move from SQLite to PostgreSQL."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    ExecuteInProcessResult,
    materialize,
)

from nodule_pipeline.assets import ALL_ASSETS, ALL_CHECKS
from nodule_pipeline.assets.split_leak import MODEL_NOT_TRAINED_ON_TEST_PATIENTS
from nodule_pipeline.resources import ArtefactIOManager, ReportStore, ScanSource
from nodule_pipeline.roi_table import (
    TEST,
    read_roi_table,
    split_patients,
    split_settings,
    write_roi_table,
)
from nodule_pipeline_tests.conftest import QUICK_TRAINING
from nodule_pipeline_tests.test_roi_dataset import _table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INDEX_CHECK = AssetCheckKey(AssetKey("hash_index"), MODEL_NOT_TRAINED_ON_TEST_PATIENTS)
EVALUATION_CHECK = AssetCheckKey(AssetKey("retrieval_evaluation"), MODEL_NOT_TRAINED_ON_TEST_PATIENTS)


@dataclass
class Library:
    data_dir: Path
    external: Path

    def run(self, instance: DagsterInstance, *assets: str, split: dict | None = None) -> ExecuteInProcessResult:
        """Materialize ``assets`` with their checks on this data dir (``roi_dataset`` split as
        ``split`` says, ``hash_model`` trained briefly, the study at its smallest)."""
        configs = {
            "roi_dataset": {"external_roi_table": str(self.external), **(split or {})},
            "hash_model": QUICK_TRAINING,
        }
        return self._execute(
            instance,
            AssetSelection.assets(*assets),
            {name: {"config": configs[name]} for name in assets if name in configs},
        )

    def check(self, instance: DagsterInstance, key: AssetCheckKey) -> AssetCheckEvaluation:
        """Run one check alone, on what is stored now."""
        return _check(self._execute(instance, AssetSelection.checks(key), {}), key)

    def _execute(self, instance: DagsterInstance, selection: AssetSelection, ops: dict) -> ExecuteInProcessResult:
        return materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=selection,
            resources={
                "io_manager": ArtefactIOManager(base_dir=str(self.data_dir / "artefacts")),
                "scan_source": ScanSource(root=str(self.data_dir)),
                "reports": ReportStore(folder=str(self.data_dir / "reports")),
            },
            run_config={"ops": ops},
            instance=instance,
            raise_on_error=False,
        )

    def reindex(self, instance: DagsterInstance, split: dict | None = None) -> ExecuteInProcessResult:
        """``roi_dataset`` and ``hash_index`` (the reindex job), the stored model kept."""
        return self.run(instance, "roi_dataset", "hash_index", split=split)

    def stored_table(self) -> pd.DataFrame:
        return read_roi_table(self.data_dir / "artefacts" / "roi_dataset" / "rois.parquet")

    def train_patients(self) -> list[str]:
        return (
            ArtefactIOManager(base_dir=str(self.data_dir / "artefacts"))
            .stored(["hash_model"])
            .card["split"]["train_patients"]
        )


def _check(result: ExecuteInProcessResult, key: AssetCheckKey) -> AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.asset_check_key == key]
    return evaluation


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Library:
    data_dir = tmp_path_factory.mktemp("library")
    library = Library(data_dir, data_dir / "mine.parquet")
    write_roi_table(_table(patients=20), library.external)
    result = library.run(DagsterInstance.ephemeral(), "roi_dataset", "hash_model", "hash_index")
    assert result.success
    assert _check(result, INDEX_CHECK).passed
    return library


@pytest.fixture
def library(built: Library, tmp_path: Path) -> Library:
    copy = tmp_path / "data"
    shutil.copytree(built.data_dir, copy, copy_function=os.link)
    return Library(copy, copy / "mine.parquet")


def test_the_stored_table_records_its_split_settings(library: Library) -> None:
    assert split_settings(library.stored_table()) == {"mode": "patient", "test_fraction": 0.3, "seed": 0}


def test_a_new_instance_keeps_the_stored_split_and_the_old_model_holds(library: Library) -> None:
    before = split_patients(library.stored_table())
    write_roi_table(_table(patients=30), library.external)  # ten patients arrive after the move
    result = library.reindex(DagsterInstance.ephemeral())  # a fresh event log: SQLite to PostgreSQL
    assert result.success
    after = split_patients(library.stored_table())
    assert after["test"] == before["test"]
    assert set(after["train"]) == set(before["train"]) | {f"P{p:03d}" for p in range(20, 30)}
    assert _check(result, INDEX_CHECK).passed


def test_a_resplit_fails_the_leak_check_until_hash_model_is_retrained(library: Library) -> None:
    instance = DagsterInstance.ephemeral()
    write_roi_table(_table(patients=30), library.external)
    result = library.run(instance, "roi_dataset", "hash_index", "retrieval_evaluation", split={"resplit": True})
    leaked = sorted(set(split_patients(library.stored_table())["test"]) & set(library.train_patients()))
    assert leaked  # a fresh 30% of 30 patients draws some the model was trained on
    check = _check(result, INDEX_CHECK)
    assert not check.passed and check.severity.value == "ERROR"
    assert check.metadata["patients"].value == leaked
    assert all(patient in check.description for patient in leaked[:10])
    assert "retrain hash_model" in check.description
    assert not result.success  # blocking: the evaluation never reports on them
    assert [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()] == [
        "roi_dataset",
        "hash_index",
    ]
    assert not library.check(instance, EVALUATION_CHECK).passed

    retrained = library.run(instance, "hash_model", "hash_index")
    assert retrained.success and _check(retrained, INDEX_CHECK).passed
    assert library.check(instance, EVALUATION_CHECK).passed
    table = library.stored_table()
    assert set(library.train_patients()).isdisjoint(table.loc[table["split"] == TEST, "patient_id"])


def test_a_seed_change_draws_a_fresh_split_that_fails_the_leak_check(library: Library) -> None:
    before = split_patients(library.stored_table())
    result = library.reindex(DagsterInstance.ephemeral(), {"seed": 1})
    after = split_patients(library.stored_table())
    assert after["test"] != before["test"]
    check = _check(result, INDEX_CHECK)
    assert not check.passed
    assert check.metadata["patients"].value == sorted(set(after["test"]) & set(before["train"]))


def test_a_roi_split_fails_the_leak_check_as_a_warning(library: Library) -> None:
    result = library.reindex(DagsterInstance.ephemeral(), {"mode": "roi"})
    check = _check(result, INDEX_CHECK)
    assert not check.passed and check.severity.value == "WARN"  # the leak this split exists to measure
    assert result.success
