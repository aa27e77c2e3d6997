"""Similar-nodule search for people: load a model and its index, answer a query ROI or a nodule
in a DICOM series, with the same ROI cut as ingestion.

    searcher = NoduleSearcher.from_data_dir(Path("data"))
    response = searcher.search_dicom(Path(".../series"), voxel=(row, col, slice), k=10)
    for hit in response.hits: print(hit.rank, hit.nodule_id, hit.label, hit.hamming)
"""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from nodule_pipeline import privacy
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.characteristics import most_likely
from nodule_pipeline.hashing.codes import Encoded
from nodule_pipeline.hashing.index import HashIndex, load_index, read_manifest
from nodule_pipeline.hashing.model_files import read_model_card
from nodule_pipeline.hashing.query_checks import QueryWarning, distance_warnings, image_warnings, outside_lungs_warning
from nodule_pipeline.hashing.search import (
    TIE_KEY_COLUMNS,
    BatchResult,
    SearchHit,
    fold_batch,
    fold_hits,
    nodule_of_rows,
    rows_for_nodules,
    search,
    search_batch,
)
from nodule_pipeline.lidc.diagnosis import diagnosis_json
from nodule_pipeline.lidc.lung_mask import segment_lungs
from nodule_pipeline.lidc.rois import roi_at
from nodule_pipeline.lidc.series import CtSeries, load_series
from nodule_pipeline.pictures import LUNG_WINDOW
from nodule_pipeline.roi_table import ROI_SIZE
from nodule_pipeline.storage import (
    TABLE_FILE,
    artefact_folder,
    artefacts_dir,
    model_version_folder,
    roi_dataset_file,
)

MODES = ("hierarchical", "hamming", "rerank")
UNITS = ("nodule", "annotation")
"""What a hit is: a nodule (its reader annotations folded into one hit, where its best one
stands), or, as the paper counts, each reader annotation on its own."""
MAX_K = 1000
"""The most hits one query may ask for (a library smaller than k answers all it holds): a
person reads ten, an evaluation a hundred, and no request can make the server allocate more."""


@dataclass
class SearchResponse:
    """The query as the network saw it, what the network thinks of it, and the hits."""

    query_image: np.ndarray
    predicted_class: int
    malignant_probability: float
    hits: list[SearchHit]
    unit: str = "nodule"
    warnings: list[QueryWarning] = field(default_factory=list)
    """Why the query may be no nodule (air, not HU, unlike the whole library); empty when all is well."""
    predicted_ratings: dict[str, int] | None = None
    """The ratings the readers most likely gave the query, as the model predicts them (None for
    a model without a rating head): what the hierarchical search ordered the hits by."""

    def as_text(self, index_version: str, diagnoses: dict[str, dict[str, str] | None] | None = None) -> str:
        """The results as a small table for a terminal: the readers' label and rating (suspicion),
        and the confirmed diagnosis where TCIA's sheet gives one."""
        verdict = "malignant" if self.predicted_class else "benign"
        lines = [
            f"query predicted {verdict} (p malignant {self.malignant_probability:.2f}); index {index_version}",
            f"{'rank':>4}  {'patient':<16} {'nodule':<22} {'readers':<9} {'malig.':>6} {'hamming':>7} {'euclid.':>8}"
            f" {'ratings':>7}  confirmed",
        ]
        for hit in self.hits:
            malignancy = f"{hit.malignancy:g}" if hit.malignancy is not None else "-"
            euclidean = f"{hit.euclidean:.3f}" if hit.euclidean is not None else "-"
            rating_gap = f"{hit.rating_distance:.3f}" if hit.rating_distance is not None else "-"
            label = "malignant" if hit.label else "benign"
            confirmed = (diagnoses or {}).get(hit.nodule_id)
            lines.append(
                f"{hit.rank:>4}  {hit.patient_id:<16} {hit.nodule_id:<22} {label:<9} {malignancy:>6} "
                f"{hit.hamming:>7} {euclidean:>8} {rating_gap:>7}  {confirmed_text(confirmed)}"
            )
        if self.predicted_ratings:  # after the table, which keeps its place for scripts that read it
            rated = ", ".join(f"{name} {value}" for name, value in self.predicted_ratings.items())
            lines.append(f"readers would likely rate the query: {rated}")
        return "\n".join(lines)


