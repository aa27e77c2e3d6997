"""Warnings for a query that may be no nodule: the search answers anything it is given, so a
click on air, an image that is not in Hounsfield units, or a picture unlike every library nodule
must say so beside its hits instead of looking like a diagnosis.

Each rule was set on the real LIDC nodules (1,733 crops, one per nodule) so that real nodules do
not trip it: the centre rule flags 1 of them (a reader's outline centred in aerated lung), the HU
rules none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nodule_pipeline.hashing.index import HashIndex
from nodule_pipeline.hashing.search import search_batch

TISSUE_HU = -800.0
"""Denser than this is tissue (solid or ground-glass); aerated lung is about -850 HU, air -1000."""
CENTRE_RADIUS = 3.5
"""The centre a nodule query must hold tissue in, in pixels (2.5 mm at LIDC's 0.7 mm pixels)."""
FAR_PERCENTILE = 99.0
"""A query farther from its nearest hit than this percentile of the library's own nodules is far."""
REFERENCE_SAMPLE = 1000
"""Library nodules searched (each without its own patient) to set the far threshold."""


@dataclass(frozen=True)
class QueryWarning:
    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _centre_disc(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= CENTRE_RADIUS**2


def image_warnings(roi: np.ndarray) -> list[QueryWarning]:
    """What the ROI itself says: values that are not HU, or no tissue at its centre."""
    low, high = float(roi.min()), float(roi.max())
    if -1.0 <= low and high <= 2.0:
        return [
            QueryWarning(
                "not_hu",
                f"the values lie between {low:g} and {high:g}: a normalised image, not Hounsfield units "
                "(the library is in HU; a lung-window PNG is converted when sent as a .png file)",
            )
        ]
    if low >= 0 and high <= 255 and np.all(np.mod(roi, 1) == 0) and high - low > 0:
        return [
            QueryWarning(
                "not_hu",
                f"the values are whole numbers from {low:g} to {high:g} and none is negative: 8-bit grey levels, "
                "not Hounsfield units (a lung nodule's crop holds aerated lung below -400 HU)",
            )
        ]
    densest = float(roi[_centre_disc(roi.shape[0])].max())
    if densest <= TISSUE_HU:
        return [
            QueryWarning(
                "no_tissue",
                f"no tissue at the centre of the ROI (its densest pixel there is {densest:g} HU, below "
                f"{TISSUE_HU:g}): the query looks like air or aerated lung, not a nodule",
            )
        ]
    return []


def nearest_in_library(
    index: HashIndex, codes: np.ndarray, fc: np.ndarray, exclude_patients: Sequence[str | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest library item as the far rule measures it, for a user's query and for
    the library's own nodules alike: rerank mode (the Hamming pool re-ranked by feature distance),
    k=1, every class, whatever mode the user searches in. Its Hamming and Euclidean distances."""
    result = search_batch(index, codes, fc, None, k=1, mode="rerank", exclude_patients=exclude_patients)
    return result.hamming[:, 0], result.euclidean[:, 0]


def distance_warnings(
    index: HashIndex, codes: np.ndarray, fc: np.ndarray, exclude_patient: str | None = None
) -> list[QueryWarning]:
    """A query (one code, one ``fc``) farther from its nearest library nodule than the library's
    own nodules are from theirs (the index's stored ``query_reference``)."""
    reference = index.lineage.get("query_reference")
    if not reference:
        return []
    hamming, euclidean = nearest_in_library(index, codes[None], fc[None], [exclude_patient])
    if hamming[0] < 0:
        return []  # nothing to compare with (every item is the query's own patient)
    if np.isfinite(euclidean[0]) and "nearest_euclidean" in reference:
        distance, limit, what = float(euclidean[0]), reference["nearest_euclidean"], "feature (Euclidean) distance"
    else:
        distance, limit, what = float(hamming[0]), reference["nearest_hamming"], "Hamming distance"
    if distance <= limit:
        return []
    return [
        QueryWarning(
            "far_from_library",
            f"the nearest library nodule is at {what} {distance:.4g}, farther than {FAR_PERCENTILE:g}% of the "
            f"library's own nodules are from theirs ({limit:.4g}): nothing in the library looks like this query",
        )
    ]


def outside_lungs_warning(in_lungs: bool) -> list[QueryWarning]:
    if in_lungs:
        return []
    return [
        QueryWarning(
            "outside_lungs",
            "the position is outside the segmented lungs: check that it is on the nodule "
            "(a nodule against the chest wall may still be right)",
        )
    ]


def library_reference(
    nearest_hamming: Sequence[int] | np.ndarray, nearest_euclidean: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """The far thresholds from library nodules searched as queries (each without its own
    patient): the :data:`FAR_PERCENTILE` of their nearest hit's distances."""
    hamming = np.asarray(nearest_hamming, dtype=np.float64)
    euclidean = np.asarray(nearest_euclidean, dtype=np.float64)
    hamming, euclidean = hamming[hamming >= 0], euclidean[np.isfinite(euclidean)]
    if not len(hamming):
        return {}
    reference: dict[str, Any] = {
        "percentile": FAR_PERCENTILE,
        "sampled": len(hamming),
        "nearest_hamming": float(np.percentile(hamming, FAR_PERCENTILE)),
    }
    if len(euclidean):
        reference["nearest_euclidean"] = float(np.percentile(euclidean, FAR_PERCENTILE))
    return reference


def reference_from_index(index: HashIndex, sample: int = REFERENCE_SAMPLE, seed: int = 0) -> dict[str, Any]:
    """:func:`library_reference` for a built index: up to ``sample`` of its items (seeded) searched
    for their :func:`nearest_in_library` with their own stored codes and features, their own
    patient left out."""
    if len(index) < 2:
        return {}
    rows = np.sort(np.random.default_rng(seed).permutation(len(index))[:sample])
    patients = index.items["patient_id"].astype(str).to_numpy()[rows].tolist()
    fc = np.asarray(index.fc[rows], dtype=np.float32)
    return library_reference(*nearest_in_library(index, np.asarray(index.codes[rows]), fc, patients))
