"""CT series on disk: find a patient's series (TCIA layout), validate them, load HU volumes.

Validation happens before anything is cropped because pylidc-style pipelines silently
mis-align crops when a slice is missing or duplicated (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import zstandard
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.annotations import (
    Annotation,
    SeriesAnnotations,
    annotations_from_dict,
    annotations_to_dict,
    find_series_xml,
)
from nodule_pipeline.privacy import (
    DICOM_ATTRIBUTES_READ,
    Pseudonymiser,
    scrub_paths,
    shown_name,
    shown_path,
    shown_uid,
)
from nodule_pipeline.storage import reads_folder, replace_dir

VOLUME_ZSTD_LEVEL = 1
"""Fast zstd: CT volumes shrink ~1.7-1.9x at ~250 MB/s on one core."""

_SLICE_BLOCK = 16
"""Slices converted per block in :func:`load_series` (16 x 512 x 512 int16 = 8 MB)."""

Z_TOLERANCE_MM = 0.01
"""How far an annotation's imageZposition may sit from a slice's z and still be that slice."""

MAX_VOLUME_BYTES = 2 << 30
"""Largest int16 volume a series may ask for (Rows x Columns x slices x 2 bytes), checked from the
headers before anything is allocated: a CT series is at most about 1,000 slices of 512x512 to
1024x1024 (1,024 slices of 1024x1024 is this 2 GiB). Headers claiming more are refused, not trusted:
three slices claiming 60000x60000 pixels would ask for 21.6 GB."""

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""ImageOrientationPatient of an axial slice as LIDC stores them and the crops assume: the column
index grows along +x, the row index along +y (:meth:`CtSeries.voxel_at_mm`)."""

ORIENTATION_TOLERANCE = 1e-3
"""How far a direction cosine may stray from :data:`AXIAL`: half a pixel of drift across 512."""

_DICOM_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
)
"""What pydicom raises on corrupt input, found by fuzzing (test_fuzz_input): on reading a file, and
on converting an element's value, which it does lazily, on first access of that element."""


@dataclass(frozen=True)
class DuplicateSlice:
    """Two slices of a series at one z (pylidc issue #7): the one with the lower InstanceNumber is
    kept, as pylidc keeps it, whether or not the pixels are the same. File names as shown."""

    z_mm: float
    kept: str
    dropped: str
    kept_instance: int | None
    dropped_instance: int | None
    identical_pixels: bool

    @property
    def rule(self) -> str:
        pixels = "identical pixels" if self.identical_pixels else "different pixels"
        return f"same z, {pixels}: kept the lower InstanceNumber (pylidc's rule)"

    def describe(self) -> str:
        return (
            f"duplicate slice at z={self.z_mm:.2f} mm: kept {self.kept} (InstanceNumber {self.kept_instance}), "
            f"dropped {self.dropped} (InstanceNumber {self.dropped_instance}); {self.rule}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rule": self.rule}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DuplicateSlice:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SkippedSeries:
    """A series folder of a kind the pipeline does not use: a chest radiograph (CR, DX), a
    segmentation or report object (SEG, SR), anything whose Modality is not CT."""

    folder: Path
    modality: str
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "folder": shown_path(self.folder), "files": self.files}


@dataclass(frozen=True)
class PatientSeries:
    """A patient folder's series folders: the CT ones to ingest, and the others, skipped."""

    ct_folders: list[Path]
    skipped: list[SkippedSeries]


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
    duplicate_slices: tuple[DuplicateSlice, ...] = ()
    """Slices that shared a z with another and were dropped (see :func:`load_series`)."""

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

    def pseudonymised(self, pseudonymiser: Pseudonymiser) -> CtSeries:
        """The series with its UIDs, readers and paths replaced by keyed pseudonyms (the patient
        id is the partition key, one already): what is stored when pseudonyms are on."""
        series_uid = pseudonymiser.uid(self.series_uid)

        def annotation(a: Annotation) -> Annotation:
            contours = tuple(replace(c, sop_uid=pseudonymiser.uid(c.sop_uid) if c.sop_uid else "") for c in a.contours)
            return replace(
                a,
                annotation_id=f"{series_uid[-6:]}-{a.annotation_id.split('-', 1)[-1]}",
                reader=pseudonymiser.reader(a.reader),
                contours=contours,
            )

        notes = self.annotations
        return replace(
            self,
            study_uid=pseudonymiser.uid(self.study_uid) if self.study_uid else "",
            series_uid=series_uid,
            folder=Path(pseudonymiser.path(self.folder)),
            sop_uids=tuple(pseudonymiser.uid(uid) for uid in self.sop_uids),
            annotations=replace(
                notes,
                xml_path=Path(pseudonymiser.path(notes.xml_path)) if notes.xml_path else None,
                ignored_files=tuple(Path(pseudonymiser.path(path)) for path in notes.ignored_files),
                series_uid=pseudonymiser.uid(notes.series_uid) if notes.series_uid else None,
                annotations=tuple(annotation(a) for a in notes.annotations),
            ),
        )


