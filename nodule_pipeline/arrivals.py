"""Which patients of a scan source are new, complete and changed (no Dagster here).

A patient counts as complete when its delivery marked it so (a folder's ``.complete``, written
last by whatever delivers it) or when its signature stayed the same for ``settle_seconds``: a
folder's file count, total size and newest modification time, a PACS patient's studies and their
instance counts. Completed patients are identified by a content fingerprint, so delivering the
same files again (even with new modification times) is recognised as known.
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
class Watched:
    """A patient as the watcher sees it: a cheap signature, whether its delivery marked it
    complete, and how to fingerprint its content (called only once it is complete)."""

    signature: str
    marked_complete: bool
    fingerprint: Callable[[], str]


def watch_folder(folder: Path) -> Watched:
    return Watched(folder_signature(folder), (folder / COMPLETE_MARKER).is_file(), lambda: content_fingerprint(folder))


@dataclass(frozen=True)
class Arrival:
    """A complete patient whose content differs from the last one seen."""

    patient_id: str
    fingerprint: str


def find_arrivals(
    watched: dict[str, Watched],
    state: ArrivalState,
    settle_seconds: float,
    known_fingerprint: Callable[[str], str | None],
    now: float | None = None,
    budget_seconds: float = 20.0,
) -> list[Arrival]:
    """Look at each patient (``watched``: partition key -> what the watcher sees) once and return
    those that are complete and new or changed.

    ``known_fingerprint(patient)`` gives the fingerprint already ingested (None if never), so a
    patient that was ingested some other way (the command line) is not ingested again.
    ``state`` is updated in place. Fingerprinting stops after ``budget_seconds``; the rest
    waits for the next look.
    """
    now = time.time() if now is None else now
    started = time.monotonic()
    arrivals = []
    for patient_id, patient in sorted(watched.items()):
        signature = patient.signature
        if state.seen.get(patient_id, {}).get("signature") == signature:
            continue
        pending = state.pending.get(patient_id)
        settled = pending is not None and pending["signature"] == signature and now - pending["since"] >= settle_seconds
        if not patient.marked_complete and not settled:
            if pending is None or pending["signature"] != signature:
                state.pending[patient_id] = {"signature": signature, "since": now}
            continue
        if time.monotonic() - started > budget_seconds:
            break
        fingerprint = patient.fingerprint()
        state.pending.pop(patient_id, None)
        previous = state.seen.get(patient_id, {}).get("fingerprint") or known_fingerprint(patient_id)
        state.seen[patient_id] = {"signature": signature, "fingerprint": fingerprint}
        if fingerprint != previous:
            arrivals.append(Arrival(patient_id, fingerprint))
    return arrivals
