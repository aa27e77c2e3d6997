"""TCIA's LIDC-IDRI diagnosis spreadsheet (pathology and follow-up) and its match to library nodules.

The readers' malignancy ratings are suspicion, not a diagnosis: this sheet is the only diagnosis
LIDC-IDRI has, for 157 patients. Its "Nodule 1..5" have no official link to the readers' nodules,
so a diagnosis reaches a library nodule only under :data:`MATCHING_RULE`, and every match says
whether it is the nodule's own diagnosis or the patient's.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import pandas as pd
import xlrd
from xlrd.compdoc import CompDocError

from nodule_pipeline import privacy
from nodule_pipeline.errors import InputDataError

SHEET_NAME = "Diagnosis Truth"
DIAGNOSES = {0: "unknown", 1: "benign", 2: "primary lung cancer", 3: "metastatic"}
"""The sheet's diagnosis codes (patient and nodule level): 1 is benign or non-malignant disease."""
METHODS = {0: "unknown", 1: "two-year stability", 2: "biopsy", 3: "resection", 4: "progression or response"}
"""How the diagnosis was made: 1 is two years of radiological stability, 3 surgical resection."""
SHEET_NODULES = 5
"""The sheet has a diagnosis and a method column for each of Nodule 1..5."""
COLUMNS = ("patient_id", "level", "nodule", "diagnosis", "diagnosis_code", "method", "method_code", "primary_site")
MATCH_COLUMNS = ("patient_id", "nodule_id", "diagnosis", "diagnosis_method", "diagnosis_level")

MATCHING_RULE = (
    "A library nodule gets a diagnosis from TCIA's sheet only when its patient is in the sheet and has "
    "exactly one nodule in the library. If the sheet lists exactly one nodule for that patient, the "
    "library nodule gets that nodule's diagnosis and method (level 'nodule'). Otherwise, if the "
    "patient-level diagnosis is known and every nodule the sheet lists has that same diagnosis (or it "
    "lists none), the library nodule gets the patient's diagnosis and method (level 'patient'). An unknown "
    "diagnosis, a patient with several library nodules, or listed nodules that disagree give no diagnosis."
)
"""The one rule, in words, that every figure computed from these diagnoses must carry.

Patients with several library nodules get none: the sheet's Nodule N cannot be tied to a library
nodule, and a patient's cancer is usually one nodule among benign ones, so the patient's diagnosis
would mislabel the others."""

_PATIENT_ID = re.compile(r"LIDC-IDRI-\d{4}")
_CODE_TEXT = re.compile(r"\d+", re.ASCII)
_EMPTY = (xlrd.XL_CELL_EMPTY, xlrd.XL_CELL_BLANK)
_UNREADABLE = (xlrd.XLRDError, CompDocError, struct.error, IndexError, KeyError, AssertionError, ValueError)
"""What xlrd raises on a file that is not an .xls or is truncated or corrupt (measured by fuzzing)."""


@dataclass(frozen=True)
class DiagnosisMatch:
    """One library nodule's diagnosis from the sheet, with the level it was taken at (so a user
    sees when it is the patient's diagnosis, not the nodule's)."""

    diagnosis: str
    method: str
    level: Literal["nodule", "patient"]

    def as_json(self) -> dict[str, str]:
        """The shape each search hit carries."""
        return {"value": self.diagnosis, "method": self.method, "level": self.level}


def read_diagnosis_sheet(path: Path | str) -> pd.DataFrame:
    """One row per patient (``level`` "patient") and per nodule the sheet lists (``level``
    "nodule", ``nodule`` 1..5), codes decoded to words. A wrong file, sheet, header or cell is an
    :class:`InputDataError` naming the file, the sheet, the column and the row, never a guess."""
    sheet = _open_sheet(Path(path))
    columns = _find_columns(sheet, path)
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for row in range(1, sheet.nrows):
        cells = sheet.row(row)
        if all(_is_empty(cell) for cell in cells):
            continue
        patient_id = _patient_id(sheet, row, columns["patient_id"], path)
        if patient_id in seen:
            raise _cell_error(
                path, row, columns["patient_id"], f"patient id repeats row {seen[patient_id] + 1}", patient_id
            )
        seen[patient_id] = row
        records += _patient_records(sheet, row, columns, path, patient_id)
    if not seen:
        raise InputDataError(f"sheet {SHEET_NAME!r} lists no patients", path=path)
    return _frame(records, COLUMNS, objects=("nodule", "primary_site"))


