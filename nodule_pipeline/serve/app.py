"""``nodule-pipeline serve``: the similar-nodule search page and its JSON API, a Starlette app.

Every query goes through :class:`~nodule_pipeline.hashing.searcher.NoduleSearcher` with the
checks and messages of ``nodule-pipeline search``; a bad one is a 400 naming what is wrong, a
body over its limit a 413, and no query stops the server. CPU work (encoding, search, pictures,
DICOM reading) runs in worker threads, so one slow upload does not hold the others; at most
:data:`CONCURRENT_SERIES_UPLOADS` series are read at once. Who may ask, and the audit of what
was asked, are :mod:`~nodule_pipeline.serve.security`'s: handlers only say what they answered
(``request.state.audit``).
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.searcher import MODES, NoduleSearcher, UnknownNoduleError, read_query_roi
from nodule_pipeline.lidc.dicomweb import Pacs, PacsError
from nodule_pipeline.pacs_results import store_results
from nodule_pipeline.serve import library as describe
from nodule_pipeline.serve.audit import AuditLog
from nodule_pipeline.serve.library import Library, LibraryUnavailable
from nodule_pipeline.serve.openapi import api_description
from nodule_pipeline.serve.security import SESSION_COOKIE, Access, Guard, ended_session_cookie, session_cookie
from nodule_pipeline.serve.uploads import SeriesStore, slice_png

STATIC = Path(__file__).resolve().parent / "static"
JSON_LIMIT = 1 << 20
"""Largest JSON request body: a 1024-value ROI takes ~10 KB."""
ROI_FILE_LIMIT = 1 << 20
"""Largest uploaded ROI file (.npy or .png); a 32x32 one takes a few KB."""
SERIES_ZIP_LIMIT = 1 << 30
"""Largest uploaded DICOM series zip (a thin-slice CT series is a few hundred MB)."""
CONCURRENT_SERIES_UPLOADS = 2
"""Series read at once (each takes up to a few GB while read); a third waits for a 503's Retry-After."""
SEARCH_FIELDS = (
    "image",
    "nodule_id",
    "series_id",
    "dicomweb",
    "voxel",
    "position_mm",
    "k",
    "mode",
    "unit",
    "exclude_patient",
    "store_results",
)
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
"""The page loads its own files only: nothing from elsewhere, even if an item's text held markup."""
T = TypeVar("T")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit:,} bytes")


