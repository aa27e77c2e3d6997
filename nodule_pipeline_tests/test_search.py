"""Searching the library built from the real sample: by DICOM position, by ROI file, from the
CLI (table, JSON, picture), and clear errors for bad queries."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodule_pipeline.cli import main
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.search import fc_rounding_bound
from nodule_pipeline.hashing.searcher import MAX_K, NoduleSearcher, check_query_image, load_query_roi

JSON_KEYS = {"rank", "patient_id", "nodule_id", "label", "malignancy", "hamming", "euclidean", "index_version"}


def _series_folder(lidc_sample: Path, patient_id: str) -> Path:
    return next((lidc_sample / patient_id).rglob("*.dcm")).parent


def test_a_database_nodule_found_from_its_own_dicom_comes_first(materialized: Path, lidc_sample: Path) -> None:
    searcher = NoduleSearcher.from_data_dir(materialized)
    items = searcher.index.items
    assert len(items) > 0
    for position, row in items.drop_duplicates("nodule_id").iterrows():
        folder = _series_folder(lidc_sample, row["patient_id"])
        voxel = (int(row["center_i"]), int(row["center_j"]), int(row["center_k"]))
        for mode in ("rerank", "hierarchical"):
            response = searcher.search_dicom(folder, voxel=voxel, k=len(items), mode=mode)
            own = [hit for hit in response.hits if hit.row == position]
            if mode == "hierarchical" and not own:
                continue  # classified into the other class: its own row is gated out, as designed
            # The query is cut exactly as its database row was: same code, and the same features
            # up to the float16 the index stores them in (the query is encoded alone, the library
            # in batches), so only items as near as rounding can stand before it.
            first = own[0]
            bound = fc_rounding_bound(searcher.index.fc[position])
            assert 0 < bound < 0.05 * float(np.linalg.norm(searcher.index.fc[position].astype(np.float32)))
            assert first.hamming == 0 and first.euclidean <= bound
            assert all(hit.index_version == searcher.index.index_version for hit in response.hits)


def _first_item_in_mm(materialized: Path, lidc_sample: Path):
    """The series, index row and patient position (mm) of the index's first nodule, the position
    from the DICOM standard on the raw header of the slice at the reader's z (from the XML), not
    from the series reader: ImagePositionPatient is the centre of pixel (0, 0), rows step by the
    first PixelSpacing value along y, columns by the second along x (axial orientation)."""
    import pydicom

    from nodule_pipeline.lidc.series import load_series

    row = NoduleSearcher.from_data_dir(materialized).index.items.iloc[0]
    folder = _series_folder(lidc_sample, row["patient_id"])
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in folder.glob("*.dcm")]
    header = min(headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - float(row["center_z_mm"])))
    assert abs(float(header.ImagePositionPatient[2]) - float(row["center_z_mm"])) < 1e-3
    x0, y0, z = (float(v) for v in header.ImagePositionPatient)
    dy, dx = (float(v) for v in header.PixelSpacing)
    corner = (x0, y0, z)
    centre = (x0 + row["center_j"] * dx, y0 + row["center_i"] * dy, z)
    return load_series(folder, row["patient_id"]), row, centre, corner


def test_patient_mm_position_matches_the_voxel(materialized: Path, lidc_sample: Path) -> None:
    series, row, (x, y, z), (x0, y0, _) = _first_item_in_mm(materialized, lidc_sample)
    k = row["center_k"]
    assert series.voxel_at_mm(x, y, z) == (row["center_i"], row["center_j"], k)
    assert series.voxel_at_mm(x0, y0, z) == (0, 0, k)
    dy, dx, dz = series.spacing_mm
    # the nearest voxel: 0.4 of a step off in each axis still names the same voxel
    assert series.voxel_at_mm(x0 + 7.4 * dx, y0 + 2.6 * dy, z + 0.4 * dz) == (3, 7, k)


def test_cli_json_and_picture(materialized: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    searcher = NoduleSearcher.from_data_dir(materialized)
    query = tmp_path / "query.npy"
    np.save(query, np.asarray(searcher.index.rois[0], dtype=np.float32))
    picture = tmp_path / "results.png"
    code = main(
        [
            "search",
            "--roi",
            str(query),
            "--data-dir",
            str(materialized),
            "--k",
            "3",
            "--json",
            "--picture",
            str(picture),
        ]
    )
    assert code == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(set(hit) == JSON_KEYS | {"readers", "diagnosis"} for hit in hits)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert len({h["nodule_id"] for h in hits}) == 3  # one hit per nodule
    assert [h["readers"] for h in hits] == [len(searcher.nodule_rows(h["nodule_id"])) for h in hits]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    common = ["search", "--roi", str(query), "--data-dir", str(materialized), "--json", "--k", "14", "--mode", "rerank"]
    assert main([*common, "--per-annotation"]) == 0
    annotations = json.loads(capsys.readouterr().out)
    assert len(annotations) == len(searcher.index) and set(annotations[0]) == JSON_KEYS | {"diagnosis"}
    assert main(common) == 0
    nodules = json.loads(capsys.readouterr().out)
    # the same ranking, each nodule where its best annotation stands
    first_places = list(dict.fromkeys(hit["nodule_id"] for hit in annotations))
    assert [hit["nodule_id"] for hit in nodules] == first_places == sorted(set(first_places), key=first_places.index)
    assert len(nodules) == searcher.index.items["nodule_id"].nunique()
    best = {hit["nodule_id"]: hit for hit in reversed(annotations)}
    assert [(h["hamming"], h["euclidean"]) for h in nodules] == [
        (best[h["nodule_id"]]["hamming"], best[h["nodule_id"]]["euclidean"]) for h in nodules
    ]
    assert main(["search", "--roi", str(query), "--data-dir", str(materialized), "--mode", "hamming"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and searcher.index.items.iloc[0]["patient_id"] in table


def test_out_of_volume_position_is_a_clear_error(materialized: Path, lidc_sample: Path) -> None:
    searcher = NoduleSearcher.from_data_dir(materialized)
    folder = _series_folder(lidc_sample, "LIDC-IDRI-0001")
    with pytest.raises(InputDataError, match="outside the volume"):
        searcher.search_dicom(folder, voxel=(600, 10, 10))


def test_search_without_a_library_is_a_clear_error(tmp_path: Path, capsys) -> None:
    query = tmp_path / "q.npy"
    np.save(query, np.zeros((32, 32)))
    assert main(["search", "--roi", str(query), "--data-dir", str(tmp_path)]) == 2
    assert "materialize hash_model and hash_index first" in capsys.readouterr().err


# --- Bad queries: each one clear error, the same from the API and from the CLI -----------------

BAD_ARRAYS = {
    "16x16": (np.zeros((16, 16)), "must be 32x32, got shape (16, 16)"),
    "32x32x3": (np.zeros((32, 32, 3)), "must be 32x32, got shape (32, 32, 3)"),
    "2x512": (np.zeros((2, 512)), "must be 32x32, got shape (2, 512)"),
    "1-D": (np.zeros(5), "must be 32x32, got shape (5,)"),
    "0-d": (np.array(-600.0), "must be 32x32, got shape ()"),
    "empty": (np.zeros((0,)), "must be 32x32, got shape (0,)"),
    "strings": (np.full((32, 32), "-600"), "must hold real numbers (HU), got dtype <U4"),
    "complex": (np.zeros((32, 32), complex), "must hold real numbers (HU), got dtype complex128"),
    "bool": (np.zeros((32, 32), bool), "must hold real numbers (HU), got dtype bool"),
    "datetime": (np.zeros((32, 32), "datetime64[s]"), "got dtype datetime64[s]"),
    "NaN": (np.where(np.arange(1024).reshape(32, 32) == 100, np.nan, 0.0), "1 NaN value(s), first at (row 3, col 4)"),
    "+inf": (np.full((32, 32), np.inf), "1024 infinite value(s), first at (row 0, col 0)"),
    "-inf": (np.where(np.eye(32, dtype=bool), -np.inf, 0.0), "32 infinite value(s), first at (row 0, col 0)"),
    "NaN and inf": (np.array([np.inf, np.nan] * 512), "512 NaN value(s), first at (row 0, col 1)"),  # NaN first
    "beyond float32": (np.full((32, 32), 1e300), "values beyond the float32 range"),
}
"""Arrays no query may be, and the message each one gets (also saved as .npy for the CLI)."""


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(array)
    (picture.convert(mode) if mode else picture).save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, roi=array)
    return buffer.getvalue()


class _Trap:
    """Unpickling this creates the file ``path``: proof that a query was never unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