def find_series_folders(patient_dir: Path, patient_id: str) -> PatientSeries:
    """Every folder under a patient that holds DICOM files (one per series), sorted into CT
    series and the others (radiographs, segmentations), told apart by the Modality of one file.
    A patient without any CT series is an error that names what was found instead."""
    if not patient_dir.is_dir():
        raise InputDataError("patient folder not found", patient_id=patient_id, path=patient_dir)
    folders = sorted({path.parent for path in patient_dir.rglob("*.dcm")})
    if not folders:
        raise InputDataError(
            "no DICOM files (*.dcm) under the patient folder",
            patient_id=patient_id,
            path=patient_dir,
        )
    ct_folders, skipped = [], []
    for folder in folders:
        modality = series_modality(folder, patient_id)
        if modality == "CT":
            ct_folders.append(folder)
        else:
            skipped.append(SkippedSeries(folder, modality, len(list(folder.glob("*.dcm")))))
    if not ct_folders:
        found = ", ".join(f"{s.modality} ({s.files} files)" for s in skipped)
        raise InputDataError(
            f"no CT series under the patient folder, only {found}", patient_id=patient_id, path=patient_dir
        )
    return PatientSeries(ct_folders, skipped)


def series_modality(folder: Path, patient_id: str) -> str:
    """The Modality of a series folder's DICOM files, read from the first: what tells a CT series
    from a radiograph study or a segmentation object beside it."""
    first = min(folder.glob("*.dcm"))
    return str(_required(_read_header(first, patient_id), "Modality", first, patient_id))


def _read_header(path: Path, patient_id: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, specific_tags=list(DICOM_ATTRIBUTES_READ))  # never parse anything else
    except _DICOM_ERRORS as error:
        raise InputDataError(
            f"unreadable DICOM ({_detail(error)})",
            patient_id=patient_id,
            path=path,
        ) from None


def _detail(error: BaseException) -> str:
    """An exception as one short line: runners show a failure's last line only."""
    text = scrub_paths(" ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _required(
    ds: pydicom.Dataset,
    keyword: str,
    path: Path,
    patient_id: str,
    convert: Callable[[Any], Any] = str,
    default: Any = None,
) -> Any:
    """``convert(value)`` of a header element; missing (without a ``default``), unreadable or
    invalid is an error naming the file."""
    try:
        value = ds.get(keyword)
        if (value is None or value == "") and default is not None:
            return default
        if value is None or value == "":
            raise InputDataError(f"DICOM lacks {keyword}", patient_id=patient_id, path=path)
        return convert(value)
    except InputDataError:
        raise
    except _DICOM_ERRORS as error:
        raise InputDataError(f"invalid DICOM {keyword} ({_detail(error)})", patient_id=patient_id, path=path) from None


def _numbers(count: int, positive: bool = False) -> Callable[[Any], tuple[float, ...]]:
    """A converter to ``count`` finite numbers (a multi-valued DS such as PixelSpacing)."""

    def convert(value: Any) -> tuple[float, ...]:
        numbers = tuple(float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value]))
        if len(numbers) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
            kind = "positive" if positive else "finite"
            raise ValueError(f"expected {count} {kind} number(s), found {str(list(numbers))[:80]}")
        return numbers

    return convert


def _positive(value: Any) -> int:
    if int(value) < 1:
        raise ValueError(f"{int(value)} is less than 1")
    return int(value)


