"""Similar-nodule search for people: load a model and its index, answer a query ROI or a nodule
in a DICOM series, with the same ROI cut as ingestion.

    searcher = NoduleSearcher.from_data_dir(Path("data"))
    response = searcher.search_dicom(Path(".../series"), voxel=(row, col, slice), k=10)
    for hit in response.hits: print(hit.rank, hit.nodule_id, hit.label, hit.hamming)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.index import HashIndex, load_index, read_manifest
from nodule_pipeline.hashing.search import SearchHit, search
from nodule_pipeline.hashing.training import TrainedModel, encode, load_model, read_model_card
from nodule_pipeline.lidc.lung_mask import segment_lungs
from nodule_pipeline.lidc.rois import query_roi_at
from nodule_pipeline.lidc.series import load_series
from nodule_pipeline.pictures import LUNG_WINDOW
from nodule_pipeline.roi_table import ROI_SIZE
from nodule_pipeline.storage import artefact_folder, artefacts_dir, model_version_folder

MODES = ("hierarchical", "hamming", "rerank")


@dataclass
class SearchResponse:
    """The query as the network saw it, what the network thinks of it, and the hits."""

    query_image: np.ndarray
    predicted_class: int
    malignant_probability: float
    hits: list[SearchHit]

    def as_text(self, index_version: str) -> str:
        """The results as a small table for a terminal."""
        verdict = "malignant" if self.predicted_class else "benign"
        lines = [
            f"query predicted {verdict} (p malignant {self.malignant_probability:.2f}); index {index_version}",
            f"{'rank':>4}  {'patient':<16} {'nodule':<22} {'label':<9} {'malig.':>6} {'hamming':>7} {'euclid.':>8}",
        ]
        for hit in self.hits:
            malignancy = f"{hit.malignancy:.1f}" if hit.malignancy is not None else "-"
            euclidean = f"{hit.euclidean:.3f}" if hit.euclidean is not None else "-"
            label = "malignant" if hit.label else "benign"
            lines.append(
                f"{hit.rank:>4}  {hit.patient_id:<16} {hit.nodule_id:<22} {label:<9} {malignancy:>6} "
                f"{hit.hamming:>7} {euclidean:>8}"
            )
        return "\n".join(lines)


def check_query_image(image: np.ndarray, source: str) -> np.ndarray:
    """A 32x32 finite ROI (also accepts 1024 flat values); anything else is a clear error."""
    array = np.asarray(image)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputDataError(f"query ROI must be numeric, got {array.dtype}", path=source)
    if array.size == ROI_SIZE * ROI_SIZE:
        array = array.reshape(ROI_SIZE, ROI_SIZE)
    if array.shape != (ROI_SIZE, ROI_SIZE):
        raise InputDataError(f"query ROI must be {ROI_SIZE}x{ROI_SIZE}, got shape {array.shape}", path=source)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputDataError("query ROI holds NaN or infinite values", path=source)
    return array


def load_query_roi(path: Path) -> np.ndarray:
    """A query ROI from a file: ``.npy`` in Hounsfield units, or a grey PNG read as the lung window
    of the project's pictures (level -600, width 1500 HU) and mapped back to HU."""
    if not path.is_file():
        raise InputDataError("query file not found", path=path)
    if path.stat().st_size == 0:
        raise InputDataError("query file is empty", path=path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise InputDataError(f"not a readable .npy array ({error})", path=path) from None
        return check_query_image(array, str(path))
    if path.suffix.lower() == ".png":
        try:
            with Image.open(path) as picture:
                grey = np.asarray(picture.convert("L"), dtype=np.float32)
        except (OSError, ValueError) as error:
            raise InputDataError(f"not a readable PNG image ({error})", path=path) from None
        level, width = LUNG_WINDOW
        return check_query_image(grey / 255.0 * width + (level - width / 2), str(path))
    raise InputDataError("query ROI must be a .npy array (HU) or a .png picture", path=path)


class NoduleSearcher:
    """A trained hashing model and the index built with it."""

    def __init__(self, model: TrainedModel, index: HashIndex, model_version: str):
        if index.model_version != model_version:
            raise InputDataError(
                f"the index was built with model {index.model_version} but the model is {model_version}: "
                "materialize hash_index again"
            )
        self.model, self.index, self.model_version = model, index, model_version

    @classmethod
    def from_paths(cls, model_dir: Path, index_dir: Path) -> NoduleSearcher:
        for what, folder in (("model", model_dir), ("index", index_dir)):
            if not folder.is_dir():
                raise InputDataError(f"no hash {what} here (materialize hash_model and hash_index first)", path=folder)
        card = read_model_card(model_dir).get("card", {})
        return cls(load_model(model_dir), load_index(index_dir), str(card.get("model_version", "")))

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> NoduleSearcher:
        base = artefacts_dir(data_dir.resolve())
        index_dir = artefact_folder(base, ["hash_index"])
        model_dir = artefact_folder(base, ["hash_model"])
        if index_dir.is_dir():  # the exact model that encoded the index, even if a newer one exists
            versioned = model_version_folder(base, read_manifest(index_dir)["model_version"])
            model_dir = versioned if versioned.is_dir() else model_dir
        return cls.from_paths(model_dir, index_dir)

    def search_roi(
        self,
        image: np.ndarray,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patient: str | None = None,
        source: str = "query",
    ) -> SearchResponse:
        """The k most similar database nodules to a 32x32 ROI (Hounsfield units, like the database)."""
        if mode not in MODES:
            raise InputDataError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if k < 1:
            raise InputDataError(f"k must be at least 1, got {k}")
        roi = check_query_image(image, source)
        encoded = encode(self.model, roi[None])
        predicted = int(encoded.predicted[0])
        hits = search(
            self.index,
            encoded.codes[0],
            encoded.fc[0],
            predicted,
            k=k,
            mode=mode,
            exclude_patient=exclude_patient,
        )
        return SearchResponse(roi, predicted, float(encoded.probs[0, 1]), hits)

    def search_dicom(
        self,
        series_dir: Path,
        voxel: tuple[int, int, int] | None = None,
        position_mm: tuple[float, float, float] | None = None,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patient: str | None = None,
    ) -> SearchResponse:
        """Cut the ROI at a nodule of a DICOM series (voxel (row, col, slice) or patient mm) the
        way ingestion does, then search with it."""
        if (voxel is None) == (position_mm is None):
            raise InputDataError("give the nodule position either as a voxel or in patient mm")
        patient_id = series_dir.parent.parent.name if series_dir.parent.parent.name else "query"
        series = load_series(series_dir, patient_id)
        centre = series.check_voxel(voxel) if voxel is not None else series.voxel_at_mm(*position_mm)
        lungs = segment_lungs(series.hu, series.spacing_mm)
        image = query_roi_at(series.hu, lungs, centre)
        return self.search_roi(image, k, mode, exclude_patient, source=str(series_dir))