GREY = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.uint8)
JPEG = io.BytesIO()
Image.fromarray(GREY).save(JPEG, "JPEG")

BAD_FILES = {
    "empty .npy": ("q.npy", lambda _: b"", "query file is empty"),
    "empty .png": ("q.png", lambda _: b"", "query file is empty"),
    "text as .npy": ("q.npy", lambda _: b"-600 -600 -600\n", "not a .npy array file (it does not start with the NumPy"),
    "random bytes as .npy": (
        "q.npy",
        lambda _: np.random.default_rng(1).bytes(700),
        "not a .npy array file (it does not start with the NumPy",
    ),
    "pickled object .npy": (
        "q.npy",
        lambda trap: _npy(np.array([_Trap(trap)], dtype=object)),
        "Object arrays cannot be loaded when allow_pickle=False",
    ),
    "raw pickle as .npy": (
        "q.npy",
        lambda trap: pickle.dumps(_Trap(trap)),
        "not a .npy array file (it does not start with the NumPy",
    ),
    ".npz as .npy": ("q.npy", lambda _: _npz(np.zeros((32, 32))), "is a .npz archive, not a .npy array"),
    "truncated .npy": ("q.npy", lambda _: _npy(np.zeros((32, 32)))[:300], "not a readable .npy array (Failed to read"),
    "record .npy": ("q.npy", lambda _: _npy(np.zeros((32, 32), [("hu", "f4")])), "must hold real numbers (HU)"),
    "text as .png": ("q.png", lambda _: b"a picture, honest", "not a PNG image"),
    "random bytes as .png": ("q.png", lambda _: np.random.default_rng(2).bytes(700), "not a PNG image"),
    "JPEG as .png": ("q.png", lambda _: JPEG.getvalue(), "not a PNG image"),
    "truncated .png": ("q.png", lambda _: _png(GREY)[:300], "not a readable PNG image (image file is truncated)"),
    "64x64 .png": ("q.png", lambda _: _png(np.zeros((64, 64), np.uint8)), "must be 32x32, got shape (64, 64)"),
    "colour .png": (
        "q.png",
        lambda _: _png(np.stack([GREY, GREY, 255 - GREY], axis=-1)),
        "PNG is in colour; save the ROI as a grey",
    ),
    "transparent .png": (
        "q.png",
        lambda _: _png(np.dstack([GREY, GREY, GREY, np.full_like(GREY, 128)])),
        "PNG has transparent pixels",
    ),
    "16-bit .png": ("q.png", lambda _: _png(np.full((32, 32), 3000, np.uint16)), "PNG of mode 'I;16' is not supported"),
    "1-bit .png": ("q.png", lambda _: _png(GREY > 127), "PNG of mode '1' is not supported"),
    "unknown extension": ("q.txt", lambda _: b"-600", "must be a .npy array (HU) or a .png picture, not .txt"),
    "no extension": ("q", lambda _: _npy(np.zeros((32, 32))), "not a file without extension"),
    "a folder": ("q.npy", None, "query ROI is a folder, not a file"),
    "missing": ("q.npy", False, "query file not found"),
}
"""Query files that are no ROI: (file name, its bytes given a trap path, message); ``None`` makes a
folder of that name, ``False`` nothing at all."""


