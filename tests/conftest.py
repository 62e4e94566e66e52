"""Shared fixtures: tiny real models, a catalog over them, and the real app on loopback."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server import keys
from server.app import create_app
from server.config import Config
from tests.webhook_receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MISTRAL_VERSION = "5fe0a3d7ac2852264a25279d1dfb798acbc4d49711d126646594e212cb821749"
LLAMA2_VERSION = "f1d50bb24186c52daae319ca8366e53debdaa9e0ae7ff976e918df752732ccc4"

AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def load_script(name: str) -> ModuleType:
    """Import a file of scripts/ as a module (they are run as programs, not a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    load_script("make_tiny_model").build_tiny_model(out)
    return out


@pytest.fixture(scope="session")
def smollm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, converted once per test run (about half a minute)."""
    from models.gguf_convert import convert_gguf, find_smollm2_gguf

    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    convert_gguf(find_smollm2_gguf(), out)
    return out


def catalog_toml(weights: Path, *, batch: int = 8, extra: str = "") -> str:
    """A catalog serving the seed schemas (and the default one) on the given weights."""
    return f"""
[[model]]
name = "huggingfacetb/smollm2-135m-instruct"
backend = "ctranslate2"
weights = "{weights}"
schema = "huggingfacetb__smollm2-135m-instruct.json"
[model.settings]
max_batch_size = {batch}
seeded_spare = false

[[model]]
name = "meta/meta-llama-3-8b-instruct"
backend = "ctranslate2"
weights = "{weights}"
schema = "meta__meta-llama-3-8b-instruct.json"
[model.settings]
chat_template = "chatml"
max_batch_size = {batch}

[[model]]
name = "mistralai/mistral-7b-instruct-v0.1"
backend = "ctranslate2"
weights = "{weights}"
schema = "mistralai__mistral-7b-instruct-v0.1.json"
extra_versions = ["{MISTRAL_VERSION}"]
[model.settings]
seeded_spare = false

[[model]]
name = "meta/llama-2-7b-chat"
backend = "ctranslate2"
weights = "{weights}"
schema = "meta__llama-2-7b-chat.json"
extra_versions = ["{LLAMA2_VERSION}"]
[model.settings]
seeded_spare = false
{extra}
"""


def make_config(tmp_path: Path, weights: Path, **overrides: Any) -> Config:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_toml(weights, extra=overrides.pop("extra", "")))
    return Config(
        data_dir=tmp_path / "data",
        catalog_path=catalog,
        api_tokens=(TOKEN,),
        flush_interval=0.05,
        **overrides,
    )


async def wait_ready(app: web.Application) -> None:
    """Until every model has loaded (or failed to); bounded at 60 s."""
    async with asyncio.timeout(60):
        await asyncio.gather(*(r.loaded.wait() for r in app[keys.RUNNERS].values()))


@pytest.fixture
def config(tmp_path: Path, tiny_model: Path) -> Config:
    return make_config(tmp_path, tiny_model)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, config: Config
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = create_app(config)
    test_client = await aiohttp_client(app)
    await wait_ready(app)
    yield test_client


# -- webhooks -------------------------------------------------------------------------------

#: Webhook bodies render URLs from this, so they can be compared with what GET answers.
WEBHOOK_PUBLIC_URL = "http://replicant.test"
#: Fast settings for webhook tests; a long throttle makes the count of updates exact.
WEBHOOK_SETTINGS: dict[str, Any] = {
    "public_url": WEBHOOK_PUBLIC_URL,
    "webhook_throttle": 30.0,
    "webhook_timeout": 5.0,
    "webhook_retry_window": 10.0,
    "webhook_retry_delay": 0.05,
}

AppStarter = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """A started receiver on a loopback port; it checks signatures once given the secret."""
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def start_app(aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path) -> AppStarter:
    """Start the real app on the tiny model with webhook test settings (plus overrides).

    Every app started by one test shares its data dir, so a second start is a restart.
    """

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = {**WEBHOOK_SETTINGS, **overrides}
        app = create_app(make_config(tmp_path, tiny_model, **settings))
        test_client = await aiohttp_client(app)
        await wait_ready(app)
        return test_client

    return start


# -- streaming tests (tests/test_streams*.py, tests/test_browser*.py, tests/test_js_client*.py)

from tests.test_streams_support import LiveServer, Scripts, scripted_factory  # noqa: E402

LiveStarter = Callable[..., Awaitable[LiveServer]]


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> Scripts:
    """Every app this test builds gets the scripted model (behind the `Backend` interface)."""
    import server.app

    registry = Scripts()
    monkeypatch.setattr(server.app, "backend_factory", scripted_factory(registry))
    return registry


@pytest.fixture
async def live_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[LiveStarter]:
    """Start the real app on a loopback port as `replicant serve` does: with aiohttp's
    default of no handler cancellation, unlike `aiohttp_client`. Apps of one test share a
    data dir, so a second start is a restart."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> LiveServer:
        app = create_app(make_config(tmp_path, tiny_model, **overrides))
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5)
        server = LiveServer(app, runner)
        app.on_response_prepare.append(server.record)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"
        await wait_ready(app)
        return server

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


