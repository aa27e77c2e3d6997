"""The writer that ``test_crash_safety`` kills: writes hash index or ROI table versions in its own
process and, given a step, stops there (prints ``paused <step>`` and waits) so that the test
SIGKILLs it by pid at exactly that point of the write, not at a moment a timer happens to hit.

``python -m nodule_pipeline_tests.crash_writer KIND TARGET FIRST COUNT [STEP]`` writes versions
FIRST.. FIRST+COUNT-1 of KIND (``index`` or ``rois``) to TARGET, printing each version's number
once it is stored.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from nodule_pipeline.hashing.index import build_index, save_index
from nodule_pipeline.roi_table import write_roi_table

ITEMS = 40_000
"""Items per index version: writes long enough for two writers to overlap."""


def pause(step: str) -> None:
    """Say where the write stands and wait for the test's SIGKILL. Stdin closes only when the
    test itself is gone: then leave without finishing the write."""
    print(f"paused {step}", flush=True)
    sys.stdin.read()
    os._exit(3)


def _stop_around(owner: Any, name: str, nth: int, step: str, before: bool = False) -> None:
    """Make ``owner.name`` pause at ``step`` just before or just after its ``nth`` call."""
    real = getattr(owner, name)
    calls = 0

    def hooked(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if before and calls == nth:
            pause(step)
        result = real(*args, **kwargs)
        if not before and calls == nth:
            pause(step)
        return result

    setattr(owner, name, hooked)


class _PausingFile(io.RawIOBase):
    """A file that pauses after its second write: the parquet header and the first bytes of
    data are on disk, the rest and the footer are not."""

    def __init__(self, raw: io.BufferedWriter, step: str):
        self.raw, self.step, self.writes = raw, step, 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview) -> int:
        written = self.raw.write(data)
        self.raw.flush()
        self.writes += 1
        if self.writes == 2:
            pause(self.step)
        return written


def _stop_half_written(step: str) -> None:
    real = pq.write_table

    def write_table(table: Any, where: str | Path, **kwargs: Any) -> None:
        with open(where, "wb") as raw:
            real(table, _PausingFile(raw, step), **kwargs)

    pq.write_table = write_table


STOPS: dict[str, dict[str, Callable[[str], None]]] = {
    # replace_dir: fill a temporary folder, move the old folder aside, move the new one in, delete the old
    "index": {
        "half filled": lambda step: _stop_around(np, "save", 1, step),
        "old moved aside": lambda step: _stop_around(os, "replace", 1, step),
        "new moved in": lambda step: _stop_around(os, "replace", 2, step),
    },
    # atomic_write: write a temporary file, rename it into place
    "rois": {
        "half written": _stop_half_written,
        "written, not renamed": lambda step: _stop_around(os, "replace", 1, step, before=True),
        "renamed": lambda step: _stop_around(os, "replace", 1, step),
    },
}
"""Where each kind of write can be stopped, in the order the steps happen."""


def write(kind: str, target: Path, version: int) -> None:
    """Version ``version`` of an index (model version ``m<version>``) or of a ROI table
    (``200 + version`` rows whose pixels all read ``version``)."""
    if kind == "index":
        rng = np.random.default_rng(version)
        items = pd.DataFrame(
            {"patient_id": [f"P{i % 50}" for i in range(ITEMS)], "nodule_id": [str(i) for i in range(ITEMS)]}
        )
        codes, fc, labels = rng.random((ITEMS, 256)) < 0.5, rng.random((ITEMS, 128)), rng.integers(0, 2, ITEMS)
        save_index(build_index(codes, fc, labels, items, f"m{version}"), target)
    else:
        rows = 200 + version
        table = pd.DataFrame(
            {
                "patient_id": ["P"] * rows,
                "nodule_id": [str(i) for i in range(rows)],
                "label": np.zeros(rows, np.int8),
                "image": [np.full(1024, version, np.float32)] * rows,
            }
        )
        write_roi_table(table, target)


def main(argv: list[str]) -> None:
    kind, target, first, count = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    if len(argv) > 4:
        STOPS[kind][argv[4]](argv[4])
    for version in range(first, first + count):
        write(kind, target, version)
        print(version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
