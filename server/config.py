"""Server settings: one frozen attrs class, filled from flags and the environment (server.cli)."""

from __future__ import annotations

from pathlib import Path

import attrs

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"


@attrs.frozen(kw_only=True)
class Config:
    """Everything the application factory needs to build a server.

    Each field is documented in `replicant serve --help` (see `server.cli`), which is generated
    from the same metadata, so the flag text and this class never disagree.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path("data")
    #: Catalog TOML file; None means the built-in catalog (`models/catalog.toml`).
    catalog_path: Path | None = None
    #: Accepted API tokens. Empty means: generate one into the data dir on first start.
    api_tokens: tuple[str, ...] = ()
    #: Base URL put in absolute links (`urls.get`, `next`, ...). None: taken from each request's
    #: Host header, or from host:port where there is no request (webhooks).
    public_url: str | None = None
    #: Largest request body accepted, in bytes (413 beyond it).
    max_body_bytes: int = 10 * 1024 * 1024
    #: Longest string accepted anywhere in a prediction's input, in characters (422 beyond
    #: it); `format: uri` inputs (images as data: URIs) are bounded by the image limits.
    max_input_chars: int = 1_000_000
    #: How often live output and logs of running predictions are written to SQLite, in seconds.
    flush_interval: float = 0.5
    #: Longest `Prefer: wait=N` honoured, in seconds (larger values are clamped).
    max_wait_seconds: int = 60
    #: Predictions that may wait per model before creates get 429.
    queue_size: int = 256
    #: Page size of `GET /v1/predictions`.
    page_size: int = 100
    #: On SIGTERM/SIGINT, seconds unfinished predictions get to finish before they are
    #: canceled; new predictions get 503 meanwhile.
    shutdown_grace: float = 30.0
    #: Streams open at once per credential: per stream URL (its capability token) and, for
    #: `/v1/run_sse`, per API token; one more gets 429. High enough for hundreds of people
    #: watching one prediction, low enough that one leaked URL cannot hold every socket.
    max_streams_per_token: int = 1000
    #: Seconds a stream URL keeps answering after its prediction ended (then 410).
    stream_ttl: float = 3600.0
    #: Seconds a write to a stream reader may wait before the reader is dropped as stuck.
    stream_send_timeout: float = 30.0
    #: Seconds between keep-alive comments (`: ping`) on a stream with nothing to send.
    stream_ping_interval: float = 15.0
    #: Browser origins that may read stream URLs; `*` (the default) means any, without
    #: credentials: the URL's token is the capability.
    cors_stream_origins: tuple[str, ...] = ("*",)
    #: Browser origins that may call the API routes (they still need a token); none by default.
    cors_api_origins: tuple[str, ...] = ()
    #: Cancel a `POST /v1/run_sse` prediction when its client disconnects before the end.
    run_sse_cancel_on_disconnect: bool = False
    #: Least time between two `output`/`logs` webhooks of one prediction, in seconds
    #: (`start` and `completed` are never held back).
    webhook_throttle: float = 0.5
    #: Time allowed for one webhook request (connect, send, answer), in seconds.
    webhook_timeout: float = 10.0
    #: How long a failing `completed` webhook is retried after the prediction ended, in seconds.
    webhook_retry_window: float = 300.0
    #: Wait before the first retry, in seconds; it doubles on each retry (with jitter, at most
    #: a minute), and a receiver's `Retry-After` may make it longer.
    webhook_retry_delay: float = 1.0
    #: Webhook requests in flight at once, over all receivers.
    webhook_concurrency: int = 32
    #: Webhook requests in flight at once to one receiving host (scheme, host and port), so a
    #: slow receiver cannot take every slot.
    webhook_host_concurrency: int = 8
    #: Predictions whose webhooks are held in memory; beyond it `completed` deliveries wait in
    #: the outbox table and other webhooks are dropped (both logged).
    webhook_backlog: int = 1000
    #: Seconds delivered and failed webhook deliveries (and their attempts) stay in the
    #: database; pending ones stay until they finish. At least twice the retry window.
    webhook_retention: float = 7 * 24 * 3600.0
    #: Refuse webhooks to loopback and private addresses too (link-local and cloud metadata
    #: addresses are always refused).
    webhook_deny_private: bool = False
    #: Seconds a playground sign-in lasts (the session cookie's lifetime).
    session_lifetime: float = 7 * 24 * 3600.0
    #: Largest image input, in bytes (fetched, uploaded or in a data: URI).
    max_image_bytes: int = 20 * 1024 * 1024
    #: Largest decoded image input, in pixels; larger ones fail before decoding.
    max_image_pixels: int = 32_000_000
    #: Largest file accepted by `POST /v1/files`, in bytes (413 beyond it).
    max_file_bytes: int = 100 * 1024 * 1024
    #: Time allowed to fetch one http(s) input, redirects included, in seconds.
    fetch_timeout: float = 30.0
    #: Refuse to fetch inputs from loopback and private addresses too (link-local and cloud
    #: metadata addresses are always refused).
    fetch_deny_private: bool = False

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "replicant.sqlite3"

    @property
    def listen_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
