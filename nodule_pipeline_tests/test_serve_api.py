"""``nodule-pipeline serve``'s JSON API, asked over HTTP while the server runs, on an index built
from the real LIDC sample: search by a library nodule, an image, an uploaded ROI file and a voxel
of an uploaded DICOM series, the same answers and the same error messages as the CLI, limits,
reloading when ``hash_index`` is materialized again, and the OpenAPI description."""

from __future__ import annotations

import http.client
import io
import json
import stat
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodule_pipeline.cli import build_parser, main
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.lidc.annotations import CHARACTERISTICS
from nodule_pipeline.serve.app import JSON_LIMIT, ROI_FILE_LIMIT, create_app
from nodule_pipeline_tests.lidc_downloads import add_radiograph_study, link_patient, series_dir
from nodule_pipeline_tests.search_server import (
    DAGSTER_URL,
    SearchServer,
    materialize_index,
    search_server,
    series_zip,
    served_copy,
)
from nodule_pipeline_tests.test_search import BAD_ARRAYS, BAD_FILES, JSON_KEYS

QUERY = "LIDC-IDRI-0001-N01"  # the sample's one nodule of patient 0001 (four readers, malignant)


@pytest.fixture(scope="module")
def searcher(served_library: Path) -> NoduleSearcher:
    return NoduleSearcher.from_data_dir(served_library)


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The reason the CLI gives (its ``error: `` line without that prefix)."""
    assert main(argv) == 2
    return capsys.readouterr().err.removeprefix("error: ").strip()


def test_library_names_the_index_the_model_and_their_assets(
    search_page: SearchServer, searcher: NoduleSearcher
) -> None:
    status, library = search_page.get_json("/api/library")
    assert status == 200
    assert library["index_version"] == searcher.index.index_version
    assert library["model_version"] == searcher.model_version == searcher.index.model_version
    assert (library["items"], library["nodules"], library["patients"]) == (14, 5, 2)
    assert library["dagster"] == {name: f"{DAGSTER_URL}/assets/{name}" for name in ("hash_index", "hash_model")}


def test_search_by_library_nodule_leaves_its_patient_out(search_page: SearchServer, searcher: NoduleSearcher) -> None:
    status, answer = search_page.post_json("/api/search", {"nodule_id": QUERY, "k": 5, "mode": "rerank"})
    assert status == 200
    assert (answer["index_version"], answer["model_version"]) == (searcher.index.index_version, searcher.model_version)
    assert answer["query"]["nodule_id"] == QUERY and answer["query"]["patient_id"] == "LIDC-IDRI-0001"
    expected = searcher.search_nodule(QUERY, k=5, mode="rerank").hits
    assert [hit["nodule_id"] for hit in answer["hits"]] == [hit.nodule_id for hit in expected]
    # patient 0003's four nodules, once each: a nodule's readers are folded into one hit
    assert answer["unit"] == "nodule" and len(answer["hits"]) == 4
    assert sorted(hit["nodule_id"] for hit in answer["hits"]) == [f"LIDC-IDRI-0003-N0{i}" for i in range(1, 5)]
    for hit in answer["hits"]:
        assert JSON_KEYS <= set(hit) and hit["class_fallback"] is False and hit["unit"] == "nodule"
        assert set(hit["characteristics"]) == set(CHARACTERISTICS)
        readers = hit["readers"]
        rows = searcher.nodule_rows(hit["nodule_id"])
        assert [reader["annotation_id"] for reader in readers] == [
            searcher.index.items["annotation_id"].iloc[row] for row in rows
        ]
        (matched,) = [reader for reader in readers if reader["matched"]]
        assert matched["annotation_id"] == hit["annotation_id"] and matched["malignancy"] == hit["malignancy"]
    status, per_annotation = search_page.post_json(
        "/api/search", {"nodule_id": QUERY, "k": 5, "mode": "rerank", "unit": "annotation"}
    )
    assert per_annotation["unit"] == "annotation" and len(per_annotation["hits"]) == 5
    assert all("readers" not in hit for hit in per_annotation["hits"])
    ranked = list(dict.fromkeys(hit["nodule_id"] for hit in per_annotation["hits"]))
    assert [hit["nodule_id"] for hit in answer["hits"]][: len(ranked)] == ranked
    for hit in answer["hits"]:
        status, headers, png = search_page.request(hit["thumbnail_url"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(png)).size == (128, 128)


def upload(server: SearchServer, path: str, name: str, content: bytes, **params: object) -> tuple[int, dict]:
    """POST a file's raw bytes, as the page sends them."""
    query = urllib.parse.urlencode({"filename": name, **params})
    status, _, body = server.request(f"{path}?{query}", content, "application/octet-stream")
    return status, json.loads(body)


