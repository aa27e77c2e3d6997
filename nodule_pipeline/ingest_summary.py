"""What ingesting a scan root came to, patient by patient, added up: patients ingested and
failed (by reason), series ingested and skipped (by modality), duplicate slices resolved, ROIs
kept and dropped. Printed at the end of ``nodule-pipeline run`` and shown on ``roi_dataset``."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PatientIngest:
    """One patient's outcome: the metadata of its ``lidc_scan`` and ``nodule_rois`` when it was
    ingested, or the reason it failed."""

    patient_id: str
    scan: dict[str, Any] = field(default_factory=dict)
    rois: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def failure_kind(error: str, patient_id: str) -> str:
    """A failure reason without what is particular to the patient (its id, file, numbers), so
    that failures of the same kind count together."""
    text = error.split(f"{patient_id}: ", 1)[-1]
    head, sep, rest = text.partition(": ")
    if sep and ("/" in head or head.endswith((".dcm", ".xml"))):  # the file the reason is about
        text = rest
    return _NUMBER.sub("N", text.split(" (", 1)[0]).strip() or "failed"


def summarise_ingestion(patients: Iterable[PatientIngest]) -> dict[str, Any]:
    """The totals over ``patients`` (metadata of older runs may lack the newer counts: 0)."""
    patients = list(patients)
    ok = [p for p in patients if p.error is None]
    skipped: Counter[str] = Counter()
    for patient in ok:
        skipped.update(patient.scan.get("skipped_by_modality") or {})
    return {
        "patients_ok": len(ok),
        "patients_failed": len(patients) - len(ok),
        "failed_by_reason": dict(
            Counter(failure_kind(p.error, p.patient_id) for p in patients if p.error is not None).most_common()
        ),
        "series_ingested": sum(int(p.scan.get("series", 0)) for p in ok),
        "series_skipped_by_modality": dict(sorted(skipped.items())),
        "duplicate_slices_resolved": sum(int(p.scan.get("duplicate_slices_resolved", 0)) for p in ok),
        **{
            f"rois_{key}": sum(int(p.rois.get(key, 0)) for p in ok)
            for key in ("kept", "benign", "malignant", "dropped_indeterminate")
        },
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as a person reads it."""
    skipped = summary["series_skipped_by_modality"]
    return [
        f"patients: {summary['patients_ok']} ok, {summary['patients_failed']} failed",
        *(f"  failed, {count}x: {reason}" for reason, count in summary["failed_by_reason"].items()),
        f"series: {summary['series_ingested']} CT ingested, {sum(skipped.values())} skipped"
        + (f" ({', '.join(f'{n} {modality}' for modality, n in skipped.items())}: not CT)" if skipped else ""),
        f"duplicate slices resolved: {summary['duplicate_slices_resolved']} (kept the lower InstanceNumber, as pylidc)",
        f"ROIs: {summary['rois_kept']} kept ({summary['rois_benign']} benign, {summary['rois_malignant']} malignant), "
        f"{summary['rois_dropped_indeterminate']} rated 3 dropped",
    ]
