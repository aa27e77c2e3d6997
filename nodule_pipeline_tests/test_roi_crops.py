"""The one ROI cut of ingestion and queries (``roi_at``) on a slice of known geometry: lung at
-850 HU, a chest wall at 40 HU, a juxta-pleural nodule at 30 HU that the lung mask stops short
of, and a rib the crop window reaches but that touches nothing."""

from __future__ import annotations

import numpy as np

from nodule_pipeline.lidc.rois import AIR_HU, RoiSettings, roi_at

LUNG, WALL, NODULE, RIB = -850, 40, 30, 300
CENTRE = (32, 37)  # the nodule's centre; the crop covers rows 16..47, columns 21..52
WALL_FROM = 40  # first column of the chest wall


def _slice() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One-slice volume and where each structure is, as (64, 64) masks."""
    rows, cols = np.mgrid[:64, :64]
    regions = {
        "wall": cols >= WALL_FROM,
        "nodule": ((rows - CENTRE[0]) ** 2 + (cols - CENTRE[1]) ** 2 <= 25) & (cols < WALL_FROM),
        "rib": (rows >= 18) & (rows <= 20) & (cols >= 24) & (cols <= 26),
    }
    hu = np.full((64, 64), LUNG, dtype=np.int16)
    for name, value in (("wall", WALL), ("nodule", NODULE), ("rib", RIB)):
        hu[regions[name]] = value
    regions["lung"] = hu == LUNG  # the mask stops short of the nodule, as at the pleura
    return hu[:, :, None], regions


def _window(mask: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    return mask[centre[0] - 16 : centre[0] + 16, centre[1] - 16 : centre[1] + 16]


def test_a_nodule_the_lung_mask_misses_keeps_the_tissue_touching_it() -> None:
    hu, regions = _slice()
    roi = roi_at(hu, regions["lung"][:, :, None], (*CENTRE, 0))
    expected = np.full((32, 32), AIR_HU, dtype=np.float32)
    for name, value in (("lung", LUNG), ("nodule", NODULE), ("wall", WALL)):
        expected[_window(regions[name], CENTRE)] = value  # the rib is dense but touches neither: air
    assert roi.dtype == np.float32 and np.array_equal(roi, expected)


def test_the_centre_is_kept_even_fainter_than_soft_tissue() -> None:
    """A faint centre (ground glass) outside the mask still reads its own HU, and the dense rim
    around it is kept with it."""
    hu, regions = _slice()
    hu[(*CENTRE, 0)] = -650
    roi = roi_at(hu, regions["lung"][:, :, None], (*CENTRE, 0))
    assert roi[16, 16] == -650
    nodule = _window(regions["nodule"], CENTRE).copy()
    nodule[16, 16] = False
    assert (roi[nodule] == NODULE).all()


def test_a_centre_in_the_lung_keeps_the_lung_only() -> None:
    """The paper's rule where the mask holds the centre: the rib reads as air like everything
    outside the lung, and so do the columns the window runs off the image."""
    hu, regions = _slice()
    roi = roi_at(hu, regions["lung"][:, :, None], (32, 12, 0))  # window: rows 16..47, columns -4..27
    expected = np.full((32, 32), AIR_HU, dtype=np.float32)
    expected[:, 4:][regions["lung"][16:48, :28]] = LUNG
    assert np.array_equal(roi, expected)
    assert (hu[18:21, 24:27, 0] == RIB).all() and (roi[2:5, 28:31] == AIR_HU).all()


def test_without_masking_the_crop_is_the_raw_window() -> None:
    hu, regions = _slice()
    roi = roi_at(hu, regions["lung"][:, :, None], (*CENTRE, 0), RoiSettings(mask_outside_lung=False))
    assert np.array_equal(roi, _window(hu[:, :, 0], CENTRE).astype(np.float32))
