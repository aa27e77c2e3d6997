"""Crash-safe writes: a reader sees the old artefact or the new one, never half of either."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from nodule_pipeline.errors import StorageError, check_safe_key

T = TypeVar("T")


_HOST = socket.gethostname().replace(".", "_")


def owner_tag() -> str:
    """Names temporaries (and runs) after their writer (host and pid), so a later writer can tell
    whether that writer still lives."""
    return f"{_HOST}~{os.getpid()}~"


def owner_died(tag: str) -> bool:
    """Whether the writer an :func:`owner_tag` names was a process on this host that is gone
    (killed, crashed). Writers on other hosts, alive, or unknown count as alive."""
    host, _, rest = tag.partition("~")
    pid = rest.split("~", 1)[0]
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_orphans(target: Path) -> None:
    """Delete the temporaries of writers on this host that died (SIGKILL, power loss) before they
    could clean up. Writers on other hosts or still alive are left alone."""
    prefix = f".{target.name}."
    for leftover in target.parent.glob(f"{prefix}{_HOST}~*~*"):
        if owner_died(leftover.name[len(prefix) :]):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _stores(function: Callable[..., T]) -> Callable[..., T]:
    """Decorate a writer whose first argument is the artefact: a failed write (disk full,
    read-only file system, no permission) becomes a :class:`StorageError` naming it; the writers
    leave the old version alone."""

    @functools.wraps(function)
    def store(target: Path, *args: object, **kwargs: object) -> T:
        try:
            return function(target, *args, **kwargs)
        except StorageError:
            raise
        except OSError as error:
            failure = StorageError(target, error)
        # Raised outside the handler, so the original error is not kept as its context: that
        # traceback's frames hold the half-written file's handle, which must close now.
        raise failure

    return store


@_stores
def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` then rename into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _swap_lock(target: Path, shared: bool) -> Iterator[None]:
    """An advisory lock beside ``target``: writers swap folders under it exclusively, readers open
    under it shared, so a reader never meets the instant between a swap's two renames."""
    if not shared:
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(target.parent / f".{target.name}.lock", "a")
    except OSError:
        if not shared:
            raise
        yield  # a read-only copy of the artefacts: nobody swaps folders there
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finish_interrupted_swap(target: Path) -> None:
    """A writer killed between moving the old folder aside and moving the new one in leaves no
    ``target`` but a ``.<name>.old-<pid>``: put the old folder back (the new one never landed)."""
    if target.exists():
        return
    for leftover in sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime):
        try:
            os.replace(leftover, target)
            return
        except FileNotFoundError:  # another reader put it back first
            continue


@contextmanager
def reading(target: Path) -> Iterator[None]:
    """Open the files of a folder written by :func:`replace_dir` inside this block: they all come
    from one version, and a swap a crash interrupted is finished first."""
    with _swap_lock(Path(target), shared=True):
        _finish_interrupted_swap(Path(target))
        yield


def reads_folder(function: Callable[..., T]) -> Callable[..., T]:
    """Decorate a loader whose first argument is a folder written by :func:`replace_dir`."""

    @functools.wraps(function)
    def load(folder: Path | str, *args: object, **kwargs: object) -> T:
        with reading(Path(folder)):
            return function(folder, *args, **kwargs)

    return load


@_stores
def replace_dir(target: Path, fill: Callable[[Path], object]) -> None:
    """Fill a fresh sibling folder through ``fill(tmp_dir)``, then swap it in for ``target``.

    A crash leaves either the old folder or the new one, never a mix, so a failed rerun cannot
    destroy a patient's earlier result; concurrent writers swap one at a time and the last wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner_tag()}", dir=target.parent))
    try:
        fill(tmp)
        with _swap_lock(target, shared=False):
            _finish_interrupted_swap(target)
            for stale in target.parent.glob(f".{target.name}.old-*"):  # a writer killed while deleting it
                shutil.rmtree(stale, ignore_errors=True)
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


ROI_TABLE_FILE = "rois.parquet"
"""Where an asset's ROI table (images and their rows) is stored in its folder."""
TABLE_FILE = "table.parquet"
"""Where a table that is not a ROI table (no images: the diagnosis sheet, its matches) is stored."""


def artefacts_dir(data_dir: Path) -> Path:
    return data_dir / "artefacts"


def roi_dataset_file(data_dir: Path) -> Path:
    """The stored ``roi_dataset`` table of a data dir (every patient's ROIs and the split)."""
    return artefact_folder(artefacts_dir(data_dir), ["roi_dataset"]) / ROI_TABLE_FILE


def reports_dir(data_dir: Path) -> Path:
    return data_dir / "reports"


def model_version_folder(base_dir: Path, model_version: str) -> Path:
    """Every trained model is also kept under its version, so an index can always be searched
    with the exact model that encoded it, even after a retrain that failed its checks."""
    return base_dir / "hash_model_versions" / check_safe_key(model_version, "model version")


KEPT_MODEL_VERSIONS = 5
"""Trained models kept under their version besides the ones in use (each is ~34 MB)."""


def prune_model_versions(base_dir: Path, in_use: set[str], newest: int = KEPT_MODEL_VERSIONS) -> list[str]:
    """Delete stored model versions older than the ``newest`` few, never one ``in_use`` (the
    model an index was built with): without this every retrain adds a model for good. Each
    is deleted under its swap lock, so a search loading it finishes first; one that cannot be
    deleted stays. Returns the deleted."""
    folder = base_dir / "hash_model_versions"
    if not folder.is_dir():
        return []
    versions = sorted(
        (path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.stat().st_mtime_ns,
        reverse=True,
    )
    deleted = []
    for path in versions[newest:]:
        if path.name in in_use:
            continue
        try:
            with _swap_lock(path, shared=False):
                shutil.rmtree(path)
        except OSError:
            continue
        deleted.append(path.name)
    return deleted
