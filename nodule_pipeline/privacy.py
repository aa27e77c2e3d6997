"""Protected health information: what may be read from DICOM, and keyed pseudonyms.

Hospital DICOM carries names, birth dates, record numbers, accession numbers and institution
names. Two rules keep them out of everything the pipeline stores, logs or shows:

- **Allow-list**: the pipeline reads only the technical DICOM attributes in
  :data:`DICOM_ATTRIBUTES_READ` (geometry, pixel encoding, UIDs); every other element is never
  parsed, so no identifying value can reach an artefact, a log line, metadata or a report.
- **Pseudonyms** (on when ``NODULE_PIPELINE_PSEUDONYM_KEY`` is set): patient folder names
  (the partition keys), DICOM UIDs, reader ids and file paths are replaced by keyed hashes
  (HMAC-SHA256). The same key gives the same pseudonyms, so incremental runs line up; without
  the key they cannot be reversed. ``nodule-pipeline reveal`` maps a pseudonym back on a machine
  that holds the key and the scans.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from functools import lru_cache
from pathlib import Path

PSEUDONYM_KEY_ENV = "NODULE_PIPELINE_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 16

DICOM_ATTRIBUTES_READ = (
    # identity of the image within its series (pseudonymised when pseudonyms are on)
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    # geometry
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    # pixel encoding and rescale to Hounsfield units
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelPaddingValue",
    "RescaleIntercept",
    "RescaleSlope",
    "PixelData",
)
"""The DICOM attributes the pipeline reads (``dcmread(specific_tags=...)``): no other element of
a file, identifying or not, is ever parsed."""

PATIENT_PREFIX, FILE_PREFIX, READER_PREFIX = "P", "F", "R"
_QUOTED_PATH = re.compile(r"""['"](/[^'"]*)['"]""")
UID_ROOT = "2.25."
"""UUID-derived UID root (ISO/IEC 9834-8): a pseudonymised UID is still a valid DICOM UID."""


class Pseudonymiser:
    """Keyed, stable, one-way pseudonyms for the identifiers the pipeline keeps."""

    def __init__(self, key: str):
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{PSEUDONYM_KEY_ENV} must be at least {MIN_KEY_LENGTH} characters")
        self._key = key.encode()

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def patient(self, folder_name: str) -> str:
        """Partition key for a patient folder: ``P`` and 16 hex digits."""
        return PATIENT_PREFIX + self._digest("patient", folder_name)[:8].hex()

    def uid(self, uid: str) -> str:
        """A DICOM UID replaced by a valid one (``2.25.<128-bit integer>``), the same every time."""
        return UID_ROOT + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def reader(self, reader_id: str) -> str:
        return READER_PREFIX + self._digest("reader", reader_id)[:4].hex()

    def path(self, path: Path | str) -> str:
        """A file or folder shown as a token (its suffix kept: ``.dcm``, ``.xml``)."""
        path = Path(path)
        return FILE_PREFIX + self._digest("path", str(path.resolve()))[:8].hex() + path.suffix


@lru_cache(maxsize=4)
def _pseudonymiser(key: str) -> Pseudonymiser:
    return Pseudonymiser(key)


def active() -> Pseudonymiser | None:
    """The pseudonymiser when ``NODULE_PIPELINE_PSEUDONYM_KEY`` is set, else None (ids as they are)."""
    key = os.environ.get(PSEUDONYM_KEY_ENV)
    return _pseudonymiser(key) if key else None


def shown_path(path: Path | str) -> str:
    """How a path may appear in errors, logs and metadata: itself, or its token under pseudonyms."""
    pseudonymiser = active()
    return pseudonymiser.path(path) if pseudonymiser else str(path)


def shown_name(path: Path | str) -> str:
    """A file's name as a message may show it: the name, or its token under pseudonyms."""
    pseudonymiser = active()
    return pseudonymiser.path(path) if pseudonymiser else Path(path).name


def shown_uid(uid: str) -> str:
    """A DICOM UID as a message may show it: itself, or its pseudonym (as stored)."""
    pseudonymiser = active()
    return pseudonymiser.uid(uid) if pseudonymiser else uid


def scrub_paths(text: str) -> str:
    """Library error texts can quote a file's absolute path: under pseudonyms, its token instead."""
    if active() is None:
        return text
    return _QUOTED_PATH.sub(lambda match: repr(shown_path(match.group(1))), text)


def reveal(token: str, roots: list[Path]) -> list[Path]:
    """The folders and files under ``roots`` that a patient or path pseudonym stands for (needs
    the key in the environment); for an operator tracing an error back to the scan."""
    pseudonymiser = active()
    if pseudonymiser is None:
        raise ValueError(f"set {PSEUDONYM_KEY_ENV} to the key the pseudonyms were made with")
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if (path.parent == root and pseudonymiser.patient(path.name) == token) or pseudonymiser.path(path) == token:
                found.append(path)
    return found
