"""The OpenAPI 3.1 description of the search server's API (served at ``/openapi.json``).

Written out by hand: the API is small, and the description is a contract for other tools, so it
changes only on purpose. A test checks that it names every route of the app.
"""

from __future__ import annotations

from typing import Any

from nodule_pipeline.hashing.search import MODES
from nodule_pipeline.hashing.searcher import MAX_K, UNITS
from nodule_pipeline.serve.security import CONTENT_TYPES, SESSION_COOKIE, TOKEN_ENV

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "bad input, with the message `nodule-pipeline search` gives for it",
        401: "no token: sign in first (the server was started with a token)",
        404: "no such nodule (or route), or no such study or series in the PACS",
        413: "the body is over its limit",
        415: "the body's content type is not one the endpoint takes",
        502: "the PACS failed: unreachable, refused the server's credentials, or answered an error",
        503: "no hash index to search yet (or, for a series, two uploads already being read)",
    }
    return {str(status): _json(_ERROR, meaning[status]) for status in statuses}


_DICOMWEB = {
    "type": "object",
    "description": "a CT series in the server's PACS (serve --dicomweb), fetched with WADO-RS",
    "properties": {"study": {"type": "string"}, "series": {"type": "string"}},
    "required": ["study", "series"],
    "additionalProperties": False,
}
_PACS_STUDY = {
    "type": "object",
    "properties": {
        "patient_id": {"type": "string"},
        "study_uid": {"type": "string"},
        "date": {"type": "string", "description": "YYYYMMDD"},
        "description": {"type": "string"},
        "modalities": {"type": "array", "items": {"type": "string"}},
        "instances": {"type": "integer"},
    },
}
_PACS_SERIES = {
    "type": "object",
    "properties": {
        "series_uid": {"type": "string"},
        "modality": {"type": "string"},
        "instances": {"type": "integer"},
        "description": {"type": "string"},
    },
}
_K = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10, "description": "how many hits"}
_MODE = {"type": "string", "enum": list(MODES), "default": "hierarchical", "description": "search stages"}
_UNIT = {
    "type": "string",
    "enum": list(UNITS),
    "default": "nodule",
    "description": "a hit is a nodule (its reader annotations folded, placed where its best ranks) or an annotation",
}
_SEARCH_RESPONSES = {"200": _json({"$ref": "#/components/schemas/SearchResponse"}, "the hits, best first")}
_PNG = {"200": {"description": "a PNG picture", "content": {"image/png": {}}}}
_PATH_NODULE = {"name": "nodule_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _upload(description: str, limit: int, path: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": f"{description} (at most {limit:,} bytes), sent as the raw body",
        "content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in CONTENT_TYPES[path]},
    }


ITEM = {
    "type": "object",
    "description": "one reader annotation of a library nodule",
    "properties": {
        "patient_id": {"type": "string"},
        "nodule_id": {"type": "string"},
        "annotation_id": {"type": "string"},
        "label": {"type": "integer", "enum": [0, 1], "description": "0 benign, 1 malignant"},
        "malignancy": {"type": ["number", "null"], "description": "the reader's rating 1..5"},
        "characteristics": {
            "type": "object",
            "additionalProperties": {"type": ["number", "null"]},
            "description": "the reader's nine LIDC ratings (subtlety ... malignancy)",
        },
        "series_uid": {"type": "string"},
        "center_i": {"type": "integer"},
        "center_j": {"type": "integer"},
        "center_k": {"type": "integer"},
        "diameter_mm": {"type": "number"},
        "thumbnail_url": {"type": "string", "description": "its ROI in the lung window, PNG"},
    },
    "required": ["patient_id", "nodule_id", "label", "malignancy", "characteristics", "thumbnail_url"],
}
HIT = {
    "allOf": [
        {"$ref": "#/components/schemas/Item"},
        {
            "type": "object",
            "description": "one search result: the library item, its distances and the index it came from",
            "properties": {
                "rank": {"type": "integer", "minimum": 1},
                "hamming": {"type": "integer"},
                "euclidean": {"type": ["number", "null"], "description": "null in hamming mode"},
                "rating_distance": {
                    "type": ["number", "null"],
                    "description": "hierarchical mode: how far (0..1) the readers' ratings of the hit are expected to "
                    "be from the query's, as the model predicts them; the order of the hits. Null where not used",
                },
                "index_version": {"type": "string"},
                "class_fallback": {
                    "type": "boolean",
                    "description": "the predicted class had no searchable item: the whole library was searched",
                },
                "unit": {"type": "string", "enum": list(UNITS)},
                "readers": {
                    "type": "array",
                    "description": "nodule hits: each reader annotation of the nodule; matched marks the one shown",
                    "items": {"type": "object"},
                },
            },
            "required": ["rank", "hamming", "euclidean", "index_version", "class_fallback", "unit"],
        },
    ]
}


