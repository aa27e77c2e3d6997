"""The GPU benchmark script: on a machine without CUDA it says so and measures nothing; with
``--device cpu`` its every step runs on a small real table (the dev set's first patients), so the
logic a GPU run depends on is exercised here, where CI has no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nodule_pipeline.benchmarks import gpu
from nodule_pipeline.roi_table import read_roi_table, write_roi_table


def test_without_cuda_it_says_so_and_measures_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu.main([str(tmp_path / "never-read.parquet"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "no CUDA device on this machine" in said and "nothing measured" in said
    assert json.loads(out.read_text()) == {"gpu": None, "reason": said.strip()}


def test_every_step_runs_on_the_cpu(real_nodules: Path, tmp_path: Path, capsys, one_torch_thread) -> None:
    table = read_roi_table(real_nodules)
    patients = table["patient_id"].drop_duplicates().iloc[:60]
    small = tmp_path / "small.parquet"
    write_roi_table(table[table["patient_id"].isin(patients)].reset_index(drop=True), small)
    out = tmp_path / "gpu.json"
    assert gpu.main([str(small), "--out", str(out), "--device", "cpu", "--epochs", "2", "--cpu-seeds", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["gpu"] is False and result["epochs"] == 2
    assert result["rois"]["train"] + result["rois"]["test"] == len(read_roi_table(small))
    train = result["train"]
    assert len(train["cpu_accuracy"]) == 2 and 0.0 <= train["accuracy"] <= 1.0
    assert train["images_per_s"] > 0 and train["mixed_precision"] is False
    assert result["encode"]["codes_equal_to_cpu"] == pytest.approx(1.0)  # the same device: the same codes
    assert result["search"]["queries"] == result["rois"]["test"] and result["search"]["hits_per_query"] == 10
    assert "training" in capsys.readouterr().out
