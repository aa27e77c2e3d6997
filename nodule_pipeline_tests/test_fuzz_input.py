"""Fuzz test of bad input (issue 7): every way a delivery can be corrupt ends in a clear error.

One generated LIDC patient is mirrored (symlinks) under a fresh patient id per case and ONE thing
is broken: DICOM bytes (bit flips in the header or the pixels, overwrites, insertions, truncation,
garbage appended, non-DICOM content), DICOM header elements (deleted, garbage, wrong VR or
multiplicity, huge, negative, NaN, another transfer syntax without re-encoding, rows/columns or
pixel data that disagree, a position copied from another slice), the LIDC XML (truncated,
invalid characters, NaN/inf/garbage positions and coordinates, points off the image, missing
elements, another namespace, ratings out of range, unknown images, empty, binary, deep nesting,
entity bombs) or the series itself (a slice removed or doubled, a second XML, a folder or a
dangling link named *.dcm). Each case must load (some corruptions are harmless) or raise
``InputDataError`` naming the patient and the corrupted file -- or, for series-level faults
(missing slices, two series), the series folder (a doubled slice is resolved as pylidc does);
annotations that no longer fit the images may name the XML. A case that hangs or runs past ``CASE_LIMIT_S`` fails.

A few corrupted patients also go through the ``ingest_patient`` job beside a good one: each run
fails with the clear error, stores nothing, and the good patient's artefacts stay byte-identical.

Bounded: ``CASES`` derandomized examples (about a minute on 2 cores), no example database.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.demo_data import XML_FILENAME, generate_patient
from nodule_pipeline.lidc.rois import extract_rois
from nodule_pipeline.lidc.series import load_series
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.roi_table import validate_roi_table
from nodule_pipeline.runner import PROGRESS_RUN_CONFIG, failure_reason, open_instance
from nodule_pipeline.storage import artefact_folder, artefacts_dir

PATIENT = "LIDC-IDRI-0957"  # 65 slices, 6 rated annotations: quick
CASES = 300
"""Unit-level examples; each loads at most a 65-slice series (0.1-0.25 s)."""
CASE_LIMIT_S = 30.0
"""A hang detector, not a speed test: a healthy case takes well under a second."""

BYTES, HEADER, XML, SERIES = "dicom bytes", "dicom header", "xml", "series"


# --------------------------------------------------------------------------------------------
# The pristine patient and its mirrors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The generated series every case starts from (never written to)."""

    series: Path
    slices: tuple[str, ...]  # *.dcm names, sorted
    z_mm: tuple[float, ...]  # z of each slice, same order
    sop_uids: tuple[str, ...]
    slice_bytes: int
    pixel_offset: int  # where the pixel data starts in a slice file
    xml_text: str


def _tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (links followed), plus every folder (as "dir")."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches what it learns from the source under ./.hypothesis even without an
    example database: keep that out of the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    (series,) = generate_patient(PATIENT, tmp_path_factory.mktemp("pristine"), seed=0)
    names = tuple(sorted(p.name for p in series.glob("*.dcm")))
    headers = [pydicom.dcmread(series / name, stop_before_pixels=True) for name in names]
    size = (series / names[0]).stat().st_size
    return Source(
        series=series,
        slices=names,
        z_mm=tuple(float(ds.ImagePositionPatient[2]) for ds in headers),
        sop_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        slice_bytes=size,
        pixel_offset=size - int(headers[0].Rows) * int(headers[0].Columns) * 2,
        xml_text=(series / XML_FILENAME).read_text(),
    )


def mirror(source: Source, root: Path, patient_id: str) -> Path:
    """The source series under a new patient id, every file a symlink; returns its series folder."""
    folder = root / patient_id / source.series.parent.name / source.series.name
    folder.mkdir(parents=True)
    for item in source.series.iterdir():
        os.symlink(item, folder / item.name)
    return folder


