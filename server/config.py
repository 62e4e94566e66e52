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
    #: How often live output and logs of running predictions are written to SQLite, in seconds.
    flush_interval: float = 0.5
    #: Longest `Prefer: wait=N` honoured, in seconds (larger values are clamped).
    max_wait_seconds: int = 60
    #: Predictions that may wait per model before creates get 429.
    queue_size: int = 256
    #: Page size of `GET /v1/predictions`.
    page_size: int = 100
    #: Skip loading models (API-only smoke runs); predictions then fail with a clear error.
    load_models: bool = True

    @property
    def database_path(self) -> Path:
        return self.data_dir / "replicant.sqlite3"

    @property
    def listen_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
