"""CT studies in a PACS over DICOMweb: find them (QIDO-RS), fetch them (WADO-RS) into a local
cache that the folder reader validates as it validates a download, and store answers (STOW-RS).

The LIDC readings are XML, not DICOM: they come from a folder of XML files (as TCIA ships them)
matched to their series by ``SeriesInstanceUid``, and are copied beside the cached series. A
series is fetched into a staging folder and moved into the cache only once every instance the
PACS listed has arrived, so a half-fetched series is never read. Requests go through
``dicomweb-client`` (no hand-written multipart parsing); credentials come from the environment,
TLS certificates are verified unless a CA bundle says otherwise. No Dagster here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from nodule_pipeline.errors import InputDataError, check_safe_key
from nodule_pipeline.lidc.series import MAX_VOLUME_BYTES, SkippedSeries
from nodule_pipeline.privacy import shown_uid

DICOMWEB_URL_ENV = "NODULE_PIPELINE_DICOMWEB_URL"
TOKEN_ENV = "NODULE_PIPELINE_DICOMWEB_TOKEN"
USER_ENV = "NODULE_PIPELINE_DICOMWEB_USER"
PASSWORD_ENV = "NODULE_PIPELINE_DICOMWEB_PASSWORD"
CA_BUNDLE_ENV = "NODULE_PIPELINE_DICOMWEB_CA_BUNDLE"

TIMEOUT_S = (5.0, 120.0)
"""Connect and read timeouts of every request: a PACS that stops answering is an error, not a hang."""
MAX_SERIES_INSTANCES = 2000
"""Most instances a CT series may have (LIDC's longest is about 800 slices); more is refused
before anything is fetched."""
MAX_STUDY_INSTANCES = 10000
"""Most instances a study may have, checked from QIDO's count before any series is fetched."""
QIDO_PAGE = 500
MAX_QIDO_PAGES = 200
MANIFEST = "series.json"
"""Written last into a cached series folder: its instance UIDs, so a retry reuses it."""
STAGING = ".staging"
READING_HEAD_BYTES = 1 << 16
"""An LIDC XML names its series in the header, within its first few kilobytes."""
_SERIES_IN_XML = re.compile(rb"<SeriesInstanceUid>\s*([0-9.]+)\s*</SeriesInstanceUid>")

T = TypeVar("T")


class PacsError(InputDataError):
    """The PACS could not give what was asked: unreachable, refused, an error, not DICOMweb.
    ``status`` is what a web service answers for it: 502 (the PACS failed), 404 (it has no such
    study or series), 400 (what was asked for cannot be used)."""

    def __init__(self, reason: str, *, status: int = 502, **where: object):
        super().__init__(reason, **where)
        self.status = status


@dataclass(frozen=True)
class PacsStudy:
    """A study as QIDO-RS lists it."""

    patient_id: str
    study_uid: str
    date: str
    description: str
    modalities: tuple[str, ...]
    instances: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "date": self.date,
            "description": self.description,
            "modalities": list(self.modalities),
            "instances": self.instances,
        }


@dataclass(frozen=True)
class PacsSeries:
    """A series as QIDO-RS lists it."""

    study_uid: str
    series_uid: str
    modality: str
    instances: int
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "instances": self.instances,
            "description": self.description,
        }


def _value(record: dict, tag: str, default: Any = "") -> Any:
    values = record.get(tag, {}).get("Value") or [default]
    value = values[0]
    return value.get("Alphabetic", default) if isinstance(value, dict) else value


def _records(answer: object, url: str, what: str) -> list[dict]:
    if not isinstance(answer, list) or not all(isinstance(r, dict) for r in answer):
        raise PacsError(f"{url} answered {what} with something that is not DICOM JSON: is it the DICOMweb root?")
    return answer


