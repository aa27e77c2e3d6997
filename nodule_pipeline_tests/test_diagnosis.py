"""TCIA's LIDC diagnosis spreadsheet: the real file's counts, refused malformed sheets, and the
matching rule that ties a diagnosis to a library nodule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import xlwt

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.diagnosis import (
    COLUMNS,
    MATCHING_RULE,
    DiagnosisMatch,
    diagnosis_json,
    match_diagnoses,
    read_diagnosis_sheet,
)
from nodule_pipeline.privacy import PSEUDONYM_KEY_ENV, Pseudonymiser

LEGEND = "\n0=Unknown\n1=benign or non-malignant disease\n2= malignant, primary lung cancer\n3 = malignant metastatic\n"
METHOD_LEGEND = "\n0 = unknown\n1 = review of radiological images to show 2 years of stable nodule\n2 = biopsy\n"
HEADERS = [
    "TCIA Patient ID",
    "Diagnosis at the Patient Level" + LEGEND,
    "Diagnosis Method" + METHOD_LEGEND,
    "Primary tumor site for metastatic disease",
] + [
    header
    for n in range(1, 6)
    for header in (
        f"Nodule {n}\nDiagnosis at the Nodule Level {LEGEND})",
        f"Nodule {n}\nDiagnosis Method at the Nodule Level{METHOD_LEGEND}",
    )
]
"""Headers as TCIA writes them: line breaks, a code legend, a stray space and parenthesis."""
GOOD_ROWS = [
    ["LIDC-IDRI-0068", 3, 4, "Head & Neck Cancer", 3, 4],
    ["LIDC-IDRI-1002", 2, 2, "non-small cell carcinoma"],
    ["LIDC-IDRI-1011", 3, 2, "tongue", 3, 2, 3, 4, " ", " "],
]


@pytest.fixture(scope="module")
def real_sheet(diagnosis_sheet: Path) -> pd.DataFrame:
    return read_diagnosis_sheet(diagnosis_sheet)


def write_xls(path: Path, rows: list[list], headers: list[str] = HEADERS, sheet: str = "Diagnosis Truth") -> Path:
    """A real .xls (BIFF8, as TCIA's) with these headers and rows; None leaves a cell empty."""
    book = xlwt.Workbook()
    page = book.add_sheet(sheet)
    for col, header in enumerate(headers):
        page.write(0, col, header)
    for r, row in enumerate(rows, start=1):
        for col, value in enumerate(row):
            if value is not None:
                page.write(r, col, value)
    book.save(str(path))
    return path


def test_real_sheet_counts(real_sheet: pd.DataFrame):
    assert list(real_sheet.columns) == list(COLUMNS)
    patients = real_sheet[real_sheet["level"] == "patient"]
    assert len(patients) == 157 and patients["patient_id"].is_unique
    assert patients["patient_id"].str.fullmatch(r"LIDC-IDRI-\d{4}").all()
    assert patients["diagnosis"].value_counts().to_dict() == {
        "unknown": 27,
        "benign": 36,
        "primary lung cancer": 43,
        "metastatic": 51,
    }
    assert patients["method"].value_counts().to_dict() == {
        "unknown": 28,
        "two-year stability": 28,
        "biopsy": 46,
        "resection": 39,
        "progression or response": 16,
    }
    # codes and words agree row by row
    assert (
        patients["diagnosis_code"].map({0: "unknown", 1: "benign", 2: "primary lung cancer", 3: "metastatic"})
        == patients["diagnosis"]
    ).all()
    assert patients["nodule"].isna().all()
    nodules = real_sheet[real_sheet["level"] == "nodule"]
    # 137 patients list Nodule 1, 20 also Nodule 2; LIDC-IDRI-0285's Nodule 3 cells hold a lone space: not a nodule
    assert nodules["nodule"].value_counts().to_dict() == {1: 137, 2: 20}
    assert nodules[nodules["patient_id"] == "LIDC-IDRI-0285"]["nodule"].tolist() == [1, 2]
    assert nodules["primary_site"].map(lambda site: site is None).all()
    first = real_sheet.iloc[0].to_dict()
    assert first == {
        "patient_id": "LIDC-IDRI-0068",
        "level": "patient",
        "nodule": None,
        "diagnosis": "metastatic",
        "diagnosis_code": 3,
        "method": "progression or response",
        "method_code": 4,
        "primary_site": "Head & Neck Cancer",
    }


def test_constructed_sheet_reads_like_tcia(tmp_path: Path):
    sheet = read_diagnosis_sheet(write_xls(tmp_path / "good.xls", [*GOOD_ROWS, []]))
    assert sheet[["patient_id", "level", "nodule", "diagnosis_code", "method_code"]].values.tolist() == [
        ["LIDC-IDRI-0068", "patient", None, 3, 4],
        ["LIDC-IDRI-0068", "nodule", 1, 3, 4],
        ["LIDC-IDRI-1002", "patient", None, 2, 2],
        ["LIDC-IDRI-1011", "patient", None, 3, 2],
        ["LIDC-IDRI-1011", "nodule", 1, 3, 2],
        ["LIDC-IDRI-1011", "nodule", 2, 3, 4],
    ]


def _refused(path: Path) -> str:
    with pytest.raises(InputDataError) as info:
        read_diagnosis_sheet(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_not_an_xls_is_refused(tmp_path: Path):
    text = tmp_path / "diagnosis.xls"
    text.write_text("TCIA Patient ID,Diagnosis\nLIDC-IDRI-0068,3\n")
    assert "not a readable .xls spreadsheet (Unsupported format, or corrupt file" in _refused(text)
    assert "cannot read the diagnosis spreadsheet (No such file or directory)" in _refused(tmp_path / "absent.xls")


def test_truncated_real_file_is_refused(diagnosis_sheet: Path, tmp_path: Path):
    cut = tmp_path / "cut.xls"
    cut.write_bytes(diagnosis_sheet.read_bytes()[:20000])
    assert "not a readable .xls spreadsheet" in _refused(cut)


def test_wrong_sheet_is_refused(tmp_path: Path):
    message = _refused(write_xls(tmp_path / "other.xls", GOOD_ROWS, sheet="Sheet1"))
    assert message.endswith("no sheet 'Diagnosis Truth' (sheets found: 'Sheet1')")


def test_missing_column_is_refused(tmp_path: Path):
    headers = [h for h in HEADERS if not h.startswith("Diagnosis Method")]
    message = _refused(write_xls(tmp_path / "nomethod.xls", [], headers=headers))
    assert "sheet 'Diagnosis Truth' has no column 'Diagnosis Method' in its first row" in message
    assert "headers found: 'TCIA Patient ID', 'Diagnosis at the Patient Level', 'Primary tumor" in message
    renamed = [h.replace("Nodule 4\nDiagnosis Method", "Nodule 4\nMethod") for h in HEADERS]
    message = _refused(write_xls(tmp_path / "renamed.xls", [], headers=renamed))
    assert "has no column 'Nodule 4 Diagnosis Method at the Nodule Level'" in message


def test_code_out_of_range_is_refused(tmp_path: Path):
    rows = [GOOD_ROWS[0], ["LIDC-IDRI-0071", 3, 7, "Head & Neck"]]
    message = _refused(write_xls(tmp_path / "code.xls", rows))
    assert message.startswith("LIDC-IDRI-0071: ")
    assert message.endswith(
        "sheet 'Diagnosis Truth', cell C3 (row 3, column 'Diagnosis Method'): code 7 is outside 0-4 "
        "(0 unknown, 1 two-year stability, 2 biopsy, 3 resection, 4 progression or response)"
    )
    rows = [["LIDC-IDRI-0071", 3, 1, "x", 1, 1, 4, 1]]
    assert "cell G2 (row 2, column 'Nodule 2 Diagnosis at the Nodule Level'): code 4 is outside 0-3" in _refused(
        write_xls(tmp_path / "nodule.xls", rows)
    )
    assert "cell B2 (row 2, column 'Diagnosis at the Patient Level'): 'two' is not a code" in _refused(
        write_xls(tmp_path / "text.xls", [["LIDC-IDRI-0071", "two", 1, "x"]])
    )
    assert "cell F2 (row 2, column 'Nodule 1 Diagnosis Method at the Nodule Level'): empty, but" in _refused(
        write_xls(tmp_path / "half.xls", [["LIDC-IDRI-0071", 3, 1, "x", 1]])
    )


def test_bad_or_repeated_patient_id_is_refused(tmp_path: Path):
    message = _refused(write_xls(tmp_path / "id.xls", [["LIDC-0068", 3, 4, "x"]]))
    assert "cell A2 (row 2, column 'TCIA Patient ID'): 'LIDC-0068' is not a patient id" in message
    message = _refused(write_xls(tmp_path / "twice.xls", [GOOD_ROWS[0], GOOD_ROWS[1], GOOD_ROWS[0]]))
    assert (
        message.startswith("LIDC-IDRI-0068: ")
        and "cell A4 (row 4, column 'TCIA Patient ID'): patient id repeats row 2" in message
    )


def _sheet(*patients: tuple[str, int, list[int]]) -> pd.DataFrame:
    """A diagnosis table as read_diagnosis_sheet returns it: (patient, code, listed nodules' codes);
    the method code is the diagnosis code plus one, so tests see whose method a match carries."""
    words = {0: "unknown", 1: "benign", 2: "primary lung cancer", 3: "metastatic"}
    methods = {1: "two-year stability", 2: "biopsy", 3: "resection", 4: "progression or response"}
    rows = []
    for patient, code, listed in patients:
        rows.append((patient, "patient", None, code, "site"))
        rows += [(patient, "nodule", n, nodule_code, None) for n, nodule_code in enumerate(listed, start=1)]
    return pd.DataFrame(
        [
            {
                "patient_id": p,
                "level": level,
                "nodule": n,
                "diagnosis": words[c],
                "diagnosis_code": c,
                "method": f"{methods[c + 1]} ({level})",
                "method_code": c + 1,
                "primary_site": site,
            }
            for p, level, n, c, site in rows
        ]
    )


def _library(**nodule_counts: int) -> pd.DataFrame:
    rows = [
        (f"LIDC-IDRI-{p}", f"LIDC-IDRI-{p}-N{i:02d}") for p, count in nodule_counts.items() for i in range(1, count + 1)
    ]
    return pd.DataFrame(rows, columns=["patient_id", "nodule_id"])


def _matches(table: pd.DataFrame) -> dict[str, tuple]:
    return {row.nodule_id: (row.diagnosis, row.diagnosis_method, row.diagnosis_level) for row in table.itertuples()}


def test_matching_rule_on_constructed_tables():
    sheet = _sheet(
        ("LIDC-IDRI-0001", 2, [1]),  # one listed nodule, benign, in a patient with lung cancer
        ("LIDC-IDRI-0002", 2, []),  # none listed
        ("LIDC-IDRI-0003", 3, [3, 3]),  # two listed, both the patient's diagnosis
        ("LIDC-IDRI-0004", 2, [2, 1]),  # two listed that disagree
        ("LIDC-IDRI-0005", 2, [2]),  # several library nodules
        ("LIDC-IDRI-0006", 0, []),  # unknown patient diagnosis
        ("LIDC-IDRI-0007", 3, [0]),  # the one listed nodule is unknown
        ("LIDC-IDRI-0008", 0, [2]),  # known nodule, unknown patient
    )
    library = _library(
        **{"0001": 1, "0002": 1, "0003": 1, "0004": 1, "0005": 3, "0006": 1, "0007": 1, "0008": 1, "0009": 1}
    )
    table, summary = match_diagnoses(library, sheet)
    assert table["nodule_id"].tolist() == library["nodule_id"].tolist()
    none = (None, None, None)
    assert _matches(table) == {
        "LIDC-IDRI-0001-N01": ("benign", "biopsy (nodule)", "nodule"),
        "LIDC-IDRI-0002-N01": ("primary lung cancer", "resection (patient)", "patient"),
        "LIDC-IDRI-0003-N01": ("metastatic", "progression or response (patient)", "patient"),
        "LIDC-IDRI-0004-N01": none,
        "LIDC-IDRI-0005-N01": none,
        "LIDC-IDRI-0005-N02": none,
        "LIDC-IDRI-0005-N03": none,
        "LIDC-IDRI-0006-N01": none,
        "LIDC-IDRI-0007-N01": none,
        "LIDC-IDRI-0008-N01": ("primary lung cancer", "resection (nodule)", "nodule"),
        "LIDC-IDRI-0009-N01": none,  # not in the sheet
    }
    assert summary == {
        "rule": MATCHING_RULE,
        "patients_in_sheet": 8,
        "library_patients": 9,
        "library_patients_in_sheet": 8,
        "patients_matched": 4,
        "nodules": 11,
        "nodules_matched": 4,
        "nodules_by_level": {"nodule": 2, "patient": 2},
        "diagnoses": {"benign": 1, "primary lung cancer": 2, "metastatic": 1},
    }


def test_matching_rule_is_stated_in_words():
    for part in ("exactly one nodule in the library", "exactly one nodule", "level 'nodule'", "level 'patient'"):
        assert part in MATCHING_RULE


def test_matching_under_pseudonyms(monkeypatch: pytest.MonkeyPatch):
    key = "k" * 32
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, key)
    keyed = Pseudonymiser(key).patient("LIDC-IDRI-0001")
    library = pd.DataFrame({"patient_id": [keyed], "nodule_id": [f"{keyed}-N01"]})
    table, summary = match_diagnoses(library, _sheet(("LIDC-IDRI-0001", 1, [1])))
    assert _matches(table) == {f"{keyed}-N01": ("benign", "biopsy (nodule)", "nodule")}
    assert summary["nodules_matched"] == 1


def test_bad_tables_are_refused():
    sheet = _sheet(("LIDC-IDRI-0001", 1, []))
    with pytest.raises(InputDataError, match=r"the nodule table lists nodule 'LIDC-IDRI-0001-N01' more than once"):
        match_diagnoses(pd.concat([_library(**{"0001": 1})] * 2), sheet)
    with pytest.raises(InputDataError, match=r"the nodule table lacks column\(s\) nodule_id"):
        match_diagnoses(pd.DataFrame({"patient_id": ["LIDC-IDRI-0001"]}), sheet)
    with pytest.raises(InputDataError, match=r"the diagnosis table lacks column\(s\) method, method_code"):
        match_diagnoses(_library(**{"0001": 1}), sheet.drop(columns=["method", "method_code"]))


def test_real_sheet_with_constructed_library(real_sheet: pd.DataFrame):
    library = _library(**{"0068": 1, "0072": 1, "1002": 1, "1011": 1, "0174": 2, "1010": 1, "0088": 1, "0001": 1})
    table, summary = match_diagnoses(library, real_sheet)
    none = (None, None, None)
    assert _matches(table) == {
        # the one listed nodule: metastatic, by progression
        "LIDC-IDRI-0068-N01": ("metastatic", "progression or response", "nodule"),
        # the patient has lung cancer; its one listed nodule is benign, and that is what the nodule gets
        "LIDC-IDRI-0072-N01": ("benign", "progression or response", "nodule"),
        # no nodule listed: the patient's diagnosis, marked as such
        "LIDC-IDRI-1002-N01": ("primary lung cancer", "biopsy", "patient"),
        # two listed nodules, both metastatic like the patient
        "LIDC-IDRI-1011-N01": ("metastatic", "biopsy", "patient"),
        # two library nodules: which one the sheet means is unknown
        "LIDC-IDRI-0174-N01": none,
        "LIDC-IDRI-0174-N02": none,
        "LIDC-IDRI-1010-N01": none,  # patient diagnosis unknown
        "LIDC-IDRI-0088-N01": none,  # metastatic patient, its one listed nodule unknown
        "LIDC-IDRI-0001-N01": none,  # not in the sheet
    }
    assert summary["patients_in_sheet"] == 157
    assert summary["library_patients_in_sheet"] == 7
    assert summary["nodules_by_level"] == {"nodule": 2, "patient": 2}


def test_real_sheet_on_real_nodules(real_sheet: pd.DataFrame, real_nodules: Path):
    """The rule on the 1,733 real nodules: few get a diagnosis, and the summary says how few."""
    library = pd.read_parquet(real_nodules, columns=["patient_id", "nodule_id"])
    _, summary = match_diagnoses(library, real_sheet)
    assert {key: value for key, value in summary.items() if key != "rule"} == {
        "patients_in_sheet": 157,
        "library_patients": 734,
        "library_patients_in_sheet": 122,
        "patients_matched": 31,
        "nodules": 1733,
        "nodules_matched": 31,
        "nodules_by_level": {"nodule": 20, "patient": 11},
        "diagnoses": {"benign": 12, "primary lung cancer": 12, "metastatic": 7},
    }


def test_hit_json(tmp_path: Path):
    table, _ = match_diagnoses(
        _library(**{"0001": 1, "0002": 2}), _sheet(("LIDC-IDRI-0001", 2, []), ("LIDC-IDRI-0002", 1, []))
    )
    # a stored match table comes back with NaN where None was written
    table.to_parquet(tmp_path / "matches.parquet")
    stored = pd.read_parquet(tmp_path / "matches.parquet")
    assert isinstance(stored["diagnosis"].iloc[1], float) and math.isnan(stored["diagnosis"].iloc[1])
    for rows in (table, stored):
        hits = [diagnosis_json(row) for _, row in rows.iterrows()]
        assert hits == [
            {"value": "primary lung cancer", "method": "resection (patient)", "level": "patient"},
            None,
            None,
        ]
    assert diagnosis_json(None) is None
    assert diagnosis_json(DiagnosisMatch("benign", "biopsy", "nodule")) == {
        "value": "benign",
        "method": "biopsy",
        "level": "nodule",
    }
    with pytest.raises(ValueError, match=re.escape("not a diagnosis match")):
        diagnosis_json({"diagnosis": "benign", "diagnosis_method": "biopsy", "diagnosis_level": "ward"})
    with pytest.raises(KeyError):
        diagnosis_json({"diagnosis": "benign"})
