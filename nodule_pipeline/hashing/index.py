"""The hash index: the searchable database of binary codes, ``fc`` features, labels and item metadata.

Stored as a folder of raw ``.npy`` arrays (memory-mapped on load, so opening a million-item
index costs no copy), the item metadata as parquet and an ``index.json`` manifest. The folder is
written through :func:`nodule_pipeline.storage.replace_dir`, so a crash leaves the old index or
the new one, never a mix.

Class gating (the paper's "corresponding class library") uses the *ground-truth* ``labels`` of
the database items and the *predicted* class of the query. ``predicted`` (the model's class for
each database item) is kept for reports only; search never reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from nodule_pipeline.hashing.codes import Encoded, pack_codes, unpack_codes
from nodule_pipeline.storage import reads_folder, replace_dir

FORMAT_VERSION = 1
"""Bump when the folder layout or the meaning of a file changes; older folders are then refused."""

REQUIRED_ITEM_COLUMNS = ("patient_id", "nodule_id")
MAX_BITS = 8 * 8190  # Hamming distances are held as uint16 with 0xFFFF reserved as "excluded"
FLOAT16_MAX = float(np.finfo(np.float16).max)

MANIFEST = "index.json"
CODES_FILE = "codes.npy"
FC_FILE = "fc.npy"
LABELS_FILE = "labels.npy"
PREDICTED_FILE = "predicted.npy"
ITEMS_FILE = "items.parquet"
ROIS_FILE = "rois.npy"
PROBS_FILE = "probs.npy"
RATINGS_FILE = "predicted_ratings.npy"
_OPTIONAL_FILES = {"rois": ROIS_FILE, "probs": PROBS_FILE, "predicted_ratings": RATINGS_FILE}
"""The index's optional arrays (field -> file), absent from indexes built without them."""
"""The index's optional arrays (field -> file): absent in indexes built without them."""
_DATA_FILES = (CODES_FILE, FC_FILE, LABELS_FILE, PREDICTED_FILE, ITEMS_FILE)
ROI_DTYPES = (np.dtype(np.int16), np.dtype(np.float32))
"""How library ROIs are stored: int16 for whole HU, float32 for anything else."""


class IndexFormatError(ValueError):
    """A hash index folder that this code cannot read (wrong version, inconsistent files)."""


