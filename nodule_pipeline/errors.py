"""Errors that users see: each names the patient and the file it is about, and the reason."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from nodule_pipeline.privacy import shown_path

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InputDataError(ValueError):
    """Bad input data (a scan, an annotation file, a ROI table, a query) that cannot be used."""

    def __init__(
        self,
        reason: str,
        *,
        patient_id: str | None = None,
        path: Path | str | None = None,
    ):
        self.reason = reason
        self.patient_id = patient_id
        # A patient's file paths carry the folder name (and often UIDs): tokens under pseudonyms.
        self.path = None if path is None else shown_path(path) if patient_id else str(path)
        where = ": ".join(part for part in (patient_id, self.path) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


def check_safe_key(key: str, what: str = "patient id") -> str:
    """Refuse keys that could escape the data folder or break a file name (``../x``, ``a/b``)."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise InputDataError(
            f"{what} {key!r} is not a safe name: use letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit, without '..'"
        )
    return key


class StorageError(OSError):
    """A result could not be stored (disk full, read-only or unwritable target). Names the
    artefact and the reason; what was stored before is untouched, so a rerun after the
    problem is fixed completes."""

    def __init__(self, path: Path | str, error: OSError):
        self.path = str(path)
        reason = error.strerror or str(error)
        code = errno.errorcode.get(error.errno, "") if error.errno else ""
        super().__init__(
            error.errno,
            f"{self.path}: cannot store the result: {reason}{f' ({code})' if code else ''}; "
            "the version stored before is kept",
        )

    def __str__(self) -> str:
        return self.strerror
