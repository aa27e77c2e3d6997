"""CT series on disk: find a patient's series (TCIA layout), validate them, load HU volumes.

Validation happens before anything is cropped because pylidc-style pipelines silently
mis-align crops when a slice is missing or duplicated (DESIGN.md section 7).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import zstandard
from pydicom.errors import InvalidDicomError

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.annotations import (
    SeriesAnnotations,
    annotations_from_dict,
    annotations_to_dict,
    find_series_xml,
)
from nodule_pipeline.storage import replace_dir

VOLUME_ZSTD_LEVEL = 1
"""Fast zstd: CT volumes shrink ~1.7-1.9x at ~250 MB/s on one core."""

Z_TOLERANCE_MM = 0.01
"""How far an annotation's imageZposition may sit from a slice's z and still be that slice."""


@dataclass(frozen=True)
class CtSeries:
    """One validated CT series: HU volume (rows, cols, slices ascending in z) plus geometry."""

    patient_id: str
    study_uid: str
    series_uid: str
    folder: Path
    spacing_mm: tuple[float, float, float]
    slice_z_mm: np.ndarray
    origin_mm: tuple[float, float]
    sop_uids: tuple[str, ...]
    annotations: SeriesAnnotations
    hu: np.ndarray = field(repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def check_voxel(self, voxel: tuple[int, int, int]) -> tuple[int, int, int]:
        """The voxel itself if it lies in the volume, else a clear error naming the series."""
        if len(voxel) != 3 or not all(0 <= int(v) < n for v, n in zip(voxel, self.shape)):
            raise InputDataError(
                f"position {tuple(voxel)} (row, col, slice) is outside the volume of shape {self.shape}",
                patient_id=self.patient_id,
                path=self.folder,
            )
        return int(voxel[0]), int(voxel[1]), int(voxel[2])

    def voxel_at_mm(self, x_mm: float, y_mm: float, z_mm: float) -> tuple[int, int, int]:
        """Patient coordinates (mm, axial DICOM frame) to the nearest (row, col, slice) voxel."""
        row = round((y_mm - self.origin_mm[1]) / self.spacing_mm[0])
        col = round((x_mm - self.origin_mm[0]) / self.spacing_mm[1])
        nearest = int(np.abs(self.slice_z_mm - z_mm).argmin())
        if abs(self.slice_z_mm[nearest] - z_mm) > self.spacing_mm[2]:
            nearest = -1
        return self.check_voxel((row, col, nearest))


def find_series_folders(patient_dir: Path, patient_id: str) -> list[Path]:
    """Every folder under a patient that holds DICOM files (one per series in TCIA layout)."""
    if not patient_dir.is_dir():
        raise InputDataError("patient folder not found", patient_id=patient_id, path=patient_dir)
    folders = sorted({path.parent for path in patient_dir.rglob("*.dcm")})
    if not folders:
        raise InputDataError(
            "no DICOM files (*.dcm) under the patient folder",
            patient_id=patient_id,
            path=patient_dir,
        )
    return folders


def _read_header(path: Path, patient_id: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as error:
        raise InputDataError(
            f"unreadable DICOM ({type(error).__name__}: {error})",
            patient_id=patient_id,
            path=path,
        ) from None


def _required(ds: pydicom.Dataset, keyword: str, path: Path, patient_id: str):
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputDataError(f"DICOM lacks {keyword}", patient_id=patient_id, path=path)
    return value


def _check_uniform_spacing(z: np.ndarray, files: list[Path], patient_id: str, folder: Path) -> float:
    """Slice spacing of the series; a gap larger than 1.5 steps means slices are missing."""
    if len(z) < 2:
        raise InputDataError(
            f"a CT series needs at least 2 slices, found {len(z)}",
            patient_id=patient_id,
            path=folder,
        )
    steps = np.diff(z)
    duplicates = np.flatnonzero(steps < Z_TOLERANCE_MM)
    if len(duplicates):
        i = int(duplicates[0])
        raise InputDataError(
            f"duplicate slice at z={z[i]:.2f} mm ({files[i].name} and {files[i + 1].name})",
            patient_id=patient_id,
            path=folder,
        )
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * step)
    if len(gaps):
        i = int(gaps[0])
        missing = round(steps[i] / step) - 1
        raise InputDataError(
            f"{missing} missing slice(s) between z={z[i]:.2f} mm ({files[i].name}) and "
            f"z={z[i + 1]:.2f} mm ({files[i + 1].name}); slice spacing is {step:.2f} mm",
            patient_id=patient_id,
            path=folder,
        )
    return step


def _check_annotations_fit(
    series: SeriesAnnotations, z: np.ndarray, sop_uids: tuple[str, ...], patient_id: str
) -> None:
    known_sops = set(sop_uids)
    for annotation in series.annotations:
        for contour in annotation.contours:
            nearest = np.abs(z - contour.z_mm).min()
            if nearest > Z_TOLERANCE_MM:
                raise InputDataError(
                    f"annotation {annotation.annotation_id} has a contour at z={contour.z_mm:.2f} mm, "
                    f"{nearest:.2f} mm from the nearest slice of series {series.series_uid}",
                    patient_id=patient_id,
                    path=series.xml_path,
                )
            if contour.sop_uid and contour.sop_uid not in known_sops:
                raise InputDataError(
                    f"annotation {annotation.annotation_id} refers to image {contour.sop_uid}, not in the series",
                    patient_id=patient_id,
                    path=series.xml_path,
                )


def load_series(folder: Path, patient_id: str) -> CtSeries:
    """Read, validate and stack one series folder into an int16 HU volume.

    Checks: every file is readable DICOM with pixel data, all belong to one CT series, slices
    share size, spacing and orientation, no duplicate or missing slices, and every annotation
    contour in the series' LIDC XML falls on a slice of this series.
    """
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise InputDataError("no DICOM files in series folder", patient_id=patient_id, path=folder)
    headers = [_read_header(path, patient_id) for path in files]

    series_uids = Counter(str(_required(ds, "SeriesInstanceUID", p, patient_id)) for ds, p in zip(headers, files))
    if len(series_uids) > 1:
        described = ", ".join(f"{uid} ({n} files)" for uid, n in series_uids.most_common())
        raise InputDataError(
            f"more than one series in one folder: {described}",
            patient_id=patient_id,
            path=folder,
        )
    for ds, path in zip(headers, files):
        if str(ds.get("Modality", "")) != "CT":
            raise InputDataError(
                f"not a CT image (Modality={ds.get('Modality')!r})",
                patient_id=patient_id,
                path=path,
            )

    first = headers[0]
    rows, cols = (
        int(_required(first, "Rows", files[0], patient_id)),
        int(_required(first, "Columns", files[0], patient_id)),
    )
    pixel_spacing = [float(v) for v in _required(first, "PixelSpacing", files[0], patient_id)]
    for ds, path in zip(headers, files):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InputDataError(
                f"slice is {ds.Rows}x{ds.Columns}, the series is {rows}x{cols}",
                patient_id=patient_id,
                path=path,
            )
        if [float(v) for v in ds.PixelSpacing] != pixel_spacing:
            raise InputDataError(
                f"pixel spacing {list(ds.PixelSpacing)} differs from {pixel_spacing}",
                patient_id=patient_id,
                path=path,
            )

    z = np.array([float(_required(ds, "ImagePositionPatient", p, patient_id)[2]) for ds, p in zip(headers, files)])
    order = np.argsort(z, kind="stable")
    z, headers, files = z[order], [headers[i] for i in order], [files[i] for i in order]
    slice_step = _check_uniform_spacing(z, files, patient_id, folder)

    series_uid = next(iter(series_uids))
    sop_uids = tuple(str(ds.get("SOPInstanceUID", "")) for ds in headers)
    annotations = find_series_xml(folder, series_uid, patient_id)
    _check_annotations_fit(annotations, z, sop_uids, patient_id)

    hu = np.empty((rows, cols, len(files)), dtype=np.int16)
    for k, (ds, path) in enumerate(zip(headers, files)):
        try:
            pixels = ds.pixel_array
        except (ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError, EOFError, OSError) as error:
            raise InputDataError(
                f"pixel data unreadable ({type(error).__name__}: {error})",
                patient_id=patient_id,
                path=path,
            ) from None
        if pixels.shape != (rows, cols):
            raise InputDataError(
                f"pixel data has shape {pixels.shape}, expected {(rows, cols)}",
                patient_id=patient_id,
                path=path,
            )
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1 and intercept == int(intercept):
            values = pixels.astype(np.int32) + int(intercept)
        else:
            values = np.rint(pixels * slope + intercept)
        np.clip(values, -32768, 32767, out=hu[:, :, k], casting="unsafe")

    position = first.get("ImagePositionPatient")
    return CtSeries(
        patient_id=patient_id,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=series_uid,
        folder=folder,
        spacing_mm=(pixel_spacing[0], pixel_spacing[1], slice_step),
        slice_z_mm=z,
        origin_mm=(float(position[0]), float(position[1])),
        sop_uids=sop_uids,
        annotations=annotations,
        hu=hu,
    )


def save_scan(series_list: list[CtSeries], folder: Path) -> None:
    """Store a patient's series: each int16 volume zstd-compressed (about half the DICOM size,
    a fraction of a second per scan, no pickle) and ``scan.json`` with shape, geometry,
    provenance and the validated annotations."""

    def fill(tmp: Path) -> None:
        manifest = []
        for series in series_list:
            compressed = zstandard.ZstdCompressor(level=VOLUME_ZSTD_LEVEL).compress(np.ascontiguousarray(series.hu))
            (tmp / f"{series.series_uid}.hu.zst").write_bytes(compressed)
            manifest.append(
                {
                    "patient_id": series.patient_id,
                    "study_uid": series.study_uid,
                    "series_uid": series.series_uid,
                    "shape": list(series.hu.shape),
                    "folder": str(series.folder),
                    "spacing_mm": list(series.spacing_mm),
                    "slice_z_mm": series.slice_z_mm.tolist(),
                    "origin_mm": list(series.origin_mm),
                    "sop_uids": list(series.sop_uids),
                    "annotations": annotations_to_dict(series.annotations),
                }
            )
        (tmp / "scan.json").write_text(json.dumps({"format": 1, "series": manifest}))

    replace_dir(folder, fill)


def _read_volume(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    return np.frombuffer(raw, dtype=np.int16).reshape(shape)


def open_scan(folder: Path) -> list[CtSeries]:
    """Load what :func:`save_scan` stored (volumes decompressed straight into read-only arrays)."""
    manifest = json.loads((folder / "scan.json").read_text())
    return [
        CtSeries(
            patient_id=item["patient_id"],
            study_uid=item["study_uid"],
            series_uid=item["series_uid"],
            folder=Path(item["folder"]),
            spacing_mm=tuple(item["spacing_mm"]),
            slice_z_mm=np.asarray(item["slice_z_mm"], dtype=float),
            origin_mm=tuple(item["origin_mm"]),
            sop_uids=tuple(item["sop_uids"]),
            annotations=annotations_from_dict(item["annotations"]),
            hu=_read_volume(folder / f"{item['series_uid']}.hu.zst", tuple(item["shape"])),
        )
        for item in manifest["series"]
    ]
