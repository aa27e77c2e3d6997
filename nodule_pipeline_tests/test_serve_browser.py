"""The search page of ``nodule-pipeline serve`` in a real browser (Debian's chromium), on an index
built from the real LIDC sample: pick a nodule and see its matches, see the class-fallback banner,
upload a bad file and see the error, upload a DICOM series and click its nodule. A screenshot of
each step goes to ``test-artifacts/serve/`` (the README's picture is the first)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from playwright import sync_api

from nodule_pipeline_tests.browser import UI_TIMEOUT_MS
from nodule_pipeline_tests.dagster_ui import REPO
from nodule_pipeline_tests.search_server import DAGSTER_URL, TOKEN, SearchServer, series_zip
from nodule_pipeline_tests.test_serve_api import QUERY

expect = sync_api.expect
SCREENSHOTS = REPO / "test-artifacts" / "serve"
SLICE_SIDE = 320  # the slice viewer's size on the page (page.css), in CSS pixels


@contextmanager
def opened_page(browser, url: str, width: int = 1400, height: int = 1000) -> Iterator:
    """``url`` in a fresh browser context of that viewport (the test's timeout), closed after."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(url)
        yield page
    finally:
        context.close()


@pytest.fixture
def page(search_page: SearchServer, browser, request: pytest.FixtureRequest):
    """The page in a fresh context, its library loaded; a screenshot if the test fails."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    failed_before = request.session.testsfailed
    with opened_page(browser, search_page.url + "/") as page:
        expect(page.locator("#nodule-select option")).not_to_have_count(0)
        yield page
        if request.session.testsfailed > failed_before:
            page.screenshot(path=SCREENSHOTS / f"FAILED-{request.node.name}.png", full_page=True)


def search_for(page, nodule_id: str) -> None:
    page.get_by_label("Library nodules").select_option(nodule_id)
    page.get_by_role("button", name="Find similar").click()


def expect_pictures_shown(page) -> None:
    """Every picture on the page loaded (the thumbnails come from the API one by one)."""
    for picture in page.locator("img[src]").all():
        expect(picture).to_have_js_property("complete", True)
        assert picture.evaluate("image => image.naturalWidth") > 0, picture.get_attribute("src")


def test_pick_a_nodule_and_see_its_matches(page, search_page: SearchServer) -> None:
    _, library = search_page.get_json("/api/library")
    provenance = page.locator("#provenance")
    expect(provenance).to_contain_text(f"index {library['index_version']} · model {library['model_version']}")
    expect(provenance.get_by_role("link", name="hash_index in Dagster")).to_have_attribute(
        "href", f"{DAGSTER_URL}/assets/hash_index"
    )

    search_for(page, QUERY)
    _, answer = search_page.post_json("/api/search", {"nodule_id": QUERY, "k": 10})
    cards = page.locator("#hits > li")
    expect(cards).to_have_count(len(answer["hits"]))
    expect(page.locator("#query")).to_contain_text(f"query: {QUERY}")
    for card, hit in zip(cards.all(), answer["hits"]):
        label = "malignant" if hit["label"] else "benign"
        expect(card.locator(".badge")).to_have_text(f"readers: {label}")
        for text in (f"#{hit['rank']}", hit["nodule_id"], hit["patient_id"], f"{hit['malignancy']:g}"):
            expect(card).to_contain_text(text)
        expect(card).to_contain_text(re.compile(rf"Hamming\s*{hit['hamming']}(?!\d)"))
        expect(card).to_contain_text(re.compile(rf"Euclidean\s*{hit['euclidean']:.3f}"))
        card.get_by_text("readers' characteristics").click()
        expect(card.get_by_text("spiculation")).to_be_visible()
        calcification = hit["characteristics"]["calcification"]
        words = {1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central", 6: "absent"}
        expect(card).to_contain_text(f"{calcification:g} {words[int(calcification)]}")
    page.get_by_text("Legend").click()
    expect(page.locator("#legend")).to_contain_text("red frame: the readers rated this annotation malignant")
    expect(page.locator("#fallback")).to_be_hidden()
    expect_pictures_shown(page)
    page.screenshot(path=SCREENSHOTS / "01-nodule-matches.png", full_page=True)


def test_class_fallback_banner(page, search_page: SearchServer) -> None:
    nodule = "LIDC-IDRI-0003-N01"
    _, answer = search_page.post_json("/api/search", {"nodule_id": nodule})
    # the sample's only benign nodules are patient 0003's own, which its query leaves out
    assert answer["query"]["predicted_label"] == 0 and answer["class_fallback"], answer["query"]
    search_for(page, nodule)
    expect(page.locator("#fallback")).to_be_visible()
    expect(page.locator("#fallback")).to_contain_text("from the whole library")
    expect(page.locator("#hits > li")).to_have_count(len(answer["hits"]))
    page.screenshot(path=SCREENSHOTS / "02-class-fallback.png", full_page=True)


def test_a_bad_file_shows_the_error_and_a_good_one_searches(page) -> None:
    files = page.get_by_label("ROI file")
    files.set_input_files(files=[{"name": "notes.npy", "mimeType": "application/octet-stream", "buffer": b"-600"}])
    error = page.get_by_role("alert")
    expect(error).to_have_text("notes.npy: not a .npy array file (it does not start with the NumPy header)")
    page.screenshot(path=SCREENSHOTS / "03-bad-file.png", full_page=True)

    roi = io.BytesIO()
    np.save(roi, np.full((32, 32), -700.0, dtype=np.float32))
    files.set_input_files(files=[{"name": "roi.npy", "mimeType": "application/octet-stream", "buffer": roi.getvalue()}])
    expect(error).to_be_hidden()
    expect(page.locator("#query")).to_contain_text("query: roi.npy")
    expect(page.locator("#hits > li").first).to_be_visible()
    expect(page.locator("#warnings")).to_be_hidden()

    air = io.BytesIO()
    np.save(air, np.full((32, 32), -1000.0, dtype=np.float32))
    files.set_input_files(files=[{"name": "air.npy", "mimeType": "application/octet-stream", "buffer": air.getvalue()}])
    expect(page.locator("#query")).to_contain_text("query: air.npy")
    expect(page.locator("#warnings")).to_contain_text("no tissue at the centre of the ROI")
    page.screenshot(path=SCREENSHOTS / "05-air-warning.png", full_page=True)
    search_for(page, QUERY)
    expect(page.locator("#warnings")).to_be_hidden()


def test_click_the_nodule_on_an_uploaded_series(page, search_page: SearchServer, lidc_sample: Path, tmp_path: Path):
    _, nodule = search_page.get_json(f"/api/nodules/{QUERY}")
    row, column, index = (nodule["annotations"][0][key] for key in ("center_i", "center_j", "center_k"))
    page.get_by_label("DICOM series zip").set_input_files(
        series_zip(lidc_sample, "LIDC-IDRI-0001", tmp_path / "0001.zip")
    )
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    page.locator("#slice").evaluate(
        "(range, k) => { range.value = k; range.dispatchEvent(new Event('input')); }", index
    )
    image = page.locator("#slice-image")
    expect(image).to_have_attribute("src", re.compile(rf"/slices/{index}\.png\?level=-600&width=1500$"))
    expect(page.locator("#slice-number")).to_have_text(f"{index + 1} / 133")
    expect_pictures_shown(page)
    scale = SLICE_SIDE / 512  # a voxel is 0.625 CSS pixels: a click lands within a voxel of its aim
    image.click(position={"x": (column + 0.5) * scale, "y": (row + 0.5) * scale})
    caption = page.locator("#query .title")
    expect(caption).to_have_text(re.compile(r"^query: voxel \d+,\d+,\d+$"))
    clicked = [int(v) for v in caption.inner_text().removeprefix("query: voxel ").split(",")]
    assert clicked[2] == index and abs(clicked[0] - row) <= 1 and abs(clicked[1] - column) <= 1, clicked
    series_id = page.locator("#slice-image").get_attribute("src").split("/")[3]
    _, answer = search_page.post_json("/api/search", {"series_id": series_id, "voxel": clicked, "k": 10})
    assert answer["hits"][0]["nodule_id"] == QUERY  # the clicked nodule is the series' own library nodule
    cards = page.locator("#hits > li")
    expect(cards).to_have_count(len(answer["hits"]))
    for card, hit in zip(cards.all(), answer["hits"]):
        expect(card).to_contain_text(hit["nodule_id"])
        expect(card).to_contain_text(re.compile(rf"Hamming\s*{hit['hamming']}(?!\d)"))
    expect(page.locator("#marker")).to_be_visible()
    expect_pictures_shown(page)
    page.screenshot(path=SCREENSHOTS / "04-dicom-click.png", full_page=True)


def test_the_page_loads_only_its_own_files(search_page: SearchServer, browser) -> None:
    context = browser.new_context()
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    response = page.goto(search_page.url + "/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator("#nodule-select option")).not_to_have_count(0)
    search_for(page, QUERY)
    expect(page.locator("#hits > li").first).to_be_visible()
    expect_pictures_shown(page)
    context.close()
    assert asked and all(url.startswith((search_page.url + "/", "data:")) for url in asked), asked


def test_a_server_with_a_token_asks_the_page_to_sign_in_once(guarded: SearchServer, browser) -> None:
    with opened_page(browser, guarded.url + "/") as page:
        expect(page.locator("#provenance")).to_have_text("sign in to search the library")
        token = page.get_by_label("This server asks for its token")
        token.fill("not the token, twenty chars")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#sign-in-error")).to_have_text("that is not this server's token")
        token.fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#sign-in")).to_be_hidden()
        expect(page.locator("#nodule-select option")).not_to_have_count(0)
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page reads the session
        search_for(page, QUERY)
        expect(page.locator("#hits > li").first).to_be_visible()
        expect_pictures_shown(page)
        page.screenshot(path=SCREENSHOTS / "06-signed-in.png", full_page=True)
        page.reload()  # the cookie keeps the page signed in
        expect(page.locator("#nodule-select option")).not_to_have_count(0)
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("#provenance")).to_have_text("sign in to search the library")


def test_no_empty_card_before_a_search_and_the_page_fits_400_px(search_page: SearchServer, browser) -> None:
    with opened_page(browser, search_page.url + "/", 400, 900) as page:
        expect(page.locator("#nodule-select option")).not_to_have_count(0)
        expect(page.locator("#results")).to_be_hidden()
        expect(page.locator("#query")).to_be_hidden()
        search_for(page, QUERY)
        expect(page.locator("#hits > li").first).to_be_visible()
        expect_pictures_shown(page)
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], f"the page scrolls sideways at 400 px: {width}"
        page.screenshot(path=SCREENSHOTS / "07-narrow.png", full_page=True)
