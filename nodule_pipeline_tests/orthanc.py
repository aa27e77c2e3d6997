"""A throwaway Orthanc PACS for tests: Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1,
a free port, a temp folder; stopped by its process id.

``running_orthanc()`` is the context manager (optionally with HTTP basic authentication);
:func:`upload` sends DICOM files through Orthanc's REST API and :func:`delete_study` removes a
study again, as a PACS administrator would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from nodule_pipeline_tests.dagster_ui import free_port

ORTHANC = Path(os.environ.get("NODULE_PIPELINE_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class OrthancServer:
    port: int
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"


def require_orthanc() -> None:
    """Orthanc and its DICOMweb plugin, or a skip here and a failure under CI=true."""
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        message = f"Orthanc not installed (missing {', '.join(missing)}): apt-get install orthanc orthanc-dicomweb"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)


@contextmanager
def running_orthanc(users: dict[str, str] | None = None) -> Iterator[OrthancServer]:
    """Start a fresh Orthanc (basic authentication for ``users`` when given), yield it, stop it."""
    require_orthanc()
    folder = Path(tempfile.mkdtemp(prefix="nodule-orthanc-"))
    port = free_port()
    config = {
        "Name": "nodule-pipeline-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([str(ORTHANC), str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    server = OrthancServer(port, next(iter(users.items())) if users else None)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({process.returncode}): {(folder / 'orthanc.log').read_text()}")
            try:
                if requests.get(f"{server.url}/system", auth=server.auth, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def upload(server: OrthancServer, files: Iterable[Path]) -> int:
    """POST each DICOM file to ``/instances``; the number stored."""
    stored = 0
    with requests.Session() as session:
        session.auth = server.auth
        for path in files:
            answer = session.post(f"{server.url}/instances", data=path.read_bytes(), timeout=30)
            answer.raise_for_status()
            stored += 1
    return stored


def delete_study(server: OrthancServer, study_uid: str) -> None:
    """Remove a study from the PACS (found by its StudyInstanceUID)."""
    found = requests.post(f"{server.url}/tools/lookup", data=study_uid, auth=server.auth, timeout=10).json()
    for item in found:
        if item["Type"] == "Study":
            requests.delete(f"{server.url}/studies/{item['ID']}", auth=server.auth, timeout=30).raise_for_status()


def sample_files(patient_dir: Path) -> list[Path]:
    """A sample patient's DICOM files, in name order."""
    return sorted(patient_dir.rglob("*.dcm"))


def copy_readings(sample: Path, patients: Iterable[str], into: Path) -> Path:
    """The patients' LIDC XML files in one flat folder, as TCIA ships the readings apart from the scans."""
    into.mkdir(parents=True, exist_ok=True)
    for patient in patients:
        for xml in (sample / patient).rglob("*.xml"):
            shutil.copyfile(xml, into / f"{patient}-{xml.name}")
    return into