def confirmed_text(diagnosis: dict[str, str] | None) -> str:
    """A confirmed diagnosis in words, "primary lung cancer (biopsy)", with "(patient's)" when the
    sheet's diagnosis is the patient's rather than this nodule's; "-" when unknown."""
    if diagnosis is None:
        return "-"
    whose = ", patient's" if diagnosis["level"] == "patient" else ""
    return f"{diagnosis['value']} ({diagnosis['method']}{whose})"


def check_query_image(image: np.ndarray, source: str) -> np.ndarray:
    """The one check of a query ROI, whatever it came from: a 32x32 array of finite real numbers
    (Hounsfield units). A flat vector of 1024 values, or 32x32 with extra axes of length 1, is
    taken as the 32x32 ROI; any other shape, a non-numeric, boolean or complex dtype, NaN and
    infinite values are a clear error naming ``source``."""
    try:
        array = np.asarray(image)
    except ValueError:  # nested lists of unequal lengths
        raise InputDataError(
            "query ROI must be a 32x32 grid of numbers; its rows differ in length", path=source
        ) from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputDataError(f"query ROI must hold real numbers (HU), got dtype {array.dtype}", path=source)
    if array.size == ROI_SIZE * ROI_SIZE and (array.ndim == 1 or array.squeeze().shape == (ROI_SIZE, ROI_SIZE)):
        array = array.reshape(ROI_SIZE, ROI_SIZE)
    if array.shape != (ROI_SIZE, ROI_SIZE):
        raise InputDataError(f"query ROI must be {ROI_SIZE}x{ROI_SIZE}, got shape {array.shape}", path=source)
    for bad, what in ((np.isnan(array), "NaN"), (np.isinf(array), "infinite")):
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputDataError(
                f"query ROI holds {int(bad.sum())} {what} value(s), first at (row {row}, col {col})", path=source
            )
    if np.abs(array).max() > np.finfo(np.float32).max:
        raise InputDataError("query ROI holds values beyond the float32 range; expected Hounsfield units", path=source)
    return array.astype(np.float32)


NPY_MAGIC = b"\x93NUMPY"
PNG_MODES = ("L", "LA", "RGB", "RGBA", "P", "PA")
"""PNG layouts a query may have: 8-bit grey, or 8-bit colour/palette/alpha whose pixels are all grey
and opaque (a grey picture some tool saved in colour). 1-bit, 16-bit and float pictures do not
hold the 8-bit lung window and are refused, like coloured or transparent pixels."""


def _read_npy(file: BinaryIO, source: str) -> np.ndarray:
    """The one array of a ``.npy`` file, never unpickled (``allow_pickle=False``)."""
    head = file.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        reason = (
            "is a .npz archive, not a .npy array"
            if head.startswith(b"PK")
            else "not a .npy array file (it does not start with the NumPy header)"
        )
        raise InputDataError(reason, path=source)
    file.seek(0)
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputDataError(f"not a readable .npy array ({error})", path=source) from None


def _read_png(file: BinaryIO, source: str) -> np.ndarray:
    """The grey levels (0-255) of an 8-bit grey PNG, or of a colour one that is all grey and opaque."""
    try:
        with Image.open(file, formats=["PNG"]) as picture:
            mode = picture.mode
            pixels = np.asarray(picture.convert("RGBA") if mode in ("P", "PA") else picture)
    except UnidentifiedImageError:
        raise InputDataError("not a PNG image", path=source) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise InputDataError(f"not a readable PNG image ({error})", path=source) from None
    if mode not in PNG_MODES:
        raise InputDataError(f"PNG of mode {mode!r} is not supported: save the ROI as an 8-bit grey PNG", path=source)
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[-1] in (2, 4) and (pixels[..., -1] != 255).any():
        raise InputDataError("PNG has transparent pixels; save the ROI as an opaque grey PNG", path=source)
    colours = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
    if (colours != colours[..., :1]).any():
        raise InputDataError("PNG is in colour; save the ROI as a grey (lung window) PNG", path=source)
    return colours[..., 0]