def _replace(folder: Path, name: str, data: bytes) -> None:
    """Put ``data`` in place of a mirrored file: the link goes, the pristine file is untouched."""
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_bytes(data)


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """One thing broken in a mirrored series folder; ``file`` is the file it is about."""

    kind: str
    what: str
    file: str
    apply: Callable[[Path], None] = field(compare=False)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.file}: {self.what}>"


def _rewrite(kind: str, what: str, name: str, transform: Callable[[bytes], bytes]) -> Corruption:
    def apply(folder: Path) -> None:
        _replace(folder, name, transform((folder / name).read_bytes()))

    return Corruption(kind, what, name, apply)


# DICOM bytes ---------------------------------------------------------------------------------

NOT_DICOM = {
    "text": b"this is not a DICOM file\n",
    "zeros": bytes(4096),
    "preamble only": bytes(128) + b"DICM",
    "preamble and junk": bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2" * 40,
    "an XML file": b'<?xml version="1.0"?><LidcReadMessage/>',
    "a PNG header": b"\x89PNG\r\n\x1a\n" + bytes(64),
}


@st.composite
def dicom_byte_corruptions(draw: st.DrawFn, source: Source) -> Corruption:
    name = draw(st.sampled_from(source.slices))
    size, header = source.slice_bytes, source.pixel_offset
    how = draw(st.sampled_from(["flip", "overwrite", "insert", "truncate", "empty", "append", "replace", "headless"]))
    if how == "flip":
        region = draw(st.sampled_from(["header", "pixels"]))
        lo, hi = (0, header) if region == "header" else (header, size)
        flips = draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=8))

        def transform(data: bytes) -> bytes:
            out = bytearray(data)
            for position, mask in flips:
                out[position] ^= mask
            return bytes(out)

        return _rewrite(BYTES, f"xor bytes in the {region} {flips}", name, transform)
    if how in ("overwrite", "insert"):
        at = draw(st.integers(0, header + 64))
        junk = draw(st.binary(min_size=1, max_size=64))
        end = at + len(junk) if how == "overwrite" else at
        return _rewrite(BYTES, f"{how} {junk!r} at byte {at}", name, lambda data: data[:at] + junk + data[end:])
    if how == "truncate":
        length = draw(st.one_of(st.integers(0, header + 16), st.integers(0, size - 1)))
        return _rewrite(BYTES, f"truncate to {length} bytes", name, lambda data: data[:length])
    if how == "empty":
        return _rewrite(BYTES, "empty file", name, lambda data: b"")
    if how == "append":
        junk = draw(st.binary(min_size=1, max_size=4096))
        return _rewrite(BYTES, f"append {len(junk)} garbage bytes", name, lambda data: data + junk)
    if how == "headless":
        return _rewrite(BYTES, "no preamble and no DICM prefix", name, lambda data: data[132:])
    label = draw(st.sampled_from([*NOT_DICOM, "random bytes"]))
    content = NOT_DICOM.get(label) or draw(st.binary(min_size=1, max_size=2048))
    return _rewrite(BYTES, f"replaced by {label}", name, lambda data: content)


# DICOM header --------------------------------------------------------------------------------

REQUIRED = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "PixelData",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
)
"""Elements deleted by a case (the transfer syntax is deleted from the file meta separately)."""

BAD_VALUES: dict[str, list] = {
    "Rows": [0, 1, 256, 511, 513, 65535],
    "Columns": [0, 1, 256, 513, 65535],
    "BitsAllocated": [0, 1, 8, 12, 32, 64],
    "BitsStored": [0, 1, 17, 64],
    "HighBit": [0, 7, 31],
    "PixelRepresentation": [2, 65535],
    "SamplesPerPixel": [0, 3],
    "NumberOfFrames": [0, 2, 100000],
    "PhotometricInterpretation": ["RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME1", "NONSENSE"],
    "Modality": ["MR", "PT", "ct", "SEG"],
    "SeriesInstanceUID": ["1.2.826.0.1.3680043.8.498.1", "9" * 64],
    "SOPInstanceUID": ["1.2.3.4"],
    "PixelSpacing": [
        *(["0", "0"], ["-0.7", "-0.7"], ["0.5", "0.5"], ["nan", "nan"], ["inf", "1"], ["1e308", "1e308"]),
        *(["0.7"], ["0.7", "0.7", "0.7"]),
    ],
    "ImagePositionPatient": [
        *(["0", "0"], ["nan", "nan", "nan"], ["0", "0", "inf"], ["0", "0", "-1e308"]),
        *(["-180", "-180", "1e999"], ["0", "0", "0", "0"]),
    ],
    "ImageOrientationPatient": [["0", "1", "0", "0", "0", "-1"], ["nan"] * 6, ["1", "0", "0"], ["0"] * 6],
    "RescaleSlope": ["0", "nan", "inf", "-1", "1e308", ["1", "2"]],
    "RescaleIntercept": ["nan", "-inf", "1e308", "-1e30", "0.5", ["-1024", "0"]],
}