def test_the_hierarchical_hits_follow_the_ratings_the_model_predicts_for_the_query(
    search_page: SearchServer, searcher: NoduleSearcher
) -> None:
    """The library holds the readers' ratings and the model learnt them (the default recipe):
    the query shows the predicted ratings, the hits carry and follow their rating distance."""
    assert searcher.model.network.rating_outputs == 45
    status, answer = search_page.post_json("/api/search", {"nodule_id": QUERY, "k": 4})
    assert status == 200
    predicted = answer["query"]["predicted_characteristics"]
    assert set(predicted) == set(CHARACTERISTICS) and all(isinstance(value, int) for value in predicted.values())
    distances = [hit["rating_distance"] for hit in answer["hits"]]
    assert distances and all(0 <= d <= 1 for d in distances) and distances == sorted(distances)
    expected = searcher.search_nodule(QUERY, k=4)
    assert predicted == expected.predicted_ratings
    assert distances == pytest.approx([hit.rating_distance for hit in expected.hits])
    status, flat = search_page.post_json("/api/search", {"nodule_id": QUERY, "k": 4, "mode": "rerank"})
    assert all(hit["rating_distance"] is None for hit in flat["hits"])  # the ablation keeps fc distance


def test_search_by_image_and_by_file_answer_as_the_cli(
    search_page: SearchServer, searcher: NoduleSearcher, served_library: Path, tmp_path: Path, capsys
) -> None:
    image = np.asarray(searcher.index.rois[3], dtype=np.float32)
    status, answer = search_page.post_json("/api/search", {"image": image.ravel().tolist(), "k": 4, "mode": "rerank"})
    assert status == 200 and answer["query"]["kind"] == "image"
    roi = tmp_path / "roi.npy"
    np.save(roi, image)
    argv = ["search", "--roi", str(roi), "--data-dir", str(served_library), "--k", "4", "--mode", "rerank", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [{key: hit[key] for key in JSON_KEYS} for hit in answer["hits"]] == [
        {key: hit[key] for key in JSON_KEYS} for hit in printed
    ]
    assert [len(hit["readers"]) for hit in answer["hits"]] == [hit["readers"] for hit in printed]
    status, uploaded = upload(search_page, "/api/search/upload", "roi.npy", roi.read_bytes(), k=4, mode="rerank")
    assert status == 200 and uploaded["query"]["name"] == "roi.npy"
    assert uploaded["hits"] == answer["hits"]


def test_nodules_are_listed_described_and_pictured(search_page: SearchServer, searcher: NoduleSearcher) -> None:
    status, listing = search_page.get_json("/api/nodules")
    assert status == 200 and listing["total"] == 5
    assert [n["nodule_id"] for n in listing["nodules"]] == sorted(searcher.rows_by_nodule())
    status, only = search_page.get_json("/api/nodules?q=0001")
    assert [n["nodule_id"] for n in only["nodules"]] == [QUERY]
    status, nodule = search_page.get_json(f"/api/nodules/{QUERY}")
    assert status == 200 and len(nodule["annotations"]) == 4
    readers = {a["annotation_id"] for a in nodule["annotations"]}
    assert len(readers) == 4 and all(
        a["thumbnail_url"].endswith(f"annotation={a['annotation_id']}") for a in nodule["annotations"]
    )
    status, missing = search_page.get_json("/api/nodules/LIDC-IDRI-9999-N01")
    assert status == 404 and "unknown nodule 'LIDC-IDRI-9999-N01'" in missing["error"]
    status, _, _ = search_page.request("/api/nodules/LIDC-IDRI-9999-N01/thumbnail.png")
    assert status == 404


JSON_ARRAYS = {name: case for name, case in BAD_ARRAYS.items() if case[0].dtype.kind in "fiu"}
"""The bad arrays JSON can carry (numbers; NaN and infinities as Python's json writes them)."""


@pytest.mark.parametrize(("array", "message"), JSON_ARRAYS.values(), ids=JSON_ARRAYS.keys())
def test_bad_images_get_the_cli_message(search_page: SearchServer, array: np.ndarray, message: str) -> None:
    status, answer = search_page.post_json("/api/search", {"image": array.tolist()})
    assert status == 400 and message in answer["error"] and answer["error"].startswith("image: ")


UPLOADS = {name: case for name, case in BAD_FILES.items() if callable(case[1])}


@pytest.mark.parametrize(("name", "content", "message"), UPLOADS.values(), ids=UPLOADS.keys())
def test_bad_uploaded_files_get_the_cli_message(
    search_page: SearchServer, tmp_path: Path, name, content, message
) -> None:
    trap = tmp_path / "unpickled"
    status, answer = upload(search_page, "/api/search/upload", name, content(trap))
    assert status == 400 and message in answer["error"] and answer["error"].startswith(f"{name}: ")
    assert not trap.exists(), "an uploaded file was unpickled"


def test_bad_options_and_unknown_nodules_get_the_cli_message(
    search_page: SearchServer, served_library: Path, capsys
) -> None:
    cli = ["search", "--data-dir", str(served_library)]
    for query, argv in (
        ({"nodule_id": "LIDC-IDRI-9999-N01"}, ["--nodule", "LIDC-IDRI-9999-N01"]),
        ({"nodule_id": QUERY, "k": 0}, ["--nodule", QUERY, "--k", "0"]),
        ({"nodule_id": QUERY, "k": -3}, ["--nodule", QUERY, "--k=-3"]),
    ):
        status, answer = search_page.post_json("/api/search", query)
        assert status == 400 and answer["error"] == cli_error(capsys, cli + argv)
    for query, message in (
        ({"nodule_id": QUERY, "mode": "nearest"}, "unknown search mode 'nearest'; use one of hierarchical"),
        ({"nodule_id": QUERY, "k": 2.5}, "k must be a whole number from 1 to 1,000, got 2.5"),
        ({"nodule_id": QUERY, "k": "10"}, "k must be a whole number from 1 to 1,000, got '10'"),
        ({"nodule_id": 7}, "unknown nodule 7"),
        ({"image": [[0.0] * 32] * 31 + [[0.0] * 5]}, "image: query ROI must be a 32x32 grid of numbers"),
        ({"image": ["-600"] * 1024}, "must hold real numbers (HU), got dtype <U4"),
        ({"image": [None] * 1024}, "must hold real numbers (HU), got dtype object"),
        ({}, "give one query"),
        ({"nodule_id": QUERY, "image": [0.0] * 1024}, "give one query"),
        ({"nodule_id": QUERY, "top": 3}, "unknown field(s) top"),
        ({"nodule_id": QUERY, "exclude_patient": "LIDC-IDRI-0003"}, "exclude_patient does not apply"),
        ({"series_id": "0123", "voxel": [1, 2, 3]}, "unknown series '0123'"),
        ([QUERY], "the request body must be a JSON object"),
    ):
        status, answer = search_page.post_json("/api/search", query)
        assert status == 400 and message in answer["error"], (query, answer)
    status, _, body = search_page.request("/api/search", b"{nodule_id: 1}")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    good = io.BytesIO()
    np.save(good, np.full((32, 32), -600.0))
    status, answer = upload(search_page, "/api/search/upload", "roi.npy", good.getvalue(), k="ten")
    assert status == 400 and "k must be a whole number from 1 to 1,000, got 'ten'" in answer["error"]


def declare_body(server: SearchServer, path: str, length: int) -> tuple[int, dict]:
    """Announce a body of ``length`` bytes and read the answer before sending any of it: the server
    refuses an oversized body from its headers alone (a client sending on would meet a closed
    connection)."""
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=60)
    try:
        connection.putrequest("POST", path)
        connection.putheader(
            "Content-Type", "application/json" if path == "/api/search" else "application/octet-stream"
        )
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_oversized_bodies_are_refused_and_the_server_keeps_serving(search_page: SearchServer) -> None:
    status, answer = declare_body(search_page, "/api/search", JSON_LIMIT + 1)
    assert status == 413 and answer["error"] == f"the request body is larger than {JSON_LIMIT:,} bytes"
    status, answer = declare_body(search_page, "/api/search/upload?filename=big.npy", ROI_FILE_LIMIT + 1)
    assert status == 413 and answer["error"] == f"the request body is larger than {ROI_FILE_LIMIT:,} bytes"
    status, answer = search_page.post_json("/api/search", {"nodule_id": QUERY, "k": 1})
    assert status == 200 and len(answer["hits"]) == 1


