"""Lung masks: synthetic chest phantoms (known truth) and the two real LIDC sample patients."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nodule_pipeline.lidc.lung_mask import (
    label_lungs,
    lung_volume_ml,
    pack_mask,
    segment_lungs,
    unpack_mask,
)
from nodule_pipeline_tests.conftest import SAMPLE_PATIENTS

REAL_PATIENTS = SAMPLE_PATIENTS

# --------------------------------------------------------------------------------------------
# Phantom: a body ellipse with two air-filled lungs, trachea and bronchi, nodules, vessels, bowel
# gas, a hollow table and room air. Geometry in mm around the volume centre, so it can be built
# at any spacing; (y, x, z) = (row, col, slice) directions.

FOV_MM = (240.0, 300.0, 150.0)
LUNG_X_MM = 55.0  # lung centres at x = -55 (right lung, image left) and +55
LUNG_SEMI_MM = (70.0, 40.0, 65.0)
JUXTA_NODULE = ((-5.0, -86.0, 0.0), 12.0)  # centre (y, x, z), radius: on the right lung's wall
INNER_NODULE = ((-5.0, 55.0, 20.0), 6.0)  # inside the left lung
TRACHEA_TOP = ((-20.0, 0.0), 9.0, 20.0)  # (y, x) centre, radius, from z = 20 mm to the top
BOWEL_GAS = ((20.0, 30.0, -68.0), 8.0)  # below the lungs


@dataclass
class Phantom:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    lungs: np.ndarray  # truth: both lungs, with what lies inside them (nodules, vessels)

    def index(self, point_mm: tuple[float, float, float]) -> tuple[int, int, int]:
        """Voxel index of a point given in mm around the volume centre."""
        return tuple(
            int(np.clip(np.floor((p + f / 2) / s), 0, n - 1))
            for p, f, s, n in zip(point_mm, self.fov, self.spacing, self.hu.shape)
        )

    @property
    def fov(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.hu.shape, self.spacing))


def make_phantom(
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    *,
    slices: int | None = None,
    with_lungs: bool = True,
    bridge: bool = False,
    juxta: tuple[tuple[float, float, float], float] = JUXTA_NODULE,
    seed: int = 0,
) -> Phantom:
    """Synthetic chest CT (int16 HU, (rows, cols, slices)) and its true lung mask.

    ``bridge`` adds a strip of aerated lung joining the two lungs (as when they touch at the
    anterior junction). ``slices`` overrides the slice count (centred on the lungs' middle).
    ``juxta`` is the (centre, radius) of the nodule drawn on the pleura.
    """
    shape = [round(f / s) for f, s in zip(FOV_MM, spacing)]
    if slices is not None:
        shape[2] = slices
    fov = [n * s for n, s in zip(shape, spacing)]
    y, x, z = (
        ((np.arange(n, dtype=np.float32) + 0.5) * s - f / 2).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, s, f) in enumerate(zip(shape, spacing, fov))
    )

    def ball(centre: tuple[float, float, float], radius: float) -> np.ndarray:
        return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[(x**2 + y**2 > 150.0**2) & (z == z)] = -2048.0  # outside the reconstruction circle
    body = ((y / 100.0) ** 2 + (x / 135.0) ** 2 <= 1.0) & (z == z)
    hu[body] = 40.0
    hu[((y / 100.0) ** 2 + (x / 135.0) ** 2 <= 1.0) & ((y / 88.0) ** 2 + (x / 123.0) ** 2 > 1.0) & (z == z)] = -100.0
    # A hollow table under the body: a large pocket of enclosed air that is not in the body.
    hu[(np.abs(x) <= 140.0) & (y >= 102.0) & (y <= 119.0) & (z == z)] = 150.0
    hu[(np.abs(x) <= 120.0) & (y >= 104.0) & (y <= 117.0) & (z == z)] = -1000.0

    lungs = np.zeros(shape, dtype=bool)
    if with_lungs:
        sy, sx, sz = LUNG_SEMI_MM
        for side in (-1.0, 1.0):
            lungs |= ((y + 5.0) / sy) ** 2 + ((x - side * LUNG_X_MM) / sx) ** 2 + (z / sz) ** 2 <= 1.0
        if bridge:
            lungs |= (np.abs(x) <= 25.0) & (y >= -40.0) & (y <= -30.0) & (np.abs(z) <= 30.0)
        hu[lungs] = -850.0
        # Vessels: soft-tissue tubes inside each lung, running along z.
        for side in (-1.0, 1.0):
            vessel = ((y - 15.0) ** 2 + (x - side * 60.0) ** 2 <= 2.5**2) & (np.abs(z) <= 40.0)
            hu[vessel] = 40.0
        # Trachea down the midline, then two bronchi into the lungs (air, outside the lungs).
        (ty, tx), tr, tz = TRACHEA_TOP
        airway = ((y - ty) ** 2 + (x - tx) ** 2 <= tr**2) & (z >= tz)
        for side in (-1.0, 1.0):
            a = np.array([ty, tx, tz])
            b = np.array([-10.0, side * 40.0, 5.0])
            t = ((y - a[0]) * (b[0] - a[0]) + (x - a[1]) * (b[1] - a[1]) + (z - a[2]) * (b[2] - a[2])) / np.sum(
                (b - a) ** 2
            )
            t = np.clip(t, 0.0, 1.0)
            d2 = (y - a[0] - t * (b[0] - a[0])) ** 2 + (x - a[1] - t * (b[1] - a[1])) ** 2
            d2 = d2 + (z - a[2] - t * (b[2] - a[2])) ** 2
            airway |= d2 <= 6.0**2
        hu[airway & ~lungs] = -1000.0
        for centre, radius in (juxta, INNER_NODULE):
            hu[ball(centre, radius) & body] = 40.0  # the juxta-pleural one reaches into the wall
    hu[ball(*BOWEL_GAS)] = -1000.0
    rng = np.random.default_rng(seed)
    hu += rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)
    return Phantom(np.clip(np.rint(hu), -2048, 3071).astype(np.int16), tuple(spacing), lungs)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom()


@pytest.fixture(scope="module")
def phantom_mask(phantom: Phantom) -> np.ndarray:
    return segment_lungs(phantom.hu, phantom.spacing)


def test_phantom_has_two_lungs_matching_the_truth(phantom: Phantom, phantom_mask: np.ndarray) -> None:
    assert phantom_mask.shape == phantom.hu.shape and phantom_mask.dtype == bool
    labels, n = label_lungs(phantom_mask)
    assert n == 2
    centres = [np.nonzero(labels == i)[1].mean() * phantom.spacing[1] - phantom.fov[1] / 2 for i in (1, 2)]
    assert sorted(np.sign(centres)) == [-1.0, 1.0]  # one lung on each side of the midline
    truth_ml = lung_volume_ml(phantom.lungs, phantom.spacing)
    for i in (1, 2):
        assert 0.4 * truth_ml <= lung_volume_ml(labels == i, phantom.spacing) <= 0.6 * truth_ml
    assert dice(phantom_mask, phantom.lungs) > 0.95


def test_phantom_nodules_and_vessels_are_inside(phantom: Phantom, phantom_mask: np.ndarray) -> None:
    assert phantom_mask[phantom.index(JUXTA_NODULE[0])], "juxta-pleural nodule centre outside the mask"
    # Nearly all soft tissue inside the true lungs (nodules, vessels) is in the mask; the last
    # few mm against the chest wall, where nodule and wall meet, may go either way.
    inner = ndimage.binary_erosion(phantom.lungs, iterations=2)
    tissue = inner & (phantom.hu > -300)
    found, total = np.count_nonzero(phantom_mask & tissue), np.count_nonzero(tissue)
    assert found >= 0.95 * total, f"only {found} of {total} nodule and vessel voxels in the mask"
    assert phantom_mask[phantom.index(INNER_NODULE[0])]
    assert phantom_mask[phantom.index((15.0, 60.0, 0.0))]  # a vessel


# Nodules on the pleura all around the right lung (centre x = -55 mm, semi-axes 70, 40, 65 mm),
# each sitting 70% of its radius inside the lung: a bite out of the lung's surface.
@pytest.mark.parametrize(
    "juxta",
    [
        ((-5.0, -95.0 + 10.5, 0.0), 15.0),  # 30 mm, on the lateral chest wall
        ((-75.0 + 8.4, -55.0, 0.0), 12.0),  # anterior wall
        ((65.0 - 8.4, -55.0, 0.0), 12.0),  # posterior wall
        ((-5.0, -15.0 - 8.4, 0.0), 12.0),  # mediastinal side
        ((-5.0, -55.0, -65.0 + 8.4), 12.0),  # on the diaphragm
        ((-5.0, -55.0, 65.0 - 7.0), 10.0),  # in the apex
    ],
    ids=["lateral-30mm", "anterior", "posterior", "mediastinal", "diaphragm", "apex"],
)
def test_juxta_pleural_nodules_anywhere_are_inside(juxta: tuple[tuple[float, float, float], float]) -> None:
    ph = make_phantom(juxta=juxta)
    mask = segment_lungs(ph.hu, ph.spacing)
    assert mask[ph.index(juxta[0])]
    assert label_lungs(mask)[1] == 2


def test_phantom_airways_bowel_gas_and_table_are_outside(phantom: Phantom, phantom_mask: np.ndarray) -> None:
    (ty, tx), _, carina_z = TRACHEA_TOP
    for z_mm in (carina_z + 10.0, carina_z + 30.0, carina_z + 50.0):  # trachea above the carina
        assert not phantom_mask[phantom.index((ty, tx, z_mm))]
    assert not phantom_mask[phantom.index(BOWEL_GAS[0])]
    assert not phantom_mask[phantom.index((110.0, 0.0, 0.0))]  # the hollow of the table
    outside_truth = phantom_mask & ~phantom.lungs
    assert lung_volume_ml(outside_truth, phantom.spacing) < 0.03 * lung_volume_ml(phantom.lungs, phantom.spacing)


def test_touching_lungs_are_split_in_two() -> None:
    ph = make_phantom(bridge=True)
    mask = segment_lungs(ph.hu, ph.spacing)
    labels, n = label_lungs(mask)
    assert n == 2
    sizes = sorted(lung_volume_ml(labels == i, ph.spacing) for i in (1, 2))
    assert sizes[0] > 0.8 * sizes[1]
    assert dice(mask, ph.lungs) > 0.9


@pytest.mark.parametrize(
    "spacing",
    [(0.7, 0.7, 2.5), (0.98, 0.98, 1.25), (2.0, 2.0, 5.0), (0.8, 0.6, 3.0)],
    ids=["lidc-0.7mm", "thin-slices", "coarse", "anisotropic"],
)
def test_any_spacing(spacing: tuple[float, float, float]) -> None:
    ph = make_phantom(spacing)
    mask = segment_lungs(ph.hu, ph.spacing)
    assert label_lungs(mask)[1] == 2
    assert dice(mask, ph.lungs) > 0.93
    assert mask[ph.index(JUXTA_NODULE[0])]


@pytest.mark.parametrize("slices", [1, 2, 7])
def test_few_slices(slices: int) -> None:
    ph = make_phantom(slices=slices)
    mask = segment_lungs(ph.hu, ph.spacing)
    assert label_lungs(mask)[1] == 2
    assert dice(mask, ph.lungs) > 0.9


def test_no_lungs_gives_an_empty_mask() -> None:
    ph = make_phantom(with_lungs=False)  # the table's hollow (~0.5 l of air) is no lung either
    assert not segment_lungs(ph.hu, ph.spacing).any()
    assert label_lungs(np.zeros((4, 5, 6), dtype=bool))[1] == 0
    for hu in (
        np.full((30, 40, 5), -1000, dtype=np.int16),  # all air
        np.full((30, 40, 5), 40, dtype=np.int16),  # all tissue
        np.zeros((1, 1, 1), dtype=np.int16),
        np.full((3, 3, 1), -1000, dtype=np.int16),
        np.zeros((0, 10, 3), dtype=np.int16),
    ):
        mask = segment_lungs(hu, (0.7, 0.7, 2.5))
        assert mask.shape == hu.shape and not mask.any()


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="3-D"):
        segment_lungs(np.zeros((10, 10), dtype=np.int16), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        segment_lungs(np.zeros((10, 10, 2), dtype=np.int16), (1.0, 0.0, 1.0))


def test_label_lungs_orders_by_size_and_drops_specks() -> None:
    mask = np.zeros((20, 30, 10), dtype=bool)
    mask[2:10, 2:10, 2:8] = True  # 384 voxels
    mask[2:18, 15:28, 1:9] = True  # 1664 voxels
    mask[19, 0, 0] = True  # a speck
    labels, n = label_lungs(mask)
    assert n == 2
    assert labels[5, 20, 5] == 1 and labels[5, 5, 5] == 2 and labels[19, 0, 0] == 0
    assert labels.shape == mask.shape


def test_lung_volume_ml() -> None:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[:5, :4, :2] = True  # 40 voxels of 0.5 * 0.5 * 2.5 mm^3
    assert lung_volume_ml(mask, (0.5, 0.5, 2.5)) == pytest.approx(40 * 0.625 / 1000)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (13, 1, 9), (512, 512, 3), (0, 4, 2), (7,)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == (mask.size + 7) // 8
    back = unpack_mask(packed, shape)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


def test_pack_unpack_of_a_segmentation(phantom_mask: np.ndarray) -> None:
    packed = pack_mask(phantom_mask)
    assert packed.nbytes * 8 >= phantom_mask.size > (packed.nbytes - 1) * 8
    np.testing.assert_array_equal(unpack_mask(packed, phantom_mask.shape), phantom_mask)
    np.testing.assert_array_equal(unpack_mask(packed.tolist(), list(phantom_mask.shape)), phantom_mask)


def test_unpack_rejects_a_wrong_shape() -> None:
    packed = pack_mask(np.ones((3, 5, 7), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        unpack_mask(packed, (3, 5, 9))


# --------------------------------------------------------------------------------------------
# Real LIDC sample


@dataclass
class RealScan:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    centroids: list[np.ndarray]  # (row, col, slice) of every reader annotation
    load_s: float


@pytest.fixture(scope="module")
def real_scans(lidc_sample: Path) -> dict[str, RealScan]:
    from nodule_pipeline.lidc.pylidc_compat import pylidc_dicom_root

    scans = {}
    with pylidc_dicom_root(lidc_sample) as pl:
        for patient_id in REAL_PATIENTS:
            scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).first()
            start = time.perf_counter()
            hu = scan.to_volume(verbose=False)  # int16 Hounsfield units, slices in ascending z
            load_s = time.perf_counter() - start
            spacing = (float(scan.pixel_spacing), float(scan.pixel_spacing), float(scan.slice_spacing))
            centroids = [np.asarray(ann.centroid) for ann in scan.annotations]
            scans[patient_id] = RealScan(hu, spacing, centroids, load_s)
    return scans


@pytest.fixture(scope="module")
def real_masks(real_scans: dict[str, RealScan]) -> dict[str, np.ndarray]:
    return {pid: segment_lungs(s.hu, s.spacing) for pid, s in real_scans.items()}


@pytest.mark.parametrize("patient_id", REAL_PATIENTS)
def test_real_volume_is_hu(real_scans: dict[str, RealScan], patient_id: str) -> None:
    scan = real_scans[patient_id]
    assert scan.hu.dtype == np.int16 and scan.hu.ndim == 3
    assert np.median(scan.hu[:20, :20, :]) < -900  # room air / padding in the corner
    assert len(scan.centroids) > 0


@pytest.mark.parametrize("patient_id", REAL_PATIENTS)
def test_real_lungs_volume_and_count(
    real_scans: dict[str, RealScan], real_masks: dict[str, np.ndarray], patient_id: str
) -> None:
    scan, mask = real_scans[patient_id], real_masks[patient_id]
    assert mask.shape == scan.hu.shape
    total = lung_volume_ml(mask, scan.spacing)
    assert 2000.0 <= total <= 8000.0
    labels, n = label_lungs(mask)
    assert n == 2
    for i in (1, 2):
        assert lung_volume_ml(labels == i, scan.spacing) >= 0.3 * total
    # Left and right: the two lungs lie side by side, not one above the other.
    centres_mm = [np.nonzero(labels == i)[1].mean() * scan.spacing[1] for i in (1, 2)]
    assert abs(centres_mm[0] - centres_mm[1]) > 80.0


@pytest.mark.parametrize("patient_id", REAL_PATIENTS)
def test_real_nodule_centroids_are_in_the_lungs(
    real_scans: dict[str, RealScan], real_masks: dict[str, np.ndarray], patient_id: str
) -> None:
    scan, mask = real_scans[patient_id], real_masks[patient_id]
    outside = [c.round(1).tolist() for c in scan.centroids if not mask[tuple(np.rint(c).astype(int))]]
    assert not outside, f"annotated nodule centroids outside the lung mask: {outside}"


@pytest.mark.parametrize("patient_id", REAL_PATIENTS)
def test_real_mask_is_aerated_lung(
    real_scans: dict[str, RealScan], real_masks: dict[str, np.ndarray], patient_id: str
) -> None:
    scan, mask = real_scans[patient_id], real_masks[patient_id]
    assert float(scan.hu[mask].mean()) < -500.0
    # Above the apices only the trachea is on the midline (it joins the lungs lower down, through
    # the bronchi): no lung there in the top slices.
    middle = mask.shape[1] // 2
    assert not mask[:, middle - 20 : middle + 20, -8:].any(), "trachea in the lung mask"


def test_real_segmentation_cost(real_scans: dict[str, RealScan]) -> None:
    """Well under the cost of loading the scan, and a small multiple of the volume in memory."""
    for scan in real_scans.values():
        start = time.perf_counter()
        segment_lungs(scan.hu, scan.spacing)
        elapsed = time.perf_counter() - start
        assert elapsed < max(3.0 * scan.load_s, 10.0)
        tracemalloc.start()
        try:
            segment_lungs(scan.hu, scan.spacing)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.5 * scan.hu.nbytes
