"""Shared fixtures: the real LIDC sample (read in place, never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LIDC_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "lidc-sample"
SAMPLE_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
REAL_NODULES = Path(__file__).resolve().parents[2] / "shared" / "lidc-real-nodules" / "rois.parquet"
DIAGNOSIS_SHEET = (
    Path(__file__).resolve().parents[2] / "shared" / "lidc-diagnosis" / "tcia-diagnosis-data-2012-04-20.xls"
)
NO_ACCURACY_FLOOR = {"accuracy_floor": 0.0}
"""``hash_model`` config for a handful of ROIs, where test accuracy says little: index anyway."""
QUICK_TRAINING = {"epochs": 2, **NO_ACCURACY_FLOOR}
"""``hash_model`` config for tests that need a model, not a good one: brief training."""
pytest_plugins = [
    "nodule_pipeline_tests.browser",  # ``browser``: Debian's chromium
    "nodule_pipeline_tests.search_server",  # ``served_library``, ``search_page``: nodule-pipeline serve
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Pin torch to one thread for a module: on a busy 2-core machine two OpenMP threads can run
    tiny training steps up to 100x slower, and forward passes use the global thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def require_shared(path: Path, what: str) -> Path:
    """A path under ../shared: missing, the test skips on a developer's machine but fails under
    CI=true, where ../shared stands beside the clone (a skipped real-data test never ran)."""
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; CI must have ../shared beside its clone")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def lidc_sample() -> Path:
    require_shared(LIDC_SAMPLE / SAMPLE_PATIENTS[0], "real LIDC sample")
    return LIDC_SAMPLE


@pytest.fixture(scope="session")
def real_nodules() -> Path:
    """The 1,733 real LIDC nodules (ROI table), for choices that must hold on real CT."""
    return require_shared(REAL_NODULES, "real LIDC nodules")


@pytest.fixture(scope="session")
def diagnosis_sheet() -> Path:
    """TCIA's real diagnosis spreadsheet, read in place: missing, it skips here and fails under CI=true."""
    return require_shared(DIAGNOSIS_SHEET, "TCIA's LIDC diagnosis spreadsheet")


@pytest.fixture(scope="session")
def materialized(lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the whole chain run on the real sample (shared by the modules that read it)."""
    from nodule_pipeline.runner import run_pipeline

    data_dir = tmp_path_factory.mktemp("sample-data")
    # 40 epochs asked for: a trained model, not the small-data placeholder (searches rely on its predictions)
    training = {**NO_ACCURACY_FLOOR, "epochs": 40}
    summary = run_pipeline(lidc_sample, data_dir, progress=lambda _: None, training=training, report="none")
    assert not summary.failed, [o.error for o in summary.failed]
    assert summary.library_ok
    return data_dir


from nodule_pipeline_tests.postgres import postgres_server  # noqa: E402,F401  (a throwaway PostgreSQL 15 server)