RAW_VALUES = [b"", b"\x00", b"abc", b"abc\x00", b"nan", b"-1", b"1e999", b"1\\2\\3\\4\\5", b"\xff\xfe\xfd", b"0" * 3000]
RAW_TARGETS = [
    *(keyword for keyword in BAD_VALUES if keyword != "NumberOfFrames"),
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
]

TRANSFER_SYNTAXES = {
    "JPEG baseline": JPEGBaseline8Bit,
    "JPEG 2000": JPEG2000Lossless,
    "RLE": RLELossless,
    "deflated": DeflatedExplicitVRLittleEndian,
    "big endian": ExplicitVRBigEndian,
    "implicit VR": ImplicitVRLittleEndian,
    "unknown UID": "1.2.3.4.5.6",
    "not a UID": "garbage!",
}


@contextmanager
def _lenient_pydicom() -> Iterator[None]:
    """Let the test write values pydicom would refuse, and keep raw (UN) elements raw."""
    saved = config.settings.writing_validation_mode, config.replace_un_with_known_vr
    config.settings.writing_validation_mode, config.replace_un_with_known_vr = config.IGNORE, False
    try:
        yield
    finally:
        config.settings.writing_validation_mode, config.replace_un_with_known_vr = saved


def _encode(ds: pydicom.Dataset) -> bytes:
    """The file as the edited header says, in explicit VR little endian whatever the file meta claims."""
    out = DicomBytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=False)
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _edit_header(what: str, name: str, edit: Callable[[pydicom.Dataset], None]) -> Corruption:
    def transform(data: bytes) -> bytes:
        with _lenient_pydicom():
            ds = pydicom.dcmread(io.BytesIO(data))
            edit(ds)
            return _encode(ds)

    return _rewrite(HEADER, what, name, transform)


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)

    return edit


def _set_raw(keyword: str, vr: str, raw: bytes) -> Callable[[pydicom.Dataset], None]:
    tag = pydicom.datadict.tag_for_keyword(keyword)

    def edit(ds: pydicom.Dataset) -> None:
        ds[tag] = DataElement(tag, vr, raw if vr in ("UN", "OB") else raw.decode("latin-1"))

    return edit


def _delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        if keyword == "TransferSyntaxUID":
            del ds.file_meta.TransferSyntaxUID
        else:
            delattr(ds, keyword)

    return edit


def _set_transfer_syntax(uid: str) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid

    return edit


def _set_z(z: float) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, repr(z)]

    return edit


def _resize_pixels(length: int) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        pixels = ds.PixelData
        ds.PixelData = pixels[:length] if length <= len(pixels) else pixels + bytes(length - len(pixels))

    return edit