NODE_DIR = ROOT / ".cache" / "node"


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """`.cache/node` with the npm packages of the JS and browser tests; skips without node.

    Runs scripts/install_test_deps.sh (idempotent: it installs only what is missing).
    """
    import os
    import shutil
    import subprocess

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed; the JS-client and browser tests need them")
    done = subprocess.run(
        [str(ROOT / "scripts" / "install_test_deps.sh")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "REPLICANT_NODE_DIR": str(NODE_DIR)},
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/install_test_deps.sh failed:\n{done.stdout}\n{done.stderr}")
    return NODE_DIR


# -- vision-language models (tests/test_vision*.py, tests/test_files*.py, tests/test_images*.py)

LLAVA = "yorickvp/llava-v1.6-34b"
MINIGPT = "daanelson/minigpt-4"


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random VLMs in the split ONNX layout: {"llava": dir, "minigpt4": dir}."""
    builder = load_script("make_tiny_vlm")
    root = tmp_path_factory.mktemp("vlm")
    return {
        flavor: builder.build_tiny_vlm(root / flavor, flavor=flavor)
        for flavor in ("llava", "minigpt4")
    }


def vlm_catalog_toml(weights: dict[str, Path], *, settings: str = "threads = 1") -> str:
    """A catalog serving the two seed VLM schemas on tiny models."""
    return f"""
[[model]]
name = "{LLAVA}"
backend = "onnxruntime"
weights = "{weights["llava"]}"
schema = "yorickvp__llava-v1.6-34b.json"
[model.settings]
{settings}

[[model]]
name = "{MINIGPT}"
backend = "onnxruntime"
weights = "{weights["minigpt4"]}"
schema = "daanelson__minigpt-4.json"
[model.settings]
{settings}
"""


def make_vlm_config(tmp_path: Path, weights: dict[str, Path], **overrides: Any) -> Config:
    catalog = tmp_path / "vlm-catalog.toml"
    catalog.write_text(vlm_catalog_toml(weights, settings=overrides.pop("settings", "threads = 1")))
    return Config(
        data_dir=tmp_path / "data",
        catalog_path=catalog,
        api_tokens=(TOKEN,),
        flush_interval=0.05,
        **overrides,
    )


@pytest.fixture
def start_vlm(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_vlm: dict[str, Path]
) -> AppStarter:
    """Start the real app serving the tiny VLMs (Config fields as keyword overrides)."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(make_vlm_config(tmp_path, tiny_vlm, **overrides))
        test_client = await aiohttp_client(app)
        await wait_ready(app)
        return test_client

    return start


@pytest.fixture
async def vlm_client(start_vlm: AppStarter) -> TestClient[web.Request, web.Application]:
    return await start_vlm()
