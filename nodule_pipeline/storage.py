"""Crash-safe writes: a reader sees the old artefact or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nodule_pipeline.errors import check_safe_key


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` then rename into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(target: Path, fill: Callable[[Path], object]) -> None:
    """Fill a fresh sibling folder through ``fill(tmp_dir)``, then swap it in for ``target``.

    A crash leaves either the old folder or the new one, never a mix, so a failed rerun cannot
    destroy a patient's earlier result.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def artefact_folder(base_dir: Path, asset_path: list[str], partition_key: str | None = None) -> Path:
    """Where an asset (partition) is stored: ``<base>/<asset>[/<partition>]``, keys checked safe."""
    folder = base_dir.joinpath(*asset_path)
    return folder / check_safe_key(partition_key, "partition key") if partition_key is not None else folder


def artefacts_dir(data_dir: Path) -> Path:
    return data_dir / "artefacts"


def model_version_folder(base_dir: Path, model_version: str) -> Path:
    """Every trained model is also kept under its version, so an index can always be searched
    with the exact model that encoded it, even after a retrain that failed its checks."""
    return base_dir / "hash_model_versions" / check_safe_key(model_version, "model version")
