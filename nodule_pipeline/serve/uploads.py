"""DICOM series that people upload (a zip) or open from the PACS to click a nodule on: unpacked
or fetched safely, read with the pipeline's own series reader, and kept in memory for a few queries.

The zip's files are unpacked into a temporary folder (under the data dir's ``uploads/``, named
by the server's process id, so that a killed server's leftovers are removed at the next start), read by
:func:`~nodule_pipeline.lidc.series.load_series` (every validation of ingestion), and deleted
again; the volume stays in memory (a few hundred MB at most) with its lung mask, segmented once
so that each click is a quick query. The newest few series are kept; older ones are dropped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.dicomweb import QUERY_PATIENT, Pacs, fetch_query_series
from nodule_pipeline.lidc.lung_mask import segment_lungs
from nodule_pipeline.lidc.series import CtSeries, load_series, series_modality
from nodule_pipeline.pictures import to_png, window
from nodule_pipeline.privacy import shown_uid

UPLOAD_PATIENT = "upload"
"""The patient id an uploaded series' errors carry (its real one is not read)."""
MAX_FILES = 5000
MAX_UNPACKED_BYTES = 4 << 30
KEPT_SERIES = 2
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadedSeries:
    """A series read from an upload and its lung mask (segmented once, for every click on it)."""

    series: CtSeries
    lungs: np.ndarray
    source: tuple[str, ...] | None = None
    """(DICOMweb URL, study UID, series UID) of a series fetched from the PACS."""

    def describe(self, series_id: str) -> dict[str, object]:
        rows, cols, slices = self.series.shape
        return {
            "series_id": series_id,
            "name": str(self.series.folder),
            "rows": rows,
            "columns": cols,
            "slices": slices,
            "spacing_mm": list(self.series.spacing_mm),
        }


class SeriesStore:
    """The last :data:`KEPT_SERIES` uploaded series, by a random id."""

    def __init__(self, scratch: Path | None = None, kept: int = KEPT_SERIES):
        self.kept = kept
        self.scratch = scratch
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
            scratch.chmod(0o700)  # patients' scans pass through it
            remove_dead_uploads(scratch)
        self._series: OrderedDict[str, UploadedSeries] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, file: BinaryIO, name: str) -> tuple[str, UploadedSeries]:
        return self._keep(read_series_zip(file, name, self.scratch))

    def add_from_pacs(self, pacs: Pacs, study_uid: str, series_uid: str) -> tuple[str, UploadedSeries]:
        """A CT series fetched from the PACS (WADO-RS) and read like an upload; asked again while
        it is kept, the same series is not fetched again."""
        source = (pacs.url, study_uid, series_uid)
        with self._lock:
            known = next((sid for sid, kept in self._series.items() if kept.source == source), None)
            if known is not None:
                self._series.move_to_end(known)
                return known, self._series[known]
        with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-pacs-", dir=self.scratch) as tmp:
            folder = fetch_query_series(pacs, study_uid, series_uid, Path(tmp))
            try:
                series = load_series(folder, QUERY_PATIENT)
            except InputDataError as error:
                raise InputDataError(str(error).replace(str(folder), f"PACS series {series_uid}")) from None
        shown = Path(f"PACS study {shown_uid(study_uid)}, series {shown_uid(series_uid)}")
        return self._keep(dataclasses.replace(series, folder=shown), source)

    def _keep(self, series: CtSeries, source: tuple[str, ...] | None = None) -> tuple[str, UploadedSeries]:
        uploaded = UploadedSeries(series, segment_lungs(series.hu, series.spacing_mm), source)
        series_id = secrets.token_hex(8)
        with self._lock:
            self._series[series_id] = uploaded
            while len(self._series) > self.kept:
                self._series.popitem(last=False)
        return series_id, uploaded

    def get(self, series_id: object) -> UploadedSeries:
        with self._lock:
            uploaded = self._series.get(series_id) if isinstance(series_id, str) else None
        if uploaded is None:
            raise InputDataError(
                f"unknown series {series_id!r}: upload it (again); the server keeps the last {self.kept}"
            )
        return uploaded


