"""The ROI table: the interchange format every stage after ingestion reads (DESIGN.md section 6).

Required columns: ``patient_id``, ``nodule_id``, ``label`` (0 benign, 1 malignant) and ``image``
(1024 float32 values, a 32x32 ROI row-major in Hounsfield units). Tables derived from scans
also carry where each ROI came from and the readers' ratings. Any table with the required
columns can be split, trained and evaluated on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.storage import atomic_write

ROI_SIZE = 32
REQUIRED_COLUMNS = ("patient_id", "nodule_id", "label", "image")
SPLIT_COLUMN = "split"
TRAIN, TEST = "train", "test"
SPLIT_SETTINGS = "split_settings"
"""``DataFrame.attrs`` key of the settings a split was drawn with; the parquet file keeps it
(pandas metadata), so a stored table says which settings its ``split`` column came from."""

_INT_COLUMNS = {
    "label": "int8",
    "nodule_label": "int8",
    "center_i": "int32",
    "center_j": "int32",
    "center_k": "int32",
    "nodule_readers": "int8",
    "subtlety": "int8",
    "internalStructure": "int8",
    "calcification": "int8",
    "sphericity": "int8",
    "margin": "int8",
    "lobulation": "int8",
    "spiculation": "int8",
    "texture": "int8",
}


def empty_roi_table() -> pd.DataFrame:
    """A table with the required columns and no rows (a patient without rated nodules)."""
    return pd.DataFrame(
        {
            "patient_id": pd.Series(dtype=str),
            "nodule_id": pd.Series(dtype=str),
            "label": pd.Series(dtype="int8"),
            "image": pd.Series(dtype=object),
        }
    )


def validate_roi_table(table: pd.DataFrame, source: str | Path = "ROI table") -> pd.DataFrame:
    """Check the contract and normalise dtypes; errors name the source and the offending row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputDataError(f"ROI table lacks required column(s) {missing}", path=source)
    table = table.reset_index(drop=True).copy()
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = labels.isna() | ~labels.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputDataError(f"row {row}: label {table['label'].iloc[row]} is not 0 or 1", path=source)
    bad = invalid_images(table)
    if bad:
        row = bad[0]
        image = np.asarray(table["image"].iloc[row], dtype=np.float32)
        reason = (
            f"image has {image.size} values, expected {ROI_SIZE * ROI_SIZE}"
            if image.size != ROI_SIZE * ROI_SIZE
            else "image holds NaN or infinite values"
        )
        raise InputDataError(f"row {row}: {reason} ({len(bad)} bad row(s) in all)", path=source)
    table["image"] = [np.asarray(value, dtype=np.float32).reshape(-1) for value in table["image"]]
    table["patient_id"] = table["patient_id"].astype(str)
    table["nodule_id"] = table["nodule_id"].astype(str)
    for column, dtype in _INT_COLUMNS.items():
        if column in table.columns:
            table[column] = table[column].astype(dtype)
    return table


def roi_images(table: pd.DataFrame) -> np.ndarray:
    """All ROIs as one (n, 32, 32) float32 array."""
    if len(table) == 0:
        return np.zeros((0, ROI_SIZE, ROI_SIZE), dtype=np.float32)
    return np.stack(table["image"].to_list()).astype(np.float32).reshape(-1, ROI_SIZE, ROI_SIZE)


def to_arrow(table: pd.DataFrame) -> pa.Table:
    """Arrow form with ``image`` as list<float32> (the contract), other columns as they are."""
    images = roi_images(table).reshape(-1)
    offsets = np.arange(0, len(table) + 1, dtype=np.int32) * ROI_SIZE * ROI_SIZE
    image_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(images, type=pa.float32()))
    rest = pa.Table.from_pandas(table.drop(columns=["image"]), preserve_index=False)
    return rest.append_column("image", image_array)


def write_roi_table(table: pd.DataFrame, path: Path) -> None:
    arrow = to_arrow(table)
    atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def read_roi_table(path: Path) -> pd.DataFrame:
    """Read and validate a ROI table parquet file; a wrong path or format names the file."""
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise InputDataError(f"cannot read ROI table ({error})", path=path) from None
    if "image" not in arrow.column_names:
        raise InputDataError("ROI table lacks required column(s) ['image']", path=path)
    table = arrow.drop(["image"]).to_pandas()
    table["image"] = list(arrow.column("image").to_numpy(zero_copy_only=False))
    return validate_roi_table(table, path)


def _stratified_pick(keys: list, strata: list, test_fraction: float, rng: np.random.Generator) -> set:
    """Keys sent to test: ``test_fraction`` of each stratum, chosen by a seeded shuffle."""
    chosen = set()
    for stratum in sorted(set(strata)):
        members = [k for k, s in zip(keys, strata) if s == stratum]
        rng.shuffle(members)
        chosen.update(members[: round(test_fraction * len(members))])
    return chosen


