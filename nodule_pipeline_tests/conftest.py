"""Shared fixtures: the real LIDC sample (read in place, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

LIDC_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "lidc-sample"
SAMPLE_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")


@pytest.fixture(scope="session")
def lidc_sample() -> Path:
    if not (LIDC_SAMPLE / SAMPLE_PATIENTS[0]).is_dir():
        pytest.skip(f"real LIDC sample not found at {LIDC_SAMPLE}")
    return LIDC_SAMPLE
