"""The search server as an attacker and a hospital's reviewer try it, over real HTTP: a server
started with a token refuses every API request without it (401), a foreign Host (DNS
rebinding, 400), a cross-site content type (415) or origin (403); the page signs in with an
HttpOnly, SameSite=Strict cookie; every search, upload and nodule view leaves one audit line;
the access log keeps no query strings or ids; and the CLI will not open the library to the
network without a token."""

from __future__ import annotations

import http.client
import json
import os
import stat
import time
import urllib.parse
from pathlib import Path

import pytest

from nodule_pipeline.cli import main
from nodule_pipeline.serve.audit import AUDIT_FILE
from nodule_pipeline.serve.library import Library, LibraryUnavailable
from nodule_pipeline.serve.security import TOKEN_ENV, token_id
from nodule_pipeline.serve.uploads import SeriesStore
from nodule_pipeline_tests.search_server import ALLOWED, TOKEN, SearchServer
from nodule_pipeline_tests.test_serve_api import QUERY

BEARER = {"Authorization": f"Bearer {TOKEN}"}
API_READS = (
    "/api/library",
    "/api/nodules",
    f"/api/nodules/{QUERY}",
    f"/api/nodules/{QUERY}/thumbnail.png",
    "/api/series/0123456789abcdef/slices/0.png",
)


def answer(server: SearchServer, path: str, body: bytes | None = None, content_type: str = "application/json", **kw):
    status, headers, raw = server.request(path, body, content_type, **kw)
    return status, headers, json.loads(raw) if headers.get("Content-Type", "").startswith("application/json") else raw


