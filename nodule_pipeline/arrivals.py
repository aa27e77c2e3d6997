"""Which patient folders under a scan root are new, complete and changed (no Dagster here).

A folder counts as complete when it holds a completion marker (``.complete``, written last by
whatever delivers it) or when its file count, total size and newest modification time stayed
the same for ``settle_seconds``. Completed folders are identified by a content fingerprint, so
delivering the same files again (even with new modification times) is recognised as known.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

COMPLETE_MARKER = ".complete"
_CHUNK = 1 << 20


def folder_signature(folder: Path) -> str:
    """A cheap change detector: file count, total bytes and newest mtime of every file inside."""
    count = size = newest = 0
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime_ns)
    return f"{count}:{size}:{newest}"


def content_fingerprint(folder: Path) -> str:
    """SHA-256 (16 hex digits) over the relative paths and bytes of every file but the marker:
    the same delivery gets the same fingerprint, whatever the copy did to timestamps."""
    digest = hashlib.sha256(b"nodule_pipeline.patient_folder\0")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass
class ArrivalState:
    """What the watcher remembers between looks (JSON-ready: the sensor's cursor)."""

    pending: dict[str, dict] = field(default_factory=dict)  # patient -> {"signature", "since"}
    seen: dict[str, dict] = field(default_factory=dict)  # patient -> {"signature", "fingerprint"}

    def to_dict(self) -> dict:
        return {"pending": self.pending, "seen": self.seen}

    @classmethod
    def from_dict(cls, payload: dict | None) -> ArrivalState:
        payload = payload or {}
        return cls(dict(payload.get("pending", {})), dict(payload.get("seen", {})))


@dataclass(frozen=True)
class Arrival:
    """A complete patient folder whose content differs from the last one seen."""

    patient_id: str
    fingerprint: str


def find_arrivals(
    folders: dict[str, Path],
    state: ArrivalState,
    settle_seconds: float,
    known_fingerprint: Callable[[str], str | None],
    now: float | None = None,
    budget_seconds: float = 20.0,
) -> list[Arrival]:
    """Look at each patient folder (``folders``: partition key -> folder) once and return those
    that are complete and new or changed.

    ``known_fingerprint(patient)`` gives the fingerprint already ingested (None if never), so a
    folder that was ingested some other way (the command line) is not ingested again.
    ``state`` is updated in place. Fingerprinting stops after ``budget_seconds``; the rest
    waits for the next look.
    """
    now = time.time() if now is None else now
    started = time.monotonic()
    arrivals = []
    for patient_id, folder in sorted(folders.items()):
        signature = folder_signature(folder)
        if state.seen.get(patient_id, {}).get("signature") == signature:
            continue
        pending = state.pending.get(patient_id)
        settled = pending is not None and pending["signature"] == signature and now - pending["since"] >= settle_seconds
        if not (folder / COMPLETE_MARKER).is_file() and not settled:
            if pending is None or pending["signature"] != signature:
                state.pending[patient_id] = {"signature": signature, "since": now}
            continue
        if time.monotonic() - started > budget_seconds:
            break
        fingerprint = content_fingerprint(folder)
        state.pending.pop(patient_id, None)
        previous = state.seen.get(patient_id, {}).get("fingerprint") or known_fingerprint(patient_id)
        state.seen[patient_id] = {"signature": signature, "fingerprint": fingerprint}
        if fingerprint != previous:
            arrivals.append(Arrival(patient_id, fingerprint))
    return arrivals
