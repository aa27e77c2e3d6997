"""Where the patients are under a scan root, in the layouts LIDC-IDRI is downloaded in.

TCIA's NBIA Data Retriever writes ``<collection>/<patient>/<study>/<series>/*.dcm`` with folders
named by UID ("classic") or by date and description, such as
``LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192/1-001.dcm``
("descriptive"), next to files such as ``metadata.csv`` and ``LICENSE``. A user may point the
pipeline at the patients' parent folder or at the download folder above the collection: both work.
"""

from __future__ import annotations

from pathlib import Path

from nodule_pipeline.errors import InputDataError

PATIENT_DICOM_DEPTH = 2
"""A patient folder holds its DICOM files at most this many folders down (study, then series);
a folder whose files lie deeper is a collection or download folder, looked into."""

MAX_CONTAINER_DEPTH = 2
"""How many container folders (download folder, collection folder) are looked through."""


def _first_dicom_depth(folder: Path) -> int | None:
    """How many folders below ``folder`` its first DICOM file lies (None: no DICOM file at all)."""
    first = next(folder.rglob("*.dcm"), None)
    return None if first is None else len(first.relative_to(folder).parts) - 1


def find_patient_folders(root: Path) -> dict[str, Path]:
    """Patient folder name -> folder, for every folder under ``root`` that holds a patient's DICOM
    files, looking through collection and download folders. Plain files (``metadata.csv``,
    ``LICENSE``) and folders without DICOM files are not patients. A patient found twice (two
    downloads side by side) is an error naming both folders: which copy is meant is the user's call."""
    if not root.is_dir():
        raise InputDataError("scan root folder not found", path=root)
    found: dict[str, Path] = {}

    def visit(folder: Path, containers: int) -> None:
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            depth = _first_dicom_depth(child)
            if depth is None:
                continue
            if depth > PATIENT_DICOM_DEPTH and containers < MAX_CONTAINER_DEPTH:
                visit(child, containers + 1)
            elif child.name in found:
                raise InputDataError(
                    f"patient {child.name} is in two folders under the scan root: {found[child.name]} and {child}; "
                    "keep one",
                    path=root,
                )
            else:
                found[child.name] = child

    visit(root, 0)
    return found