def _check_axial(orientation: tuple[float, ...], path: Path, patient_id: str) -> tuple[float, ...]:
    """The orientation itself if it is :data:`AXIAL`; any other plane would be cut as if it were
    axial (wrong crops, wrong mm positions), so it is an error that says which plane it is."""
    if max(abs(v - a) for v, a in zip(orientation, AXIAL)) <= ORIENTATION_TOLERANCE:
        return orientation
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.abs(normal).argmax())
    if abs(normal[axis]) < 1 - ORIENTATION_TOLERANCE:
        plane = "oblique"
    else:
        plane = ("sagittal", "coronal", "axial but rotated or flipped")[axis]
    shown = ", ".join(f"{v:g}" for v in orientation)
    raise InputDataError(
        f"image orientation ({shown}) is {plane}; the pipeline reads axial slices (1, 0, 0, 0, 1, 0), "
        "columns along x and rows along y, as LIDC's CT series are",
        patient_id=patient_id,
        path=path,
    )


@dataclass(frozen=True)
class _SliceHeader:
    """The header values a series is checked and stacked by, read and checked per file."""

    series_uid: str
    size: tuple[int, int]
    pixel_spacing: tuple[float, ...]
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    sop_uid: str
    study_uid: str
    instance_number: int | None


def _instance_number(ds: pydicom.Dataset) -> int | None:
    """InstanceNumber, or None when absent or unreadable: it only decides between duplicate slices."""
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except _DICOM_ERRORS:
        return None


def _slice_header(ds: pydicom.Dataset, path: Path, patient_id: str) -> _SliceHeader:
    """Every file's own values, checked before slices are compared: a corrupt element only shows
    when read, and must fail naming its file, not the first file or one compared with it."""
    if _required(ds, "Modality", path, patient_id) != "CT":
        raise InputDataError(f"not a CT image (Modality={ds.get('Modality')!r})", patient_id=patient_id, path=path)
    return _SliceHeader(
        series_uid=_required(ds, "SeriesInstanceUID", path, patient_id),
        size=(
            _required(ds, "Rows", path, patient_id, _positive),
            _required(ds, "Columns", path, patient_id, _positive),
        ),
        pixel_spacing=_required(ds, "PixelSpacing", path, patient_id, _numbers(2, positive=True)),
        position=_required(ds, "ImagePositionPatient", path, patient_id, _numbers(3)),
        orientation=_check_axial(
            _required(ds, "ImageOrientationPatient", path, patient_id, _numbers(6)), path, patient_id
        ),
        sop_uid=_required(ds, "SOPInstanceUID", path, patient_id),
        study_uid=_required(ds, "StudyInstanceUID", path, patient_id, default=""),
        instance_number=_instance_number(ds),
    )


def _series_value(values: list[Any], files: list[Path], what: str, patient_id: str) -> Any:
    """The value all slices share; the series' value is the most common one, so a slice that
    differs is named even when it is the first file."""
    expected = Counter(values).most_common(1)[0][0]
    for value, path in zip(values, files):
        if value != expected:
            raise InputDataError(
                f"{what} {_show(value)} differs from the series' {_show(expected)}", patient_id=patient_id, path=path
            )
    return expected


def _show(value: tuple) -> str:
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(list(value))


def _check_volume_size(rows: int, cols: int, slices: int, patient_id: str, folder: Path) -> None:
    """The volume the headers ask for fits :data:`MAX_VOLUME_BYTES`, before it is allocated."""
    size = rows * cols * slices * np.dtype(np.int16).itemsize
    if size > MAX_VOLUME_BYTES:
        raise InputDataError(
            f"{slices} slices of {rows}x{cols} pixels make a {size / 1e9:,.1f} GB volume, more than the "
            f"{MAX_VOLUME_BYTES / 1e9:.1f} GB a CT series may take (about 1,000 slices of 1024x1024)",
            patient_id=patient_id,
            path=folder,
        )


