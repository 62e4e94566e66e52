"""The typed application keys: every piece of shared state the routes reach."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from models.catalog import Catalog
from server.auth import TokenSet
from server.config import Config
from server.predictions import PredictionService
from server.runner import Runner
from server.store import PredictionStore

CONFIG = web.AppKey("config", Config)
CATALOG = web.AppKey("catalog", Catalog)
TOKENS = web.AppKey("tokens", TokenSet)
STORE = web.AppKey("store", PredictionStore)
RUNNERS = web.AppKey("runners", Mapping[str, Runner])
PREDICTIONS = web.AppKey("predictions", PredictionService)
