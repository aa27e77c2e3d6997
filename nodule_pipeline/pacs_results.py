"""A search's answer as DICOM objects a viewer lists in the query's study: a Comprehensive SR
(the query series and location, the index and model versions, and each hit's nodule id, the
readers' ratings, the confirmed diagnosis where known and the distances) and a Key Object
Selection of the query's slice and the hits' source images that lie in the same series. Built
with highdicom from the search API's answer (``serve.library.response_json``), so the SR says
exactly what the page and the API showed; no Dagster here.

What the SR names of the library's nodules is what the index holds: under pseudonyms, only
pseudonyms. A KOS references the instances of one patient's study (DICOM's rule, and highdicom's);
hits from other patients are named in the SR, by their nodule ids and series UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from nodule_pipeline.lidc.dicomweb import Pacs
from nodule_pipeline.lidc.series import CtSeries

SCHEME = "99NODPIPE"
"""The private coding scheme of the SR's concept names (DICOM's convention for local codes: 99...)."""
SR_SERIES_NUMBER = 9901
KOS_SERIES_NUMBER = 9902
MANUFACTURER = "nodule_pipeline"
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_BITS = hd.sr.CodedConcept("{bits}", "UCUM", "bits")
_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
LABELS = {0: "benign", 1: "malignant"}


def concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


TITLE = concept("SIMSEARCH", "Similar nodule search")
HIT = concept("SIMNODULE", "Similar nodule")


def _text(value: str, meaning: str, text: object) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(concept(value, meaning), str(text), relationship_type=_CONTAINS)


def _number(value: str, meaning: str, number: float, unit: hd.sr.CodedConcept = _NO_UNITS) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(concept(value, meaning), float(number), unit=unit, relationship_type=_CONTAINS)


def _ratings(characteristics: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in characteristics.items() if value is not None)


def _hit_items(hit: dict[str, Any]) -> list[hd.sr.ContentItem]:
    items: list[hd.sr.ContentItem] = [
        _number("RANK", "Rank", hit["rank"]),
        _text("NODULEID", "Nodule ID", hit["nodule_id"]),
        _text("PATIENTID", "Library patient", hit["patient_id"]),
        _text("READLABEL", "Readers' label", LABELS.get(hit["label"], hit["label"])),
    ]
    if hit.get("malignancy") is not None:
        items.append(_number("READMALIG", "Readers' malignancy rating", hit["malignancy"]))
    ratings = [reader["characteristics"] for reader in hit.get("readers", [])] or [hit.get("characteristics", {})]
    for number, characteristics in enumerate(ratings, start=1):
        items.append(_text("READRATING", f"Reader {number} ratings", _ratings(characteristics)))
    diagnosis = hit.get("diagnosis")
    if diagnosis:
        items.append(_text("DIAGNOSIS", "Confirmed diagnosis", diagnosis.get("summary") or diagnosis))
    items.append(_number("HAMMING", "Hamming distance", hit["hamming"], _BITS))
    items.append(_number("EUCLID", "Feature distance", hit["euclidean"]))
    if hit.get("rating_distance") is not None:
        items.append(_number("RATINGDIST", "Rating distance", hit["rating_distance"]))
    if hit.get("series_uid"):
        items.append(_text("SERIESUID", "Source series", hit["series_uid"]))
    return items


def results_report(answer: dict[str, Any], query_slice: pydicom.Dataset, voxel: Sequence[int]) -> hd.sr.ComprehensiveSR:
    """The SR of a search from a slice of a PACS series (``query_slice``: its header, whose
    patient and study the SR joins)."""
    row, column, index = (int(v) for v in voxel)
    query = answer["query"]
    image = hd.sr.ImageContentItem(
        concept("QUERYIMG", "Query image"),
        referenced_sop_class_uid=query_slice.SOPClassUID,
        referenced_sop_instance_uid=query_slice.SOPInstanceUID,
        relationship_type=_CONTAINS,
    )
    point = hd.sr.ScoordContentItem(
        concept("QUERYPT", "Query location"),
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[column + 0.5, row + 0.5]]),  # the voxel's centre, (column, row)
        pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.VOLUME,
        relationship_type=_CONTAINS,
    )
    point.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.ImageContentItem(
                codes.DCM.SourceImage,
                referenced_sop_class_uid=query_slice.SOPClassUID,
                referenced_sop_instance_uid=query_slice.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.SELECTED_FROM,
            )
        ]
    )
    items: list[hd.sr.ContentItem] = [
        _text("INDEXVER", "Index version", answer["index_version"]),
        _text("MODELVER", "Model version", answer["model_version"]),
        _text("QUERYSER", "Query series", query_slice.SeriesInstanceUID),
        _text("QUERYVOX", "Query voxel (row, column, slice)", f"{row}, {column}, {index}"),
        image,
        point,
        _text("PREDLABEL", "Predicted class", LABELS.get(query["predicted_label"], query["predicted_label"])),
        _number("PMALIG", "Malignant probability", query["malignant_probability"]),
    ]
    items += [_text("WARNING", "Query warning", warning["message"]) for warning in answer.get("warnings", [])]
    for hit in answer["hits"]:
        container = hd.sr.ContainerContentItem(HIT, relationship_type=_CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(_hit_items(hit))
        items.append(container)
    root = hd.sr.ContainerContentItem(TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[query_slice],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="Similar nodules (nodule_pipeline)",
    )


def key_images(query_slice: pydicom.Dataset, hit_slices: Sequence[pydicom.Dataset]) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of the query's slice and the hits' source slices of the same study."""
    by_uid = {query_slice.SOPInstanceUID: query_slice} | {s.SOPInstanceUID: s for s in hit_slices}
    referenced = [query_slice, *[s for uid, s in by_uid.items() if uid != query_slice.SOPInstanceUID]]
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        description=f"query slice and {len(referenced) - 1} similar nodule slice(s) of this study",
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=generate_uid(),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="Similar nodules: key images (nodule_pipeline)",
    )


