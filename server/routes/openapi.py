"""/openapi.json: this server's own API, including every served model's Input schema."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from models.catalog import Catalog
from server import __version__, keys
from server.http import json_response
from server.records import WEBHOOK_EVENTS

_STATUS = ["starting", "processing", "succeeded", "failed", "canceled"]
_TIME = {"type": ["string", "null"], "format": "date-time"}

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
    "429": _problem("Queue full"),
    "503": _problem("Shutting down or model unavailable"),
}


def build_openapi(catalog: Catalog) -> dict[str, Any]:
    inputs = {}
    for entry in catalog:
        key = "Input_" + entry.ref.replace("/", "__").replace(".", "_").replace("-", "_")
        inputs[key] = copy.deepcopy(entry.schema.input)
    any_input: dict[str, Any] = (
        {"oneOf": [_ref(k) for k in inputs]} if inputs else {"type": "object"}
    )
    create_body = {
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
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
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
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model", "input"],
                                "properties": {"model": {"type": "string"}, "input": any_input},
                            }
                        }
                    },
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
            "schemas": {"Prediction": PREDICTION, "Problem": PROBLEM, **inputs},
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(request.app[keys.CATALOG]))


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", get_openapi)
