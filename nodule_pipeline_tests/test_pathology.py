"""The report's ``pathology`` section: how often the readers' label and ours agree with the
confirmed diagnosis, with Wilson intervals, ours out of fold, and a search by our codes against it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.pathology import pathology, wilson
from nodule_pipeline.hashing.training import TrainConfig
from nodule_pipeline.lidc.diagnosis import MATCHING_RULE
from nodule_pipeline_tests.test_diagnosis import _sheet
from nodule_pipeline_tests.test_evaluation import blob_or_ring
from nodule_pipeline_tests.test_hashing_network import SMALL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_wilson_intervals_match_the_textbook() -> None:
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def _table(patients: int = 12, readers: int = 3) -> pd.DataFrame:
    """One nodule a patient, read by ``readers`` readers (a row each); the readers call patient p
    malignant when p is odd: a bright solid blob, else a faint ring."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(1, patients + 1):
        label = p % 2
        for _ in range(readers):
            image = blob_or_ring(label, rng)
            rows.append(
                {
                    "patient_id": f"LIDC-IDRI-{p:04d}",
                    "nodule_id": f"LIDC-IDRI-{p:04d}-N01",
                    "label": np.int8(label),
                    "image": image.reshape(-1),
                }
            )
    return pd.DataFrame(rows)


def test_the_section_scores_the_readers_and_ours_against_the_diagnosis() -> None:
    table = _table()
    # six patients diagnosed at nodule level: the readers' call agrees on four (1, 2, 3, 4), not on 5 and 6
    sheet = _sheet(
        ("LIDC-IDRI-0001", 2, [2]),
        ("LIDC-IDRI-0002", 1, [1]),
        ("LIDC-IDRI-0003", 3, [3]),
        ("LIDC-IDRI-0004", 1, [1]),
        ("LIDC-IDRI-0005", 1, [1]),
        ("LIDC-IDRI-0006", 2, [2]),
        ("LIDC-IDRI-0007", 0, []),  # unknown: not matched
    )
    recipe = TrainConfig(epochs=2, batch_size=8, num_threads=1)
    section = pathology(table, sheet, recipe, NetworkConfig(bits=32, **SMALL), folds=3)
    assert section["rule"] == MATCHING_RULE
    assert (section["matched_patients"], section["matched_nodules"], section["folds"]) == (6, 6, 3)
    assert section["readers"]["n"] == 6 and section["readers"]["agreement"] == pytest.approx(4 / 6)
    assert (section["readers"]["low"], section["readers"]["high"]) == pytest.approx(wilson(4, 6))
    assert section["ours"]["n"] == 6 and 0 <= section["ours"]["agreement"] <= 1
    assert section["retrieval"]["n_queries"] == 6 and 0 <= section["retrieval"]["p_at_10"] <= 1
    markdown = render_markdown_section(section)
    assert "## Against the confirmed diagnosis" in markdown and "ours (out of fold)" in markdown


def test_too_few_matches_are_said_not_scored() -> None:
    section = pathology(_table(4), _sheet(("LIDC-IDRI-0001", 2, [2])), TrainConfig(epochs=1), NetworkConfig())
    assert section["matched_nodules"] == 1 and section["skipped"] == "1 nodule(s) matched: nothing to score"


def render_markdown_section(section: dict) -> str:
    """The report's markdown for a report holding only this section (and what every report has)."""
    from nodule_pipeline.hashing.report import _pathology_section

    return "\n".join(_pathology_section(section))


def test_evaluate_adds_the_section_and_the_report_shows_it() -> None:
    from dataclasses import replace

    from nodule_pipeline.hashing.evaluation import EvaluationConfig, evaluate
    from nodule_pipeline.hashing.report import pathology_summary, render_markdown

    table = _table(patients=16)
    sheet = _sheet(*[(f"LIDC-IDRI-{p:04d}", 1 + p % 2, [1 + p % 2]) for p in range(1, 9)])
    config = replace(
        EvaluationConfig.quick(epochs=1, seeds=1),
        hashing_baselines=(),
        classifier_baselines=(),
        bits_sweep=(),
        variants=(),
        leakage=False,
    )
    recipe = TrainConfig(epochs=1, batch_size=8, num_threads=1)
    report = evaluate(table, config, recipe=recipe, network=NetworkConfig(bits=32, **SMALL), diagnosis=sheet).report
    section = report["pathology"]
    assert section["matched_nodules"] == 8 and section["readers"]["agreement"] == 1.0  # the sheet says what they say
    assert "## Against the confirmed diagnosis" in render_markdown(report)
    assert pathology_summary(section).startswith("against the confirmed diagnosis (8 nodules): readers agree 100.0")


