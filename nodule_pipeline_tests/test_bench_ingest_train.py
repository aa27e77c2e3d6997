"""The ingestion and training benchmarks (shape and sanity of their figures, never timing
thresholds) and the speed work they measure: framed scan storage with lazy reads, shifted-array
morphology, slice-ordered labelling."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zstandard
from scipy import ndimage as ndi

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc import lung_mask as lm
from nodule_pipeline.lidc.lung_mask import segment_lungs
from nodule_pipeline.lidc.rois import extract_rois
from nodule_pipeline.lidc.series import LazyVolume, find_series_folders, load_series, open_scan, save_scan
from nodule_pipeline.resources import load_artefact
from nodule_pipeline_tests.conftest import SAMPLE_PATIENTS


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------------------------
# Benchmarks


def test_ingest_benchmark_reports_every_figure(lidc_sample: Path) -> None:
    from nodule_pipeline.benchmarks.ingest import STAGES, format_ingest_table, run_ingest_benchmark

    lines: list[str] = []
    patient = SAMPLE_PATIENTS[0]
    result = run_ingest_benchmark(lidc_sample, repeat=1, progress=lines.append, patients=[patient])
    json.dumps(result)  # JSON-ready
    assert lines
    assert result["patients"] == [patient]
    for key in (
        "seconds_per_patient",
        "pylidc_to_volume_seconds",
        "peak_rss_mb",
        "volume_mb",
        "time_ratio",
        "memory_ratio",
    ):
        assert set(result[key]) == {patient}, key
        assert _positive(result[key][patient]), (key, result[key])
    # 512 x 512 x 133 int16
    assert result["volume_mb"][patient] == pytest.approx(512 * 512 * 133 * 2 / 2**20, abs=0.1)
    assert result["time_ratio"][patient] == pytest.approx(
        result["seconds_per_patient"][patient] / result["pylidc_to_volume_seconds"][patient], rel=1e-2
    )
    assert result["memory_ratio"][patient] == pytest.approx(
        result["peak_rss_mb"][patient] / result["volume_mb"][patient], rel=1e-2
    )
    stages = result["stages"][patient]
    for stage in STAGES:
        assert _positive(stages[stage]["seconds"]) and _positive(stages[stage]["compute_s"])
        cold = stages[stage]["cold"]
        assert _positive(cold["seconds"]) and cold["peak_rss_mb"] >= 0
        assert cold["raw_maxrss_mb"] >= cold["baseline_rss_mb"] > 0
    assert result["peak_rss_mb"][patient] == max(stages[s]["cold"]["peak_rss_mb"] for s in STAGES)
    assert result["seconds_per_patient"][patient] == pytest.approx(sum(stages[s]["seconds"] for s in STAGES), rel=1e-2)
    assert _positive(result["cold"]["time_ratio"][patient])
    assert _positive(result["pylidc"][patient]["cold"]["peak_rss_mb"])
    assert set(result["met"][patient]) == {"time", "memory"}
    assert patient in format_ingest_table(result)


def test_train_benchmark_reports_asset_and_bare_loop() -> None:
    from nodule_pipeline.benchmarks.train import format_train_summary, run_train_benchmark

    lines: list[str] = []
    result = run_train_benchmark(rois=48, epochs=1, progress=lines.append, repeat=1, threads=1, batch_size=16)
    json.dumps(result)
    assert lines
    for key in ("images_per_s", "in_loop_images_per_s", "bare_torch_images_per_s", "ratio", "in_loop_ratio"):
        assert _positive(result[key]), (key, result[key])
    assert result["device"] in ("cpu", "cuda", "cuda:0")
    assert result["ratio"] == pytest.approx(result["images_per_s"] / result["bare_torch_images_per_s"], rel=1e-2)
    assert result["images"] == 48
    seconds = result["asset_seconds"]
    # the wall clock of the materialization holds the asset body, which holds the training loop
    assert seconds["wall"] >= seconds["training_loop"] > 0
    assert all(math.isfinite(loss) for loss in result["final_train_loss"].values())
    assert "images/s" in format_train_summary(result)


def test_synthetic_roi_table_meets_the_contract() -> None:
    from nodule_pipeline.benchmarks.train import synthetic_roi_table
    from nodule_pipeline.roi_table import SPLIT_COLUMN, patients_on_both_sides, validate_roi_table

    table = synthetic_roi_table(40, 12)
    validated = validate_roi_table(table)
    assert len(validated) == 52
    assert (table[SPLIT_COLUMN] == "train").sum() == 40
    assert set(table.loc[table[SPLIT_COLUMN] == "train", "label"]) == {0, 1}
    assert not patients_on_both_sides(table)


# --------------------------------------------------------------------------------------------
# Stored scans: frames, lazy reads, the old format


@pytest.fixture(scope="module")
def sample_series(lidc_sample: Path):
    patient = SAMPLE_PATIENTS[0]
    return [load_series(folder, patient) for folder in find_series_folders(lidc_sample / patient, patient).ct_folders]


def test_framed_scan_reads_back_exactly_eager_and_lazy(sample_series, tmp_path: Path) -> None:
    save_scan(sample_series, tmp_path / "scan")
    manifest = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert manifest["format"] == 2
    (eager,) = open_scan(tmp_path / "scan")
    hu = sample_series[0].hu
    assert isinstance(eager.hu, np.ndarray) and np.array_equal(eager.hu, hu)
    assert not eager.hu.flags.writeable
    (lazy,) = open_scan(tmp_path / "scan", lazy=True)
    volume = lazy.hu
    assert isinstance(volume, LazyVolume)
    assert volume.shape == hu.shape and volume.nbytes == hu.nbytes and volume.dtype == np.int16
    for key in [
        5,
        -1,
        (slice(3, 20),),
        (slice(3, 20), 7),
        (slice(None), slice(None), 40),
        (slice(500, 600), slice(None), 3),
        (slice(-10, None), 2, slice(5, 9)),
        (Ellipsis, 3),
        (np.array([0, 511]), 4, 5),
        (slice(0, 64, 2),),
    ]:
        assert np.array_equal(volume[key], hu[key]), key
    assert np.array_equal(np.asarray(volume), hu)
    with pytest.raises(IndexError):
        volume[512]
    # the IO manager's lazy read is the same
    (via_loader,) = load_artefact(tmp_path / "scan", lazy_volumes=True)
    assert isinstance(via_loader.hu, LazyVolume)


def test_rois_from_a_lazy_volume_equal_the_eager_ones(sample_series, tmp_path: Path) -> None:
    series = sample_series[0]
    mask = segment_lungs(series.hu, series.spacing_mm)
    save_scan(sample_series, tmp_path / "scan")
    (lazy,) = open_scan(tmp_path / "scan", lazy=True)
    eager_table, eager_counts = extract_rois(series, mask)
    lazy_table, lazy_counts = extract_rois(lazy, mask)
    assert eager_counts == lazy_counts and len(eager_table) > 0
    assert np.array_equal(np.stack(eager_table["image"].to_list()), np.stack(lazy_table["image"].to_list()))
    # only the rows around the nodules were decompressed
    assert len(lazy.hu._frames) < lazy.hu.shape[0] // 8


def test_lazy_volume_keeps_reading_the_scan_it_opened(sample_series, tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    save_scan(sample_series, folder)
    (lazy,) = open_scan(folder, lazy=True)
    save_scan([replace(sample_series[0], hu=sample_series[0].hu // 2)], folder)  # a rerun replaces it
    assert np.array_equal(lazy.hu[200:260, :, 10], sample_series[0].hu[200:260, :, 10])
    lazy.hu.close()


def test_a_frame_table_that_does_not_fit_fails_clearly(sample_series, tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    save_scan(sample_series, folder)
    manifest = json.loads((folder / "scan.json").read_text())
    manifest["series"][0]["frame_offsets"] = manifest["series"][0]["frame_offsets"][:-1]
    (folder / "scan.json").write_text(json.dumps(manifest))
    for lazy in (False, True):
        with pytest.raises(ValueError, match="frame table does not fit"):
            open_scan(folder, lazy=lazy)


def test_old_single_frame_scans_still_load(sample_series, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    save_scan(sample_series, folder)
    manifest = json.loads((folder / "scan.json").read_text())
    for item in manifest["series"]:
        path = folder / f"{item['series_uid']}.hu.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=1).compress(np.ascontiguousarray(sample_series[0].hu)))
        del item["rows_per_frame"], item["frame_offsets"]
    manifest["format"] = 1
    (folder / "scan.json").write_text(json.dumps(manifest))
    for lazy in (False, True):
        (series,) = open_scan(folder, lazy=lazy)
        assert isinstance(series.hu, np.ndarray) and np.array_equal(series.hu, sample_series[0].hu)


def test_unknown_scan_format_fails_clearly(sample_series, tmp_path: Path) -> None:
    folder = tmp_path / "future"
    save_scan(sample_series, folder)
    manifest = json.loads((folder / "scan.json").read_text())
    manifest["format"] = 99
    (folder / "scan.json").write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match=r"format 99.*materialize lidc_scan again"):
        open_scan(folder)


# --------------------------------------------------------------------------------------------
# Morphology and labelling shortcuts: bit for bit what scipy gives


@pytest.mark.parametrize("structure", ["cross_3d", "cube_3d", "cross_2d", "square_2d"])
def test_shifted_morphology_equals_scipy(structure: str) -> None:
    element = {"cross_3d": lm._CROSS_3D, "cube_3d": lm._CUBE_3D, "cross_2d": lm._CROSS_2D, "square_2d": lm._SQUARE_2D}[
        structure
    ]
    rng = np.random.default_rng(7)
    for trial in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 9, 3))
        mask = rng.random(shape) < rng.random()
        iterations = int(rng.integers(1, 4))
        assert np.array_equal(lm._dilate(mask, element, iterations), ndi.binary_dilation(mask, element, iterations)), (
            trial,
            shape,
            iterations,
        )
        assert np.array_equal(lm._erode(mask, element, iterations), ndi.binary_erosion(mask, element, iterations)), (
            trial,
            shape,
            iterations,
        )
    with pytest.raises(ValueError, match="iterations"):
        lm._erode(np.ones((3, 3, 3), bool), element, 0)


def test_other_structures_still_go_to_scipy() -> None:
    mask = np.random.default_rng(0).random((6, 6, 6)) < 0.5
    odd = np.zeros((3, 3, 3), bool)
    odd[1, 1, :] = True
    assert np.array_equal(lm._dilate(mask, odd, 2), ndi.binary_dilation(mask, odd, 2))


def test_slice_of_each_label_matches_find_objects() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        stacked = rng.random(tuple(int(n) for n in rng.integers(1, 10, 3))) < 0.4
        labels, n = ndi.label(stacked, structure=lm._SQUARE_IN_SLICE, output=np.int32)
        expected = np.array([0] + [box[0].start for box in ndi.find_objects(labels)])
        assert np.array_equal(lm._label_slices(labels, n)[1:], expected[1:])
    # labels out of slice order: the fallback still finds each label's slice
    shuffled = np.zeros((3, 4, 4), np.int32)
    shuffled[0, 0, 0], shuffled[2, 1, 1], shuffled[1, 3, 3] = 2, 1, 3
    assert lm._label_slices(shuffled, 3)[1:].tolist() == [2, 0, 1]