def _check_pixel_length(ds: pydicom.Dataset, size: tuple[int, int], path: Path, patient_id: str) -> None:
    """Native pixel data holds exactly the pixels the header describes (one padding byte allowed
    when that is odd): pydicom would otherwise read a 16-bit image as 8-bit without a word, or
    allocate what the header claims. Compressed (encapsulated) data is checked when decoded."""
    try:
        element = ds["PixelData"]
    except KeyError:
        raise InputDataError("DICOM lacks PixelData", patient_id=patient_id, path=path) from None
    except _DICOM_ERRORS as error:
        raise InputDataError(f"invalid DICOM PixelData ({_detail(error)})", patient_id=patient_id, path=path) from None
    if element.is_undefined_length:
        return
    bits = _required(ds, "BitsAllocated", path, patient_id, _positive)
    samples = _required(ds, "SamplesPerPixel", path, patient_id, _positive, default=1)
    frames = _required(ds, "NumberOfFrames", path, patient_id, _positive, default=1)
    expected = (size[0] * size[1] * samples * frames * bits + 7) // 8
    held = len(element.value or b"")
    if held not in (expected, expected + expected % 2):
        extra = (f" x {samples} samples" if samples != 1 else "") + (f" x {frames} frames" if frames != 1 else "")
        raise InputDataError(
            f"pixel data holds {held:,} bytes, but {size[0]}x{size[1]} pixels{extra} at BitsAllocated {bits} "
            f"take {expected:,}",
            patient_id=patient_id,
            path=path,
        )


def _check_uniform_spacing(z: np.ndarray, files: list[Path], patient_id: str, folder: Path) -> float:
    """Slice spacing of the series (z ascending, no duplicates); a gap larger than 1.5 steps
    means slices are missing."""
    if len(z) < 2:
        raise InputDataError(
            f"a CT series needs at least 2 slices, found {len(z)}",
            patient_id=patient_id,
            path=folder,
        )
    steps = np.diff(z)
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * step)
    if len(gaps):
        i = int(gaps[0])
        missing = round(steps[i] / step) - 1
        raise InputDataError(
            f"{missing} missing slice(s) between z={z[i]:.2f} mm ({shown_name(files[i])}) and "
            f"z={z[i + 1]:.2f} mm ({shown_name(files[i + 1])}); slice spacing is {step:.2f} mm",
            patient_id=patient_id,
            path=folder,
        )
    return step


def _check_annotations_fit(
    series: SeriesAnnotations, z: np.ndarray, sop_uids: tuple[str, ...], size: tuple[int, int], patient_id: str
) -> None:
    """Every contour lies on a slice of the series and inside its images (ROIs are cut there)."""
    known_sops = set(sop_uids)
    for annotation in series.annotations:
        for contour in annotation.contours:
            nearest = np.abs(z - contour.z_mm).min()
            if not nearest <= Z_TOLERANCE_MM:  # NaN too
                raise InputDataError(
                    f"annotation {annotation.annotation_id} has a contour at z={contour.z_mm:.2f} mm, "
                    f"{nearest:.2f} mm from the nearest slice of series {shown_uid(series.series_uid or '')}",
                    patient_id=patient_id,
                    path=series.xml_path,
                )
            if contour.sop_uid and contour.sop_uid not in known_sops:
                raise InputDataError(
                    f"annotation {annotation.annotation_id} refers to image {shown_uid(contour.sop_uid)}, "
                    "not in the series",
                    patient_id=patient_id,
                    path=series.xml_path,
                )
            outside = (contour.points < 0).any(axis=1) | (contour.points >= size).any(axis=1)
            if outside.any():
                row, col = contour.points[np.flatnonzero(outside)[0]]
                raise InputDataError(
                    f"annotation {annotation.annotation_id} has a contour point (x={col}, y={row}) outside the "
                    f"{size[1]}x{size[0]} image at z={contour.z_mm:.2f} mm",
                    patient_id=patient_id,
                    path=series.xml_path,
                )


def _resolve_duplicate_slices(
    values: list[_SliceHeader], headers: list[pydicom.Dataset], files: list[Path]
) -> tuple[list[int], list[DuplicateSlice], dict[str, str]]:
    """One slice per z, chosen as pylidc chooses: the lower InstanceNumber (a missing number
    loses, then the first file by name). Takes the slices in z order; returns the positions kept,
    what was dropped, and each dropped slice's SOP UID -> the kept slice's."""
    keep: list[int] = []
    dropped: list[DuplicateSlice] = []
    aliases: dict[str, str] = {}
    start = 0
    for stop in range(1, len(values) + 1):
        if stop < len(values) and values[stop].position[2] - values[start].position[2] < Z_TOLERANCE_MM:
            continue
        group = range(start, stop)
        winner = min(group, key=lambda i: (values[i].instance_number is None, values[i].instance_number or 0))
        keep.append(winner)
        for i in group:
            if i == winner:
                continue
            aliases[values[i].sop_uid] = values[winner].sop_uid
            dropped.append(
                DuplicateSlice(
                    z_mm=values[i].position[2],
                    kept=shown_name(files[winner]),
                    dropped=shown_name(files[i]),
                    kept_instance=values[winner].instance_number,
                    dropped_instance=values[i].instance_number,
                    identical_pixels=_same_pixels(headers[winner], headers[i]),
                )
            )
        start = stop
    return keep, dropped, aliases