def load_query_roi(path: Path) -> np.ndarray:
    """A query ROI from a file (see :func:`read_query_roi`); a missing file or a folder is a
    clear error naming it."""
    if path.is_dir():
        raise InputDataError("query ROI is a folder, not a file", path=path)
    if not path.is_file():
        raise InputDataError("query file not found", path=path)
    with path.open("rb") as file:
        return read_query_roi(file, str(path))


def read_query_roi(file: BinaryIO, name: str) -> np.ndarray:
    """A query ROI from an open file called ``name`` (its path, or an upload's file name):
    ``.npy`` in Hounsfield units (never unpickled), or a PNG read as the lung window of the
    project's pictures (level -600, width 1500 HU) and mapped back to HU; see ``PNG_MODES`` for
    the PNG layouts accepted. Either must hold 32x32 values (``check_query_image``). Empty or
    unreadable contents, another extension or contents that do not match the extension are each
    a clear error naming ``name``."""
    if file.seek(0, io.SEEK_END) == 0:
        raise InputDataError("query file is empty", path=name)
    file.seek(0)
    suffix = Path(name).suffix.lower()
    if suffix == ".npy":
        return check_query_image(_read_npy(file, name), name)
    if suffix == ".png":
        level, width = LUNG_WINDOW
        grey = _read_png(file, name).astype(np.float32)
        return check_query_image(grey / 255.0 * width + (level - width / 2), name)
    raise InputDataError(
        f"query ROI must be a .npy array (HU) or a .png picture, not {suffix or 'a file without extension'}", path=name
    )


def check_position(values: object, voxel: bool, source: str) -> tuple:
    """A nodule position as three finite numbers: whole (row, col, slice) voxel indices, or (x, y, z)
    in patient mm. Whether it lies in the volume is for the series to say (``CtSeries.check_voxel``)."""
    what = "voxel (row, col, slice)" if voxel else "position (x, y, z) in mm"
    parts = tuple(values) if isinstance(values, (tuple, list, np.ndarray)) else (values,)
    if len(parts) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in parts):
        raise InputDataError(f"{what} must be three numbers, got {values!r}", path=source)
    if not all(math.isfinite(v) for v in parts):
        raise InputDataError(f"{what} must be finite numbers, got {values!r}", path=source)
    if voxel:
        if not all(float(v).is_integer() for v in parts):
            raise InputDataError(f"{what} must be whole voxel indices, got {values!r}", path=source)
        return tuple(int(v) for v in parts)
    return tuple(float(v) for v in parts)


if TYPE_CHECKING:  # torch comes with the model, loaded only by a query that needs the network
    from nodule_pipeline.hashing.training import TrainedModel


class UnknownNoduleError(InputDataError):
    """A nodule id the index does not hold."""