@dataclass(frozen=True, eq=False)
class HashIndex:
    """The database side of retrieval; row ``r`` of every array and of ``items`` is one item.

    Treat it as read-only: search caches derived layouts on the object (``_cache``), and arrays
    built by :func:`build_index` or loaded by :func:`load_index` are flagged non-writeable.
    """

    codes: np.ndarray  # uint8 (n, bits/8), np.packbits order
    fc: np.ndarray  # float16 (n, d); distances are computed in float32 on the rows that need them
    labels: np.ndarray  # int8 (n,) ground truth; what class gating filters on
    predicted: np.ndarray  # int8 (n,) the model's class per item, -1 when unknown; reports only
    items: pd.DataFrame  # per-item metadata, row-aligned, at least patient_id and nodule_id
    bits: int
    model_version: str
    index_version: str  # content hash (see compute_index_version), named in every search result
    format_version: int = FORMAT_VERSION
    rois: np.ndarray | None = None  # (n, 32, 32) as read (see _library_rois): pictures and search by nodule
    probs: np.ndarray | None = None  # float32 (n, classes): the model's class probabilities per item
    predicted_ratings: np.ndarray | None = None  # float16 (n, 45): its rating head's, for a model with one
    lineage: dict[str, Any] = field(default_factory=dict)  # what it was built from (data version, patients)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.bits <= 0 or self.bits % 8 or self.bits > MAX_BITS:
            raise ValueError(f"bits must be a positive multiple of 8 up to {MAX_BITS}, got {self.bits}")
        if self.codes.dtype != np.uint8 or self.codes.ndim != 2 or self.codes.shape != (n, self.bits // 8):
            raise ValueError(
                f"codes must be uint8 of shape ({n}, {self.bits // 8}), got {self.codes.dtype} {self.codes.shape}"
            )
        if self.fc.ndim != 2 or self.fc.shape[0] != n or not np.issubdtype(self.fc.dtype, np.floating):
            raise ValueError(f"fc must be a float array with {n} rows, got {self.fc.dtype} {self.fc.shape}")
        if self.labels.dtype != np.int8 or self.labels.ndim != 1:
            raise ValueError(f"labels must be int8 (n,), got {self.labels.dtype} {self.labels.shape}")
        if self.predicted.dtype != np.int8 or self.predicted.shape != (n,):
            raise ValueError(f"predicted must be int8 ({n},), got {self.predicted.dtype} {self.predicted.shape}")
        if len(self.items) != n:
            raise ValueError(f"items has {len(self.items)} rows but the index has {n} items")
        missing = [c for c in REQUIRED_ITEM_COLUMNS if c not in self.items.columns]
        if missing:
            raise ValueError(f"items lacks required column(s) {missing}")
        if self.rois is not None and (self.rois.ndim != 3 or self.rois.shape[0] != n):
            raise ValueError(f"rois must be ({n}, h, w), got {self.rois.shape}")
        if self.rois is not None and self.rois.dtype not in ROI_DTYPES:
            raise ValueError(f"rois must be int16 or float32, got {self.rois.dtype}")
        for name, array in (("probs", self.probs), ("predicted_ratings", self.predicted_ratings)):
            if array is not None and (array.ndim != 2 or array.shape[0] != n):
                raise ValueError(f"{name} must have {n} rows, got {array.shape}")

    def encoded(self, row: int) -> Encoded | None:
        """What the model made of item ``row``, as a query by it needs (codes and features as
        stored): so a library nodule is searched without the network. None for an index that does
        not keep the model's class probabilities."""
        if self.probs is None:
            return None
        rows = slice(row, row + 1)
        ratings = self.predicted_ratings
        return Encoded(
            codes=unpack_codes(self.codes[rows], self.bits),
            fc=np.asarray(self.fc[rows], dtype=np.float32),
            probs=np.asarray(self.probs[rows], dtype=np.float32),
            predicted=np.asarray(self.predicted[rows], dtype=np.int8),
            ratings=None if ratings is None else np.asarray(ratings[rows], dtype=np.float32),
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fc_dim(self) -> int:
        """Length of one ``fc`` feature vector."""
        return int(self.fc.shape[1])


def build_index(
    codes: np.ndarray,
    fc: np.ndarray,
    labels: np.ndarray,
    items: pd.DataFrame,
    model_version: str,
    predicted: np.ndarray | None = None,
    rois: np.ndarray | None = None,
    lineage: dict[str, Any] | None = None,
    probs: np.ndarray | None = None,
    predicted_ratings: np.ndarray | None = None,
) -> HashIndex:
    """Validate and assemble an index from the model's outputs on the database split.

    ``codes`` is either boolean/0-1 codes (n, bits) or already packed ``uint8`` (n, bits/8):
    a ``uint8`` array is always taken as packed. ``fc`` is rounded to float16 here, once, so an
    index behaves the same before and after a save/load round trip. ``predicted`` defaults to -1
    (unknown). ``rois`` (optional) are kept with their values as read (:func:`_library_rois`) for
    result pictures and search by nodule; they are not part of the content hash. ``lineage``
    (JSON-ready) is stored in the manifest: the data version and patients the database came from.
    ``probs`` and ``predicted_ratings`` (the model's class probabilities and rating distributions
    per item) let a library nodule be searched without the network; like ``rois`` they follow from
    the model and the items, so they are not part of the content hash.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (n, bits) or packed (n, bits/8), got shape {codes.shape}")
    if codes.dtype == np.uint8:
        packed = np.array(codes, dtype=np.uint8, order="C", copy=True)
    elif codes.dtype == bool or np.issubdtype(codes.dtype, np.integer):
        if codes.dtype != bool and codes.size and not np.isin(codes, (0, 1)).all():
            raise ValueError("integer codes must hold only 0 and 1 (pass uint8 only for packed codes)")
        if codes.shape[1] % 8:
            raise ValueError(f"code length must be a multiple of 8 bits, got {codes.shape[1]}")
        packed = pack_codes(codes.astype(bool))
    else:
        raise ValueError(f"codes must be boolean, 0/1 integers or packed uint8, got dtype {codes.dtype}")
    n, bits = packed.shape[0], packed.shape[1] * 8
    if bits == 0 or bits > MAX_BITS:
        raise ValueError(f"code length must be between 8 and {MAX_BITS} bits, got {bits}")

    fc = np.asarray(fc)
    if fc.ndim != 2 or fc.shape[1] == 0:
        raise ValueError(f"fc must be 2-D (n, d) with d >= 1, got shape {fc.shape}")
    if not (np.issubdtype(fc.dtype, np.floating) or np.issubdtype(fc.dtype, np.integer)):
        raise ValueError(f"fc must be numeric, got dtype {fc.dtype}")

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    labels = _as_int8(labels, "labels")
    predicted = np.full(n, -1, dtype=np.int8) if predicted is None else _as_int8(np.asarray(predicted), "predicted")

    lengths = {"codes": n, "fc": fc.shape[0], "labels": len(labels), "predicted": len(predicted), "items": len(items)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs disagree on the number of items: {lengths}")
    missing = [c for c in REQUIRED_ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(f"items lacks required column(s) {missing}")

    # Own copies, so the read-only flag below never touches the caller's arrays.
    fc16 = _features_float16(fc)
    labels, predicted = labels.copy(), predicted.copy()
    items = items.reset_index(drop=True)
    version = compute_index_version(packed, fc16, labels, predicted, items)
    for array in (packed, fc16, labels, predicted):
        array.flags.writeable = False
    return HashIndex(
        codes=packed,
        fc=fc16,
        labels=labels,
        predicted=predicted,
        items=items,
        bits=bits,
        model_version=str(model_version),
        index_version=version,
        rois=None if rois is None else _library_rois(rois),
        lineage=dict(lineage or {}),
        probs=None if probs is None else _read_only(np.asarray(probs, dtype=np.float32)),
        predicted_ratings=None if predicted_ratings is None else _read_only(_features_float16(predicted_ratings)),
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def _library_rois(rois: np.ndarray) -> np.ndarray:
    """A read-only copy of ``rois`` that keeps every value: int16 (half the bytes) only when all
    are whole numbers in its range, as HU crops are; float32 otherwise (a table on another scale,
    such as 0..1), since search by nodule re-encodes these very images."""
    values = np.array(rois, dtype=np.float32, order="C", copy=True)
    whole = np.array_equal(np.rint(values), values) and (
        values.size == 0 or -32768 <= values.min() <= values.max() <= 32767
    )
    out = values.astype(np.int16) if whole else values
    out.flags.writeable = False
    return out


def _features_float16(fc: np.ndarray) -> np.ndarray:
    """A float16 copy of ``fc``, refusing NaN/inf and values float16 cannot hold.

    Checked in row chunks: at 10^6 x 512 a whole-matrix check would allocate gigabytes of temporaries.
    """
    step = max(1, (1 << 22) // fc.shape[1])
    for start in range(0, fc.shape[0], step):
        chunk = fc[start : start + step]
        if chunk.dtype == np.float16:
            # numpy reduces float16 ~20x slower than float32; an all-ones exponent marks NaN/inf.
            exponent = np.bitwise_and(np.ascontiguousarray(chunk).view(np.uint16), 0x7C00)
            low = high = np.nan if exponent.max(initial=0) == 0x7C00 else 0.0
        else:
            low, high = chunk.min(), chunk.max()  # NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high)):
            bad = start + np.flatnonzero(~np.isfinite(chunk).all(axis=1))
            raise ValueError(f"fc holds NaN or infinite values, first at row {bad[0]}")
        if max(-float(low), float(high)) > FLOAT16_MAX:
            raise ValueError(f"fc values exceed the float16 range (|x| <= {FLOAT16_MAX}) the index stores them in")
    return np.array(fc, dtype=np.float16, order="C", copy=True)


def _as_int8(values: np.ndarray, name: str) -> np.ndarray:
    """Integer class ids as int8, refusing floats and values that would wrap."""
    if values.dtype == bool:
        return values.astype(np.int8)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
    if values.size and (values.min() < -128 or values.max() > 127):
        raise ValueError(f"{name} must fit in int8 (-128..127)")
    return np.ascontiguousarray(values, dtype=np.int8)


def compute_index_version(
    codes: np.ndarray, fc: np.ndarray, labels: np.ndarray, predicted: np.ndarray, items: pd.DataFrame
) -> str:
    """A short content hash (sha256, 16 hex digits) of codes, fc, labels, predicted and items.

    Items are hashed through a canonical text/float64 form rather than pandas' own hashing or
    parquet bytes, so the value survives a parquet round trip and library upgrades.
    """
    h = hashlib.sha256(b"nodule_pipeline.hash_index\0")
    for name, array in (("codes", codes), ("fc", fc), ("labels", labels), ("predicted", predicted)):
        array = np.ascontiguousarray(array)
        h.update(f"{name}:{array.dtype.str}:{array.shape}\0".encode())
        if array.size:
            h.update(memoryview(array).cast("B"))
    h.update(f"items:{len(items)}:{len(items.columns)}\0".encode())
    for column in items.columns:
        h.update(_canonical_column(str(column), items[column]))
    return h.hexdigest()[:16]


def _canonical_column(name: str, column: pd.Series) -> bytes:
    """Numbers as float64 (one NaN pattern), everything else as text; the column name first."""
    if (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)) and not isinstance(
        column.dtype, pd.CategoricalDtype
    ):
        values = np.array(column.to_numpy(dtype=np.float64, na_value=np.nan), copy=True)
        values[np.isnan(values)] = np.nan
        return f"n:{name}\0".encode() + values.tobytes()
    text = column.astype("string").fillna("\x00NA").tolist()
    return f"s:{name}\0".encode() + "\x1f".join(text).encode("utf-8", "surrogatepass") + b"\0"


def bytes_per_item(index: HashIndex) -> int:
    """Bytes one item costs in the array files (codes + float16 fc + label + prediction).

    The parquet item metadata comes on top of this and depends on which columns were given.
    """
    return index.bits // 8 + index.fc_dim * index.fc.dtype.itemsize + 2


def save_index(index: HashIndex, folder: Path | str) -> Path:
    """Write the index folder atomically: readers see the previous index or this one, never a mix."""
    folder = Path(folder)

    def fill(tmp: Path) -> None:
        np.save(tmp / CODES_FILE, np.ascontiguousarray(index.codes, dtype=np.uint8), allow_pickle=False)
        np.save(tmp / FC_FILE, np.ascontiguousarray(index.fc, dtype=np.float16), allow_pickle=False)
        np.save(tmp / LABELS_FILE, np.ascontiguousarray(index.labels), allow_pickle=False)
        np.save(tmp / PREDICTED_FILE, np.ascontiguousarray(index.predicted), allow_pickle=False)
        index.items.to_parquet(tmp / ITEMS_FILE, index=False)
        for field_name, name in _OPTIONAL_FILES.items():
            if getattr(index, field_name) is not None:
                np.save(tmp / name, np.ascontiguousarray(getattr(index, field_name)), allow_pickle=False)
        labels, counts = np.unique(index.labels, return_counts=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "bits": index.bits,
            "count": len(index),
            "fc_dim": index.fc_dim,
            "fc_dtype": "float16",
            "model_version": index.model_version,
            "index_version": index.index_version,
            "label_counts": {str(int(lab)): int(c) for lab, c in zip(labels, counts)},
            "bytes_per_item": bytes_per_item(index),
            "files": list(_DATA_FILES),
            "lineage": index.lineage,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    replace_dir(folder, fill)
    return folder


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The ``index.json`` of an index folder, checked for a format version this code reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"hash index folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"hash index folder {folder} has no {MANIFEST}: not an index, or an interrupted write")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"hash index folder {folder}: {MANIFEST} is not valid JSON ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"hash index folder {folder} has format version {version!r}; this code reads version "
            f"{FORMAT_VERSION} only. Rebuild the index (materialise hash_index again)."
        )
    return manifest


@reads_folder
def load_index(folder: Path | str, mmap: bool = True, verify: bool = False) -> HashIndex:
    """Open an index folder; with ``mmap`` the arrays are memory-mapped read-only, not copied.

    ``verify`` recomputes the content hash and refuses a folder whose files no longer match
    its manifest (it reads every byte, so it is off by default).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    missing = [name for name in _DATA_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"hash index folder {folder} lacks {', '.join(missing)}")
    mode = "r" if mmap else None
    arrays = {
        name: np.load(folder / name, mmap_mode=mode, allow_pickle=False)
        for name in (CODES_FILE, FC_FILE, LABELS_FILE, PREDICTED_FILE)
    }
    for array in arrays.values():
        if not mmap:
            array.flags.writeable = False
    # One chunk per column: taking a few rows from a multi-chunk Arrow column costs ~1 ms per query.
    items = pq.read_table(folder / ITEMS_FILE).combine_chunks().to_pandas()
    n, bits = manifest.get("count"), manifest.get("bits")
    if arrays[LABELS_FILE].shape != (n,):
        raise IndexFormatError(
            f"hash index folder {folder}: {LABELS_FILE} has shape {arrays[LABELS_FILE].shape}, manifest says {n} items"
        )
    try:
        index = HashIndex(
            codes=arrays[CODES_FILE],
            fc=arrays[FC_FILE],
            labels=arrays[LABELS_FILE],
            predicted=arrays[PREDICTED_FILE],
            items=items,
            bits=int(bits),
            model_version=str(manifest.get("model_version", "")),
            index_version=str(manifest.get("index_version", "")),
            lineage=manifest.get("lineage", {}),
            **{
                field_name: np.load(folder / name, mmap_mode=mode, allow_pickle=False)
                if (folder / name).is_file()
                else None
                for field_name, name in _OPTIONAL_FILES.items()
            },
        )
    except (TypeError, ValueError) as exc:
        raise IndexFormatError(f"hash index folder {folder} is inconsistent: {exc}") from exc
    if verify:
        actual = compute_index_version(index.codes, index.fc, index.labels, index.predicted, index.items)
        if actual != index.index_version:
            raise IndexFormatError(
                f"hash index folder {folder}: content hash {actual} does not match the manifest's "
                f"index_version {index.index_version}; the files were changed or damaged"
            )
    return index
