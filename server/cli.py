"""`replicant serve`: the command line, with every setting also readable from the environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
from aiohttp import web

from models.catalog import CatalogError, load_catalog
from server import __version__
from server.app import create_app
from server.auth import TOKENS_ENV, load_tokens, tokens_from_env
from server.config import DEFAULT_HOST, DEFAULT_PORT, Config
from server.shutdown import drain_on_signals

log = logging.getLogger("replicant")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"REPLICANT_{name}", default)


def _origins(raw: str) -> tuple[str, ...]:
    """`a, b` -> ("a", "b"): browser origins from a comma-separated flag or variable."""
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicant",
        description="A self-hosted, Replicate-compatible prediction server.",
    )
    parser.add_argument("--version", action="version", version=f"replicant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the models of a catalog over the Replicate HTTP API",
        description=(
            "Serve the models of a catalog over the Replicate HTTP API. Every flag can also be "
            "set with the environment variable named in its help. API tokens come from "
            f"{TOKENS_ENV} (comma-separated); without it a token is generated into the data "
            "directory on first start and printed once."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default=_env("HOST", DEFAULT_HOST),
        help="address to listen on; 0.0.0.0 for every interface (REPLICANT_HOST)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", str(DEFAULT_PORT))),
        help="TCP port to listen on (REPLICANT_PORT)",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", "data")),
        help="where the database, the API token and prepared models live (REPLICANT_DATA_DIR)",
    )
    serve.add_argument(
        "--catalog",
        type=Path,
        default=_env("CATALOG", "") or None,
        help="catalog TOML file naming the served models; default: the built-in "
        "catalog with SmolLM2-135M-Instruct (REPLICANT_CATALOG)",
    )
    serve.add_argument(
        "--public-url",
        default=_env("PUBLIC_URL", "") or None,
        help="base URL for absolute links when behind a proxy, e.g. "
        "https://models.example.com; default: the request's Host "
        "(REPLICANT_PUBLIC_URL)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(_env("MAX_BODY_BYTES", str(10 * 1024 * 1024))),
        help="largest request body accepted; larger ones get 413 (REPLICANT_MAX_BODY_BYTES)",
    )
    serve.add_argument(
        "--max-input-chars",
        type=int,
        default=int(_env("MAX_INPUT_CHARS", "1000000")),
        help="longest string accepted in a prediction's input, in characters; longer ones "
        "get 422 (image inputs are bounded by the image limits instead) "
        "(REPLICANT_MAX_INPUT_CHARS)",
    )
    serve.add_argument(
        "--max-streams-per-token",
        type=int,
        default=int(_env("MAX_STREAMS_PER_TOKEN", "1000")),
        help="streams open at once per stream URL, and per API token on /v1/run_sse; one "
        "more gets 429 (REPLICANT_MAX_STREAMS_PER_TOKEN)",
    )
    serve.add_argument(
        "--queue-size",
        type=int,
        default=int(_env("QUEUE_SIZE", "256")),
        help="predictions that may wait per model before creates get 429 (REPLICANT_QUEUE_SIZE)",
    )
    serve.add_argument(
        "--flush-interval",
        type=float,
        default=float(_env("FLUSH_INTERVAL", "0.5")),
        help="seconds between writes of running predictions' output to the "
        "database (REPLICANT_FLUSH_INTERVAL)",
    )
    serve.add_argument(
        "--webhook-throttle",
        type=float,
        default=float(_env("WEBHOOK_THROTTLE", "0.5")),
        help="least seconds between two output/logs webhooks of one prediction; start and "
        "completed are never held back (REPLICANT_WEBHOOK_THROTTLE)",
    )
    serve.add_argument(
        "--webhook-timeout",
        type=float,
        default=float(_env("WEBHOOK_TIMEOUT", "10")),
        help="seconds allowed for one webhook request (REPLICANT_WEBHOOK_TIMEOUT)",
    )
    serve.add_argument(
        "--webhook-retention",
        type=float,
        default=float(_env("WEBHOOK_RETENTION", str(7 * 24 * 3600))),
        help="seconds finished webhook deliveries and their attempts stay in the database "
        "(pending ones stay until they finish; at least twice the retry window) "
        "(REPLICANT_WEBHOOK_RETENTION)",
    )
    serve.add_argument(
        "--webhook-retry-window",
        type=float,
        default=float(_env("WEBHOOK_RETRY_WINDOW", "300")),
        help="seconds after a prediction ends during which a failing completed webhook is "
        "retried (REPLICANT_WEBHOOK_RETRY_WINDOW)",
    )
    serve.add_argument(
        "--webhook-retry-delay",
        type=float,
        default=float(_env("WEBHOOK_RETRY_DELAY", "1")),
        help="seconds before the first retry of a completed webhook; doubles on each retry, "
        "with jitter, up to a minute (REPLICANT_WEBHOOK_RETRY_DELAY)",
    )
    serve.add_argument(
        "--webhook-concurrency",
        type=int,
        default=int(_env("WEBHOOK_CONCURRENCY", "32")),
        help="webhook requests in flight at once (REPLICANT_WEBHOOK_CONCURRENCY)",
    )
    serve.add_argument(
        "--webhook-host-concurrency",
        type=int,
        default=int(_env("WEBHOOK_HOST_CONCURRENCY", "8")),
        help="webhook requests in flight at once to one receiving host "
        "(REPLICANT_WEBHOOK_HOST_CONCURRENCY)",
    )
    serve.add_argument(
        "--webhook-backlog",
        type=int,
        default=int(_env("WEBHOOK_BACKLOG", "1000")),
        help="predictions whose webhooks are held in memory; beyond it completed webhooks "
        "wait in the database and others are dropped (REPLICANT_WEBHOOK_BACKLOG)",
    )
    serve.add_argument(
        "--webhook-deny-private",
        action="store_true",
        default=_env("WEBHOOK_DENY_PRIVATE", "") not in ("", "0", "false", "no"),
        help="refuse webhooks to loopback and private addresses too; link-local and cloud "
        "metadata addresses are always refused (REPLICANT_WEBHOOK_DENY_PRIVATE=1)",
    )
    serve.add_argument(
        "--stream-ttl",
        type=float,
        default=float(_env("STREAM_TTL", "3600")),
        help="seconds a prediction's stream URL keeps working after the prediction "
        "ends; later it answers 410 (REPLICANT_STREAM_TTL)",
    )
    serve.add_argument(
        "--stream-send-timeout",
        type=float,
        default=float(_env("STREAM_SEND_TIMEOUT", "30")),
        help="seconds a write to a stream reader may wait before the reader is "
        "dropped as stuck (REPLICANT_STREAM_SEND_TIMEOUT)",
    )
    serve.add_argument(
        "--stream-ping-interval",
        type=float,
        default=float(_env("STREAM_PING_INTERVAL", "15")),
        help="seconds between keep-alive comments on idle streams (REPLICANT_STREAM_PING_INTERVAL)",
    )
    serve.add_argument(
        "--cors-stream-origins",
        type=_origins,
        default=_env("CORS_STREAM_ORIGINS", "*"),
        help="comma-separated browser origins that may read stream URLs; * for any "
        "(never with credentials), empty for none (REPLICANT_CORS_STREAM_ORIGINS)",
    )
    serve.add_argument(
        "--cors-api-origins",
        type=_origins,
        default=_env("CORS_API_ORIGINS", ""),
        help="comma-separated browser origins that may call the API routes, e.g. "
        "https://app.example.com; empty for none (REPLICANT_CORS_API_ORIGINS)",
    )
    serve.add_argument(
        "--run-sse-cancel-on-disconnect",
        action="store_true",
        default=_env("RUN_SSE_CANCEL_ON_DISCONNECT", "") not in ("", "0", "false", "no"),
        help="cancel a POST /v1/run_sse prediction when its client disconnects before "
        "the end (REPLICANT_RUN_SSE_CANCEL_ON_DISCONNECT=1)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(_env("SHUTDOWN_GRACE", "30")),
        help="on SIGTERM or SIGINT, seconds unfinished predictions get to finish before they "
        "are canceled; new predictions get 503 meanwhile (REPLICANT_SHUTDOWN_GRACE)",
    )
    serve.add_argument(
        "--session-lifetime",
        type=float,
        default=float(_env("SESSION_LIFETIME", str(7 * 24 * 3600))),
        help="seconds a sign-in to the web playground lasts (REPLICANT_SESSION_LIFETIME)",
    )
    serve.add_argument(
        "--max-image-bytes",
        type=int,
        default=int(_env("MAX_IMAGE_BYTES", str(20 * 1024 * 1024))),
        help="largest image input in bytes, fetched, uploaded or inline "
        "(REPLICANT_MAX_IMAGE_BYTES)",
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=int(_env("MAX_IMAGE_PIXELS", "32000000")),
        help="largest image input in pixels (width x height); larger ones fail before "
        "decoding (REPLICANT_MAX_IMAGE_PIXELS)",
    )
    serve.add_argument(
        "--max-file-bytes",
        type=int,
        default=int(_env("MAX_FILE_BYTES", str(100 * 1024 * 1024))),
        help="largest upload to /v1/files in bytes; larger ones get 413 (REPLICANT_MAX_FILE_BYTES)",
    )
    serve.add_argument(
        "--fetch-timeout",
        type=float,
        default=float(_env("FETCH_TIMEOUT", "30")),
        help="seconds allowed to fetch one http(s) input, redirects included "
        "(REPLICANT_FETCH_TIMEOUT)",
    )
    serve.add_argument(
        "--fetch-deny-private",
        action="store_true",
        default=_env("FETCH_DENY_PRIVATE", "") not in ("", "0", "false", "no"),
        help="refuse to fetch inputs from loopback and private addresses too; link-local and "
        "cloud metadata addresses are always refused (REPLICANT_FETCH_DENY_PRIVATE=1)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="how much to log (REPLICANT_LOG_LEVEL)",
    )
    return parser


def banner(url: str, token_note: str, models: Sequence[str]) -> str:
    """What startup prints: where to point a client, with which token, for which models."""
    first = models[0] if models else "owner/name"
    lines = [
        f"replicant {__version__} listening on {url}",
        f"  API token: {token_note}",
        "  Models:",
        *(f"      {m}" for m in models),
        "  Point a client at it:",
        f"      export REPLICATE_BASE_URL={url} REPLICATE_API_TOKEN=<token>",
        f'      curl -s {url}/v1/run -H "Authorization: Bearer $REPLICATE_API_TOKEN" \\',
        f'        -d \'{{"model": "{first}", "input": '
        f'{{"prompt": "What is the capital of France?"}}}}\'',
        f"  Health: {url}/health-check    API description: {url}/openapi.json",
        f"  Playground: {url}/  (sign in with the API token)",
    ]
    return "\n".join(lines) + "\n"


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    configured = tokens_from_env()
    config = Config(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        catalog_path=args.catalog,
        api_tokens=configured,
        public_url=args.public_url,
        max_body_bytes=args.max_body_bytes,
        max_input_chars=args.max_input_chars,
        max_streams_per_token=args.max_streams_per_token,
        queue_size=args.queue_size,
        flush_interval=args.flush_interval,
        shutdown_grace=args.shutdown_grace,
        webhook_throttle=args.webhook_throttle,
        webhook_timeout=args.webhook_timeout,
        webhook_retry_window=args.webhook_retry_window,
        webhook_retry_delay=args.webhook_retry_delay,
        webhook_concurrency=args.webhook_concurrency,
        webhook_host_concurrency=args.webhook_host_concurrency,
        webhook_backlog=args.webhook_backlog,
        webhook_retention=args.webhook_retention,
        webhook_deny_private=args.webhook_deny_private,
        stream_ttl=args.stream_ttl,
        stream_send_timeout=args.stream_send_timeout,
        stream_ping_interval=args.stream_ping_interval,
        cors_stream_origins=args.cors_stream_origins,
        cors_api_origins=args.cors_api_origins,
        run_sse_cancel_on_disconnect=args.run_sse_cancel_on_disconnect,
        session_lifetime=args.session_lifetime,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_file_bytes=args.max_file_bytes,
        fetch_timeout=args.fetch_timeout,
        fetch_deny_private=args.fetch_deny_private,
    )
    try:
        catalog = load_catalog(config.catalog_path, data_dir=config.data_dir)
    except CatalogError as exc:
        print(f"replicant: {exc}", file=sys.stderr)
        return 2
    tokens, new_token = load_tokens(config.api_tokens, config.data_dir)
    if new_token:
        token_note = f"{new_token}  (generated now, kept in {config.data_dir / 'api-token'})"
    elif configured:
        token_note = f"from {TOKENS_ENV}"
    else:
        token_note = f"the one in {config.data_dir / 'api-token'}"
    app = create_app(attrs.evolve(config, api_tokens=tokens), catalog=catalog)
    models = [entry.ref for entry in catalog]

    url = config.public_url or config.listen_url

    def announce(_: str) -> None:
        # run_app calls this once its sockets listen, so the banner never runs ahead of them.
        print(banner(url, token_note, models), flush=True)

    app.on_startup.append(drain_on_signals)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        print=announce,
        access_log_format='%a "%r" %s %b %Tfs',
        shutdown_timeout=10,
        handle_signals=False,  # server.shutdown drains first, then exits through aiohttp
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