def match_patient(
    library_nodules: int, patient: Mapping[str, Any], listed: Sequence[Mapping[str, Any]]
) -> DiagnosisMatch | None:
    """:data:`MATCHING_RULE` for one patient: the diagnosis each of its ``library_nodules`` gets,
    from its patient row and the nodule rows the sheet lists (rows of :func:`read_diagnosis_sheet`)."""
    if library_nodules != 1:
        return None
    if len(listed) == 1:
        (nodule,) = listed
        return _match(nodule, "nodule")
    if all(nodule["diagnosis_code"] == patient["diagnosis_code"] for nodule in listed):
        return _match(patient, "patient")
    return None


def match_diagnoses(nodules: pd.DataFrame, sheet: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Each library nodule (``patient_id``, ``nodule_id``) with its diagnosis under
    :data:`MATCHING_RULE` (``diagnosis``, ``diagnosis_method``, ``diagnosis_level``; None where the
    rule gives none), and a summary that states the rule and how many nodules it matched.

    Library patient ids are partition keys: under pseudonyms the sheet's ids are keyed the same way."""
    _require_columns(nodules, ("patient_id", "nodule_id"), "the nodule table")
    _require_columns(sheet, COLUMNS, "the diagnosis table")
    repeated = nodules["nodule_id"][nodules["nodule_id"].duplicated()]
    if len(repeated):
        raise InputDataError(f"the nodule table lists nodule {repeated.iloc[0]!r} more than once")
    patients: dict[str, dict[str, Any]] = {}
    listed: dict[str, list[dict[str, Any]]] = {}
    for record in sheet.to_dict("records"):
        key = _library_key(record["patient_id"])
        if record["level"] == "patient":
            patients[key] = record
        else:
            listed.setdefault(key, []).append(record)
    counts = nodules["patient_id"].value_counts()
    found = {
        patient: match_patient(int(counts[patient]), patients[patient], listed.get(patient, []))
        for patient in counts.index
        if patient in patients
    }
    rows = [
        dict(zip(MATCH_COLUMNS, (patient, nodule_id, *_match_fields(found.get(patient)))))
        for patient, nodule_id in zip(nodules["patient_id"], nodules["nodule_id"])
    ]
    table = _frame(rows, MATCH_COLUMNS, objects=MATCH_COLUMNS)
    matched = table[table["diagnosis_level"].notna()]
    summary = {
        "rule": MATCHING_RULE,
        "patients_in_sheet": len(patients),
        "library_patients": len(counts),
        "library_patients_in_sheet": sum(patient in patients for patient in counts.index),
        "patients_matched": int(matched["patient_id"].nunique()),
        "nodules": len(table),
        "nodules_matched": len(matched),
        "nodules_by_level": {
            level: int((matched["diagnosis_level"] == level).sum()) for level in ("nodule", "patient")
        },
        "diagnoses": {word: int((matched["diagnosis"] == word).sum()) for code, word in DIAGNOSES.items() if code},
    }
    return table, summary


def diagnosis_json(match: DiagnosisMatch | Mapping[str, Any] | None) -> dict[str, str] | None:
    """What a search hit shows for its nodule, ``{"value", "method", "level"}``, or None where the
    rule gave no diagnosis; ``match`` is a :class:`DiagnosisMatch` or a row of the match table."""
    if match is None or isinstance(match, DiagnosisMatch):
        return None if match is None else match.as_json()
    fields = [match[name] for name in MATCH_COLUMNS[2:]]
    if any(value is None or pd.isna(value) for value in fields):
        return None
    diagnosis, method, level = (str(value) for value in fields)
    if level not in ("nodule", "patient") or diagnosis not in DIAGNOSES.values():
        raise ValueError(f"not a diagnosis match: {dict(zip(MATCH_COLUMNS[2:], fields))}")
    return DiagnosisMatch(diagnosis, method, cast(Literal["nodule", "patient"], level)).as_json()


def _open_sheet(path: Path) -> xlrd.sheet.Sheet:
    try:
        # xlrd writes its warnings about odd files to stdout by default: keep them out of logs.
        book = xlrd.open_workbook(str(path), logfile=io.StringIO())
    except OSError as error:
        raise InputDataError(f"cannot read the diagnosis spreadsheet ({error.strerror})", path=path) from None
    except _UNREADABLE as error:
        raise InputDataError(
            f"not a readable .xls spreadsheet ({error or type(error).__name__}); TCIA publishes "
            "the LIDC diagnosis data as an Excel 97-2003 .xls file",
            path=path,
        ) from None
    if SHEET_NAME not in book.sheet_names():
        found = ", ".join(repr(name) for name in book.sheet_names()) or "none"
        raise InputDataError(f"no sheet {SHEET_NAME!r} (sheets found: {found})", path=path)
    return book.sheet_by_name(SHEET_NAME)


def _expected_columns() -> dict[str, str]:
    columns = {
        "patient_id": "TCIA Patient ID",
        "diagnosis": "Diagnosis at the Patient Level",
        "method": "Diagnosis Method",
        "primary_site": "Primary tumor site for metastatic disease",
    }
    for nodule in range(1, SHEET_NODULES + 1):
        columns[f"nodule{nodule}_diagnosis"] = f"Nodule {nodule} Diagnosis at the Nodule Level"
        columns[f"nodule{nodule}_method"] = f"Nodule {nodule} Diagnosis Method at the Nodule Level"
    return columns


def _normal(text: Any) -> str:
    return " ".join(str(text).split()).casefold()


def _find_columns(sheet: xlrd.sheet.Sheet, path: Path | str) -> dict[str, tuple[int, str]]:
    """Each expected column's index and name, from the header row. A header is the column's name,
    optionally followed by the code legend (TCIA's cells carry line breaks and spaces)."""
    headers = [_normal(cell.value) for cell in sheet.row(0)] if sheet.nrows else []
    found: dict[str, tuple[int, str]] = {}
    for key, name in _expected_columns().items():
        wanted = _normal(name)
        hits = [i for i, header in enumerate(headers) if header == wanted or header.startswith(wanted + " ")]
        if len(hits) != 1:
            shown = ", ".join(
                repr(str(cell.value).strip().splitlines()[0]) for cell in sheet.row(0) if str(cell.value).strip()
            )
            problem = "no column" if not hits else f"{len(hits)} columns"
            raise InputDataError(
                f"sheet {SHEET_NAME!r} has {problem} {name!r} in its first row (headers found: {shown or 'none'})",
                path=path,
            )
        found[key] = (hits[0], name)
    return found


def _patient_records(
    sheet: xlrd.sheet.Sheet, row: int, columns: Mapping[str, tuple[int, str]], path: Path | str, patient_id: str
) -> list[dict[str, Any]]:
    """One sheet row: the patient's record, then one for each nodule it lists."""

    def code(key: str, allowed: Mapping[int, str], *, required: bool) -> int | None:
        return _code(sheet, row, columns[key], allowed, path, patient_id, required=required)

    site = str(sheet.cell(row, columns["primary_site"][0]).value).strip() or None
    diagnosis, method = code("diagnosis", DIAGNOSES, required=True), code("method", METHODS, required=True)
    records = [_record(patient_id, "patient", None, diagnosis, method, site)]
    for nodule in range(1, SHEET_NODULES + 1):
        diagnosis = code(f"nodule{nodule}_diagnosis", DIAGNOSES, required=False)
        method = code(f"nodule{nodule}_method", METHODS, required=False)
        if (diagnosis is None) != (method is None):
            missing = columns[f"nodule{nodule}_{'diagnosis' if diagnosis is None else 'method'}"]
            raise _cell_error(path, row, missing, "empty, but the nodule's other column is filled", patient_id)
        if diagnosis is not None:
            records.append(_record(patient_id, "nodule", nodule, diagnosis, method, None))
    return records


def _is_empty(cell: xlrd.sheet.Cell) -> bool:
    return cell.ctype in _EMPTY or (cell.ctype == xlrd.XL_CELL_TEXT and not cell.value.strip())


def _cell_error(
    path: Path | str, row: int, column: tuple[int, str], reason: str, patient_id: str | None = None
) -> InputDataError:
    index, name = column
    return InputDataError(
        f"sheet {SHEET_NAME!r}, cell {xlrd.cellname(row, index)} (row {row + 1}, column {name!r}): {reason}",
        patient_id=None if patient_id is None else _library_key(patient_id),
        path=path,
    )


def _patient_id(sheet: xlrd.sheet.Sheet, row: int, column: tuple[int, str], path: Path | str) -> str:
    cell = sheet.cell(row, column[0])
    value = cell.value.strip() if cell.ctype == xlrd.XL_CELL_TEXT else ""
    if not _PATIENT_ID.fullmatch(value):
        raise _cell_error(path, row, column, f"{cell.value!r} is not a patient id like 'LIDC-IDRI-0068'")
    return value


def _code(
    sheet: xlrd.sheet.Sheet,
    row: int,
    column: tuple[int, str],
    allowed: Mapping[int, str],
    path: Path | str,
    patient_id: str,
    *,
    required: bool,
) -> int | None:
    cell = sheet.cell(row, column[0])
    if _is_empty(cell):
        if required:
            raise _cell_error(path, row, column, "empty; the patient needs a code", patient_id)
        return None
    if cell.ctype == xlrd.XL_CELL_NUMBER and float(cell.value).is_integer():
        code = int(cell.value)
    elif cell.ctype == xlrd.XL_CELL_TEXT and _CODE_TEXT.fullmatch(cell.value.strip()):
        code = int(cell.value.strip())
    else:
        raise _cell_error(path, row, column, f"{cell.value!r} is not a code", patient_id)
    if code not in allowed:
        legend = ", ".join(f"{number} {word}" for number, word in allowed.items())
        raise _cell_error(
            path, row, column, f"code {code} is outside {min(allowed)}-{max(allowed)} ({legend})", patient_id
        )
    return code


def _record(
    patient_id: str, level: str, nodule: int | None, diagnosis: int, method: int, site: str | None
) -> dict[str, Any]:
    return {
        "patient_id": patient_id,
        "level": level,
        "nodule": nodule,
        "diagnosis": DIAGNOSES[diagnosis],
        "diagnosis_code": diagnosis,
        "method": METHODS[method],
        "method_code": method,
        "primary_site": site,
    }


def _match(record: Mapping[str, Any], level: Literal["nodule", "patient"]) -> DiagnosisMatch | None:
    """A known diagnosis from one sheet row; an unknown one (code 0) is no diagnosis."""
    if record["diagnosis_code"] == 0:
        return None
    return DiagnosisMatch(str(record["diagnosis"]), str(record["method"]), level)


def _match_fields(match: DiagnosisMatch | None) -> tuple[str | None, str | None, str | None]:
    return (match.diagnosis, match.method, match.level) if match else (None, None, None)


def _frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], objects: Sequence[str]) -> pd.DataFrame:
    """A table with ``objects`` columns kept as Python objects, so an absent value is None (pandas
    would make it NaN in a string or number column)."""
    return pd.DataFrame(
        {name: pd.Series([row[name] for row in rows], dtype=object if name in objects else None) for name in columns}
    )