def assign_split(
    table: pd.DataFrame,
    mode: str = "patient",
    test_fraction: float = 0.3,
    seed: int = 0,
) -> pd.DataFrame:
    """Add the ``split`` column.

    ``patient`` (default): whole patients go to one side, stratified by each patient's majority
    label, so no nodule or scan is on both sides. ``roi``: the paper's random split of ROIs,
    stratified by label; it leaks (the same nodule's readers land on both sides) and exists to
    measure that leak.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    table = table.copy()
    if mode == "patient":
        majority = table.groupby("patient_id")["label"].mean().round().astype(int).sort_index()
        test_patients = _stratified_pick(list(majority.index), list(majority.to_numpy()), test_fraction, rng)
        is_test = table["patient_id"].isin(test_patients)
    elif mode == "roi":
        test_rows = _stratified_pick(list(range(len(table))), list(table["label"].to_numpy()), test_fraction, rng)
        is_test = pd.Series(np.isin(np.arange(len(table)), sorted(test_rows)), index=table.index)
    else:
        raise ValueError(f"split mode must be 'patient' or 'roi', got {mode!r}")
    table[SPLIT_COLUMN] = np.where(is_test, TEST, TRAIN)
    return table


def extend_split(table: pd.DataFrame, previous: dict[str, list[str]]) -> pd.DataFrame:
    """Add ``split`` keeping an earlier patient split: patients listed in ``previous``
    (``{"train": [...], "test": [...]}``) stay on their side, every other patient joins the
    training side, which is the search database. New scans thus grow the library without
    entering the test split an existing model and evaluation were measured on."""
    side = {patient: name for name in (TRAIN, TEST) for patient in previous.get(name, [])}
    table = table.copy()
    table[SPLIT_COLUMN] = table["patient_id"].map(side).fillna(TRAIN).astype(str)
    return table


def with_split_settings(table: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The table carrying the settings its split was drawn with (see :data:`SPLIT_SETTINGS`)."""
    table = table.copy()
    table.attrs[SPLIT_SETTINGS] = settings
    return table


def split_settings(table: pd.DataFrame) -> dict | None:
    """The settings a table's split was drawn with; None for a table that does not record them."""
    return table.attrs.get(SPLIT_SETTINGS)


def training_patients_in_test(train_patients: list[str], table: pd.DataFrame) -> list[str]:
    """The patients a model trained on that the table's split puts on the test side: figures
    measured on them are measured on data the model learned from."""
    return sorted(set(table.loc[table[SPLIT_COLUMN] == TEST, "patient_id"]) & set(train_patients))


def split_patients(table: pd.DataFrame) -> dict[str, list[str]]:
    """The patients on each side of a split table (what :func:`extend_split` keeps)."""
    return {
        name: sorted(table.loc[table[SPLIT_COLUMN] == name, "patient_id"].unique().tolist()) for name in (TRAIN, TEST)
    }


def malignant_fractions(table: pd.DataFrame) -> dict[str, float | None]:
    """The share of malignant ROIs on each side of the split (None for an empty side)."""
    return {
        name: float(rows["label"].mean()) if len(rows := table[table[SPLIT_COLUMN] == name]) else None
        for name in (TRAIN, TEST)
    }


def invalid_images(table: pd.DataFrame) -> list[int]:
    """Rows whose image is not 32x32 finite values (the contract every model input must meet)."""
    bad = []
    for row, value in enumerate(table["image"]):
        image = np.asarray(value, dtype=np.float32)
        if image.size != ROI_SIZE * ROI_SIZE or not np.isfinite(image).all():
            bad.append(row)
    return bad


def patients_on_both_sides(table: pd.DataFrame) -> list[str]:
    """Patients with ROIs in train and in test: a leak in patient mode."""
    sides = table.groupby("patient_id")[SPLIT_COLUMN].nunique()
    return sorted(sides[sides > 1].index)


def table_fingerprint(table: pd.DataFrame) -> str:
    """Content hash (16 hex digits) of the rows a model sees: ids, labels, split and pixels, so a
    model card and an index can name exactly which data they came from."""
    digest = hashlib.sha256(b"nodule_pipeline.roi_table\0")
    for column in ("patient_id", "nodule_id", "annotation_id", SPLIT_COLUMN):
        if column in table.columns:
            digest.update(f"{column}\0".encode() + "\x1f".join(table[column].astype(str)).encode() + b"\0")
    digest.update(np.ascontiguousarray(table["label"].to_numpy(dtype=np.int8)).tobytes())
    digest.update(np.ascontiguousarray(roi_images(table)).tobytes())
    return digest.hexdigest()[:16]
