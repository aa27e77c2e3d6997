"""Nodule ROIs: one 32x32 crop per reader annotation at the nodule's central slice.

The paper's unit is one ROI per radiologist annotation with malignancy != 3 (1-2 benign,
4-5 malignant), cropped from the lung parenchyma region. Each row also carries the nodule it
belongs to (annotations clustered as pylidc does) and the readers' consensus, so retrieval can
be judged per nodule as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.distance import pdist
from skimage.draw import polygon

from nodule_pipeline.lidc.annotations import (
    CHARACTERISTICS,
    Annotation,
    cluster_annotations,
)
from nodule_pipeline.lidc.series import CtSeries

AIR_HU = -1024
SOFT_TISSUE_HU = -600
INDETERMINATE = 3


@dataclass(frozen=True)
class RoiSettings:
    """How ROIs are cut. ``mask_outside_lung`` follows the paper: only the lung (and a nodule
    the lung mask stops short of, see :func:`roi_at`) is kept, everything else reads as air."""

    size: int = 32
    mask_outside_lung: bool = True


def malignancy_label(rating: float) -> int:
    """Binary label of a malignancy rating: 0 benign (< 3), 1 malignant (> 3), -1 indeterminate."""
    return 0 if rating < INDETERMINATE else (1 if rating > INDETERMINATE else -1)


def annotation_mask_slices(
    annotation: Annotation, slice_z_mm: np.ndarray, shape: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Filled outline per slice index (inclusion contours added, exclusion contours cut out)."""
    masks: dict[int, np.ndarray] = {}
    for contour in sorted(annotation.contours, key=lambda c: not c.inclusion):
        k = int(np.abs(slice_z_mm - contour.z_mm).argmin())
        mask = masks.setdefault(k, np.zeros(shape, dtype=bool))
        rr, cc = polygon(contour.points[:, 0], contour.points[:, 1], shape)
        region = np.zeros(shape, dtype=bool)
        region[rr, cc] = True
        region[
            contour.points[:, 0].clip(0, shape[0] - 1),
            contour.points[:, 1].clip(0, shape[1] - 1),
        ] = True
        if contour.inclusion:
            mask |= region
        else:
            mask &= ~region
    return masks


def nodule_centre(masks: dict[int, np.ndarray]) -> tuple[int, int, int]:
    """(row, col, slice) of the annotation's centre: its centre of mass, snapped onto the
    outline's own pixels so the centre always lies inside the nodule (crescents, rings)."""
    slices = sorted(k for k, m in masks.items() if m.any())
    if not slices:  # degenerate outline: fall back to any slice
        slices = sorted(masks)
    areas = np.array([masks[k].sum() for k in slices], dtype=float)
    k_mean = float(np.average(slices, weights=areas)) if areas.sum() else float(np.mean(slices))
    k = min(slices, key=lambda s: (abs(s - k_mean), s))
    rows, cols = np.nonzero(masks[k])
    if len(rows) == 0:
        return 0, 0, k
    i, j = rows.mean(), cols.mean()
    nearest = int(np.argmin((rows - i) ** 2 + (cols - j) ** 2))
    return int(rows[nearest]), int(cols[nearest]), k


def crop(image: np.ndarray, centre: tuple[int, int], size: int, fill: float) -> np.ndarray:
    """``size`` x ``size`` window centred on ``centre``; outside the image reads ``fill``."""
    half = size // 2
    out = np.full((size, size), fill, dtype=np.float32)
    r0, c0 = centre[0] - half, centre[1] - half
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + size, image.shape[0]), min(c0 + size, image.shape[1])
    out[rs - r0 : re - r0, cs - c0 : ce - c0] = image[rs:re, cs:ce]
    return out


def roi_at(
    hu: np.ndarray, lung_mask: np.ndarray, centre: tuple[int, int, int], settings: RoiSettings = RoiSettings()
) -> np.ndarray:
    """The ROI centred on voxel ``centre`` = (row, col, slice): the one cut of ingestion and of
    queries, so a query at a database nodule's centre gives its database crop pixel for pixel.

    It reads only what a query has, the scan and its lung mask, never a reader's outline: an
    outline would shape database crops in a way no query can repeat, and the model is trained on
    the crops it is later asked about. With ``mask_outside_lung`` the lung is kept and the rest
    reads as air; where the mask stops short of the centre (a juxta-pleural nodule) the tissue
    denser than the lung that touches the centre is kept too, and the centre always is. Only the
    crop's rows and columns are read, so a lazily stored volume decompresses a few frames.
    """
    i, j, k = centre
    half = settings.size // 2
    r0, c0 = max(i - half, 0), max(j - half, 0)
    rows, cols = slice(r0, i - half + settings.size), slice(c0, j - half + settings.size)
    window = np.asarray(hu[rows, cols, k])
    local = (i - r0, j - c0)
    if settings.mask_outside_lung:
        keep = np.asarray(lung_mask[rows, cols, k])
        if not keep[local]:
            dense = window > SOFT_TISSUE_HU
            dense[local] = True
            labels, _ = ndimage.label(dense)
            keep = keep | (labels == labels[local])
        window = np.where(keep, window, AIR_HU)
    return crop(window, local, settings.size, AIR_HU)


