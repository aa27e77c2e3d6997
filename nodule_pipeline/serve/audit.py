"""The search server's audit log: one JSON line per search, upload, nodule view and sign-in,
appended to ``<data-dir>/audit/serve.jsonl`` by a writer thread, so that answering never waits
on the disk.

Each line is written with one ``write`` on a file opened ``O_APPEND`` (mode 0600), so lines of
several server processes interleave whole and a crash leaves at most the last line unwritten;
shipping the file (a log collector tailing it, as for any JSON-lines log) is the deployment's.
When the disk cannot keep up the queue drops lines rather than block, and says how many.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodule_pipeline.errors import InputDataError

AUDIT_FILE = Path("audit") / "serve.jsonl"
QUEUE_LINES = 10_000
"""Lines waiting for the disk before new ones are dropped (and counted): minutes of heavy use."""

log = logging.getLogger(__name__)


class AuditLog:
    """The audit file of a data dir, opened at start (a server that cannot audit does not serve)."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / AUDIT_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.parent.chmod(0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as error:
            raise InputDataError(f"cannot open the audit log {self.path} ({error.strerror})") from None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LINES)
        self.dropped = 0
        self._writer = threading.Thread(target=self._write_lines, name="audit-log", daemon=True)
        self._writer.start()

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one line (the time is stamped now); never blocks."""
        try:
            self._queue.put_nowait({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry})
        except queue.Full:
            self.dropped += 1

    def _write_lines(self) -> None:
        reported = 0
        while (entry := self._queue.get()) is not None:
            line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
            try:
                os.write(self._fd, line)
            except OSError as error:
                log.error("audit log %s: a line was not written (%s): %s", self.path, error.strerror, line[:200])
            if self.dropped > reported:
                log.error("audit log %s: %d lines dropped, the disk did not keep up", self.path, self.dropped)
                reported = self.dropped

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and close the file."""
        self._queue.put(None)
        self._writer.join(timeout)
        os.close(self._fd)