def test_the_evaluation_asset_scores_against_the_sheet_and_runs_without_one(tmp_path) -> None:
    """``retrieval_evaluation`` reads ``lidc_diagnosis`` when it was stored (the sheet at the scan
    root) and adds the section; before any sheet was read it reports as before, without it."""
    import json

    from dagster import DagsterInstance

    from nodule_pipeline.roi_table import write_roi_table
    from nodule_pipeline_tests.test_diagnosis import write_xls
    from nodule_pipeline_tests.test_split_leak import Library

    library = Library(tmp_path, tmp_path / "mine.parquet")
    write_roi_table(_table(patients=20), library.external)
    instance = DagsterInstance.ephemeral()
    built = library.run(instance, "roi_dataset", "hash_model", "hash_index", "retrieval_evaluation")
    assert built.success
    report = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert "pathology" not in report and report["deployed"]["accuracy"] is not None
    (unscored,) = [e for e in built.get_asset_materialization_events() if e.asset_key.path == ["retrieval_evaluation"]]
    metadata = unscored.step_materialization_data.materialization.metadata
    assert metadata["pathology"].value == "no diagnosis sheet"
    # the UI cannot follow the report's relative picture links: its tables come without them
    assert ".png" not in metadata["tables"].value and "data:image/png;base64," in metadata["examples"].value

    # ten patients diagnosed as the readers call them (odd: malignant), one nodule each: all matched
    write_xls(
        tmp_path / "tcia-diagnosis.xls", [[f"LIDC-IDRI-{p:04d}", 1 + p % 2, 1, "", 1 + p % 2, 1] for p in range(1, 11)]
    )
    scored = library.run(instance, "lidc_diagnosis", "retrieval_evaluation")
    assert scored.success
    section = json.loads((tmp_path / "reports" / "evaluation.json").read_text())["pathology"]
    assert (section["matched_patients"], section["matched_nodules"]) == (10, 10)
    readers = section["readers"]
    assert (readers["agreement"], readers["n"]) == (1.0, 10)
    assert (readers["low"], readers["high"]) == pytest.approx(wilson(10, 10))
    assert section["ours"]["n"] == 10 and section["retrieval"]["n_queries"] == 10
    (event,) = [e for e in scored.get_asset_materialization_events() if e.asset_key.path == ["retrieval_evaluation"]]
    line = event.step_materialization_data.materialization.metadata["pathology"].value
    assert line.startswith("against the confirmed diagnosis (10 nodules): readers agree 100.0")
    assert "## Against the confirmed diagnosis" in (tmp_path / "reports" / "evaluation.md").read_text()


def test_the_section_on_the_real_nodules_and_the_real_sheet(real_nodules, diagnosis_sheet) -> None:
    """The dev set against TCIA's sheet: 31 matched nodules, the readers' median agreeing with the
    diagnosis on 16 of them, and ours scored out of fold by a brief small model (the figure the
    default recipe gives, 58%, takes ten minutes; this checks the section, not the model)."""
    from nodule_pipeline.lidc.diagnosis import read_diagnosis_sheet
    from nodule_pipeline.roi_table import read_roi_table

    table = read_roi_table(real_nodules)
    recipe = TrainConfig(epochs=1, batch_size=64, num_threads=1, validation_fraction=0)
    section = pathology(table, read_diagnosis_sheet(diagnosis_sheet), recipe, NetworkConfig(bits=32, **SMALL))
    assert (section["matched_patients"], section["matched_nodules"], section["folds"]) == (31, 31, 5)
    assert section["by_level"] == {"nodule": 20, "patient": 11}
    readers = section["readers"]
    assert (readers["n"], readers["agreement"]) == (31, pytest.approx(16 / 31))
    assert (readers["low"], readers["high"]) == pytest.approx(wilson(16, 31))
    assert (
        section["ours"]["n"] == 31 and section["ours"]["low"] <= section["ours"]["agreement"] <= section["ours"]["high"]
    )
    assert section["retrieval"]["n_queries"] == 31