def _all_pages(search: Callable[..., object], url: str, what: str) -> list[dict]:
    """Every result of a QIDO-RS search, :data:`QIDO_PAGE` at a time. Bounded: a server that
    ignores ``offset`` (it sends the same page again) or never stops is an error, not a loop."""
    records: list[dict] = []
    for _ in range(MAX_QIDO_PAGES):
        page = _records(search(limit=QIDO_PAGE, offset=len(records)), url, what)
        if records and page and page[0] == records[-QIDO_PAGE]:
            raise PacsError(f"{url} sent the same page of {what} twice: it ignores QIDO-RS's offset")
        records += page
        if len(page) < QIDO_PAGE:
            return records
    raise PacsError(f"{url} answered {what} with more than {MAX_QIDO_PAGES * QIDO_PAGE} results")


class Pacs:
    """One DICOMweb server. Every failure is a :class:`PacsError` naming the server, the study
    when there is one, and the reason."""

    def __init__(self, url: str, timeout: tuple[float, float] = TIMEOUT_S):
        if not url.startswith(("http://", "https://")):
            raise PacsError(f"DICOMweb URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        session = requests.Session()
        session.verify = os.environ.get(CA_BUNDLE_ENV) or True
        if os.environ.get(TOKEN_ENV):
            session.headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
        elif os.environ.get(USER_ENV):
            session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)

    def _ask(self, what: str, call: Callable[[], T], study_uid: str | None = None, patient_id: str | None = None) -> T:
        """Run one request; turn each way it can fail into a sentence."""
        study = f"study {shown_uid(study_uid)}: " if study_uid else ""
        try:
            return call()
        except PacsError:
            raise  # already a sentence (a paging or answer check)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                reason = (
                    f"the PACS refused {what} ({status} {'Unauthorized' if status == 401 else 'Forbidden'}): "
                    f"check the credentials in {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}"
                )
            elif status == 404:
                reason = f"{what}: not found in the PACS (404): deleted or moved while it was read?"
            elif status in (400, 405, 406, 415):
                reason = f"the PACS answered {what} with HTTP {status}: is the URL the DICOMweb root?"
            else:
                reason = f"the PACS answered {what} with HTTP {status}"
            not_found = 404 if status == 404 else 502
            raise PacsError(f"{study}{reason}", status=not_found, patient_id=patient_id, path=self.url) from None
        except requests.exceptions.SSLError as error:
            reason = f"TLS verification failed for {what} ({_short(error)})"
            raise PacsError(f"{study}{reason}", patient_id=patient_id, path=self.url) from None
        except (requests.ConnectionError, requests.Timeout) as error:
            reason = f"the PACS is unreachable for {what} ({_short(error)})"
            raise PacsError(f"{study}{reason}", patient_id=patient_id, path=self.url) from None
        except (ValueError, KeyError, TypeError, AttributeError, pydicom.errors.InvalidDicomError) as error:
            reason = f"the answer to {what} is not DICOMweb ({_short(error)}): is the URL the DICOMweb root?"
            raise PacsError(f"{study}{reason}", patient_id=patient_id, path=self.url) from None

    def studies(self) -> list[PacsStudy]:
        """Every study the PACS holds, oldest first."""
        fields = ["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]

        def ask() -> list[dict]:
            search = self.client.search_for_studies
            return _all_pages(lambda **page: search(fields=fields, **page), self.url, "studies")

        studies = [
            PacsStudy(
                patient_id=str(_value(r, "00100020")),
                study_uid=str(_value(r, "0020000D")),
                date=str(_value(r, "00080020")),
                description=str(_value(r, "00081030")),
                modalities=tuple(str(m) for m in (r.get("00080061", {}).get("Value") or [])),
                instances=int(_value(r, "00201208", 0) or 0),
            )
            for r in self._ask("the study search", ask)
        ]
        return sorted(studies, key=lambda s: (s.date, s.study_uid))

    def series(self, study_uid: str, patient_id: str | None = None) -> list[PacsSeries]:
        def ask() -> list[dict]:
            fields = ["SeriesDescription", "NumberOfSeriesRelatedInstances"]
            search = self.client.search_for_series
            return _all_pages(lambda **page: search(study_uid, fields=fields, **page), self.url, "series")

        return [
            PacsSeries(
                study_uid=study_uid,
                series_uid=str(_value(r, "0020000E")),
                modality=str(_value(r, "00080060")),
                instances=int(_value(r, "00201209", 0) or 0),
                description=str(_value(r, "0008103E")),
            )
            for r in self._ask("the series search", ask, study_uid, patient_id)
        ]

    def instances(self, series: PacsSeries, patient_id: str | None = None) -> list[dict]:
        """The series' instances as QIDO-RS lists them (UID, size): what a fetch must bring."""

        def ask() -> list[dict]:
            search = self.client.search_for_instances
            uids = (series.study_uid, series.series_uid)
            return _all_pages(lambda **page: search(*uids, fields=["Rows", "Columns"], **page), self.url, "instances")

        return self._ask(f"series {shown_uid(series.series_uid)}", ask, series.study_uid, patient_id)

    def iter_instances(self, series: PacsSeries, patient_id: str | None = None) -> Iterator[pydicom.Dataset]:
        """The series' instances, streamed one at a time (WADO-RS)."""
        what, study = f"series {shown_uid(series.series_uid)}", series.study_uid
        stream = self._ask(what, lambda: self.client.iter_series(study, series.series_uid), study, patient_id)
        while True:
            dataset = self._ask(what, lambda: next(stream, None), study, patient_id)
            if dataset is None:
                return
            yield dataset

    def instance_metadata(self, study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
        """One instance's header (WADO-RS metadata, no pixels)."""
        what = f"instance {shown_uid(sop_uid)}"
        found = self._ask(
            what, lambda: self.client.retrieve_instance_metadata(study_uid, series_uid, sop_uid), study_uid
        )
        header = {tag: value for tag, value in found.items() if "BulkDataURI" not in value}  # no pixels
        return self._ask(what, lambda: pydicom.Dataset.from_json(header), study_uid)

    def store(self, datasets: Sequence[pydicom.Dataset], study_uid: str) -> None:
        """Store objects in a study (STOW-RS); a refusal of any of them is an error."""
        answer = self._ask("storing results", lambda: self.client.store_instances(list(datasets), study_uid), study_uid)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise PacsError(f"study {shown_uid(study_uid)}: the PACS refused {len(failed)} stored object(s)")


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:160] + ("..." if len(text) > 160 else "")


# --- the readings: LIDC XML files matched to series ---------------------------------------------


@lru_cache(maxsize=65536)
def _xml_series_uid(path: Path, _mtime_ns: int, _size: int) -> str | None:
    with open(path, "rb") as handle:
        found = _SERIES_IN_XML.search(handle.read(READING_HEAD_BYTES))
    return found.group(1).decode() if found else None


def index_readings(folder: Path | None) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> the LIDC XML files under ``folder`` that read it (a radiograph
    reading names no CT series and is left out). Each file's header is read once per version."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise InputDataError("annotations folder (LIDC XML) not found", path=folder)
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.xml")):
        stat = path.stat()
        uid = _xml_series_uid(path, stat.st_mtime_ns, stat.st_size)
        if uid:
            found.setdefault(uid, []).append(path)
    return found


# --- the cache: complete series only -------------------------------------------------------------


def patient_key(study: PacsStudy) -> str:
    """The partition key of a study's patient: its PatientID, which must be a safe name."""
    if not study.patient_id:
        raise PacsError(f"study {shown_uid(study.study_uid)} has no PatientID")
    return check_safe_key(study.patient_id, "PatientID")


def patient_signature(studies: Sequence[PacsStudy]) -> str:
    """A cheap change detector for the arrival watcher: each study and its instance count."""
    return ";".join(f"{s.study_uid}:{s.instances}" for s in sorted(studies, key=lambda s: s.study_uid))


def source_fingerprint(instance_uids: dict[str, Sequence[str]], readings: Sequence[Path]) -> str:
    """SHA-256 (16 hex digits) over each CT series' instance UIDs and the bytes of its readings:
    the same in the PACS as in the cache, so a patient ingested once is known by the watcher."""
    digest = hashlib.sha256(b"nodule_pipeline.dicomweb_patient\0")
    for series_uid in sorted(instance_uids):
        digest.update(series_uid.encode() + b"\0" + "\0".join(sorted(instance_uids[series_uid])).encode() + b"\0")
    for path in sorted(readings, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CachedPatient:
    """A patient's CT series on local disk, ready for the folder reader."""

    folder: Path
    skipped: list[SkippedSeries]
    fingerprint: str
    studies: list[str]


@dataclass(frozen=True)
class PatientListing:
    """What the PACS holds of a patient, before anything is fetched."""

    ct_series: dict[PacsSeries, list[dict]]
    skipped: list[SkippedSeries]

    def instance_uids(self) -> dict[str, list[str]]:
        return {s.series_uid: [str(_value(r, "00080018")) for r in rows] for s, rows in self.ct_series.items()}


def list_patient(pacs: Pacs, patient_id: str, studies: Sequence[PacsStudy]) -> PatientListing:
    """The patient's CT series with their instances, and the other series (skipped), checked
    for size before anything is fetched."""
    ct_series: dict[PacsSeries, list[dict]] = {}
    skipped: list[SkippedSeries] = []
    for study in studies:
        if study.instances > MAX_STUDY_INSTANCES:
            raise PacsError(
                f"study {shown_uid(study.study_uid)} has {study.instances} instances, more than the "
                f"{MAX_STUDY_INSTANCES} a chest CT study may have: refused before fetching",
                patient_id=patient_id,
            )
        for series in pacs.series(study.study_uid, patient_id):
            if series.modality != "CT":
                where = Path(f"dicomweb:{shown_uid(study.study_uid)}/{shown_uid(series.series_uid)}")
                skipped.append(SkippedSeries(where, series.modality, series.instances))
                continue
            rows = pacs.instances(series, patient_id)
            _check_series_size(series, rows, patient_id)
            ct_series[series] = rows
    if not ct_series:
        found = ", ".join(f"{s.modality} ({s.files} instances)" for s in skipped) or "no series"
        raise PacsError(f"no CT series in the PACS for this patient, only {found}", patient_id=patient_id)
    return PatientListing(ct_series, skipped)


def _check_series_size(series: PacsSeries, rows: list[dict], patient_id: str) -> None:
    study = f"study {shown_uid(series.study_uid)}, series {shown_uid(series.series_uid)}"
    if len(rows) > MAX_SERIES_INSTANCES:
        raise PacsError(
            f"{study} has {len(rows)} instances, more than the {MAX_SERIES_INSTANCES} a CT series may have: "
            "refused before fetching",
            status=400,
            patient_id=patient_id,
        )
    pixels = sum(int(_value(r, "00280010", 0) or 0) * int(_value(r, "00280011", 0) or 0) for r in rows)
    if 2 * pixels > MAX_VOLUME_BYTES:
        raise PacsError(
            f"{study} would be a {2 * pixels / 2**20:,.0f} MiB volume, more than the "
            f"{MAX_VOLUME_BYTES / 2**20:,.0f} MiB a CT series may be: refused before fetching",
            status=400,
            patient_id=patient_id,
        )


def _read_manifest(folder: Path) -> list[str] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())["instances"]
    except (OSError, ValueError, KeyError):
        return None


def fetch_series(pacs: Pacs, series: PacsSeries, expected: Sequence[str], dest: Path, patient_id: str) -> None:
    """Fetch one series into ``dest`` unless it already holds exactly the ``expected`` instances.

    Instances stream into a staging folder beside the cache; only when every expected instance
    has arrived (none missing, none extra, all of this series) does it replace ``dest``."""
    if _read_manifest(dest) == sorted(expected):
        return
    staging_root = dest.parents[2] / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=staging_root))
    study = f"study {shown_uid(series.study_uid)}, series {shown_uid(series.series_uid)}"
    try:
        wanted, arrived = set(expected), set()
        for dataset in pacs.iter_instances(series, patient_id):
            uid = str(dataset.get("SOPInstanceUID", ""))
            if str(dataset.get("SeriesInstanceUID", "")) != series.series_uid or uid not in wanted or uid in arrived:
                raise PacsError(
                    f"{study}: the PACS sent an instance that was not listed ({shown_uid(uid) or 'no UID'}): "
                    "the series changed while it was fetched; try again when it is complete",
                    patient_id=patient_id,
                )
            arrived.add(uid)
            dataset.save_as(staging / f"{uid}.dcm", enforce_file_format=True)
        if arrived != wanted:
            raise PacsError(
                f"{study}: the PACS listed {len(wanted)} instances and sent {len(arrived)}: still arriving "
                "or being deleted; nothing of it was ingested, try again when it is complete",
                patient_id=patient_id,
            )
        (staging / MANIFEST).write_text(json.dumps({"instances": sorted(arrived)}))
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = staging_root / f"{staging.name}.old"
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sync_readings(folder: Path, readings: Sequence[Path]) -> None:
    """Make the series folder's XML files exactly ``readings`` (copied, each atomically)."""
    wanted = {path.name: path for path in readings}
    for stale in folder.glob("*.xml"):
        if stale.name not in wanted:
            stale.unlink()
    for name, path in wanted.items():
        target = folder / name
        if target.exists() and target.read_bytes() == path.read_bytes():
            continue
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def cache_patient(
    pacs: Pacs,
    patient_id: str,
    studies: Sequence[PacsStudy],
    readings: dict[str, list[Path]],
    cache_root: Path,
) -> CachedPatient:
    """Bring the patient's CT series into ``cache_root/<patient>/<study>/<series>/`` with their
    readings, dropping cached series the PACS no longer has. Series already cached whole are
    not fetched again."""
    listing = list_patient(pacs, patient_id, studies)
    cache_root.mkdir(parents=True, exist_ok=True)
    cache_root.chmod(0o700)  # patients' scans
    folder = cache_root / check_safe_key(patient_id)
    keep: set[Path] = set()
    instance_uids = listing.instance_uids()
    for series in listing.ct_series:
        dest = folder / series.study_uid / series.series_uid
        fetch_series(pacs, series, instance_uids[series.series_uid], dest, patient_id)
        _sync_readings(dest, readings.get(series.series_uid, []))
        keep.add(dest)
    for cached in [p for p in folder.glob("*/*") if p.is_dir() and p not in keep]:
        shutil.rmtree(cached)
    for study_folder in [p for p in folder.iterdir() if p.is_dir() and not any(p.iterdir())]:
        study_folder.rmdir()
    matched = [path for s in listing.ct_series for path in readings.get(s.series_uid, [])]
    return CachedPatient(
        folder=folder,
        skipped=listing.skipped,
        fingerprint=source_fingerprint(instance_uids, matched),
        studies=[s.study_uid for s in studies],
    )