def test_without_the_token_the_api_answers_401_and_the_page_asks_to_sign_in(guarded: SearchServer) -> None:
    for path in API_READS:
        status, headers, body = answer(guarded, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == 'Bearer realm="nodule-pipeline"'
        assert body["error"].startswith("sign in: send the server's token as 'Authorization: Bearer <token>'")
    search = json.dumps({"nodule_id": QUERY}).encode()
    assert answer(guarded, "/api/search", search)[0] == 401
    assert answer(guarded, "/api/series?filename=s.zip", b"PK", "application/zip")[0] == 401
    assert answer(guarded, "/api/search", search, headers={"Authorization": "Bearer not-the-token-at-all"})[0] == 401
    assert answer(guarded, "/api/search", search, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    for public in ("/", "/static/page.js", "/openapi.json"):
        assert guarded.request(public)[0] == 200, public
    assert answer(guarded, "/api/session")[2] == {"token_required": True, "signed_in": False}
    status, _, body = answer(guarded, "/api/search", search, headers=BEARER)
    assert status == 200 and body["query"]["nodule_id"] == QUERY


def test_the_page_signs_in_once_with_an_httponly_strict_cookie(guarded: SearchServer) -> None:
    status, _, body = answer(guarded, "/api/session", json.dumps({"token": "a-guess-of-twenty-chars"}).encode())
    assert status == 401 and body["error"] == "that is not this server's token"
    status, headers, body = answer(guarded, "/api/session", json.dumps({"token": TOKEN}).encode())
    assert status == 200 and body == {"signed_in": True}
    cookie = headers["Set-Cookie"]
    attributes = {part.strip().partition("=")[0] for part in cookie.split(";")}
    assert {"HttpOnly", "SameSite", "Path", "Max-Age"} <= attributes and "SameSite=Strict" in cookie
    assert "Secure" not in attributes  # plain http on loopback; behind a TLS proxy it is set
    session = {"Cookie": cookie.split(";")[0]}
    assert answer(guarded, "/api/session", headers=session)[2] == {"token_required": True, "signed_in": True}
    assert answer(guarded, "/api/library", headers=session)[0] == 200
    assert answer(guarded, "/api/library", headers={"Cookie": "nodule_session=forged"})[0] == 401
    status, headers, _ = answer(guarded, "/api/session", headers=session, method="DELETE")
    assert status == 200 and "Max-Age=0" in headers["Set-Cookie"]
    assert answer(guarded, "/api/library", headers=session)[0] == 401  # the session ended on the server too


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", "[::2]:80"])
def test_a_foreign_host_header_is_refused_dns_rebinding(guarded: SearchServer, search_page: SearchServer, host) -> None:
    for server, extra in ((guarded, BEARER), (search_page, {})):
        status, _, body = answer(server, "/api/library", headers={"Host": host, **extra})
        assert status == 400 and body["error"].startswith("this server does not answer to the host"), body
    port = urllib.parse.urlsplit(guarded.url).port
    for named in (ALLOWED, f"{ALLOWED}:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert answer(guarded, "/api/library", headers={"Host": named, **BEARER})[0] == 200, named


CROSS_SITE = {
    "/api/search": ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""),
    "/api/search/upload?filename=roi.png": ("text/plain", "image/jpeg", "multipart/form-data; boundary=x"),
    "/api/series?filename=s.zip": ("text/plain", "application/x-www-form-urlencoded"),
    "/api/session": ("text/plain",),
    "/api/pacs/series": ("text/plain", "application/x-www-form-urlencoded"),
}


def test_posts_take_only_their_declared_content_types(guarded: SearchServer, search_page: SearchServer) -> None:
    """A cross-site "simple" request (text/plain, a form) needs no preflight: it must not act."""
    body = json.dumps({"nodule_id": QUERY}).encode()
    for server, extra in ((guarded, BEARER), (search_page, {})):
        for path, types in CROSS_SITE.items():
            for kind in types:
                status, _, answered = answer(server, path, body, kind, headers=extra)
                route = path.partition("?")[0]
                assert status == 415, (path, kind)
                assert answered["error"].startswith(f"POST {route} takes "), answered
    status, _, answered = answer(guarded, "/api/search", body, headers={"Origin": "http://attacker.example", **BEARER})
    assert status == 403 and "cross-origin requests are refused" in answered["error"]
    own = urllib.parse.urlsplit(guarded.url).netloc
    assert answer(guarded, "/api/search", body, headers={"Origin": f"http://{own}", **BEARER})[0] == 200


def test_answers_carry_the_security_headers_and_tell_no_patients_or_paths(
    guarded: SearchServer, served_library: Path
) -> None:
    status, headers, library = answer(guarded, "/api/library", headers=BEARER)
    assert status == 200
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert set(library["lineage"]) == {"data_version", "database", "model_measured"}
    assert str(served_library) not in json.dumps(library)
    assert guarded.request("/")[1]["X-Content-Type-Options"] == "nosniff"


def test_a_broken_index_is_a_503_that_names_no_server_path(tmp_path: Path) -> None:
    library = Library(tmp_path / "data")
    library.manifest.parent.mkdir(parents=True)
    library.manifest.write_text("{ not json")
    with pytest.raises(LibraryUnavailable) as refused:
        library.searcher()
    message = str(refused.value)
    assert message.startswith("the hash index cannot be loaded") and str(tmp_path) not in message


def audit_lines(data_dir: Path, who: str, count: int) -> list[dict]:
    """The audit lines of ``who``, once at least ``count`` are written (a bounded wait: the
    writer thread appends them after answering)."""
    path = data_dir / AUDIT_FILE
    for _ in range(100):
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        mine = [line for line in lines if line["who"] == who]
        if len(mine) >= count:
            return mine
        time.sleep(0.1)
    raise AssertionError(f"{count} audit lines of {who} not written in 10 s: {mine}")


def test_every_search_upload_and_view_leaves_one_audit_line(guarded: SearchServer, served_library: Path) -> None:
    audit = served_library / AUDIT_FILE
    who = token_id(TOKEN)
    before = len(audit_lines(served_library, who, 0))
    status, _, found = answer(guarded, "/api/search", json.dumps({"nodule_id": QUERY, "k": 3}).encode(), headers=BEARER)
    assert status == 200
    status, _, _ = answer(guarded, "/api/search", json.dumps({"nodule_id": QUERY, "k": 0}).encode(), headers=BEARER)
    assert status == 400
    assert answer(guarded, f"/api/nodules/{QUERY}", headers=BEARER)[0] == 200
    assert (
        answer(guarded, "/api/series?filename=notes.zip", b"PK not a zip", "application/zip", headers=BEARER)[0] == 400
    )
    lines = audit_lines(served_library, who, before + 4)[before:]
    search, refused, view, series = lines
    assert search["action"] == "search" and search["status"] == 200 and search["client"] == "127.0.0.1"
    assert search["asked"] == {"nodule_id": QUERY}
    assert search["hits"] == [hit["nodule_id"] for hit in found["hits"]]
    assert (search["index_version"], search["model_version"]) == (found["index_version"], found["model_version"])
    assert (refused["action"], refused["status"], refused["asked"]) == ("search", 400, {"nodule_id": QUERY})
    assert (view["action"], view["asked"], view["status"]) == ("nodule view", {"nodule_id": QUERY}, 200)
    assert (series["action"], series["asked"], series["status"]) == ("series upload", {"name": "notes.zip"}, 400)
    assert all(set(line) >= {"time", "who", "client", "action", "status"} for line in lines)
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert answer(guarded, "/api/library")[0] == 401  # a refused request is audited as such
    refusal = audit_lines(served_library, "unknown", 1)[-1]
    assert refusal["action"] == "refused" and refusal["status"] == 401


def test_the_access_log_keeps_no_query_strings_or_ids(guarded: SearchServer) -> None:
    secret = "LIDC-IDRI-0042-secret-name.npy"
    query = urllib.parse.urlencode({"filename": secret})
    assert answer(guarded, f"/api/search/upload?{query}", b"x", "application/octet-stream", headers=BEARER)[0] == 400
    assert answer(guarded, f"/api/nodules/{QUERY}", headers=BEARER)[0] == 200
    for _ in range(50):  # the log line follows the answer
        log = guarded.log.read_text()
        if '"GET /api/nodules/{id}" 200' in log:
            break
        time.sleep(0.1)
    assert '"POST /api/search/upload" 400' in log and '"GET /api/nodules/{id}" 200' in log
    assert secret not in log and "filename" not in log and QUERY not in log


def _hold_series_slot(server: SearchServer) -> http.client.HTTPConnection:
    """A series upload that has sent its headers and one byte of a large body, so the server
    holds one of its series slots while it waits for the rest."""
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=30)
    connection.putrequest("POST", "/api/series?filename=slow.zip")
    connection.putheader("Content-Type", "application/zip")
    connection.putheader("Content-Length", str(10 << 20))
    connection.endheaders()
    connection.send(b"P")
    return connection


def test_at_most_two_series_are_read_at_once(search_page: SearchServer) -> None:
    holders = [_hold_series_slot(search_page), _hold_series_slot(search_page)]
    try:
        for _ in range(50):  # until both holders are inside the handler
            status, headers, body = answer(search_page, "/api/series?filename=third.zip", b"PK", "application/zip")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and headers["Retry-After"] == "5"
        assert body["error"] == "2 series are being read; send this one again in a few seconds"
    finally:
        for connection in holders:
            connection.close()
    for _ in range(50):  # the slots come back once the clients went away
        status, _, body = answer(search_page, "/api/series?filename=third.zip", b"PK", "application/zip")
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 400 and body["error"].startswith("third.zip: not a readable zip archive")


def test_uploads_of_a_killed_server_are_removed_at_start(tmp_path: Path) -> None:
    scratch = tmp_path / "uploads"
    dead = scratch / f"{2**22 + 1}-upload-abc"  # above Linux's largest pid: no such process
    alive = scratch / f"{os.getpid()}-upload-def"
    for folder in (dead, alive):
        (folder / "series").mkdir(parents=True)
        (folder / "series" / "1.dcm").write_bytes(b"x")
    SeriesStore(scratch)
    assert not dead.exists() and alive.exists()
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700


def test_the_cli_refuses_the_network_without_a_token_and_short_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = ["serve", "--data-dir", str(tmp_path), "--port", "1"]
    for host in ("0.0.0.0", "::", "10.1.2.3", "nodules.hospital.example"):
        assert main([*argv, "--host", host]) == 2
        error = capsys.readouterr().err
        assert f"--host {host} would open the library (patient identifiers) to the network without a token" in error
        assert TOKEN_ENV in error
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main([*argv, "--host", "0.0.0.0"]) == 2
    assert "holds 5 characters; a token needs at least 16" in capsys.readouterr().err
    assert main([*argv, "--token-file", str(tmp_path / "missing")]) == 2
    assert f"cannot read the token file {tmp_path / 'missing'}" in capsys.readouterr().err
    assert not (tmp_path / AUDIT_FILE).exists()  # refused before anything was opened


def test_k_beyond_the_cap_is_refused_by_the_api_and_the_cli(
    search_page: SearchServer, served_library: Path, capsys: pytest.CaptureFixture
) -> None:
    for k in (1001, 10**9, 10**30):
        status, _, body = answer(search_page, "/api/search", json.dumps({"nodule_id": QUERY, "k": k}).encode())
        assert status == 400 and body["error"] == f"k must be a whole number from 1 to 1,000, got {k}"
    assert main(["search", "--nodule", QUERY, "--data-dir", str(served_library), "--k", "1001"]) == 2
    assert "k must be a whole number from 1 to 1,000, got 1001" in capsys.readouterr().err
