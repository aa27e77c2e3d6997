"""DICOM headers are not trusted for their size (issue 20): the volume a series' headers ask for,
each file's pixel data length against its BitsAllocated, and the orientation are checked before
anything is allocated, in ingestion and in the search server's series upload alike."""

from __future__ import annotations

import io
import json
import tracemalloc
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.series import MAX_VOLUME_BYTES, load_series
from nodule_pipeline_tests.search_server import search_server

PATIENT = "HEADERS"
SIZE = 16
"""Rows and columns of the generated slices whose pixels are really there."""
AXIAL = ["1", "0", "0", "0", "1", "0"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]
HUGE = 60_000
"""Rows and columns a forged header claims: three such slices would be 21.6 GB as int16."""
SMALL_PEAK = 64 << 20
"""Far above what reading a few tiny files costs, far below a volume the forged headers claim."""


def write_series(
    folder: Path,
    slices: int = 3,
    size: int = SIZE,
    bits_allocated: int = 16,
    orientation: list[str] = AXIAL,
    trailing_bytes: int = 0,
) -> Path:
    """A small CT series of ``slices`` files whose header says ``size`` x ``size`` pixels at
    ``bits_allocated``; the pixel data is always SIZE x SIZE 16-bit values and ``trailing_bytes``
    more, so a larger ``size``, another ``bits_allocated`` or trailing bytes make a header that
    lies about its pixels."""
    folder.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = ["-100", "-100", str(2.5 * index)]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_allocated, bits_allocated - 1
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.full((SIZE, SIZE), 1024 - 600 + index, dtype="<i2").tobytes() + bytes(trailing_bytes)
        ds.save_as(folder / f"{index + 1:06d}.dcm", enforce_file_format=True)
    return folder


def load_traced(folder: Path) -> tuple[InputDataError, int]:
    """The error ``load_series`` raises and the peak of memory traced while it ran (numpy's
    allocations included, lazily committed or not)."""
    tracemalloc.start()
    try:
        with pytest.raises(InputDataError) as caught:
            load_series(folder, PATIENT)
        return caught.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_honest_series_loads(tmp_path: Path) -> None:
    series = load_series(write_series(tmp_path / "good"), PATIENT)
    assert series.shape == (SIZE, SIZE, 3) and int(series.hu[0, 0, 2]) == -598


def test_headers_claiming_a_huge_volume_are_refused_before_it_is_allocated(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "huge", size=HUGE)
    error, peak = load_traced(folder)
    assert str(error).startswith(f"{PATIENT}: ")
    assert "3 slices of 60000x60000 pixels make a 21.6 GB volume, more than the 2.1 GB a CT series may take" in str(
        error
    )
    assert error.path == str(folder)
    assert peak < SMALL_PEAK, f"{peak:,} bytes traced: the volume was allocated"
    assert HUGE * HUGE * 3 * 2 > MAX_VOLUME_BYTES >= 1000 * 1024 * 1024 * 2  # a real CT series fits


@pytest.mark.parametrize(
    ("bits_allocated", "trailing_bytes", "message"),
    [
        (8, 0, "pixel data holds 512 bytes, but 16x16 pixels at BitsAllocated 8 take 256"),
        (32, 0, "pixel data holds 512 bytes, but 16x16 pixels at BitsAllocated 32 take 1,024"),
        # pydicom reads this one, dropping the excess with a warning: a silently wrong image
        (16, 100, "pixel data holds 612 bytes, but 16x16 pixels at BitsAllocated 16 take 512"),
    ],
    ids=["8-bit header", "32-bit header", "trailing bytes"],
)
def test_bits_allocated_that_disagree_with_the_pixel_data_are_refused(
    tmp_path: Path, bits_allocated: int, trailing_bytes: int, message: str
) -> None:
    folder = write_series(tmp_path / "bits", bits_allocated=bits_allocated, trailing_bytes=trailing_bytes)
    error, peak = load_traced(folder)
    assert error.path == str(folder / "000001.dcm") and PATIENT in str(error)
    assert message in str(error)
    assert peak < SMALL_PEAK


def test_a_sagittal_series_is_refused_naming_its_plane(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "sagittal", orientation=SAGITTAL)
    error, _ = load_traced(folder)
    assert error.path == str(folder / "000001.dcm") and PATIENT in str(error)
    assert "image orientation (0, 1, 0, 0, 0, -1) is sagittal; the pipeline reads axial slices" in str(error)


def test_the_server_answers_an_upload_of_huge_headers_400(tmp_path: Path) -> None:
    """300 forged slices ask for 2.2 TB: more than any machine, so trusting them is a 500
    (MemoryError), not the 400 that names the limit."""
    folder = write_series(tmp_path / "upload" / "series", slices=300, size=HUGE)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.iterdir()):
            bundle.write(path, f"series/{path.name}")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with search_server(data_dir, tmp_path / "serve.log") as server:
        query = urllib.parse.urlencode({"filename": "huge.zip"})
        status, _, body = server.request(f"/api/series?{query}", archive.getvalue(), "application/octet-stream")
        peak_kb = _peak_rss_kb(server.process.pid)
    answer = json.loads(body)
    assert status == 400, answer
    assert "huge.zip/series: 300 slices of 60000x60000 pixels make a 2,160.0 GB volume" in answer["error"]
    assert peak_kb < 2 << 20, f"the server's peak RSS reached {peak_kb:,} kB"


def _peak_rss_kb(pid: int) -> int:
    """A process's peak resident set (VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")