def test_a_clicked_voxel_of_an_uploaded_series_finds_its_nodule(
    search_page: SearchServer, searcher: NoduleSearcher, lidc_sample: Path, tmp_path: Path
) -> None:
    archive = series_zip(lidc_sample, "LIDC-IDRI-0001", tmp_path / "0001.zip")
    status, series = upload(search_page, "/api/series", "0001.zip", archive.read_bytes())
    assert status == 200, series
    assert (series["rows"], series["columns"], series["slices"]) == (512, 512, 133)
    item = searcher.index.items.iloc[int(searcher.nodule_rows(QUERY)[0])]
    voxel = [int(item["center_i"]), int(item["center_j"]), int(item["center_k"])]
    status, _, png = search_page.request(
        f"/api/series/{series['series_id']}/slices/{voxel[2]}.png?level=-600&width=1500"
    )
    assert status == 200 and Image.open(io.BytesIO(png)).size == (512, 512)
    status, answer = search_page.post_json("/api/search", {"series_id": series["series_id"], "voxel": voxel, "k": 3})
    assert status == 200
    first = answer["hits"][0]  # cut exactly as ingestion cut it: the same code, the same features
    assert first["nodule_id"] == QUERY and first["hamming"] == 0 and first["euclidean"] < 0.05
    for query, message in (
        ({"voxel": [600, 10, 10]}, "position (600, 10, 10) (row, col, slice) is outside the volume of shape"),
        ({"voxel": [1.5, 2, 3]}, "voxel (row, col, slice) must be whole voxel indices, got [1.5, 2, 3]"),
        ({}, "give the nodule position either as a voxel or in patient mm"),
    ):
        status, answer = search_page.post_json("/api/search", {"series_id": series["series_id"], **query})
        assert status == 400 and message in answer["error"] and "0001.zip/" in answer["error"]
    status, _, body = search_page.request(f"/api/series/{series['series_id']}/slices/133.png")
    assert status == 400 and "slices 0..132" in json.loads(body)["error"]
    status, answer = upload(search_page, "/api/series", "notes.zip", b"PK\x03\x04 not really")
    assert status == 400 and answer["error"].startswith("notes.zip: not a readable zip archive")


