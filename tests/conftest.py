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