def _diameter_mm(annotation: Annotation, spacing_mm: tuple[float, float, float]) -> float:
    """Largest in-plane distance between outline points on any slice (pylidc's diameter)."""
    scale = np.array(spacing_mm[:2])
    best = 0.0
    for contour in annotation.contours:
        if contour.inclusion and len(contour.points) > 1:
            best = max(best, float(pdist(contour.points * scale).max()))
    return best


def extract_rois(
    series: CtSeries,
    lung_mask: np.ndarray,
    first_nodule_number: int = 1,
    settings: RoiSettings = RoiSettings(),
) -> tuple[pd.DataFrame, dict[str, int]]:
    """ROI rows of one series (ROI-table contract, DESIGN.md section 6) and kept/dropped counts.

    Nodules are numbered from ``first_nodule_number`` so a patient with two series keeps
    unique nodule ids.
    """
    annotations = series.annotations.annotations
    groups = cluster_annotations(annotations, series.slice_z_mm, tolerance=series.spacing_mm[2])
    rows: list[dict] = []
    counts = {
        "annotations": len(annotations),
        "kept": 0,
        "dropped_indeterminate": 0,
        "nodules": len(groups),
    }
    plane = series.hu.shape[:2]
    for number, group in enumerate(groups, start=first_nodule_number):
        members = [annotations[i] for i in group]
        ratings = [a.malignancy for a in members]
        nodule_mean = float(np.mean(ratings))
        for annotation in members:
            if annotation.malignancy == INDETERMINATE:
                counts["dropped_indeterminate"] += 1
                continue
            masks = annotation_mask_slices(annotation, series.slice_z_mm, plane)
            i, j, k = nodule_centre(masks)
            nodule_here = masks.get(k, np.zeros(plane, dtype=bool))
            lung_here = lung_mask[:, :, k]
            image = roi_at(series.hu, lung_mask, (i, j, k), settings)
            nodule_pixels = max(int(nodule_here.sum()), 1)
            rows.append(
                {
                    "patient_id": series.patient_id,
                    "nodule_id": f"{series.patient_id}-N{number:02d}",
                    "label": np.int8(malignancy_label(annotation.malignancy)),
                    "image": image.reshape(-1),
                    "malignancy": float(annotation.malignancy),
                    "annotation_id": annotation.annotation_id,
                    "reader": annotation.reader,
                    "study_uid": series.study_uid,
                    "series_uid": series.series_uid,
                    "center_i": i,
                    "center_j": j,
                    "center_k": k,
                    "center_z_mm": float(series.slice_z_mm[k]),
                    **{name: annotation.characteristics[name] for name in CHARACTERISTICS if name != "malignancy"},
                    "diameter_mm": _diameter_mm(annotation, series.spacing_mm),
                    "lung_overlap": float((nodule_here & lung_here).sum() / nodule_pixels),
                    "nodule_readers": len(members),
                    "nodule_malignancy_mean": nodule_mean,
                    "nodule_label": np.int8(malignancy_label(nodule_mean)),
                }
            )
            counts["kept"] += 1
    return pd.DataFrame(rows), counts


@dataclass(frozen=True)
class AnnotationAccount:
    """How a patient's ROI table accounts for the readers' rated annotations in its scans."""

    rated: int
    indeterminate: int
    rois: int
    without_roi: tuple[str, ...]
    """Annotation ids rated 1, 2, 4 or 5 that have no ROI row."""
    unexplained_rois: tuple[str, ...]
    """Annotation ids of ROI rows that no such annotation has."""

    @property
    def balanced(self) -> bool:
        """ROIs kept + rated-3 annotations dropped = rated annotations, one ROI per annotation."""
        return self.rois + self.indeterminate == self.rated and not self.without_roi and not self.unexplained_rois


def account_for_annotations(series_list: Sequence[CtSeries], rois: pd.DataFrame) -> AnnotationAccount:
    """Match a ROI table against the annotations of the series it was cut from."""
    annotations = [a for series in series_list for a in series.annotations.annotations]
    wanted = {a.annotation_id for a in annotations if a.malignancy != INDETERMINATE}
    held = set(rois["annotation_id"].astype(str)) if len(rois) else set()
    return AnnotationAccount(
        rated=len(annotations),
        indeterminate=sum(a.malignancy == INDETERMINATE for a in annotations),
        rois=len(rois),
        without_roi=tuple(sorted(wanted - held)),
        unexplained_rois=tuple(sorted(held - wanted)),
    )


def centres_outside(
    rois: pd.DataFrame, series_list: Sequence[CtSeries], lung_masks: dict[str, np.ndarray]
) -> list[str]:
    """Annotation ids of ROI rows whose centre voxel lies neither in the lung mask nor in the
    reader's outline on the ROI's slice (or outside the volume, or in no known series)."""
    found = {(s.series_uid, a.annotation_id): (s, a) for s in series_list for a in s.annotations.annotations}
    outside = []
    for row in rois.itertuples(index=False):
        series, annotation = found.get((row.series_uid, row.annotation_id), (None, None))
        voxel = (int(row.center_i), int(row.center_j), int(row.center_k))
        if series is None or not all(0 <= v < n for v, n in zip(voxel, series.shape)):
            outside.append(row.annotation_id)
            continue
        i, j, k = voxel
        if lung_masks[series.series_uid][i, j, k]:
            continue
        outline = annotation_mask_slices(annotation, series.slice_z_mm, series.shape[:2]).get(k)
        if outline is None or not outline[i, j]:
            outside.append(row.annotation_id)
    return outside
