"""The prediction lifecycle: waiting, cancelling in every state, persistence across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from server import keys
from server.app import RESTART_ERROR, create_app
from server.records import Prediction, Status
from server.store import PredictionStore
from tests.conftest import AUTH, AiohttpClient, make_config, wait_ready

Client = TestClient[web.Request, web.Application]
SMOL = "huggingfacetb/smollm2-135m-instruct"
LONG = {"prompt": "Tell me a long story.", "max_tokens": 500, "min_tokens": 500}


async def create(client: Client, inputs: dict[str, Any], **headers: str) -> dict[str, Any]:
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions", json={"input": inputs}, headers={**AUTH, **headers}
    )
    body: dict[str, Any] = await resp.json()
    assert resp.status == 201, body
    return body


@contextlib.asynccontextmanager
async def model_busy(client: Client, model: str = SMOL) -> AsyncIterator[threading.Event]:
    """Keep the model's thread busy until the yielded event is set (or the block ends).

    The runner runs every batch on its own one-thread executor; a task parked there makes
    the next batch wait exactly as a long generation would, without depending on speed.
    """
    runner = client.app[keys.RUNNERS][model]
    release = threading.Event()
    parked = runner._executor.submit(release.wait, 30)
    try:
        yield release
    finally:
        release.set()
        await asyncio.wrap_future(parked)


async def test_prefer_wait_returns_finished_prediction(client: Client) -> None:
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "hi", "max_tokens": 3}},
        headers={**AUTH, "Prefer": "wait=5"},
    )
    assert resp.headers["Preference-Applied"] == "wait=5"
    assert resp.headers["Location"].endswith("/v1/predictions/" + (await resp.json())["id"])
    assert (await resp.json())["status"] == "succeeded"


async def test_prefer_wait_is_clamped_and_malformed_ignored(client: Client) -> None:
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "hi", "max_tokens": 1}},
        headers={**AUTH, "Prefer": "wait=600"},
    )
    assert resp.headers["Preference-Applied"] == "wait=60"
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "hi", "max_tokens": 1}},
        headers={**AUTH, "Prefer": "respond-async, wait=abc"},
    )
    assert resp.status == 201 and "Preference-Applied" not in resp.headers


async def test_wait_that_runs_out_says_starting(client: Client) -> None:
    """Not done when a 1 s wait ends: the answer says `starting`, as the clients need."""
    service = client.app[keys.PREDICTIONS]
    async with model_busy(client):
        waited = await create(client, {"prompt": "x", "max_tokens": 1}, Prefer="wait=1")
        assert waited["status"] == "starting"
        # Really processing underneath: the model picked it up and is waiting for the thread.
        live = service.live(waited["id"])
        assert live is not None and live.prediction.status is Status.PROCESSING
    final = await service.wait(waited["id"], 30)
    assert final.status is Status.SUCCEEDED


def started_event(client: Client) -> asyncio.Event:
    """Set when any prediction starts (the runner took it out of the queue)."""
    started = asyncio.Event()
    service = client.app[keys.PREDICTIONS]
    service.listeners.append(lambda p, event: started.set() if event == "start" else None)
    return started


async def test_cancel_in_every_state(client: Client) -> None:
    started = started_event(client)
    async with model_busy(client) as release:
        running = await create(client, {"prompt": "x", "max_tokens": 50})
        await asyncio.wait_for(started.wait(), 10)
        # A seeded request cannot share the batch, so this one waits in the queue.
        queued = await create(client, {"prompt": "x", "max_tokens": 1, "seed": 1})
        assert queued["status"] == "starting"
        # Queued: canceled at once, never started.
        resp = await client.post(f"/v1/predictions/{queued['id']}/cancel", headers=AUTH)
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "canceled"
        assert body["started_at"] is None and body["completed_at"] is not None
        assert body["metrics"]["predict_time"] == 0
        # Processing: the job is told to stop and ends canceled at its first step.
        cancel = asyncio.create_task(
            client.post(f"/v1/predictions/{running['id']}/cancel", headers=AUTH)
        )
        live = client.app[keys.PREDICTIONS].live(running["id"])
        assert live is not None
        async with asyncio.timeout(10):
            await asyncio.to_thread(live.job.cancel_event.wait, 10)
        release.set()
        body = await (await cancel).json()
    assert body["status"] == "canceled"
    assert body["output"] == []
    # Finished: unchanged, and cancelling again is harmless.
    again = await (
        await client.post(f"/v1/predictions/{running['id']}/cancel", headers=AUTH)
    ).json()
    assert again == {**body, "urls": again["urls"]}
    stored = await client.app[keys.STORE].get(queued["id"])
    assert stored is not None and stored.status is Status.CANCELED


async def test_restart_keeps_predictions_and_fails_interrupted_ones(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    config = make_config(tmp_path, tiny_model)
    app = create_app(config)
    client = await aiohttp_client(app)
    await wait_ready(app)
    done = await create(client, {"prompt": "hello", "max_tokens": 4}, Prefer="wait=10")
    assert done["status"] == "succeeded"
    await client.close()  # runs every cleanup step, as a normal shutdown does

    # A prediction a crashed process left `processing` (written as the crash left it).
    store = await PredictionStore.open(config.database_path)
    orphan = Prediction(id="a" * 26, model=SMOL, version="v", input={"prompt": "x"})
    await store.insert(orphan)
    orphan.transition(Status.PROCESSING)
    await store.save([orphan])
    await store.close()

    app2 = create_app(config)
    client2 = await aiohttp_client(app2)
    await wait_ready(app2)
    again = await (await client2.get(f"/v1/predictions/{done['id']}", headers=AUTH)).json()
    assert again["output"] == done["output"] and again["status"] == "succeeded"
    failed = await (await client2.get(f"/v1/predictions/{'a' * 26}", headers=AUTH)).json()
    assert failed["status"] == "failed" and failed["error"] == RESTART_ERROR
    assert failed["completed_at"] is not None


async def test_health_and_openapi(client: Client) -> None:
    health = await (await client.get("/health-check")).json()
    assert health["status"] == "READY"
    assert health["models"][SMOL]["status"] == "READY"
    assert health["models"][SMOL]["device"] == "cpu"
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/predictions" in spec["paths"]
    inputs = [k for k in spec["components"]["schemas"] if k.startswith("Input_")]
    assert len(inputs) == 4


async def test_setup_failure_is_reported_not_fatal(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    config = make_config(
        tmp_path,
        tiny_model,
        extra=(
            '[[model]]\nname = "broken/model"\nbackend = "ctranslate2"\n'
            f'weights = "{tmp_path / "missing"}"\nschema = "meta__llama-2-7b-chat.json"\n'
        ),
    )
    app = create_app(config)
    client = await aiohttp_client(app)
    await wait_ready(app)
    health = await (await client.get("/health-check")).json()
    assert health["status"] == "SETUP_FAILED"
    assert "model.bin" in health["models"]["broken/model"]["error"]
    resp = await client.post(
        "/v1/models/broken/model/predictions", json={"input": {"prompt": "x"}}, headers=AUTH
    )
    assert resp.status == 503
    assert resp.content_type == "application/problem+json"
    # The other models still serve.
    ok = await create(client, {"prompt": "x", "max_tokens": 1}, Prefer="wait=10")
    assert ok["status"] == "succeeded"


async def test_full_queue_answers_429_and_stores_nothing_for_it(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    app = create_app(make_config(tmp_path, tiny_model, queue_size=2))
    client = await aiohttp_client(app)
    await wait_ready(app)
    started = started_event(client)
    async with model_busy(client):
        # One batch is parked on the model thread; the queue behind it holds two.
        first = await create(client, {"prompt": "x", "max_tokens": 1})
        await asyncio.wait_for(started.wait(), 10)  # taken out of the queue
        responses = await asyncio.gather(
            *(
                client.post(
                    f"/v1/models/{SMOL}/predictions",
                    json={"input": {"prompt": "x", "max_tokens": 1, "seed": i}},
                    headers=AUTH,
                )
                for i in range(6)
            )
        )
        statuses = sorted(r.status for r in responses)
        assert statuses == [201, 201, 429, 429, 429, 429]
        for resp in responses:
            if resp.status == 429:
                assert resp.headers["Retry-After"] == "1"
                assert resp.content_type == "application/problem+json"
        health = await (await client.get("/health-check")).json()
        assert health["status"] == "BUSY"
    page = await (await client.get("/v1/predictions", headers=AUTH)).json()
    assert len(page["results"]) == 3  # the first and the two admitted; no orphans
    for p in [first, *(await asyncio.gather(*(r.json() for r in responses if r.status == 201)))]:
        final = await client.app[keys.PREDICTIONS].wait(p["id"], 30)
        assert final.status is Status.SUCCEEDED


async def test_cancel_after_header_sets_the_deadline(client: Client) -> None:
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "x", "max_tokens": 1}},
        headers={**AUTH, "Cancel-After": "1h30m"},
    )
    body = await resp.json()
    created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    deadline = datetime.fromisoformat(body["deadline"].replace("Z", "+00:00"))
    assert (deadline - created).total_seconds() == 5400
    for bad, status in (("soon", 400), ("2s", 422), ("", 400), ("5x", 400)):
        resp = await client.post(
            f"/v1/models/{SMOL}/predictions",
            json={"input": {"prompt": "x"}},
            headers={**AUTH, "Cancel-After": bad},
        )
        assert resp.status == status, bad
        assert resp.content_type == "application/problem+json"


async def test_prediction_past_its_deadline_is_canceled_and_says_why(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    limited = (
        '[[model]]\nname = "limited/model"\nbackend = "ctranslate2"\n'
        f'weights = "{tiny_model}"\nschema = "meta__llama-2-7b-chat.json"\n'
        "max_prediction_time = 0.3\n"
    )
    app = create_app(make_config(tmp_path, tiny_model, extra=limited))
    client = await aiohttp_client(app)
    await wait_ready(app)
    async with model_busy(client, "limited/model") as release:
        resp = await client.post(
            "/v1/models/limited/model/predictions", json={"input": {"prompt": "x"}}, headers=AUTH
        )
        created = await resp.json()
        assert created["deadline"] is not None
        live = client.app[keys.PREDICTIONS].live(created["id"])
        assert live is not None
        # The deadline passes while the model is busy: a queued job is canceled at once, a
        # running one is told to stop and stops at its first step once the model gets to it.
        told = asyncio.ensure_future(asyncio.to_thread(live.job.cancel_event.wait, 10))
        ended = asyncio.ensure_future(live.done.wait())
        await asyncio.wait({told, ended}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        live.job.cancel_event.set()  # lets the waiting thread go either way
        release.set()
        await asyncio.gather(told, ended)
        final = await client.app[keys.PREDICTIONS].wait(created["id"], 10)
    assert final.status is Status.CANCELED
    assert final.error is not None and "deadline" in final.error
    assert "deadline" in final.logs


async def test_metrics_count_predictions_tokens_and_requests(client: Client) -> None:
    assert (await client.get("/metrics")).status == 401
    await create(client, {"prompt": "x", "max_tokens": 3, "temperature": 0}, Prefer="wait=10")
    resp = await client.get("/metrics", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    model = f'model="{SMOL}"'
    assert f'replicant_predictions_total{{{model},status="succeeded"}} 1.0' in text
    assert f"replicant_predictions_submitted_total{{{model}}} 1.0" in text
    assert f"replicant_queue_depth{{{model}}} 0.0" in text
    assert f"replicant_model_ready{{{model}}} 1.0" in text
    tokens = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f"replicant_tokens_generated_total{{{model}}}")
    )
    assert 1 <= tokens <= 3
    assert f"replicant_predict_seconds_count{{{model}}} 1.0" in text
    assert 'route="/v1/models/{owner}/{name}/predictions"' in text