QUERY_PATIENT = "pacs query"
"""The patient id a query series' errors carry (its own is not read)."""


def fetch_query_series(pacs: Pacs, study_uid: str, series_uid: str, scratch: Path) -> Path:
    """One CT series to search from, fetched whole (the checks of ingestion's fetch) into
    ``scratch/query/<study>/<series>``: the folder to read."""
    found = [s for s in pacs.series(study_uid) if s.series_uid == series_uid]
    if not found:
        raise PacsError(f"study {shown_uid(study_uid)} has no series {shown_uid(series_uid)} in the PACS", status=404)
    (series,) = found
    if series.modality != "CT":
        raise PacsError(
            f"study {shown_uid(study_uid)}: series {shown_uid(series_uid)} is {series.modality or 'of no modality'}, "
            "not CT: a query needs a CT series",
            status=400,
        )
    rows = pacs.instances(series)
    _check_series_size(series, rows, QUERY_PATIENT)
    dest = scratch / "query" / study_uid / series_uid
    fetch_series(pacs, series, [str(_value(r, "00080018")) for r in rows], dest, QUERY_PATIENT)
    return dest


def group_by_patient(studies: Sequence[PacsStudy]) -> tuple[dict[str, list[PacsStudy]], list[str]]:
    """Studies with CT by patient key, and a line for each study that cannot be a partition."""
    patients: dict[str, list[PacsStudy]] = {}
    refused = []
    for study in studies:
        if study.modalities and "CT" not in study.modalities:
            continue
        try:
            patients.setdefault(patient_key(study), []).append(study)
        except InputDataError as error:
            refused.append(str(error))
    return patients, refused
