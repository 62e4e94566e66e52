"""/v1/models: the served models and their versions, with each version's OpenAPI schema."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from models.catalog import ModelEntry
from server import keys
from server.errors import NotFound
from server.http import base_url, json_response
from server.records import format_time

#: Reported as each version's `cog_version`: the official Python client needs a string, and
#: values below 0.3.9 make it reinterpret array outputs.
COG_VERSION = "0.16.12"


def openapi_schema(entry: ModelEntry) -> dict[str, Any]:
    """The version's schema in the shape Cog publishes (`components.schemas.Input/Output`)."""
    return {
        "openapi": "3.0.2",
        "info": {"title": entry.ref, "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {"Input": entry.schema.input, "Output": entry.schema.output}},
    }


def version_object(entry: ModelEntry, version_id: str) -> dict[str, Any]:
    return {
        "id": version_id,
        "created_at": format_time(entry.created_at),
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(entry),
    }


def model_object(request: web.Request, entry: ModelEntry, run_count: int) -> dict[str, Any]:
    return {
        "url": f"{base_url(request)}/models/{entry.ref}",
        "owner": entry.owner,
        "name": entry.name,
        "description": entry.description,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "cover_image_url": None,
        "default_example": None,
        "is_official": False,
        "run_count": run_count,
        "latest_version": version_object(entry, entry.version_id),
    }


def _entry(request: web.Request) -> ModelEntry:
    owner, name = request.match_info["owner"], request.match_info["name"]
    entry = request.app[keys.CATALOG].get(owner, name)
    if entry is None:
        raise NotFound(f"The model {owner}/{name} does not exist on this server.")
    return entry


async def list_models(request: web.Request) -> web.Response:
    store = request.app[keys.STORE]
    results = [
        model_object(request, entry, await store.count_for_model(entry.ref))
        for entry in request.app[keys.CATALOG]
    ]
    return json_response({"next": None, "previous": None, "results": results})


async def get_model(request: web.Request) -> web.Response:
    entry = _entry(request)
    count = await request.app[keys.STORE].count_for_model(entry.ref)
    return json_response(model_object(request, entry, count))


async def list_versions(request: web.Request) -> web.Response:
    entry = _entry(request)
    results = [version_object(entry, vid) for vid in entry.version_ids]
    return json_response({"next": None, "previous": None, "results": results})


async def get_version(request: web.Request) -> web.Response:
    entry = _entry(request)
    vid = request.match_info["version"].lower()
    if vid not in entry.version_ids:
        raise NotFound(f"Version {vid} of {entry.ref} does not exist on this server.")
    return json_response(version_object(entry, vid))


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{owner}/{name}", get_model)
    app.router.add_get("/v1/models/{owner}/{name}/versions", list_versions)
    app.router.add_get("/v1/models/{owner}/{name}/versions/{version}", get_version)
