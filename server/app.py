"""The application factory: `create_app(config)` builds the whole server.

Resources that open and close (the store, the model runners, the prediction service and its
flush task) are `cleanup_ctx` generators, opened in this order and closed in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from models.base import Backend
from models.catalog import Catalog, ModelEntry, load_catalog
from models.images import ImageLimits
from server import keys, metrics
from server.auth import TokenSet, auth_middleware, load_tokens
from server.config import Config
from server.cors import CorsPolicy, cors_middleware
from server.errors import problem_middleware
from server.files import FILES, FileStore
from server.inputs import FetchSettings, InputResolver
from server.metrics import metrics_ctx, request_metrics
from server.predictions import PredictionService
from server.routes import account, health, models, openapi, predictions, streams
from server.routes import files as file_routes
from server.routes import webhooks as webhook_routes
from server.runner import Runner
from server.store import PredictionStore
from server.web import setup as setup_playground
from server.webhooks import webhooks_ctx

log = logging.getLogger(__name__)

RESTART_ERROR = "The server restarted while this prediction was running."


class BackendUnavailable(RuntimeError):
    pass


def backend_factory(entry: ModelEntry) -> Callable[[], Backend]:
    """How to build the backend a catalog entry names (called on the runner's thread)."""

    def build() -> Backend:
        match entry.backend:
            case "ctranslate2":
                from models.text_generation import TextGenerationBackend

                return TextGenerationBackend.from_entry(entry)
            case "onnxruntime":
                from models.vision_language import VisionLanguageBackend

                return VisionLanguageBackend.from_entry(entry)
            case other:
                raise BackendUnavailable(f"the {other} backend is not available in this build")

    return build


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    store = await PredictionStore.open(config.database_path)
    interrupted = await store.fail_unfinished(RESTART_ERROR)
    if interrupted:
        log.warning("marked %d interrupted predictions as failed", len(interrupted))
    app[keys.STORE] = store
    yield
    await store.close()


async def _runners_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    runners: dict[str, Runner] = {}
    for entry in app[keys.CATALOG]:
        runners[entry.ref] = Runner(
            entry.ref,
            backend_factory(entry),
            queue_size=config.queue_size,
        )
    app[keys.RUNNERS] = runners
    loading = [asyncio.create_task(r.start(), name=f"load-{name}") for name, r in runners.items()]
    yield
    for task in loading:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await asyncio.gather(*(r.stop() for r in runners.values()))


async def _predictions_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    service = PredictionService(
        app[keys.STORE],
        app[keys.RUNNERS],
        flush_interval=config.flush_interval,
        max_input_chars=config.max_input_chars,
    )
    app[keys.PREDICTIONS] = service
    flusher = asyncio.create_task(service.flush_forever(), name="flush")
    yield
    service.stop_accepting()
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    for live in service.unfinished:
        live.job.cancel_event.set()
    await service.flush()


async def _files_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    files = await FileStore.open(
        config.database_path, config.files_dir, max_bytes=config.max_file_bytes
    )
    app[FILES] = files
    yield
    await files.close()


async def _inputs_ctx(app: web.Application) -> AsyncIterator[None]:
    """Resolves `format: uri` inputs (fetch, decode) just before each job runs."""
    config = app[keys.CONFIG]
    resolver = InputResolver(
        app[FILES],
        FetchSettings(
            timeout=config.fetch_timeout,
            deny_private=config.fetch_deny_private,
            limits=ImageLimits(config.max_image_bytes, config.max_image_pixels),
        ),
        own_origins=frozenset(
            u.rstrip("/").lower() for u in (config.public_url, config.listen_url) if u
        ),
    )
    app[keys.PREDICTIONS].input_preparer = resolver.prepare
    yield
    app[keys.PREDICTIONS].input_preparer = None
    await resolver.close()


async def _shutdown_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs last on the way down: whatever the runners left unfinished is failed and stored."""
    yield
    await app[keys.PREDICTIONS].fail_unfinished(
        "The server shut down before this prediction finished."
    )


def create_app(config: Config, *, catalog: Catalog | None = None) -> web.Application:
    catalog = catalog or load_catalog(config.catalog_path, data_dir=config.data_dir)
    tokens, _ = load_tokens(config.api_tokens, config.data_dir)
    token_set = TokenSet(tokens)
    cors = CorsPolicy.from_config(config)
    app = web.Application(
        middlewares=[
            request_metrics,
            cors_middleware(cors),
            problem_middleware,
            auth_middleware(token_set),
        ],
        client_max_size=config.max_body_bytes,
    )
    app.on_response_prepare.append(cors.add_headers)
    app[keys.CONFIG] = config
    app[keys.CATALOG] = catalog
    app[keys.TOKENS] = token_set
    # Opened in this order, closed in reverse: on the way down the inputs and files go
    # first, then webhooks (pending ones stay in the outbox), the prediction service, the
    # runners, and last the store.
    app.cleanup_ctx.extend(
        [
            _store_ctx,
            _shutdown_ctx,
            _runners_ctx,
            _predictions_ctx,
            webhooks_ctx,
            metrics_ctx,
            _files_ctx,
            _inputs_ctx,
        ]
    )
    for module in (predictions, models, account, health, openapi, streams, webhook_routes):
        module.setup_routes(app)
    file_routes.setup_routes(app)
    metrics.setup_routes(app)
    setup_playground(app, tokens)
    return app