class NoduleSearcher:
    """A trained hashing model and the index built with it. The model may be given as the folder
    it is saved in (``model_dir``): it is loaded, with torch, by the first query that needs the
    network; a query by a library nodule uses what the index holds of it and needs none."""

    def __init__(self, model: TrainedModel | None, index: HashIndex, model_version: str, model_dir: Path | None = None):
        if index.model_version != model_version:
            raise InputDataError(
                f"the index was built with model {index.model_version} but the model is {model_version}: "
                "materialize hash_index again"
            )
        if model is None and model_dir is None:
            raise ValueError("give the model or the folder it is saved in")
        self._model, self._model_dir = model, model_dir
        self.index, self.model_version = index, model_version
        self._nodule_rows: dict[str, np.ndarray] | None = None
        self.nodule_of_row = nodule_of_rows(index)
        self._rows_per_nodule = rows_for_nodules(self.nodule_of_row, 1)  # once, not per query
        self.data_dir: Path | None = None
        self._left_out: set[str] | None = None
        self.diagnoses: dict[str, dict[str, str] | None] = {}
        """Confirmed diagnoses by nodule id, where TCIA's sheet gives one (``nodule_diagnosis``)."""

    @classmethod
    def from_paths(cls, model_dir: Path, index_dir: Path) -> NoduleSearcher:
        for what, folder in (("model", model_dir), ("index", index_dir)):
            if not folder.is_dir():
                raise InputDataError(f"no hash {what} here (materialize hash_model and hash_index first)", path=folder)
        card = read_model_card(model_dir).get("card", {})
        return cls(None, load_index(index_dir), str(card.get("model_version", "")), model_dir=model_dir)

    @property
    def model(self) -> TrainedModel:
        """The network, loaded from its folder the first time a query needs it."""
        if self._model is None:
            from nodule_pipeline.hashing.training import load_model

            self._model = load_model(self._model_dir)
        return self._model

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> NoduleSearcher:
        base = artefacts_dir(data_dir.resolve())
        index_dir = artefact_folder(base, ["hash_index"])
        model_dir = artefact_folder(base, ["hash_model"])
        if index_dir.is_dir():  # the exact model that encoded the index, even if a newer one exists
            versioned = model_version_folder(base, read_manifest(index_dir)["model_version"])
            model_dir = versioned if versioned.is_dir() else model_dir
        searcher = cls.from_paths(model_dir, index_dir)
        searcher.diagnoses = read_diagnoses(diagnosis_file(data_dir))
        searcher.data_dir = data_dir.resolve()
        return searcher

    @staticmethod
    def _check_options(k: int, mode: str, unit: str = "nodule") -> None:
        if mode not in MODES:
            raise InputDataError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_K:
            raise InputDataError(f"k must be a whole number from 1 to {MAX_K:,}, got {k!r}")
        if unit not in UNITS:
            raise InputDataError(f"unknown unit {unit!r}; a hit is one of {', '.join(UNITS)}")

    def _rows_to_ask(self, k: int, unit: str) -> int:
        """Rows the search core returns for k hits: k annotations, or enough rows to hold k nodules."""
        return k if unit == "annotation" else k * self._rows_per_nodule

    def _check_position_query(
        self, voxel: object, position_mm: object, k: int, mode: str, source: str, unit: str = "nodule"
    ) -> tuple[tuple[int, int, int] | None, tuple[float, float, float] | None]:
        """Options and position of a query in a series, checked before any file is read."""
        if (voxel is None) == (position_mm is None):
            raise InputDataError("give the nodule position either as a voxel or in patient mm", path=source)
        self._check_options(k, mode, unit)
        if voxel is not None:
            return check_position(voxel, True, source), None
        return None, check_position(position_mm, False, source)

    def search_roi(
        self,
        image: np.ndarray,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patient: str | None = None,
        source: str = "query",
        unit: str = "nodule",
    ) -> SearchResponse:
        """The k most similar library nodules to a 32x32 ROI (Hounsfield units, like the
        library), or the k most similar reader annotations with ``unit="annotation"``."""
        self._check_options(k, mode, unit)
        roi = check_query_image(image, source)
        return self._respond(roi, self._encode(roi[None]), k, mode, exclude_patient, unit)

    def _encode(self, images: np.ndarray) -> Encoded:
        from nodule_pipeline.hashing.training import encode

        return encode(self.model, images)

    def _respond(
        self, roi: np.ndarray, encoded: Encoded, k: int, mode: str, exclude_patient: str | None, unit: str
    ) -> SearchResponse:
        """The search of one encoded query, its warnings and what the network thinks of it."""
        predicted = int(encoded.predicted[0])
        hits = search(
            self.index,
            encoded.codes[0],
            encoded.fc[0],
            predicted,
            k=self._rows_to_ask(k, unit),
            mode=mode,
            exclude_patient=exclude_patient,
            query_ratings=None if encoded.ratings is None else encoded.ratings[0],
        )
        if unit == "nodule":
            hits = fold_hits(hits, self.nodule_of_row, k)
        warnings = image_warnings(roi) + distance_warnings(self.index, encoded.codes[0], encoded.fc[0], exclude_patient)
        ratings = None if encoded.ratings is None else most_likely(encoded.ratings[0])
        return SearchResponse(roi, predicted, float(encoded.probs[0, 1]), hits, unit, warnings, ratings)

    def nodule_rows(self, nodule_id: str) -> np.ndarray:
        """The index rows of a library nodule (one per reader annotation), by annotation id where
        the items have one; an unknown nodule is a clear error."""
        rows = self.rows_by_nodule().get(nodule_id) if isinstance(nodule_id, str) else None
        if rows is None:
            if isinstance(nodule_id, str) and nodule_id in self.left_out_nodules():
                raise UnknownNoduleError(
                    f"{nodule_id} is in the test split: the library holds the training side (materialize "
                    "hash_index with database 'all' to search every nodule, or query with its image)"
                )
            raise UnknownNoduleError(
                f"unknown nodule {nodule_id!r}: index {self.index.index_version} holds no nodule of that id"
            )
        return rows

    def left_out_nodules(self) -> set[str]:
        """The roi_dataset nodules the index leaves out (the test split, when it holds the training
        side), so that asking for one says why instead of "unknown"; empty without a data dir."""
        if self._left_out is None:
            self._left_out = set()
            table = roi_dataset_file(self.data_dir) if self.data_dir else None
            if table is not None and table.exists():
                ids = pq.read_table(table, columns=["nodule_id"]).column("nodule_id").to_pylist()
                self._left_out = {str(nodule) for nodule in ids} - set(self.rows_by_nodule())
        return self._left_out

    def rows_by_nodule(self) -> dict[str, np.ndarray]:
        """Every library nodule's index rows, each ordered by annotation id (the first is the
        annotation a search by the nodule uses); built once per searcher."""
        if self._nodule_rows is None:
            columns = [c for c in TIE_KEY_COLUMNS if c in self.index.items.columns]
            keys = self.index.items[columns].astype(str).reset_index(drop=True)
            ordered = keys.sort_values(columns, kind="stable")
            rows = ordered.index.to_numpy()
            self._nodule_rows = {
                nodule: rows[positions]
                for nodule, positions in ordered.groupby("nodule_id", sort=False).indices.items()
            }
        return self._nodule_rows

    def search_nodule(
        self, nodule_id: str, k: int = 10, mode: str = "hierarchical", unit: str = "nodule"
    ) -> SearchResponse:
        """The k most similar nodules to a library nodule (its first annotation's ROI), leaving out
        every nodule of its own patient."""
        self._check_options(k, mode, unit)
        row = int(self.nodule_rows(nodule_id)[0])
        if self.index.rois is None:
            raise InputDataError(f"index {self.index.index_version} keeps no ROIs to search with; query with an image")
        patient = str(self.index.items["patient_id"].iloc[row])
        stored = self.index.encoded(row)
        if stored is None:  # an index from before it kept the model's outputs: ask the network
            return self.search_roi(self.index.rois[row], k, mode, exclude_patient=patient, source=nodule_id, unit=unit)
        return self._respond(np.asarray(self.index.rois[row], dtype=np.float32), stored, k, mode, patient, unit)

    def search_many(
        self,
        images: np.ndarray,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patients: list[str | None] | None = None,
        unit: str = "nodule",
        classes: np.ndarray | None = None,
    ) -> tuple[Encoded, BatchResult]:
        """Many ROIs (n, 32, 32) at once, for evaluation: one encoding pass and one pass over the
        codes, with the search core :meth:`search_roi` uses, so the hits are the same.
        ``classes``: the hierarchical mode's gate, the predicted classes unless given (the true
        labels give the evaluation its within-class ranking)."""
        self._check_options(k, mode, unit)
        encoded = self._encode(images)
        result = search_batch(
            self.index,
            encoded.codes,
            encoded.fc,
            encoded.predicted if classes is None else classes,
            k=self._rows_to_ask(k, unit),
            mode=mode,
            exclude_patients=exclude_patients,
            query_ratings=encoded.ratings,
        )
        return encoded, fold_batch(result, self.nodule_of_row, k) if unit == "nodule" else result

    def search_dicom(
        self,
        series_dir: Path,
        voxel: tuple[int, int, int] | None = None,
        position_mm: tuple[float, float, float] | None = None,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patient: str | None = None,
        unit: str = "nodule",
    ) -> SearchResponse:
        """Cut the ROI at a nodule of a DICOM series (voxel (row, col, slice) or patient mm) the
        way ingestion does, then search with it."""
        voxel, position_mm = self._check_position_query(voxel, position_mm, k, mode, str(series_dir), unit)
        if not series_dir.is_dir():
            what = "is a file, not a DICOM series folder" if series_dir.exists() else "DICOM series folder not found"
            raise InputDataError(what, path=series_dir)
        series = load_series(series_dir, _query_patient(series_dir))
        return self.search_series(series, voxel, position_mm, k, mode, exclude_patient, unit=unit)

    def search_series(
        self,
        series: CtSeries,
        voxel: tuple[int, int, int] | None = None,
        position_mm: tuple[float, float, float] | None = None,
        k: int = 10,
        mode: str = "hierarchical",
        exclude_patient: str | None = None,
        lungs: np.ndarray | None = None,
        unit: str = "nodule",
    ) -> SearchResponse:
        """:meth:`search_dicom` on a series already loaded, with its lung mask when the caller
        keeps one (``segment_lungs`` of the whole volume is most of a query's time)."""
        voxel, position_mm = self._check_position_query(voxel, position_mm, k, mode, str(series.folder), unit)
        if voxel is not None:
            centre = series.check_voxel(voxel)
        else:
            try:
                centre = series.voxel_at_mm(*position_mm)
            except (ValueError, OverflowError):  # InputDataError too: its message has the voxel, not the mm
                raise InputDataError(
                    f"position {position_mm} (x, y, z) mm is outside the volume, which spans {_extent_mm(series)}",
                    patient_id=series.patient_id,
                    path=series.folder,
                ) from None
        if lungs is None:
            lungs = segment_lungs(series.hu, series.spacing_mm)
        image = roi_at(series.hu, lungs, centre)
        response = self.search_roi(image, k, mode, exclude_patient, source=str(series.folder), unit=unit)
        response.warnings[:0] = outside_lungs_warning(bool(lungs[centre]))
        return response