def remove_dead_uploads(scratch: Path) -> list[Path]:
    """Delete the unpack folders of server processes that are gone (killed mid-upload: their
    ``TemporaryDirectory`` never cleaned up); a live server's folders are left alone."""
    removed = []
    for folder in scratch.iterdir():
        pid = folder.name.partition("-")[0]
        if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def read_series_zip(file: BinaryIO, name: str, scratch: Path | None = None) -> CtSeries:
    """The one CT series in a zip of DICOM files (any folder layout; the LIDC XML beside the
    slices is read too), unpacked under ``scratch`` (default: the system's temporary folder).
    Errors name the file inside the zip, never the temporary folder."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise InputDataError(f"not a readable zip archive ({error})", path=name) from None
    with archive, tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-upload-", dir=scratch) as tmp:
        root = Path(tmp)
        try:
            unpacked = _unpack(archive, root, name)
            modalities = {folder: series_modality(folder, UPLOAD_PATIENT) for folder in unpacked}
            folders = [folder for folder, modality in modalities.items() if modality == "CT"]  # radiographs beside
            if len(folders) != 1:
                others = sorted(set(modalities.values()) - {"CT"})
                found = (
                    "no DICOM files (*.dcm)"
                    if not unpacked
                    else f"{len(folders)} CT series" + (f" (and {', '.join(others)})" if others else "")
                )
                raise InputDataError(f"the zip holds {found}; upload the folder of one CT series", path=name)
            series = load_series(folders[0], UPLOAD_PATIENT)
        except InputDataError as error:
            shown = str(error).replace(str(root), name)
            raise InputDataError(shown) from None
        shown_folder = PurePosixPath(name, folders[0].relative_to(root).as_posix())
        return dataclasses.replace(series, folder=Path(shown_folder))


def _unpack(archive: zipfile.ZipFile, root: Path, name: str) -> list[Path]:
    """Write the zip's files under ``root`` (each checked by :func:`member_target`), refusing
    archives that unpack to more than :data:`MAX_FILES` files or :data:`MAX_UNPACKED_BYTES`;
    returns the folders that hold ``.dcm`` files (macOS's ``__MACOSX`` copies left out)."""
    members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
    if len(members) > MAX_FILES:
        raise InputDataError(f"the zip holds {len(members)} files, more than {MAX_FILES}", path=name)
    written = 0
    folders = set()
    seen: set[tuple[str, ...]] = set()
    for member in members:
        target = member_target(member, root, seen, name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, target.open("xb") as out:
                while chunk := source.read(_COPY_CHUNK):
                    written += len(chunk)
                    if written > MAX_UNPACKED_BYTES:
                        raise InputDataError(f"the zip unpacks to more than {MAX_UNPACKED_BYTES >> 30} GB", path=name)
                    out.write(chunk)
        except InputDataError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise InputDataError(f"zip member {member.filename!r}: cannot unpack ({reason})", path=name) from None
        if target.suffix == ".dcm":  # what load_series reads
            folders.add(target.parent)
    return sorted(folders)


_DRIVE = re.compile(r"^[A-Za-z]:")


def member_target(member: zipfile.ZipInfo, root: Path, seen: set[tuple[str, ...]], name: str) -> Path:
    """Where a zip member is written: a plain file strictly under ``root``. A name that is absolute,
    has a drive letter, a backslash or a ``..`` step, a link or any other non-file entry, and a
    second member of the same name are refused, naming the member (nothing outside ``root`` is
    ever opened, whatever the name's spelling)."""
    filename = member.filename
    parts = PurePosixPath(filename).parts
    kind = stat.S_IFMT(member.external_attr >> 16)
    refusals = (  # the first that applies is the reason
        ("\\" in filename, "its name holds a backslash"),
        (filename.startswith("/"), "its name is an absolute path"),
        (bool(_DRIVE.match(filename)), "its name starts with a drive letter"),
        (".." in parts, "its name steps out of the folder (..)"),
        (kind == stat.S_IFLNK, "it is a link"),
        (kind not in (0, stat.S_IFREG), "it is not a plain file"),
        (not parts, "it has an empty name"),
        (parts in seen, "another member has the same name"),
    )
    reason = next((why for refused, why in refusals if refused), None)
    target = root.joinpath(*parts) if parts else root
    if reason is None and not target.resolve().is_relative_to(root.resolve()):
        reason = "it would be written outside the upload's folder"
    if reason is not None:
        raise InputDataError(f"zip member {filename!r} refused: {reason}", path=name)
    seen.add(parts)
    return target


def slice_png(uploaded: UploadedSeries, index: int, level: float, width: float) -> bytes:
    """One axial slice of an uploaded series in an HU window, full resolution."""
    slices = uploaded.series.shape[2]
    if not 0 <= index < slices:
        raise InputDataError(f"slice {index} is outside the series, which has slices 0..{slices - 1}")
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise InputDataError(f"the HU window needs a finite level and a positive width, got {level}, {width}")
    return to_png(Image.fromarray(window(uploaded.series.hu[:, :, index], level, width)), optimize=False)