EVIL_MEMBERS = {
    "../escape.dcm": "its name steps out of the folder (..)",
    "a/../../escape.dcm": "its name steps out of the folder (..)",
    "/tmp/escape.dcm": "its name is an absolute path",
    "\\tmp\\escape.dcm": "its name holds a backslash",
    "a\\..\\..\\escape.dcm": "its name holds a backslash",
    "C:/escape.dcm": "its name starts with a drive letter",
    "C:escape.dcm": "its name starts with a drive letter",
}


def evil_zip(member: str, *, link: bool = False, twice: bool = False) -> bytes:
    """A zip whose first member is ``member`` (a symbolic link when ``link``), written twice when
    ``twice``: the shapes of a zip-slip attack."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        info = zipfile.ZipInfo(member)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if link else b"x")
        if twice:
            archive.writestr(zipfile.ZipInfo(member), b"y")
    return data.getvalue()


@pytest.mark.parametrize("member", sorted(EVIL_MEMBERS))
def test_zip_members_that_leave_their_folder_are_refused_by_name(search_page: SearchServer, member: str) -> None:
    status, answer = upload(search_page, "/api/series", "evil.zip", evil_zip(member))
    assert status == 400, answer
    assert answer["error"] == f"evil.zip: zip member {member!r} refused: {EVIL_MEMBERS[member]}"
    assert not Path("/tmp/escape.dcm").exists() and not Path("/escape.dcm").exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the attack itself
def test_links_duplicates_and_unwritable_members_are_refused(search_page: SearchServer) -> None:
    status, answer = upload(search_page, "/api/series", "link.zip", evil_zip("series/1.dcm", link=True))
    assert status == 400 and answer["error"] == "link.zip: zip member 'series/1.dcm' refused: it is a link"
    status, answer = upload(search_page, "/api/series", "twice.zip", evil_zip("series/1.dcm", twice=True))
    assert status == 400
    assert answer["error"] == "twice.zip: zip member 'series/1.dcm' refused: another member has the same name"
    long_name = "series/" + "a" * 300 + ".dcm"  # longer than a file name may be: an OSError, answered 400
    status, answer = upload(search_page, "/api/series", "long.zip", evil_zip(long_name))
    assert (
        status == 400 and answer["error"] == f"long.zip: zip member {long_name!r}: cannot unpack (File name too long)"
    )


def test_a_zip_of_a_whole_patient_folder_uses_its_ct_and_leaves_the_radiograph(
    search_page: SearchServer, lidc_sample: Path, tmp_path: Path
) -> None:
    patient = link_patient(lidc_sample / "LIDC-IDRI-0001", tmp_path / "LIDC-IDRI-0001")
    ct = series_dir(patient)
    add_radiograph_study(patient, next(ct.glob("*.dcm")))
    whole, radiograph_only = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(whole, "w") as archive, zipfile.ZipFile(radiograph_only, "w") as other:
        for path in sorted(patient.rglob("*")):
            if path.is_file():
                name = path.relative_to(tmp_path).as_posix()
                archive.write(path, name)
                if ct not in path.parents:
                    other.write(path, name)
    status, series = upload(search_page, "/api/series", "patient.zip", whole.getvalue())
    assert status == 200 and series["slices"] == 133, series
    status, answer = upload(search_page, "/api/series", "cr.zip", radiograph_only.getvalue())
    assert status == 400 and "the zip holds 0 CT series (and CR); upload the folder of one CT series" in answer["error"]


def test_openapi_describes_every_route(search_page: SearchServer, served_library: Path) -> None:
    status, description = search_page.get_json("/openapi.json")
    assert status == 200 and description["openapi"].startswith("3.")
    app = create_app(served_library)
    api_routes = {route.path.replace(":int", "") for route in app.routes if route.path.startswith("/api/")}
    assert api_routes == set(description["paths"])


def test_serves_on_loopback_by_default() -> None:
    arguments = build_parser().parse_args(["serve"])
    assert (arguments.host, arguments.port) == ("127.0.0.1", 8000)


def test_the_server_waits_for_an_index_and_follows_it(materialized: Path, tmp_path: Path) -> None:
    data_dir = served_copy(materialized, tmp_path / "data", None)
    with search_server(data_dir, tmp_path / "serve.log") as server:
        status, answer = server.get_json("/api/library")
        assert status == 503 and "materialize hash_model and hash_index first" in answer["error"]
        status, _, page = server.request("/")
        assert status == 200 and b"Similar lung nodules" in page
        materialize_index(data_dir, "train")
        status, first = server.get_json("/api/library")
        assert status == 200 and first["items"] == 10 and first["patients"] == 1
        materialize_index(data_dir, "all")
        status, second = server.get_json("/api/library")
        assert second["items"] == 14 and second["index_version"] != first["index_version"]
        status, answer = server.post_json("/api/search", {"nodule_id": QUERY, "k": 1})
        assert status == 200 and answer["index_version"] == second["index_version"]