def _slice(series: CtSeries, index: int, sop_class_uid: str) -> pydicom.Dataset:
    """The references a KOS needs of one slice of a series."""
    reference = pydicom.Dataset()
    reference.SOPClassUID, reference.SOPInstanceUID = sop_class_uid, series.sop_uids[index]
    reference.StudyInstanceUID, reference.SeriesInstanceUID = series.study_uid, series.series_uid
    return reference


def store_results(pacs: Pacs, answer: dict[str, Any], series: CtSeries, voxel: Sequence[int]) -> StoredResults:
    """Store the SR and the KOS of a search from ``series`` (a PACS series, read with its own
    UIDs) at ``voxel`` in the series' study (STOW-RS). The query slice's header (patient and
    study) comes from the PACS itself (WADO-RS metadata)."""
    index = series.check_voxel(tuple(int(v) for v in voxel))[2]
    query_slice = pacs.instance_metadata(series.study_uid, series.series_uid, series.sop_uids[index])
    hit_slices = [
        _slice(series, int(hit["center_k"]), query_slice.SOPClassUID)
        for hit in answer["hits"]
        if hit.get("series_uid") == series.series_uid and hit.get("center_k") is not None
    ]
    report = results_report(answer, query_slice, voxel)
    selection = key_images(query_slice, hit_slices)
    pacs.store([report, selection], series.study_uid)
    return StoredResults(
        study_uid=series.study_uid,
        report_uid=report.SOPInstanceUID,
        key_images_uid=selection.SOPInstanceUID,
        key_images=len(
            selection.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        ),
    )


@dataclass(frozen=True)
class StoredResults:
    """What was stored in the query's study."""

    study_uid: str
    report_uid: str
    key_images_uid: str
    key_images: int

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "report_uid": self.report_uid,
            "key_images_uid": self.key_images_uid,
            "key_images": self.key_images,
        }