def create_app(
    data_dir: Path,
    dagster_url: str | None = None,
    access: Access | None = None,
    audit: AuditLog | None = None,
    dicomweb_url: str | None = None,
) -> Starlette:
    """The app for a data dir; ``dagster_url`` (the Dagster UI's address) adds links to the assets.
    ``access`` says who may ask (default: no token, localhost names only); ``audit`` takes a line
    per search, upload and nodule view. ``dicomweb_url`` is the PACS that "Open from PACS" lists
    and fetches from (a server setting, with its credentials from the environment: the page never
    names a PACS)."""
    access = access or Access()
    app = Starlette(
        routes=[
            Route("/", page),
            Route("/openapi.json", openapi),
            Route("/api/session", session_info),
            Route("/api/session", sign_in, methods=["POST"]),
            Route("/api/session", sign_out, methods=["DELETE"]),
            Route("/api/library", library_info),
            Route("/api/nodules", nodules),
            Route("/api/nodules/{nodule_id}", nodule),
            Route("/api/nodules/{nodule_id}/thumbnail.png", nodule_thumbnail),
            Route("/api/search", search, methods=["POST"]),
            Route("/api/search/upload", search_upload, methods=["POST"]),
            Route("/api/series", series_upload, methods=["POST"]),
            Route("/api/series/{series_id}/slices/{index:int}.png", series_slice),
            Route("/api/pacs/studies", pacs_studies),
            Route("/api/pacs/studies/{study_uid}/series", pacs_series),
            Route("/api/pacs/series", pacs_open, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={
            InputDataError: lambda _, error: _error(400, str(error)),
            PacsError: lambda _, error: _error(error.status, str(error)),
            BodyTooLarge: lambda _, error: _error(413, str(error)),
            LibraryUnavailable: lambda _, error: _error(503, str(error)),
            HTTPException: lambda _, error: _error(error.status_code, error.detail),
        },
        middleware=[Middleware(Guard, access=access, audit=audit)],
    )
    app.state.access = access
    app.state.library = Library(data_dir)
    app.state.uploads = SeriesStore(data_dir / "uploads")
    app.state.series_slots = threading.BoundedSemaphore(CONCURRENT_SERIES_UPLOADS)
    app.state.dagster_url = dagster_url.rstrip("/") if dagster_url else None
    app.state.dicomweb_url = dicomweb_url
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _with_searcher(request: Request, work: Callable[[NoduleSearcher], T]) -> T:
    """``work`` on the current searcher, in a worker thread (loading a changed index included)."""
    library: Library = request.app.state.library
    return await run_in_threadpool(lambda: work(library.searcher()))


async def _receive(request: Request, limit: int, into: IO[bytes]) -> None:
    """The request body into ``into``, refused as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        into.write(chunk)
    into.seek(0)


def _number(text: str | None, default: Any) -> Any:
    """A query-string number as int or float; anything else is passed on as given, for the
    searcher to refuse with its own message."""
    if text is None:
        return default
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _upload_name(request: Request, example: str) -> str:
    name = request.query_params.get("filename", "").strip()
    if not name:
        raise InputDataError(f"name the uploaded file (?filename={example}): its extension says how to read it")
    return Path(name).name


def _audit(request: Request, answer: dict[str, Any]) -> dict[str, Any]:
    """Tell the audit log what a search asked and found (nodule ids, never the pictures)."""
    query = answer["query"]
    asked = {key: query[key] for key in ("nodule_id", "series_id", "voxel", "name") if key in query}
    request.state.audit = {
        "asked": asked or query["kind"],
        "hits": [hit["nodule_id"] for hit in answer["hits"]],
        "index_version": answer["index_version"],
        "model_version": answer["model_version"],
    }
    return answer


async def _json_body(request: Request) -> object:
    with tempfile.SpooledTemporaryFile() as body:
        await _receive(request, JSON_LIMIT, body)
        text = body.read()
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise InputDataError(f"the request body is not JSON ({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------- sign-in


async def session_info(request: Request) -> JSONResponse:
    access: Access = request.app.state.access
    return JSONResponse({"token_required": access.token is not None, "signed_in": request.state.who is not None})


async def sign_in(request: Request) -> JSONResponse:
    """The page's sign-in: the token once, then an HttpOnly session cookie scripts cannot read."""
    access: Access = request.app.state.access
    if access.token is None:
        raise InputDataError("this server takes no token: it answers on this computer only")
    request.state.audit = {"asked": "session"}
    payload = await _json_body(request)
    opened = access.open_session(payload.get("token") if isinstance(payload, dict) else None)
    if opened is None:
        return _error(401, "that is not this server's token")
    session, request.state.who = opened
    answer = JSONResponse({"signed_in": True})
    answer.headers["set-cookie"] = session_cookie(session, secure=request.url.scheme == "https")
    return answer


async def sign_out(request: Request) -> JSONResponse:
    access: Access = request.app.state.access
    access.close_session(request.cookies.get(SESSION_COOKIE))
    answer = JSONResponse({"signed_in": False})
    answer.headers["set-cookie"] = ended_session_cookie(secure=request.url.scheme == "https")
    return answer


# --------------------------------------------------------------------------- pages and library


async def page(_: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


async def openapi(_: Request) -> JSONResponse:
    return JSONResponse(api_description(JSON_LIMIT, ROI_FILE_LIMIT, SERIES_ZIP_LIMIT))


async def library_info(request: Request) -> JSONResponse:
    url = request.app.state.dagster_url
    links = {name: f"{url}/assets/{name}" for name in ("hash_index", "hash_model")} if url else None
    info = await _with_searcher(request, describe.summary)
    return JSONResponse({**info, "modes": list(MODES), "dagster": links, "pacs": bool(request.app.state.dicomweb_url)})


async def nodules(request: Request) -> JSONResponse:
    text = request.query_params.get("q", "")
    limit = _number(request.query_params.get("limit"), 200)
    if not isinstance(limit, int) or limit < 1:
        raise InputDataError(f"limit must be a whole number of at least 1, got {limit!r}")
    return JSONResponse(await _with_searcher(request, lambda s: describe.nodule_list(s, text, limit)))


async def nodule(request: Request) -> JSONResponse:
    nodule_id = request.path_params["nodule_id"]
    request.state.audit = {"asked": {"nodule_id": nodule_id}}
    try:
        return JSONResponse(await _with_searcher(request, lambda s: describe.nodule_json(s, nodule_id)))
    except UnknownNoduleError as error:  # a resource that is not there; a search by it is a bad query (400)
        return _error(404, str(error))


async def nodule_thumbnail(request: Request) -> Response:
    nodule_id, annotation = request.path_params["nodule_id"], request.query_params.get("annotation")
    try:
        png = await _with_searcher(request, lambda s: describe.thumbnail(s, nodule_id, annotation))
    except UnknownNoduleError as error:
        return _error(404, str(error))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- search


async def search(request: Request) -> JSONResponse:
    """A JSON query: an image, a library nodule, or a voxel of an uploaded series."""
    payload = await _json_body(request)
    if isinstance(payload, dict):
        asked = {key: str(payload[key])[:200] for key in ("nodule_id", "series_id", "dicomweb") if key in payload}
        request.state.audit = {"asked": asked or ("image" if "image" in payload else "?")}
    uploads: SeriesStore = request.app.state.uploads
    pacs_url = request.app.state.dicomweb_url
    answer = await _with_searcher(request, lambda s: _search(s, uploads, payload, pacs_url))
    return JSONResponse(_audit(request, answer))


def _search(
    searcher: NoduleSearcher, uploads: SeriesStore, payload: object, pacs_url: str | None = None
) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InputDataError("the request body must be a JSON object")
    unknown = sorted(set(payload) - set(SEARCH_FIELDS))
    if unknown:
        raise InputDataError(f"unknown field(s) {', '.join(unknown)}; a search takes {', '.join(SEARCH_FIELDS)}")
    given = [key for key in ("image", "nodule_id", "series_id", "dicomweb") if key in payload]
    if len(given) != 1:
        raise InputDataError(
            "give one query: image (32x32 = 1024 HU values), nodule_id, or series_id (or dicomweb: "
            "{study, series}) with voxel"
        )
    k, mode, exclude = payload.get("k", 10), payload.get("mode", "hierarchical"), payload.get("exclude_patient")
    unit = payload.get("unit", "nodule")
    if exclude is not None and not isinstance(exclude, str):
        raise InputDataError(f"exclude_patient must be a patient id, got {exclude!r}")
    if "image" in payload:
        response = searcher.search_roi(payload["image"], k, mode, exclude_patient=exclude, source="image", unit=unit)
        query: dict[str, Any] = {"kind": "image"}
    elif "nodule_id" in payload:
        if exclude is not None:
            raise InputDataError(
                "a nodule_id query leaves out the nodule's own patient; exclude_patient does not apply"
            )
        response = searcher.search_nodule(payload["nodule_id"], k, mode, unit=unit)
        nodule = describe.nodule_json(searcher, payload["nodule_id"])
        query = {"kind": "nodule", **{key: nodule[key] for key in ("nodule_id", "patient_id", "label", "malignancy")}}
    else:
        if "dicomweb" in payload:
            study_uid, series_uid = _pacs_series_uids(payload["dicomweb"])
            series_id, uploaded = uploads.add_from_pacs(_pacs_at(pacs_url), study_uid, series_uid)
        else:
            series_id, uploaded = payload["series_id"], uploads.get(payload["series_id"])
        response = searcher.search_series(
            uploaded.series,
            payload.get("voxel"),
            payload.get("position_mm"),
            k,
            mode,
            exclude,
            lungs=uploaded.lungs,
            unit=unit,
        )
        query = {"kind": "series", "series_id": series_id, "voxel": payload.get("voxel")}
        if uploaded.source is not None:
            query |= {"dicomweb": {"study": uploaded.source[1], "series": uploaded.source[2]}}
    answer = describe.response_json(searcher, response, query)
    if payload.get("store_results"):
        if query["kind"] != "series" or uploaded.source is None:
            raise InputDataError("store_results needs a query on a series opened from the PACS (dicomweb)")
        series = uploaded.series
        voxel = payload.get("voxel") or series.voxel_at_mm(*payload["position_mm"])
        answer["stored"] = store_results(_pacs_at(pacs_url), answer, series, voxel).to_json()
    return answer


async def search_upload(request: Request) -> JSONResponse:
    """An uploaded ROI file (.npy in HU or a lung-window .png), read as ``nodule-pipeline search --roi``."""
    name = _upload_name(request, "roi.npy")
    request.state.audit = {"asked": {"name": name}}
    params = request.query_params
    k, mode, unit = _number(params.get("k"), 10), params.get("mode", "hierarchical"), params.get("unit", "nodule")
    exclude = params.get("exclude_patient")
    with tempfile.TemporaryFile() as file:
        await _receive(request, ROI_FILE_LIMIT, file)

        def work(searcher: NoduleSearcher) -> dict[str, Any]:
            # read as a plain file, as the CLI opens a path: numpy then reads it, and words damage, the same way
            with open(file.fileno(), "rb", closefd=False) as reader:
                image = read_query_roi(reader, name)
            response = searcher.search_roi(image, k, mode, exclude_patient=exclude, source=name, unit=unit)
            return describe.response_json(searcher, response, {"kind": "upload", "name": name})

        return JSONResponse(_audit(request, await _with_searcher(request, work)))


# --------------------------------------------------------------------------- uploaded DICOM series


async def series_upload(request: Request) -> JSONResponse:
    """A zip of one DICOM series, read and kept for clicking a nodule on."""
    name = _upload_name(request, "series.zip")
    request.state.audit = {"asked": {"name": name}}
    uploads: SeriesStore = request.app.state.uploads
    slots: threading.BoundedSemaphore = request.app.state.series_slots
    if not slots.acquire(blocking=False):
        busy = f"{CONCURRENT_SERIES_UPLOADS} series are being read; send this one again in a few seconds"
        return JSONResponse({"error": busy}, status_code=503, headers={"Retry-After": "5"})
    try:
        with tempfile.TemporaryFile() as file:
            await _receive(request, SERIES_ZIP_LIMIT, file)
            series_id, uploaded = await run_in_threadpool(uploads.add, file, name)
    finally:
        slots.release()
    request.state.audit = {"asked": {"name": name, "series_id": series_id}}
    return JSONResponse(uploaded.describe(series_id))


# --------------------------------------------------------------------------- the PACS (DICOMweb)


def _pacs_at(url: str | None) -> Pacs:
    if not url:
        raise InputDataError("this server has no PACS: start it with serve --dicomweb URL")
    return Pacs(url)


def _pacs(request: Request) -> Pacs:
    return _pacs_at(request.app.state.dicomweb_url)


def _pacs_series_uids(given: object) -> tuple[str, str]:
    if not (isinstance(given, dict) and set(given) == {"study", "series"}):
        raise InputDataError(f"dicomweb must be {{study: UID, series: UID}}, got {str(given)[:200]}")
    uids = (given["study"], given["series"])
    if not all(isinstance(uid, str) and _UID.match(uid) for uid in uids):
        raise InputDataError(f"study and series must be DICOM UIDs (digits and dots), got {str(given)[:200]}")
    return uids


_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


async def pacs_studies(request: Request) -> JSONResponse:
    """The PACS's CT studies (patient id, date, description), newest first, for "Open from PACS"."""
    pacs = _pacs(request)
    studies = await run_in_threadpool(pacs.studies)
    shown = [s.to_dict() for s in reversed(studies) if not s.modalities or "CT" in s.modalities]
    request.state.audit = {"asked": "pacs studies"}
    return JSONResponse({"studies": shown})


async def pacs_series(request: Request) -> JSONResponse:
    """A study's series in the PACS (CT ones can be opened)."""
    pacs = _pacs(request)
    study_uid = request.path_params["study_uid"]
    if not _UID.match(study_uid):
        raise InputDataError(f"study must be a DICOM UID (digits and dots), got {study_uid[:200]!r}")
    found = await run_in_threadpool(pacs.series, study_uid)
    request.state.audit = {"asked": {"study": study_uid}}
    return JSONResponse(
        {
            "study_uid": study_uid,
            "series": [
                {
                    "series_uid": s.series_uid,
                    "modality": s.modality,
                    "instances": s.instances,
                    "description": s.description,
                }
                for s in found
            ],
        }
    )


async def pacs_open(request: Request) -> JSONResponse:
    """Fetch a CT series from the PACS (WADO-RS) to click a nodule on, as an uploaded zip is."""
    payload = await _json_body(request)
    study_uid, series_uid = _pacs_series_uids(payload.get("dicomweb") if isinstance(payload, dict) else payload)
    request.state.audit = {"asked": {"study": study_uid, "series": series_uid}}
    pacs, uploads = _pacs(request), request.app.state.uploads
    slots: threading.BoundedSemaphore = request.app.state.series_slots
    if not slots.acquire(blocking=False):
        busy = f"{CONCURRENT_SERIES_UPLOADS} series are being read; ask again in a few seconds"
        return JSONResponse({"error": busy}, status_code=503, headers={"Retry-After": "5"})
    try:
        series_id, opened = await run_in_threadpool(uploads.add_from_pacs, pacs, study_uid, series_uid)
    finally:
        slots.release()
    request.state.audit = {"asked": {"study": study_uid, "series": series_uid, "series_id": series_id}}
    return JSONResponse(opened.describe(series_id) | {"dicomweb": {"study": study_uid, "series": series_uid}})


async def series_slice(request: Request) -> Response:
    uploaded = request.app.state.uploads.get(request.path_params["series_id"])
    level, width = (
        _number(request.query_params.get(key), default) for key, default in (("level", -600), ("width", 1500))
    )
    if not all(isinstance(value, (int, float)) for value in (level, width)):
        raise InputDataError(f"the HU window's level and width must be numbers, got {level!r} and {width!r}")
    png = await run_in_threadpool(slice_png, uploaded, request.path_params["index"], float(level), float(width))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