def api_description(json_limit: int, roi_limit: int, series_limit: int) -> dict[str, Any]:
    """The description, with the app's body limits (bytes)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nodule_pipeline search",
            "version": "1",
            "description": (
                "Similar lung nodules from the hash index (deep hashing after Hao et al. 2022). When the "
                f"server has a token (${TOKEN_ENV}), every /api/ request but /api/session needs it, as "
                f"'Authorization: Bearer <token>' or the {SESSION_COOKIE} cookie of POST /api/session."
            ),
        },
        "paths": {
            "/api/session": {
                "get": {
                    "summary": "whether this server asks for a token, and whether this request is signed in",
                    "responses": {"200": _json({"type": "object"}, "token_required and signed_in")},
                },
                "post": {
                    "summary": "sign in with the token: sets an HttpOnly, SameSite=Strict session cookie",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"token": {"type": "string"}},
                                    "required": ["token"],
                                }
                            }
                        },
                    },
                    "responses": {"200": _json({"type": "object"}, "signed in"), **_errors(400, 401, 415)},
                },
                "delete": {
                    "summary": "sign out: ends the session and clears its cookie",
                    "responses": {"200": _json({"type": "object"}, "signed out")},
                },
            },
            "/api/library": {
                "get": {
                    "summary": "the index and model being searched, with links to them in the Dagster UI",
                    "responses": {"200": _json({"type": "object"}, "versions, counts, lineage"), **_errors(401, 503)},
                }
            },
            "/api/nodules": {
                "get": {
                    "summary": "the library's nodules, by id",
                    "parameters": [
                        _query("q", {"type": "string"}, "only ids or patients containing this text"),
                        _query("limit", {"type": "integer", "minimum": 1, "default": 200}, "at most this many"),
                    ],
                    "responses": {"200": _json({"type": "object"}, "total and nodules"), **_errors(400, 503)},
                }
            },
            "/api/nodules/{nodule_id}": {
                "get": {
                    "summary": "a library nodule with each reader annotation the index holds",
                    "parameters": [_PATH_NODULE],
                    "responses": {
                        "200": _json({"type": "object"}, "the nodule; annotations: Item objects"),
                        **_errors(400, 503),
                    },
                }
            },
            "/api/nodules/{nodule_id}/thumbnail.png": {
                "get": {
                    "summary": "a nodule's ROI in the lung window",
                    "parameters": [
                        _PATH_NODULE,
                        _query("annotation", {"type": "string"}, "this annotation's ROI (default: the first)"),
                    ],
                    "responses": {**_PNG, **_errors(400, 503)},
                }
            },
            "/api/search": {
                "post": {
                    "summary": "the k most similar library nodules to a ROI, a library nodule or a voxel of a series",
                    "requestBody": {
                        "required": True,
                        "description": f"at most {json_limit:,} bytes",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}}},
                    },
                    "responses": {**_SEARCH_RESPONSES, **_errors(400, 401, 404, 413, 415, 502, 503)},
                }
            },
            "/api/search/upload": {
                "post": {
                    "summary": "search with a ROI file, read as `nodule-pipeline search --roi` reads it",
                    "parameters": [
                        _query(
                            "filename", {"type": "string"}, "the file's name: .npy (HU) or .png (lung window)", True
                        ),
                        _query("k", _K, "how many hits"),
                        _query("mode", _MODE, "search stages"),
                        _query("unit", _UNIT, "what a hit is"),
                        _query("exclude_patient", {"type": "string"}, "leave this patient's nodules out"),
                    ],
                    "requestBody": _upload(
                        "a 32x32 ROI: .npy in HU, or an 8-bit grey .png in the lung window",
                        roi_limit,
                        "/api/search/upload",
                    ),
                    "responses": {**_SEARCH_RESPONSES, **_errors(400, 401, 413, 415, 503)},
                }
            },
            "/api/series": {
                "post": {
                    "summary": "upload a zip of one CT series (DICOM) to query voxels of",
                    "parameters": [_query("filename", {"type": "string"}, "the zip's name", True)],
                    "requestBody": _upload(
                        "a zip of the series' .dcm files (the LIDC XML may be beside them)", series_limit, "/api/series"
                    ),
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Series"}, "the series id and shape"),
                        **_errors(400, 401, 413, 415, 503),
                    },
                }
            },
            "/api/series/{series_id}/slices/{index}.png": {
                "get": {
                    "summary": "one axial slice of an uploaded series in an HU window",
                    "parameters": [
                        {"name": "series_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
                        _query("level", {"type": "number", "default": -600}, "window level (HU)"),
                        _query(
                            "width", {"type": "number", "default": 1500, "exclusiveMinimum": 0}, "window width (HU)"
                        ),
                    ],
                    "responses": {**_PNG, **_errors(400)},
                }
            },
            "/api/pacs/studies": {
                "get": {
                    "summary": "the CT studies in the server's PACS (QIDO-RS), newest first",
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"studies": {"type": "array", "items": _PACS_STUDY}}},
                            "patient id, date, description, modalities and instance count of each study",
                        ),
                        **_errors(400, 401, 502),
                    },
                }
            },
            "/api/pacs/studies/{study_uid}/series": {
                "get": {
                    "summary": "a study's series in the PACS (CT ones can be opened)",
                    "parameters": [
                        {"name": "study_uid", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"series": {"type": "array", "items": _PACS_SERIES}}},
                            "series UID, modality, instance count and description of each series",
                        ),
                        **_errors(400, 401, 404, 502),
                    },
                }
            },
            "/api/pacs/series": {
                "post": {
                    "summary": "fetch a CT series from the PACS (WADO-RS) to query voxels of, as an uploaded zip",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"dicomweb": _DICOMWEB},
                                    "required": ["dicomweb"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Series"}, "the series id and shape"),
                        **_errors(400, 401, 404, 502, 503),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": f"the server's token (${TOKEN_ENV})"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Item": ITEM,
                "Hit": HIT,
                "SearchRequest": {
                    "type": "object",
                    "description": "exactly one of image, nodule_id, series_id, dicomweb",
                    "properties": {
                        "image": {
                            "type": "array",
                            "description": "32x32 = 1024 Hounsfield units, row-major (or 32 rows of 32)",
                            "items": {"type": ["number", "array"]},
                        },
                        "nodule_id": {"type": "string", "description": "a library nodule; its own patient is left out"},
                        "series_id": {"type": "string", "description": "an uploaded series (POST /api/series)"},
                        "dicomweb": _DICOMWEB,
                        "store_results": {
                            "type": "boolean",
                            "description": "with a series from the PACS: store the answer in its study (DICOM SR "
                            "and KOS, STOW-RS); the answer's `stored` names them",
                        },
                        "voxel": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "minItems": 3,
                            "maxItems": 3,
                            "description": "with series_id or dicomweb: row, column, slice (slice in ascending z)",
                        },
                        "position_mm": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 3,
                            "maxItems": 3,
                            "description": "with series_id or dicomweb, instead of voxel: x, y, z in patient mm",
                        },
                        "k": _K,
                        "mode": _MODE,
                        "unit": _UNIT,
                        "exclude_patient": {"type": "string", "description": "leave this patient's nodules out"},
                    },
                    "additionalProperties": False,
                },
                "SearchResponse": {
                    "type": "object",
                    "properties": {
                        "index_version": {"type": "string"},
                        "model_version": {"type": "string"},
                        "query": {
                            "type": "object",
                            "description": "what was asked, predicted label, p(malignant), the ROI as a PNG data URL",
                        },
                        "class_fallback": {"type": "boolean"},
                        "unit": {"type": "string", "enum": list(UNITS)},
                        "warnings": {
                            "type": "array",
                            "description": "why the query may be no nodule (empty when all is well)",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "code": {
                                        "type": "string",
                                        "enum": ["no_tissue", "not_hu", "far_from_library", "outside_lungs"],
                                    },
                                    "message": {"type": "string"},
                                },
                            },
                        },
                        "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
                    },
                    "required": ["index_version", "model_version", "query", "class_fallback", "warnings", "hits"],
                },
                "Series": {
                    "type": "object",
                    "properties": {
                        "series_id": {"type": "string"},
                        "name": {"type": "string"},
                        "rows": {"type": "integer"},
                        "columns": {"type": "integer"},
                        "slices": {"type": "integer"},
                        "spacing_mm": {"type": "array", "items": {"type": "number"}},
                    },
                },
            },
        },
    }