@st.composite
def dicom_header_corruptions(draw: st.DrawFn, source: Source) -> Corruption:
    index = draw(st.integers(0, len(source.slices) - 1))
    name = source.slices[index]
    how = draw(st.sampled_from(["delete", "set", "raw", "transfer syntax", "position", "sop", "pixel data length"]))
    if how == "delete":
        keyword = draw(st.sampled_from([*REQUIRED, "TransferSyntaxUID"]))
        return _edit_header(f"delete {keyword}", name, _delete(keyword))
    if how == "set":
        keyword = draw(st.sampled_from(sorted(BAD_VALUES)))
        value = draw(st.sampled_from(BAD_VALUES[keyword]))
        return _edit_header(f"{keyword} = {value!r}", name, _set(keyword, value))
    if how == "raw":
        keyword = draw(st.sampled_from(RAW_TARGETS))
        vr = draw(st.sampled_from(["UN", "LO", "OB"]))
        raw = draw(st.one_of(st.sampled_from(RAW_VALUES), st.binary(max_size=32)))
        return _edit_header(f"{keyword} as {vr} {raw[:40]!r}", name, _set_raw(keyword, vr, raw))
    if how == "transfer syntax":
        label = draw(st.sampled_from(sorted(TRANSFER_SYNTAXES)))
        uid = TRANSFER_SYNTAXES[label]
        return _edit_header(f"transfer syntax {label}, data not re-encoded", name, _set_transfer_syntax(uid))
    if how == "position":
        other = draw(st.integers(0, len(source.slices) - 1))
        step = abs(source.z_mm[1] - source.z_mm[0])
        z = draw(
            st.sampled_from(
                [
                    source.z_mm[other],
                    source.z_mm[index] + 0.5 * step,
                    source.z_mm[index] + 0.3 * step,
                    source.z_mm[index] + 1000.0,
                    source.z_mm[index] - 1000.0,
                ]
            )
        )
        return _edit_header(f"z = {z} (slice {other} is at {source.z_mm[other]})", name, _set_z(z))
    if how == "sop":
        other = draw(st.integers(0, len(source.slices) - 1))
        return _edit_header(f"SOPInstanceUID of slice {other}", name, _set("SOPInstanceUID", source.sop_uids[other]))
    pixels = source.slice_bytes - source.pixel_offset
    length = draw(st.sampled_from([0, 2, pixels // 2, pixels - 2, pixels + 2, 2 * pixels]))
    return _edit_header(f"pixel data resized to {length} bytes", name, _resize_pixels(length))


# LIDC XML ------------------------------------------------------------------------------------

XML_VALUES = {
    "imageZposition": ["", "nan", "NaN", "inf", "-inf", "1e999", "abc", "1e308", "-254.5", "0"],
    "xCoord": ["", "-1", "512", "100000", "99999999999999999999999", "3.5", "nan", "x"],
    "yCoord": ["-5", "513", "-99999999999999999999999", "1e3", ""],
    "malignancy": ["0", "6", "99", "-1", "3.5", "x", ""],
    "subtlety": ["0", "6", "x"],
    "internalStructure": ["0", "6", "-3"],
    "calcification": ["0", "7", "99"],
    "texture": ["0", "6", "1e9"],
    "imageSOP_UID": ["1.2.3.4", "", "x" * 200],
    "SeriesInstanceUid": ["1.2.3.4", ""],
    "inclusion": ["MAYBE", "", "false"],
    "noduleID": ["", "<>"],
}
XML_DELETABLE = [
    "imageZposition",
    "xCoord",
    "yCoord",
    "edgeMap",
    "roi",
    "characteristics",
    "malignancy",
    "subtlety",
    "imageSOP_UID",
    "ResponseHeader",
    "SeriesInstanceUid",
    "readingSession",
    "unblindedReadNodule",
]
XML_JUNK = ["\x00", "\x01", "<", "&", "&bogus;", "]]>", "</roi>", "<roi>", "\ufffe", '"', "<!--"]
ENTITY_BOMB = (
    '<?xml version="1.0"?>\n<!DOCTYPE LidcReadMessage [\n<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">\n'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">\n' for i in range(9))
    + "]>\n<LidcReadMessage>&j;</LidcReadMessage>\n"
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?>\n<!DOCTYPE LidcReadMessage [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
    "<LidcReadMessage>&x;</LidcReadMessage>\n"
)


def _elements(text: str, tag: str) -> list[re.Match]:
    return list(re.finditer(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL))


def _xml_text(what: str, transform: Callable[[str], str | bytes]) -> Corruption:
    def to_bytes(data: bytes) -> bytes:
        out = transform(data.decode("utf-8"))
        return out.encode("utf-8", "surrogatepass") if isinstance(out, str) else out

    return _rewrite(XML, what, XML_FILENAME, to_bytes)


def _nest(depth: int) -> Callable[[str], str]:
    def transform(text: str) -> str:
        head = text.index("</ResponseHeader>") + len("</ResponseHeader>")
        return text[:head] + "<a>" * depth + "</a>" * depth + text[head:]

    return transform


@st.composite
def xml_corruptions(draw: st.DrawFn, source: Source) -> Corruption:
    text = source.xml_text
    how = draw(st.sampled_from(["truncate", "inject", "value", "delete", "namespace", "root", "whole file"]))
    if how == "truncate":
        at = draw(st.integers(0, len(text) - 1))
        return _xml_text(f"truncate to {at} characters", lambda t: t[:at])
    if how == "inject":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.one_of(st.sampled_from(XML_JUNK), st.binary(min_size=1, max_size=16)))
        if isinstance(junk, bytes):
            return _xml_text(f"insert bytes {junk!r} at {at}", lambda t: t[:at].encode() + junk + t[at:].encode())
        return _xml_text(f"insert {junk!r} at {at}", lambda t: t[:at] + junk + t[at:])
    if how == "value":
        tag = draw(st.sampled_from(sorted(XML_VALUES)))
        found = _elements(text, tag)
        match = found[draw(st.integers(0, len(found) - 1))]
        value = draw(st.sampled_from(XML_VALUES[tag]))
        start, end = match.span(1)
        return _xml_text(f"<{tag}> #{found.index(match)} = {value!r}", lambda t: t[:start] + value + t[end:])
    if how == "delete":
        tag = draw(st.sampled_from(XML_DELETABLE))
        found = _elements(text, tag)
        match = found[draw(st.integers(0, len(found) - 1))]
        start, end = match.span()
        return _xml_text(f"delete <{tag}> #{found.index(match)}", lambda t: t[:start] + t[end:])
    if how == "namespace":
        ns = draw(st.sampled_from(['xmlns="http://example.com/other"', "", 'xmlns:x="http://www.nih.gov"']))
        return _xml_text(f"namespace {ns!r}", lambda t: t.replace('xmlns="http://www.nih.gov"', ns, 1))
    if how == "root":
        return _xml_text("root element renamed", lambda t: t.replace("LidcReadMessage", "IdriReadMessage"))
    whole: dict[str, Callable[[str], str | bytes]] = {
        "empty": lambda t: "",
        "binary": lambda t: bytes(range(256)) * 4,
        "nesting 1000": _nest(1000),
        "nesting 100000": _nest(100_000),
        "entity bomb": lambda t: ENTITY_BOMB,
        "external entity": lambda t: EXTERNAL_ENTITY,
        "unknown encoding": lambda t: t.replace('encoding="UTF-8"', 'encoding="bogus-8"', 1),
        "multi-byte encoding": lambda t: t.replace('encoding="UTF-8"', 'encoding="EUC-JP"', 1),
        "utf-16 without BOM": lambda t: t.encode("utf-16-le"),
        "a DICOM file": lambda t: (source.series / source.slices[0]).read_bytes()[:4096],
    }
    label = draw(st.sampled_from(list(whole)))
    return _xml_text(label, whole[label])


# The series as a whole -----------------------------------------------------------------------


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _copy_as(name: str, new_name: str) -> Callable[[Path], None]:
    return lambda folder: _replace(folder, new_name, (folder / name).read_bytes())


def _folder_named(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).mkdir()


def _dangling_link(name: str) -> Callable[[Path], None]:
    return lambda folder: os.symlink(folder / "nowhere", folder / name)


@st.composite
def series_corruptions(draw: st.DrawFn, source: Source) -> Corruption:
    name = draw(st.sampled_from(source.slices))
    how = draw(st.sampled_from(["remove", "duplicate", "second xml", "folder", "dangling link"]))
    if how == "remove":
        return Corruption(SERIES, "slice removed", name, _remove(name))
    if how == "duplicate":
        return Corruption(SERIES, f"copy of {name}", "copy.dcm", _copy_as(name, "copy.dcm"))
    if how == "second xml":
        return Corruption(SERIES, "a second LIDC XML", "070.xml", _copy_as(XML_FILENAME, "070.xml"))
    if how == "folder":
        return Corruption(SERIES, "a folder named like a slice", "999999.dcm", _folder_named("999999.dcm"))
    return Corruption(SERIES, "a dangling link named like a slice", "999999.dcm", _dangling_link("999999.dcm"))


KIND_WEIGHTS = {BYTES: 3, HEADER: 4, XML: 3, SERIES: 1}
"""Share of the cases per kind: the series kind has few distinct cases."""


def corruptions(source: Source) -> st.SearchStrategy[Corruption]:
    by_kind = {
        BYTES: dicom_byte_corruptions(source),
        HEADER: dicom_header_corruptions(source),
        XML: xml_corruptions(source),
        SERIES: series_corruptions(source),
    }
    weighted = [kind for kind, weight in KIND_WEIGHTS.items() for _ in range(weight)]
    return st.sampled_from(weighted).flatmap(by_kind.__getitem__)


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


class CaseHung(BaseException):
    """Raised by the alarm in a case that runs past the limit (a BaseException: no code under
    test catches it and turns it into an InputDataError)."""


@contextmanager
def time_bound(seconds: float, what: object) -> Iterator[None]:
    def alarm(signum: int, frame: object) -> None:
        raise CaseHung(f"{what} still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_and_cut(folder: Path, patient_id: str) -> None:
    """What ingestion does with a series that a corruption could still break: load, validate,
    cut the ROIs (an all-lung mask: the real one is slow and not about bad input)."""
    series = load_series(folder, patient_id)
    table, _ = extract_rois(series, np.ones(series.shape, dtype=bool))
    if len(table):
        validate_roi_table(table, source=folder)


def check_clear_error(error: InputDataError, corruption: Corruption, folder: Path, patient_id: str) -> str:
    """Assert the error names the patient and the right place; returns where it pointed."""
    message = str(error)
    assert "\n" not in message, f"runners show the last line only: {message!r}"
    assert error.patient_id == patient_id and patient_id in message, message
    assert error.path and error.path in message, message
    path = Path(error.path)
    if path == folder / corruption.file:
        return "file"
    assert corruption.kind != XML, f"{corruption!r}: the error should name the XML file: {message}"
    if path == folder:
        return "series folder"
    if path == folder / XML_FILENAME:  # the images changed under the annotations
        return "XML"
    assert corruption.kind == SERIES and path.parent == folder, f"{corruption!r}: names another file: {message}"
    return "file"


def run_case(corruption: Corruption, folder: Path, patient_id: str) -> str:
    """Apply, load, check: "loaded" or where the clear error pointed."""
    corruption.apply(folder)
    started = time.perf_counter()
    try:
        with time_bound(CASE_LIMIT_S, corruption):
            load_and_cut(folder, patient_id)
        outcome = "loaded"
    except InputDataError as error:
        outcome = check_clear_error(error, corruption, folder, patient_id)
    seconds = time.perf_counter() - started
    assert seconds < CASE_LIMIT_S, f"{corruption!r} took {seconds:.1f} s"
    return outcome


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each invalid value it meets
def test_every_corruption_loads_or_fails_clearly(
    source: Source, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    pristine = _tree_hashes(source.series)
    numbers = count(1)
    tally: Counter[tuple[str, str]] = Counter()
    started = time.perf_counter()

    @settings(
        max_examples=CASES,
        derandomize=True,
        database=None,
        deadline=None,  # time_bound is the hang detector; hypothesis' deadline would flag slow CI
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(corruption=corruptions(source))
    def case(corruption: Corruption) -> None:
        patient_id = f"FUZZ-{next(numbers):04d}"
        folder = mirror(source, root, patient_id)
        try:
            tally[corruption.kind, run_case(corruption, folder, patient_id)] += 1
        finally:
            shutil.rmtree(root / patient_id)

    case()
    seconds = time.perf_counter() - started
    assert _tree_hashes(source.series) == pristine, "a case wrote through to the pristine patient"
    kinds = Counter(kind for kind, _ in tally.elements())
    outcomes = Counter(outcome for _, outcome in tally.elements())
    errors = kinds.total() - outcomes["loaded"]
    with capsys.disabled():
        print(f"\n{summary(tally, seconds)}")
    assert set(kinds) == set(KIND_WEIGHTS) and kinds.total() >= CASES // 2
    assert errors >= kinds.total() // 2  # most corruptions are caught, not silently loaded


def summary(tally: Counter[tuple[str, str]], seconds: float) -> str:
    """One line: cases per kind, how many ended in a clear error, and what the errors named."""
    kinds = Counter(kind for kind, _ in tally.elements())
    per_kind = ", ".join(f"{n} {kind} ({n - tally[kind, 'loaded']} errors)" for kind, n in kinds.most_common())
    named = Counter(outcome for _, outcome in tally.elements() if outcome != "loaded")
    return (
        f"fuzz: {kinds.total()} cases in {seconds:.0f} s: {per_kind}; {named.total()} clear errors naming the "
        f"{', the '.join(f'{place} ({n})' for place, n in named.most_common())}; "
        f"{kinds.total() - named.total()} loaded fine"
    )


def pipeline_corruptions(source: Source) -> dict[str, Corruption]:
    """A few corrupted patients for the Dagster job, one per stage an error can surface in."""
    roi = _elements(source.xml_text, "imageZposition")[0].span(1)
    return {
        "BAD-TRUNCATED": _rewrite(BYTES, "cut inside the header", source.slices[40], lambda data: data[:700]),
        "BAD-FIRST-SLICE": _edit_header("Rows = 256", source.slices[0], _set("Rows", 256)),
        "BAD-SLOPE": _edit_header("RescaleSlope 'abc'", source.slices[20], _set_raw("RescaleSlope", "UN", b"abc")),
        "BAD-MIXED-MODALITY": _edit_header("Modality = MR", source.slices[30], _set("Modality", "MR")),
        "BAD-NAN-Z": _xml_text("imageZposition NaN", lambda t: t[: roi[0]] + "NaN" + t[roi[1] :]),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ingest_job_fails_corrupt_patients_and_keeps_the_good_one(
    source: Source, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    root, data_dir = tmp_path_factory.mktemp("lidc"), tmp_path_factory.mktemp("data")
    mirror(source, root, PATIENT)
    bad = pipeline_corruptions(source)
    for patient_id, corruption in bad.items():
        corruption.apply(mirror(source, root, patient_id))
    defs = build_definitions(data_dir, root)
    instance = open_instance(data_dir)
    instance.add_dynamic_partitions(patients_partitions.name, [PATIENT, *bad])
    job = defs.resolve_job_def("ingest_patient")

    def run(patient_id: str):
        return job.execute_in_process(
            run_config=PROGRESS_RUN_CONFIG, instance=instance, partition_key=patient_id, raise_on_error=False
        )

    assert run(PATIENT).success
    artefacts = artefacts_dir(data_dir)
    stored = _tree_hashes(artefacts)
    started = time.perf_counter()
    for patient_id, corruption in bad.items():
        result = run(patient_id)
        reason = failure_reason(result)
        assert not result.success and patient_id in reason and corruption.file in reason, (corruption, reason)
    seconds = time.perf_counter() - started

    assert _tree_hashes(artefacts) == stored, "a failed run changed or added stored artefacts"
    for asset in ("lidc_scan", "lung_mask", "nodule_rois"):
        assert load_artefact(artefact_folder(artefacts, [asset], PATIENT)) is not None
    with capsys.disabled():
        print(
            f"\nfuzz pipeline: {len(bad)} corrupted patients failed clearly in {seconds:.0f} s; "
            f"the good patient's {sum(h != 'dir' for h in stored.values())} stored files are unchanged"
        )
