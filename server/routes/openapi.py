"""/openapi.json: this server's own API, including every served model's Input schema."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from models.catalog import Catalog
from server import __version__, keys
from server.http import json_response
from server.records import WEBHOOK_EVENTS
from server.store import SQLITE_MAX_INT

_STATUS = ["starting", "processing", "succeeded", "failed", "canceled"]
_TIME = {"type": ["string", "null"], "format": "date-time"}
_STR = {"type": "string"}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": SQLITE_MAX_INT}

PREDICTION = {
    "type": "object",
    "required": [
        "id",
        "model",
        "version",
        "input",
        "output",
        "error",
        "status",
        "created_at",
        "urls",
    ],
    "properties": {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "input": {"type": "object"},
        "output": {},
        "logs": {"type": "string"},
        "error": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": _STATUS},
        "source": {"type": "string", "enum": ["api", "web"]},
        "data_removed": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": _TIME,
        "completed_at": _TIME,
        "deadline": {"type": "string", "format": "date-time"},
        "urls": {"type": "object", "additionalProperties": {"type": "string"}},
        "metrics": {"type": "object"},
        "webhook": {"type": "string"},
        "webhook_events_filter": {
            "type": "array",
            "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
        },
    },
}
PROBLEM = {
    "type": "object",
    "required": ["title", "detail", "status"],
    "properties": {
        "title": {"type": "string"},
        "detail": {"type": "string"},
        "status": {"type": "integer"},
    },
}
FILE = {
    "type": "object",
    "required": ["id", "name", "content_type", "size", "checksums", "created_at", "urls"],
    "properties": {
        "id": _STR,
        "name": _STR,
        "content_type": _STR,
        "size": {"type": "integer"},
        "etag": _STR,
        "checksums": {"type": "object", "additionalProperties": _STR},
        "metadata": {"type": "object"},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": _TIME,
        "urls": {"type": "object", "additionalProperties": _STR},
    },
}
#: One server-sent event, as the official clients accept them: these four names, each with an id.
EVENT = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {"type": "string", "enum": ["output", "logs", "error", "done"]},
        "data": _STR,
        "id": _STR,
    },
}
PAGE = {
    "type": "object",
    "required": ["next", "previous", "results"],
    "properties": {
        "next": {"type": ["string", "null"]},
        "previous": {"type": ["string", "null"]},
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}},
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _events(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/event-stream": {"schema": EVENT}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


_ERRORS = {
    "400": _problem("Malformed request"),
    "401": _problem("Missing or wrong token"),
    "404": _problem("Unknown model, version or prediction"),
    "413": _problem("Body too large"),
    "422": _problem("Input or request fields invalid"),
    "429": _problem("Queue full or too many streams"),
    "503": _problem("Shutting down or model unavailable"),
}


def build_openapi(catalog: Catalog) -> dict[str, Any]:
    inputs = {}
    for entry in catalog:
        key = "Input_" + entry.ref.replace("/", "__").replace(".", "_").replace("-", "_")
        inputs[key] = copy.deepcopy(entry.schema.input)
    any_input: dict[str, Any] = (
        {"anyOf": [_ref(k) for k in inputs]} if inputs else {"type": "object"}
    )
    create_body: dict[str, Any] = {
        "type": "object",
        "required": ["version", "input"],
        "properties": {
            "version": {"type": "string", "description": "id, owner/name or owner/name:id"},
            "input": any_input,
            "stream": {"type": "boolean"},
            "webhook": {"type": "string", "format": "uri"},
            "webhook_events_filter": {
                "type": "array",
                "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
            },
        },
    }
    prefer = {
        "name": "Prefer",
        "in": "header",
        "schema": {"type": "string", "pattern": "^wait(=([1-9]|[1-9][0-9]|60))?$"},
    }
    model_create_body = copy.deepcopy(create_body)
    del model_create_body["properties"]["version"]
    model_create_body["required"] = ["input"]
    run_body = {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": {"type": "string"}, "input": any_input},
    }
    id_param = {"name": "id", "in": "path", "required": True, "schema": _STR}
    model_params = [
        {"name": "owner", "in": "path", "required": True, "schema": _STR},
        {"name": "name", "in": "path", "required": True, "schema": _STR},
    ]
    created = _json(_ref("Prediction"), "The prediction")
    paths: dict[str, Any] = {
        "/v1/predictions": {
            "post": {
                "operationId": "createPrediction",
                "parameters": [prefer],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": create_body}},
                },
                "responses": {"201": created, **_ERRORS},
            },
            "get": {
                "operationId": "listPredictions",
                "parameters": [{"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _json(PAGE, "A page of predictions"), **_ERRORS},
            },
        },
        "/v1/predictions/{id}": {
            "get": {
                "operationId": "getPrediction",
                "parameters": [id_param],
                "responses": {"200": created, **_ERRORS},
            }
        },
        "/v1/predictions/{id}/cancel": {
            "post": {
                "operationId": "cancelPrediction",
                "parameters": [id_param],
                "responses": {"200": created, **_ERRORS},
            }
        },
        "/v1/run": {
            "post": {
                "operationId": "run",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": run_body}},
                },
                "responses": {"201": created, **_ERRORS},
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "responses": {"200": _json({"type": "object"}, "Models"), **_ERRORS},
            }
        },
        "/v1/models/{owner}/{name}": {
            "get": {
                "operationId": "getModel",
                "parameters": model_params,
                "responses": {"200": _json({"type": "object"}, "The model"), **_ERRORS},
            }
        },
        "/v1/models/{owner}/{name}/versions": {
            "get": {
                "operationId": "listModelVersions",
                "parameters": model_params,
                "responses": {"200": _json({"type": "object"}, "Its versions"), **_ERRORS},
            }
        },
        "/v1/models/{owner}/{name}/versions/{version}": {
            "get": {
                "operationId": "getModelVersion",
                "parameters": [
                    *model_params,
                    {"name": "version", "in": "path", "required": True, "schema": _STR},
                ],
                "responses": {"200": _json({"type": "object"}, "The version"), **_ERRORS},
            }
        },
        "/v1/models/{owner}/{name}/predictions": {
            "post": {
                "operationId": "createModelPrediction",
                "parameters": [*model_params, prefer],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": model_create_body}},
                },
                "responses": {"201": created, **_ERRORS},
            }
        },
        "/v1/run_sse": {
            "post": {
                "operationId": "runWithEvents",
                "description": "Creates a prediction and answers with its event stream.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": run_body}},
                },
                "responses": {"200": _events("The prediction's events"), **_ERRORS},
            }
        },
        "/v1/streams/{token}": {
            "get": {
                "operationId": "getStream",
                "description": "A prediction's event stream; the token in the URL is the key.",
                "security": [],
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": _STR},
                    {"name": "Last-Event-ID", "in": "header", "schema": _STR},
                ],
                "responses": {
                    "200": _events("The prediction's events"),
                    "204": {"description": "The stream already ended; stop reconnecting"},
                    **_ERRORS,
                },
            }
        },
        "/v1/files": {
            "post": {
                "operationId": "createFile",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["content"],
                                "properties": {
                                    "content": {"type": "string", "format": "binary"},
                                    "metadata": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {"201": _json(_ref("File"), "The stored file"), **_ERRORS},
            },
            "get": {
                "operationId": "listFiles",
                "responses": {"200": _json({"type": "object"}, "A page of files"), **_ERRORS},
            },
        },
        "/v1/files/{id}": {
            "get": {
                "operationId": "getFile",
                "parameters": [id_param],
                "responses": {"200": _json(_ref("File"), "The file"), **_ERRORS},
            },
            "delete": {
                "operationId": "deleteFile",
                "parameters": [id_param],
                "responses": {"204": {"description": "Deleted"}, **_ERRORS},
            },
        },
        "/v1/files/{id}/download": {
            "get": {
                "operationId": "downloadFile",
                "parameters": [id_param],
                "responses": {
                    "200": {
                        "description": "The file's bytes",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/v1/webhooks/default/secret": {
            "get": {
                "operationId": "getDefaultWebhookSecret",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["key"],
                            "properties": {"key": {"type": "string", "pattern": "^whsec_"}},
                        },
                        "The signing secret",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/v1/webhooks/deliveries": {
            "get": {
                "operationId": "listWebhookDeliveries",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                    },
                    {"name": "prediction_id", "in": "query", "schema": _STR},
                    {"name": "limit", "in": "query", "schema": _POSITIVE},
                    {"name": "before", "in": "query", "schema": _POSITIVE},
                ],
                "responses": {"200": _json({"type": "object"}, "Deliveries"), **_ERRORS},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": _STR}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/v1/account": {
            "get": {
                "operationId": "getAccount",
                "responses": {"200": _json({"type": "object"}, "Account"), **_ERRORS},
            }
        },
        "/health-check": {
            "get": {
                "operationId": "healthCheck",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Health")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "replicant",
            "version": __version__,
            "description": "A self-hosted, Replicate-compatible prediction API.",
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Prediction": PREDICTION, "Problem": PROBLEM, "File": FILE, **inputs},
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(request.app[keys.CATALOG]))


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", get_openapi)