def diagnosis_file(data_dir: Path) -> Path:
    """Where ``nodule_diagnosis`` keeps its match table."""
    return artefact_folder(artefacts_dir(data_dir.resolve()), ["nodule_diagnosis"]) / TABLE_FILE


def read_diagnoses(path: Path) -> dict[str, dict[str, str] | None]:
    """The confirmed diagnosis of each library nodule the sheet matched ({} before the sheet was
    read; a table that cannot be read is an error naming it)."""
    if not path.exists():
        return {}
    try:
        table = pd.read_parquet(path)
        return {str(row["nodule_id"]): diagnosis_json(row) for row in table.to_dict("records")}
    except (OSError, ValueError, KeyError) as error:
        raise InputDataError(f"the nodule diagnoses cannot be read ({error})", path=path) from None


def _query_patient(series_dir: Path) -> str:
    """The query's patient as errors name it: the folder two levels up (TCIA layout), as its
    pseudonym when pseudonyms are on."""
    name = series_dir.resolve().parent.parent.name or "query"
    pseudonymiser = privacy.active()
    return pseudonymiser.patient(name) if pseudonymiser else name


def _extent_mm(series) -> str:
    """The patient-mm box a series covers (voxel centres), for an out-of-volume message."""
    rows, cols, _ = series.shape
    x0, y0 = series.origin_mm
    x1, y1 = x0 + (cols - 1) * series.spacing_mm[1], y0 + (rows - 1) * series.spacing_mm[0]
    z0, z1 = float(series.slice_z_mm.min()), float(series.slice_z_mm.max())
    return f"x {min(x0, x1):.1f}..{max(x0, x1):.1f}, y {min(y0, y1):.1f}..{max(y0, y1):.1f}, z {z0:.1f}..{z1:.1f} mm"
