"""What the search server answers from: the current ``hash_index`` and the model it names,
reloaded when the index changes, and its nodules as JSON for people (characteristics, pictures).

Search itself is :class:`~nodule_pipeline.hashing.searcher.NoduleSearcher`'s; this module only
keeps it current and describes its items.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.index import MANIFEST, IndexFormatError
from nodule_pipeline.hashing.search import SearchHit, prepare_search
from nodule_pipeline.hashing.searcher import NoduleSearcher, SearchResponse, diagnosis_file
from nodule_pipeline.lidc.annotations import CHARACTERISTICS
from nodule_pipeline.pictures import roi_png
from nodule_pipeline.storage import artefact_folder, artefacts_dir

log = logging.getLogger(__name__)

PROVENANCE_COLUMNS = ("annotation_id", "reader", "series_uid", "center_i", "center_j", "center_k", "diameter_mm")
"""Item columns a nodule's JSON names besides its ratings, where the index has them."""
SHOWN_LINEAGE = ("data_version", "database", "model_measured")
"""What the library tells of its lineage; the patient list stays in Dagster, behind its own access."""
_UNSEEN = object()


class LibraryUnavailable(RuntimeError):
    """No index to search yet (nothing materialized, or the one on disk cannot be loaded)."""


class Library:
    """The searcher of a data dir's current index. Each request looks at the index manifest (one
    ``stat``); when ``hash_index`` was materialized again the new index and its model are loaded,
    and until then, or when the new one cannot be loaded, the one before keeps answering."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir.resolve()
        self.manifest = artefact_folder(artefacts_dir(self.data_dir), ["hash_index"]) / MANIFEST
        self.diagnoses = diagnosis_file(self.data_dir)
        self._lock = threading.Lock()
        self._searcher: NoduleSearcher | None = None
        self._stamp: object = _UNSEEN
        self._problem = "no hash index yet: materialize hash_model and hash_index first"

    def searcher(self) -> NoduleSearcher:
        """The current searcher, reloaded first if the index on disk changed."""
        stamp = self._manifest_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._load(stamp)
        if self._searcher is None:
            raise LibraryUnavailable(self._problem)
        return self._searcher

    def _manifest_stamp(self) -> tuple[tuple[int, int, int] | None, ...] | None:
        """Identity of the index manifest (a re-materialized index is a new folder, so a new
        inode) and of the nodule diagnoses, which change on their own."""
        stamps = []
        for path in (self.manifest, self.diagnoses):
            try:
                info = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return None if stamps[0] is None else tuple(stamps)

    def _load(self, stamp: object) -> None:
        try:
            searcher = NoduleSearcher.from_data_dir(self.data_dir)
            prepare_search(searcher.index)  # the search layout now, not in the first user's request
        except (InputDataError, IndexFormatError, OSError, ValueError) as error:
            log.warning("the hash index under %s cannot be loaded: %s", self.data_dir, error)
            # the answer names the problem, not where the server keeps its files
            self._problem = "the hash index cannot be loaded: " + str(error).replace(str(self.data_dir), "<data-dir>")
            if self._searcher:
                log.warning("the index loaded before keeps answering")
        else:
            previous = self._searcher.index.index_version if self._searcher else None
            self._searcher = searcher
            log.info(
                "index %s (model %s) loaded, was %s", searcher.index.index_version, searcher.model_version, previous
            )
        self._stamp = stamp  # a failed load is retried when the index changes again


def summary(searcher: NoduleSearcher) -> dict[str, Any]:
    """What the library holds and where it came from."""
    index = searcher.index
    return {
        "index_version": index.index_version,
        "model_version": searcher.model_version,
        "items": len(index),
        "nodules": int(index.items["nodule_id"].nunique()),
        "patients": int(index.items["patient_id"].nunique()),
        "bits": index.bits,
        "label_counts": {str(label): int(count) for label, count in zip(*np.unique(index.labels, return_counts=True))},
        "lineage": {key: index.lineage[key] for key in SHOWN_LINEAGE if key in index.lineage},
    }


def item_json(searcher: NoduleSearcher, row: int) -> dict[str, Any]:
    """One index item (a reader's annotation of a nodule): ids, label, ratings, provenance, picture."""
    index = searcher.index
    item = index.items.iloc[row]
    present = index.items.columns
    return {
        "patient_id": str(item["patient_id"]),
        "nodule_id": str(item["nodule_id"]),
        "label": int(index.labels[row]),
        "malignancy": _plain(item.get("malignancy")),
        "characteristics": {name: _plain(item[name]) for name in CHARACTERISTICS if name in present},
        **{name: _plain(item[name]) for name in PROVENANCE_COLUMNS if name in present},
        "thumbnail_url": thumbnail_url(str(item["nodule_id"]), item.get("annotation_id")),
        "diagnosis": searcher.diagnoses.get(str(item["nodule_id"])),
    }


def nodule_json(searcher: NoduleSearcher, nodule_id: str) -> dict[str, Any]:
    """A library nodule with every reader annotation the index holds of it (first: the one a
    search by this nodule uses)."""
    rows = searcher.nodule_rows(nodule_id)
    annotations = [item_json(searcher, int(row)) for row in rows]
    return {
        "nodule_id": nodule_id,
        "patient_id": annotations[0]["patient_id"],
        "label": annotations[0]["label"],
        "malignancy": annotations[0]["malignancy"],
        "thumbnail_url": annotations[0]["thumbnail_url"],
        "diagnosis": annotations[0]["diagnosis"],
        "annotations": annotations,
    }


def nodule_list(searcher: NoduleSearcher, text: str = "", limit: int = 200) -> dict[str, Any]:
    """The library's nodules whose id or patient contains ``text`` (case-insensitive), by id."""
    rows = searcher.rows_by_nodule()
    ids = sorted(rows)
    first = np.array([rows[nodule_id][0] for nodule_id in ids], dtype=np.int64)
    patients = searcher.index.items["patient_id"].to_numpy()[first] if ids else []
    wanted = text.strip().lower()
    found = [i for i, nodule_id in enumerate(ids) if wanted in nodule_id.lower() or wanted in str(patients[i]).lower()]
    nodules = [
        {
            "nodule_id": ids[i],
            "patient_id": str(patients[i]),
            "label": int(searcher.index.labels[first[i]]),
            "annotations": len(rows[ids[i]]),
        }
        for i in found[:limit]
    ]
    return {"index_version": searcher.index.index_version, "total": len(found), "nodules": nodules}


def thumbnail(searcher: NoduleSearcher, nodule_id: str, annotation_id: str | None = None) -> bytes:
    """The PNG of a nodule's ROI in the lung window: its first annotation's, or the one named."""
    rows = [int(row) for row in searcher.nodule_rows(nodule_id)]
    if annotation_id is not None:
        annotations = searcher.index.items.get("annotation_id")
        rows = [row for row in rows if annotations is not None and str(annotations.iloc[row]) == annotation_id]
        if not rows:
            raise InputDataError(f"nodule {nodule_id!r} has no annotation {annotation_id!r} in the index")
    if searcher.index.rois is None:
        raise InputDataError(f"index {searcher.index.index_version} keeps no ROI pictures")
    return roi_png(np.asarray(searcher.index.rois[rows[0]], dtype=np.float32))


def thumbnail_url(nodule_id: str, annotation_id: object = None) -> str:
    url = f"/api/nodules/{urllib.parse.quote(nodule_id, safe='')}/thumbnail.png"
    if annotation_id is not None and not pd.isna(annotation_id):
        url += "?" + urllib.parse.urlencode({"annotation": str(annotation_id)})
    return url


def hit_json(searcher: NoduleSearcher, hit: SearchHit, unit: str) -> dict[str, Any]:
    """A hit: the search-result contract, then the matched annotation's ratings and picture; a
    nodule hit also lists each of the nodule's reader annotations (``matched`` names the one
    whose distances these are)."""
    answer = {
        **item_json(searcher, hit.row),
        **hit.to_json(),
        "rating_distance": hit.rating_distance,
        "unit": unit,
        "class_fallback": hit.class_fallback,
    }
    if unit == "nodule":
        readers = []
        for row in searcher.nodule_rows(hit.nodule_id):
            reader = item_json(searcher, int(row))
            readers.append(
                {key: reader[key] for key in ("annotation_id", "reader", "label", "malignancy") if key in reader}
                | {"characteristics": reader["characteristics"], "matched": int(row) == hit.row}
            )
        answer["readers"] = readers
    return answer


def response_json(searcher: NoduleSearcher, response: SearchResponse, query: dict[str, Any]) -> dict[str, Any]:
    """A search answer: versions, the query as the network saw it and what it thinks of it, the hits."""
    picture = base64.b64encode(roi_png(response.query_image)).decode("ascii")
    return {
        "index_version": searcher.index.index_version,
        "model_version": searcher.model_version,
        "query": {
            **query,
            "predicted_label": response.predicted_class,
            "malignant_probability": response.malignant_probability,
            "predicted_characteristics": response.predicted_ratings,
            "picture": f"data:image/png;base64,{picture}",
        },
        "warnings": [warning.to_json() for warning in response.warnings],
        "class_fallback": any(hit.class_fallback for hit in response.hits),
        "unit": response.unit,
        "hits": [hit_json(searcher, hit, response.unit) for hit in response.hits],
    }


def _plain(value: object) -> object:
    """A pandas/numpy cell as a JSON value (missing -> None)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