def _write_query(tmp_path: Path, name: str, content) -> tuple[Path, Path]:
    query, trap = tmp_path / name, tmp_path / "unpickled"
    if content is None:
        query.mkdir()
    elif content is not False:
        query.write_bytes(content(trap))
    return query, trap


@pytest.fixture(scope="module")
def searcher(materialized: Path) -> NoduleSearcher:
    return NoduleSearcher.from_data_dir(materialized)


@pytest.fixture(scope="module")
def series_folder(lidc_sample: Path) -> Path:
    return _series_folder(lidc_sample, "LIDC-IDRI-0001")


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI, expect the input-error exit (2) and one ``error:`` line, return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(("array", "message"), BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
def test_bad_query_arrays_from_the_api(searcher: NoduleSearcher, array: np.ndarray, message: str) -> None:
    with pytest.raises(InputDataError) as error:
        searcher.search_roi(array, source="my-roi")
    assert message in str(error.value) and str(error.value).startswith("my-roi: ")
    with pytest.raises(InputDataError, match=r"^query: "):  # the default source
        searcher.search_roi(array)


@pytest.mark.parametrize(("array", "message"), BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
def test_bad_query_arrays_from_the_cli(materialized: Path, tmp_path: Path, capsys, array, message: str) -> None:
    query = tmp_path / "bad-roi.npy"
    np.save(query, array, allow_pickle=False)
    error = _cli_error(capsys, ["search", "--roi", str(query), "--data-dir", str(materialized)])
    assert message in error and f"{query}: " in error


@pytest.mark.parametrize(
    "array",
    [np.zeros(1024), np.zeros((1, 32, 32)), np.zeros((32, 32, 1), np.float16), np.zeros((32, 32), np.int16)],
    ids=["flat 1024", "1x32x32", "32x32x1 float16", "int16"],
)
def test_query_arrays_that_are_a_roi_are_searched(searcher: NoduleSearcher, array: np.ndarray) -> None:
    response = searcher.search_roi(array - 600, k=2)
    assert response.query_image.shape == (32, 32) and response.query_image.dtype == np.float32
    assert 1 <= len(response.hits) <= 2


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_query_files_from_the_api(tmp_path: Path, name: str, content, message: str) -> None:
    query, trap = _write_query(tmp_path, name, content)
    with pytest.raises(InputDataError) as error:
        load_query_roi(query)
    assert message in str(error.value) and str(error.value).startswith(f"{query}: ")
    assert not trap.exists(), "a query file was unpickled"


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_query_files_from_the_cli(materialized: Path, tmp_path: Path, capsys, name, content, message) -> None:
    query, trap = _write_query(tmp_path, name, content)
    error = _cli_error(capsys, ["search", "--roi", str(query), "--data-dir", str(materialized)])
    assert message in error and f"{query}: " in error
    assert not trap.exists(), "a query file was unpickled"


@pytest.mark.parametrize(
    "content",
    [
        lambda: _png(GREY),
        lambda: _png(GREY, "RGB"),
        lambda: _png(GREY, "RGBA"),
        lambda: _png(GREY, "LA"),
        lambda: _png(np.full((32, 32), 77, np.uint8), "P"),
    ],
    ids=["grey", "grey as RGB", "opaque grey RGBA", "opaque grey LA", "grey palette"],
)
def test_grey_pngs_are_read_as_the_lung_window(tmp_path: Path, content) -> None:
    query = tmp_path / "q.PNG"
    query.write_bytes(content())
    grey = np.asarray(Image.open(query).convert("L"), dtype=np.float32)
    assert np.allclose(load_query_roi(query), grey / 255 * 1500 - 1350)


def test_cut_and_flipped_query_files_are_only_ever_input_errors(tmp_path: Path) -> None:
    """Whatever a damaged file holds, the answer is an InputDataError, never another exception."""
    rng = np.random.default_rng(3)
    for name, good in (("q.png", _png(GREY)), ("q.npy", _npy(GREY.astype(np.float32) - 600))):
        for trial in range(60):
            data = bytearray(good[: rng.integers(1, len(good))] if trial % 2 else good)
            for spot in rng.integers(0, len(data), 3):
                data[spot] = rng.integers(0, 256)
            query = tmp_path / f"{trial}-{name}"
            query.write_bytes(bytes(data))
            try:
                assert load_query_roi(query).shape == (32, 32)  # a flip may miss what matters
            except InputDataError as error:
                assert str(error).startswith(f"{query}: ")


def test_check_query_image_names_its_source() -> None:
    with pytest.raises(InputDataError, match=r"^scan-7/roi\.npy: query ROI must be 32x32"):
        check_query_image(np.zeros((8, 8)), "scan-7/roi.npy")


BAD_VOXELS = {
    "row beyond": ((600, 10, 10), "position (600, 10, 10) (row, col, slice) is outside the volume of shape"),
    "slice beyond": ((10, 10, 10_000), "position (10, 10, 10000) (row, col, slice) is outside the volume"),
    "negative": ((-1, 10, 10), "position (-1, 10, 10) (row, col, slice) is outside the volume"),
    "two numbers": ((1, 2), "voxel (row, col, slice) must be three numbers, got (1, 2)"),
    "four numbers": ((1, 2, 3, 4), "voxel (row, col, slice) must be three numbers, got (1, 2, 3, 4)"),
    "one number": (7, "voxel (row, col, slice) must be three numbers, got 7"),
    "letters": (("a", "b", "c"), "voxel (row, col, slice) must be three numbers, got ('a', 'b', 'c')"),
    "fraction": ((1.5, 2, 3), "voxel (row, col, slice) must be whole voxel indices, got (1.5, 2, 3)"),
    "NaN": ((float("nan"), 2, 3), "voxel (row, col, slice) must be finite numbers, got (nan, 2, 3)"),
}
BAD_POSITIONS_MM = {
    "far away": ((1e4, 1e4, 1e4), "position (10000.0, 10000.0, 10000.0) (x, y, z) mm is outside the volume"),
    "above the slices": ((0.0, 0.0, 5000.0), "position (0.0, 0.0, 5000.0) (x, y, z) mm is outside the volume"),
    "overflowing": ((-1.7e308, 0.0, 0.0), "(x, y, z) mm is outside the volume, which spans x "),
    "two numbers": ((1.0, 2.0), "position (x, y, z) in mm must be three numbers, got (1.0, 2.0)"),
    "infinite": ((0.0, float("-inf"), 0.0), "position (x, y, z) in mm must be finite numbers, got (0.0, -inf, 0.0)"),
    "NaN": ((0.0, 0.0, float("nan")), "position (x, y, z) in mm must be finite numbers"),
}


@pytest.mark.parametrize(("voxel", "message"), BAD_VOXELS.values(), ids=BAD_VOXELS.keys())
def test_bad_voxels_from_the_api(searcher: NoduleSearcher, series_folder: Path, voxel, message: str) -> None:
    with pytest.raises(InputDataError) as error:
        searcher.search_dicom(series_folder, voxel=voxel)
    assert message in str(error.value) and str(series_folder) in str(error.value)


@pytest.mark.parametrize(("position", "message"), BAD_POSITIONS_MM.values(), ids=BAD_POSITIONS_MM.keys())
def test_bad_mm_positions_from_the_api(searcher: NoduleSearcher, series_folder: Path, position, message) -> None:
    with pytest.raises(InputDataError) as error:
        searcher.search_dicom(series_folder, position_mm=position)
    assert message in str(error.value) and str(series_folder) in str(error.value)


def test_bad_dicom_queries_from_the_api(searcher: NoduleSearcher, series_folder: Path, tmp_path: Path) -> None:
    def fails(message: str, folder: Path = series_folder, **query) -> str:
        with pytest.raises(InputDataError) as error:
            searcher.search_dicom(folder, **query)
        assert message in str(error.value)
        return str(error.value)

    assert str(tmp_path / "gone") in fails("DICOM series folder not found", tmp_path / "gone", voxel=(1, 2, 3))
    (tmp_path / "a.dcm").write_bytes(b"x")
    fails("is a file, not a DICOM series folder", tmp_path / "a.dcm", voxel=(1, 2, 3))
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in fails("no DICOM files in series folder", tmp_path / "empty", voxel=(1, 2, 3))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "1.dcm").write_text("not DICOM")
    assert "1.dcm" in fails("unreadable DICOM", tmp_path / "fake", voxel=(1, 2, 3))
    fails("either as a voxel or in patient mm")
    fails("either as a voxel or in patient mm", voxel=(1, 2, 3), position_mm=(1.0, 2.0, 3.0))
    fails("k must be a whole number from 1 to 1,000, got 0", voxel=(1, 2, 3), k=0)
    fails("unknown search mode 'nearest'", voxel=(1, 2, 3), mode="nearest")
    with pytest.raises(InputDataError, match="k must be a whole number from 1 to 1,000, got -3"):
        searcher.search_roi(np.zeros((32, 32)), k=-3)
    for too_many in (MAX_K + 1, 10**9, 10**30):
        with pytest.raises(InputDataError, match=f"k must be a whole number from 1 to 1,000, got {too_many}"):
            searcher.search_roi(np.zeros((32, 32)), k=too_many)
    everything = searcher.search_roi(np.zeros((32, 32)), k=MAX_K, mode="hamming", unit="annotation")
    assert len(everything.hits) == len(searcher.index) < MAX_K  # a k beyond the library answers all it holds
    nodules = searcher.search_roi(np.zeros((32, 32)), k=MAX_K, mode="hamming")
    assert len(nodules.hits) == searcher.index.items["nodule_id"].nunique()  # all it holds, one hit a nodule
    with pytest.raises(InputDataError, match="unknown unit 'reader'; a hit is one of nodule, annotation"):
        searcher.search_roi(np.zeros((32, 32)), unit="reader")


CLI_BAD_POSITIONS = {
    "voxel outside": (["--at", "600,10,10"], "position (600, 10, 10) (row, col, slice) is outside the volume"),
    "negative voxel": (["--at=-1,10,10"], "position (-1, 10, 10) (row, col, slice) is outside the volume"),
    "two numbers": (["--at", "1,2"], "voxel (row, col, slice) must be three numbers, got (1.0, 2.0)"),
    "letters": (["--at", "a,b,c"], "--at 'a,b,c': 'a' is not a number"),
    "a blank": (["--at", "1,,3"], "--at '1,,3': '' is not a number"),
    "empty": (["--at", ""], "--at '': '' is not a number"),
    "fraction": (["--at", "1.5,2,3"], "voxel (row, col, slice) must be whole voxel indices, got (1.5, 2.0, 3.0)"),
    "NaN voxel": (["--at", "nan,2,3"], "voxel (row, col, slice) must be finite numbers"),
    "mm outside": (["--at-mm", "1e4,1e4,1e4"], "position (10000.0, 10000.0, 10000.0) (x, y, z) mm is outside"),
    "negative mm outside": (["--at-mm=-1e4,0,0"], "position (-10000.0, 0.0, 0.0) (x, y, z) mm is outside"),
    "mm letters": (["--at-mm", "x,y,z"], "--at-mm 'x,y,z': 'x' is not a number"),
    "mm four numbers": (["--at-mm", "1,2,3,4"], "position (x, y, z) in mm must be three numbers"),
    "infinite mm": (["--at-mm", "0,inf,0"], "position (x, y, z) in mm must be finite numbers"),
    "voxel and mm": (["--at", "1,2,3", "--at-mm", "1,2,3"], "either as a voxel or in patient mm"),
    "k 0": (["--at", "1,2,3", "--k", "0"], "k must be a whole number from 1 to 1,000, got 0"),
}


@pytest.mark.parametrize(("options", "message"), CLI_BAD_POSITIONS.values(), ids=CLI_BAD_POSITIONS.keys())
def test_bad_positions_from_the_cli(materialized: Path, series_folder: Path, capsys, options, message) -> None:
    argv = ["search", "--dicom", str(series_folder), *options, "--data-dir", str(materialized)]
    error = _cli_error(capsys, argv)
    assert message in error
    if "is not a number" not in message and "k must" not in message:  # those name the option instead
        assert str(series_folder) in error


def test_bad_dicom_folders_and_option_mixes_from_the_cli(
    materialized: Path, series_folder: Path, tmp_path: Path, capsys
) -> None:
    def fails(*options: str) -> str:
        return _cli_error(capsys, ["search", *options, "--data-dir", str(materialized)])

    gone, empty = tmp_path / "gone", tmp_path / "empty"
    empty.mkdir()
    assert f"{gone}: DICOM series folder not found" in fails("--dicom", str(gone), "--at", "1,2,3")
    assert f"{empty}: no DICOM files in series folder" in fails("--dicom", str(empty), "--at-mm", "1,2,3")
    assert "give --roi FILE, or --dicom DIR with --at" in fails("--dicom", str(series_folder))
    assert "give --roi FILE, or --dicom DIR with --at" in fails("--at", "1,2,3")
    assert "give --roi FILE, or --dicom DIR with --at" in fails()
    query = tmp_path / "q.npy"
    np.save(query, np.zeros((32, 32)))
    assert "not both" in fails("--roi", str(query), "--dicom", str(series_folder), "--at", "1,2,3")
    picture = tmp_path / "no-such-folder" / "results.png"
    assert f"{picture}: cannot write the picture" in fails("--roi", str(query), "--picture", str(picture))


def test_negative_mm_position_from_the_cli(materialized: Path, lidc_sample: Path, capsys) -> None:
    """Patient coordinates are often negative: ``--at-mm -1,2,3`` and ``--at-mm=-1,2,3`` both work."""
    series, _, (x, y, z), _ = _first_item_in_mm(materialized, lidc_sample)
    assert min(x, y, z) < 0, "the sample's nodules lie at negative patient coordinates"
    common = ["search", "--dicom", str(series.folder), "--data-dir", str(materialized), "--json"]
    for position in (["--at-mm", f"{x},{y},{z}"], [f"--at-mm={x},{y},{z}"]):
        assert main(common + position) == 0
        assert json.loads(capsys.readouterr().out)


def test_a_test_split_nodule_is_named_as_such(materialized: Path) -> None:
    """The sample's index holds the training side (patient 0003); 0001's nodule is a test query."""
    searcher = NoduleSearcher.from_data_dir(materialized)
    assert searcher.left_out_nodules() == {"LIDC-IDRI-0001-N01"}
    with pytest.raises(InputDataError, match="LIDC-IDRI-0001-N01 is in the test split: the library holds the training"):
        searcher.search_nodule("LIDC-IDRI-0001-N01")
    with pytest.raises(InputDataError, match=r"unknown nodule 'LIDC-IDRI-9999-N01': index .* holds no nodule"):
        searcher.search_nodule("LIDC-IDRI-9999-N01")