def _library_key(patient_id: str) -> str:
    """A sheet patient as the library keys it: its id, or its pseudonym when pseudonyms are on."""
    pseudonymiser = privacy.active()
    return pseudonymiser.patient(patient_id) if pseudonymiser else patient_id


def _require_columns(table: pd.DataFrame, names: Sequence[str], what: str) -> None:
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise InputDataError(f"{what} lacks column(s) {', '.join(missing)}")


SHEET_PATTERN = "*diagnosis*.xls"
"""How the sheet is found at the scan root: TCIA names it ``tcia-diagnosis-data-2012-04-20.xls``."""


def find_diagnosis_sheet(scan_root: Path, given: str | Path | None = None) -> Path | None:
    """The diagnosis sheet to read: ``given`` (which must exist), else the one ``*diagnosis*.xls``
    at the scan root (beside TCIA's ``metadata.csv``), else None: the pipeline runs without it."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise InputDataError("diagnosis sheet not found" if not path.exists() else "not a file", path=path)
        return path
    found = sorted(path for path in Path(scan_root).glob(SHEET_PATTERN) if path.is_file()) if scan_root else []
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise InputDataError(f"several diagnosis sheets at the scan root ({names}): name one", path=scan_root)
    return found[0] if found else None


def empty_sheet() -> pd.DataFrame:
    """The sheet's table when there is no sheet: no patient has a known diagnosis."""
    return _frame([], COLUMNS, objects=("patient_id", "level", "diagnosis", "method", "primary_site"))


def sheet_fingerprint(path: Path | None) -> str:
    """The identity of the sheet read ("none" without one): a run reads it again only when it changed."""
    if path is None:
        return "none"
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