def _same_pixels(a: pydicom.Dataset, b: pydicom.Dataset) -> bool:
    """The same stored pixels and rescale, so the same HU (read for duplicates only)."""
    try:
        return a.PixelData == b.PixelData and all(a.get(k) == b.get(k) for k in ("RescaleSlope", "RescaleIntercept"))
    except _DICOM_ERRORS:
        return False


def _point_to_kept_slices(series: SeriesAnnotations, aliases: dict[str, str]) -> SeriesAnnotations:
    """Contours drawn on a dropped duplicate slice now name the slice kept at that z."""
    if not aliases:
        return series

    def moved(annotation: Annotation) -> Annotation:
        contours = tuple(replace(c, sop_uid=aliases.get(c.sop_uid, c.sop_uid)) for c in annotation.contours)
        return replace(annotation, contours=contours)

    return replace(series, annotations=tuple(moved(a) for a in series.annotations))


def _rescale(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return number


def _slice_hu(ds: pydicom.Dataset, path: Path, shape: tuple[int, int], patient_id: str) -> np.ndarray:
    """One slice's pixels in HU, clipped to the int16 range; drops the file's pixel data after."""
    try:
        pixels = ds.pixel_array
    except _DICOM_ERRORS as error:
        raise InputDataError(
            f"pixel data unreadable ({_detail(error)})",
            patient_id=patient_id,
            path=path,
        ) from None
    if pixels.shape != shape:
        raise InputDataError(
            f"pixel data has shape {pixels.shape}, expected {shape}",
            patient_id=patient_id,
            path=path,
        )
    slope = _required(ds, "RescaleSlope", path, patient_id, _rescale, default=1.0)
    intercept = _required(ds, "RescaleIntercept", path, patient_id, _rescale, default=0.0)
    if slope == 0:
        raise InputDataError("RescaleSlope is 0: every pixel would read the same", patient_id=patient_id, path=path)
    if slope == 1 and intercept == int(intercept) and abs(intercept) < 2**16:
        values = pixels.astype(np.int32)
        values += int(intercept)
    else:
        values = np.rint(pixels * slope + intercept)
    del ds.PixelData  # also frees pydicom's cached pixel array
    return np.clip(values, -32768, 32767, out=values)


def load_series(folder: Path, patient_id: str) -> CtSeries:
    """Read, validate and stack one series folder into an int16 HU volume.

    Checks: every file is readable DICOM with pixel data, all belong to one CT series, slices
    are axial and share size, spacing and orientation, the volume fits :data:`MAX_VOLUME_BYTES`
    and each file's pixel data is as long as its header says (both before anything is allocated
    or decoded), no duplicate or missing slices, and every annotation contour in the series' LIDC
    XML falls on a slice of this series. Each file is read once.
    """
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise InputDataError("no DICOM files in series folder", patient_id=patient_id, path=folder)
    headers = [_read_header(path, patient_id) for path in files]
    values = [_slice_header(ds, path, patient_id) for ds, path in zip(headers, files)]

    series_uids = Counter(v.series_uid for v in values)
    if len(series_uids) > 1:
        main_uid = series_uids.most_common(1)[0][0]
        odd = [shown_name(path) for v, path in zip(values, files) if v.series_uid != main_uid]
        described = ", ".join(f"{shown_uid(uid)} ({n} files)" for uid, n in series_uids.most_common())
        raise InputDataError(
            f"more than one series in one folder: {described}; not in the first: "
            f"{', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}",
            patient_id=patient_id,
            path=folder,
        )
    rows, cols = _series_value([v.size for v in values], files, "slice size", patient_id)
    _check_volume_size(rows, cols, len(files), patient_id, folder)
    for ds, path in zip(headers, files):
        _check_pixel_length(ds, (rows, cols), path, patient_id)
    pixel_spacing = _series_value([v.pixel_spacing for v in values], files, "pixel spacing", patient_id)
    _series_value([v.orientation for v in values], files, "image orientation", patient_id)

    for keyword in ("RescaleIntercept", "RescaleSlope"):  # a slice without it would be off by it, silently
        present = [keyword in ds for ds in headers]
        if any(present) and not all(present):
            raise InputDataError(
                f"lacks {keyword}, which other slices of the series have",
                patient_id=patient_id,
                path=files[present.index(False)],
            )

    first = values[0]
    order = np.argsort([v.position[2] for v in values], kind="stable")
    values, headers, files = [values[i] for i in order], [headers[i] for i in order], [files[i] for i in order]
    keep, duplicate_slices, aliases = _resolve_duplicate_slices(values, headers, files)
    values, headers, files = [values[i] for i in keep], [headers[i] for i in keep], [files[i] for i in keep]
    z = np.array([v.position[2] for v in values])
    slice_step = _check_uniform_spacing(z, files, patient_id, folder)

    series_uid = next(iter(series_uids))
    sop_uids = tuple(v.sop_uid for v in values)
    annotations = _point_to_kept_slices(find_series_xml(folder, series_uid, patient_id), aliases)
    _check_annotations_fit(annotations, z, sop_uids, (rows, cols), patient_id)

    # Slices are converted a block at a time into a contiguous (block, rows, cols) buffer and then
    # written into the (rows, cols, slices) volume in one transposing copy: writing slice by slice
    # touches every cache line of the volume once per slice (3-4x slower). Each file's pixel data
    # is dropped once converted, so the raw DICOM pixels and the volume do not coexist in full.
    hu = np.empty((rows, cols, len(files)), dtype=np.int16)
    block = np.empty((min(_SLICE_BLOCK, len(files)), rows, cols), dtype=np.int16)
    for start in range(0, len(files), _SLICE_BLOCK):
        stop = min(start + _SLICE_BLOCK, len(files))
        for j, (ds, path) in enumerate(zip(headers[start:stop], files[start:stop])):
            block[j] = _slice_hu(ds, path, (rows, cols), patient_id)
        hu[:, :, start:stop] = block[: stop - start].transpose(1, 2, 0)
    del block

    return CtSeries(
        patient_id=patient_id,
        study_uid=first.study_uid,
        series_uid=series_uid,
        folder=folder,
        spacing_mm=(pixel_spacing[0], pixel_spacing[1], slice_step),
        slice_z_mm=z,
        origin_mm=(first.position[0], first.position[1]),
        sop_uids=sop_uids,
        annotations=annotations,
        hu=hu,
        duplicate_slices=tuple(duplicate_slices),
    )


LOWEST_STORED_HU = -3100
"""Below anything a CT scanner stores: padding outside the field of view reads -2000 or -3024."""
AIR_HU_MAX = -900
"""Air reads about -1000 HU; a chest CT's darkest percent (room air, lungs) lies below this."""
DENSE_HU_RANGE = (0.0, 3100.0)
"""A chest CT's brightest percent is soft tissue, bone or contrast: at or above water, below metal."""


@dataclass(frozen=True)
class HuRange:
    """The spread of a volume's values: extremes and the 1st/99th percentiles (of every 4th row and
    column, which is plenty for a percentile). Unrescaled pixel data has no air, a wrong slope
    puts air or bone far off."""

    lowest: int
    highest: int
    darkest_percent: float
    brightest_percent: float

    @property
    def plausible(self) -> bool:
        """Hounsfield units of a chest CT: nothing below what scanners store, air, and tissue."""
        low, high = DENSE_HU_RANGE
        return (
            self.lowest >= LOWEST_STORED_HU
            and self.darkest_percent <= AIR_HU_MAX
            and low <= self.brightest_percent <= high
        )


def hu_range(hu: np.ndarray) -> HuRange:
    """The :class:`HuRange` of a (rows, cols, slices) volume."""
    sample = np.asarray(hu[::4, ::4, :])
    darkest, brightest = np.percentile(sample, [1, 99])
    return HuRange(int(np.min(hu)), int(np.max(hu)), float(darkest), float(brightest))


SCAN_FORMAT = 2
"""Stored scan format: 1 = each volume one zstd frame; 2 = one zstd frame per band of
``rows_per_frame`` rows with a byte-offset table in ``scan.json``, so a reader can decompress
only the rows it needs (:class:`LazyVolume`). Both are read; a concatenation of the frames is
the same C-order int16 bytes as format 1's single frame."""

ROWS_PER_FRAME = 8
"""Rows per zstd frame (8 x 512 x ~130 slices x 2 bytes ~ 1 MB): a 32x32 ROI touches 5 frames."""


def _volume_file(series_uid: str) -> str:
    return f"{series_uid}.hu.zst"


def save_scan(series_list: list[CtSeries], folder: Path) -> None:
    """Store a patient's series: each int16 volume zstd-compressed (about half the DICOM size,
    a fraction of a second per scan, no pickle) in frames of :data:`ROWS_PER_FRAME` rows, and
    ``scan.json`` with shape, frame offsets, geometry, provenance and the validated annotations."""

    def fill(tmp: Path) -> None:
        manifest = []
        compressor = zstandard.ZstdCompressor(level=VOLUME_ZSTD_LEVEL)
        for series in series_list:
            hu = np.ascontiguousarray(series.hu, dtype=np.int16)
            offsets = [0]
            with open(tmp / _volume_file(series.series_uid), "wb") as handle:
                for row in range(0, hu.shape[0], ROWS_PER_FRAME):
                    frame = compressor.compress(hu[row : row + ROWS_PER_FRAME])
                    handle.write(frame)
                    offsets.append(offsets[-1] + len(frame))
            manifest.append(
                {
                    "patient_id": series.patient_id,
                    "study_uid": series.study_uid,
                    "series_uid": series.series_uid,
                    "shape": list(hu.shape),
                    "rows_per_frame": ROWS_PER_FRAME,
                    "frame_offsets": offsets,
                    "folder": str(series.folder),
                    "spacing_mm": list(series.spacing_mm),
                    "slice_z_mm": series.slice_z_mm.tolist(),
                    "origin_mm": list(series.origin_mm),
                    "sop_uids": list(series.sop_uids),
                    "annotations": annotations_to_dict(series.annotations),
                    "duplicate_slices": [d.to_dict() for d in series.duplicate_slices],
                }
            )
        (tmp / "scan.json").write_text(json.dumps({"format": SCAN_FORMAT, "series": manifest}))

    replace_dir(folder, fill)


class LazyVolume:
    """A stored int16 volume (format 2) read on demand: indexing decompresses only the row frames
    the index touches (cached while the object lives), so a ROI at one nodule costs a few frames
    instead of the whole scan. Read-only and numpy-like: ``shape``, ``dtype``, ``nbytes``, basic
    indexing (``v[r0:r1]``, ``v[i, j, k]``, ...) and ``np.asarray(v)`` (the whole volume).

    The file is opened once, when the object is made, so it keeps reading the scan it was opened
    on even if the artefact is replaced meanwhile (a new file replaces the old one, it does not
    overwrite it)."""

    def __init__(self, path: Path, shape: tuple[int, ...], rows_per_frame: int, offsets: list[int]):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(np.int16)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self._rows_per_frame = int(rows_per_frame)
        self._offsets = _check_frames(self.path, self.shape, self._rows_per_frame, offsets)
        self._frames: dict[int, np.ndarray] = {}
        self._handle = open(self.path, "rb")  # held for the object's lifetime

    def close(self) -> None:
        """Release the file (frames already read stay readable)."""
        self._handle.close()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyVolume({str(self.path)!r}, shape={self.shape}, {len(self._frames)} frame(s) read)"

    def _frame(self, index: int) -> np.ndarray:
        if index not in self._frames:
            lo, hi = self._offsets[index], self._offsets[index + 1]
            self._handle.seek(lo)
            raw = zstandard.ZstdDecompressor().decompress(self._handle.read(hi - lo))
            rows = min(self._rows_per_frame, self.shape[0] - index * self._rows_per_frame)
            if len(raw) != rows * self.nbytes // self.shape[0]:
                raise ValueError(f"{self.path}: frame {index} holds {len(raw)} bytes, not {rows} rows")
            self._frames[index] = np.frombuffer(raw, dtype=np.int16).reshape(-1, *self.shape[1:])
        return self._frames[index]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (clipped to the volume) as a read-only array."""
        start, stop = max(0, int(start)), min(self.shape[0], int(stop))
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)
        n = self._rows_per_frame
        first, last = start // n, (stop - 1) // n
        frames = [self._frame(i) for i in range(first, last + 1)]
        block = frames[0] if len(frames) == 1 else np.concatenate(frames)
        out = block[start - first * n : stop - first * n]
        out.flags.writeable = False
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        head = key[0] if key else slice(None)
        if isinstance(head, (int, np.integer)) and not isinstance(head, bool):
            row = int(head) + self.shape[0] if head < 0 else int(head)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {head} is outside a volume of {self.shape[0]} rows")
            return self.rows(row, row + 1)[(0, *key[1:])]
        if isinstance(head, slice) and head.step in (None, 1):
            start, stop, _ = head.indices(self.shape[0])
            return self.rows(start, stop)[(slice(None), *key[1:])]
        return np.asarray(self)[key]  # anything else (fancy, strided, Ellipsis) reads the whole volume

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.shape[0])
        return np.array(whole, dtype=dtype) if copy or dtype is not None else whole


def _check_frames(path: Path, shape: tuple[int, ...], rows_per_frame: int, offsets: list[int]) -> list[int]:
    """The frame offsets of a format-2 volume, checked against its shape."""
    offsets = [int(o) for o in offsets]
    expected = -(-shape[0] // rows_per_frame) + 1 if rows_per_frame > 0 else -1
    if len(offsets) != expected or any(b < a for a, b in pairwise(offsets)):
        raise ValueError(
            f"{path}: the frame table does not fit a volume of shape {shape} ({rows_per_frame} rows/frame)"
        )
    return offsets


def _read_frames(path: Path, shape: tuple[int, ...], rows_per_frame: int, offsets: list[int]) -> np.ndarray:
    """A format-2 volume, frame by frame into one array (no compressed copy of the whole file)."""
    offsets = _check_frames(path, shape, rows_per_frame, offsets)
    out = np.empty(shape, dtype=np.int16)
    flat = out.reshape(-1).view(np.uint8)
    decompressor = zstandard.ZstdDecompressor()
    position = 0
    with open(path, "rb") as handle:
        for lo, hi in pairwise(offsets):
            handle.seek(lo)
            raw = decompressor.decompress(handle.read(hi - lo))
            flat[position : position + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            position += len(raw)
    if position != out.nbytes:
        raise ValueError(f"{path}: frames hold {position} bytes, a volume of shape {shape} needs {out.nbytes}")
    out.flags.writeable = False
    return out


def _read_volume(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A format-1 volume: one zstd frame."""
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    return np.frombuffer(raw, dtype=np.int16).reshape(shape)


@reads_folder
def open_scan(folder: Path, lazy: bool = False) -> list[CtSeries]:
    """Load what :func:`save_scan` stored (volumes decompressed straight into read-only arrays).

    ``lazy=True`` gives each series a :class:`LazyVolume` instead, which decompresses only the
    rows that are indexed (for readers that need a few slices' neighbourhoods, not the volume);
    scans stored in format 1 have no frames and are read whole either way.
    """
    manifest_path = folder / "scan.json"
    manifest = json.loads(manifest_path.read_text())
    version = manifest.get("format")
    if version not in (1, SCAN_FORMAT):
        raise InputDataError(
            f"stored scan has format {version!r}; this version reads formats 1 and {SCAN_FORMAT}: "
            "materialize lidc_scan again for this patient",
            path=manifest_path,
        )

    def volume(item: dict) -> np.ndarray | LazyVolume:
        path, shape = folder / _volume_file(item["series_uid"]), tuple(item["shape"])
        if version == 1:
            return _read_volume(path, shape)
        if lazy:
            return LazyVolume(path, shape, item["rows_per_frame"], item["frame_offsets"])
        return _read_frames(path, shape, item["rows_per_frame"], item["frame_offsets"])

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
            hu=volume(item),
            duplicate_slices=tuple(DuplicateSlice.from_dict(d) for d in item.get("duplicate_slices", ())),
        )
        for item in manifest["series"]
    ]
