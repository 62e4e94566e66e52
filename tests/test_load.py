"""A bounded burst against the real server on loopback while its queue overflows.

Fifty clients, each with its own connection, send 2,000 requests between them: creates on
the tiny model and gets of predictions already created. The queue holds 16, so most creates
are refused. Every answer must be one the API documents for this situation (201, 200, 429 or
503), never a 5xx or a dropped connection; and every prediction that got a 201 must exist
afterwards and finish.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp

from server import keys
from server.records import Status
from tests.conftest import AUTH, LiveStarter

CLIENTS = 50
REQUESTS = 2_000
QUEUE_SIZE = 16
#: The burst and the wait for stragglers are each bounded (the whole test takes ~15 s here).
BURST_TIMEOUT = 40.0
FINISH_TIMEOUT = 30.0
ALLOWED = {200, 201, 429, 503}
MODEL = "huggingfacetb/smollm2-135m-instruct"


async def client(
    url: str, seed: int, tickets: asyncio.Queue[int], created: list[str], statuses: Counter[int]
) -> None:
    """One client: take a ticket, send one request (half creates, half gets), repeat."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession(
        url, headers=AUTH, connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        while not tickets.empty():
            number = tickets.get_nowait()
            if created and rng.random() < 0.5:
                async with session.get(f"/v1/predictions/{rng.choice(created)}") as response:
                    await response.read()
                    statuses[response.status] += 1
                continue
            body = {"version": MODEL, "input": {"prompt": f"request {number}", "max_tokens": 4}}
            async with session.post("/v1/predictions", json=body) as response:
                answer = await response.json(content_type=None)
                statuses[response.status] += 1
                if response.status == 201:
                    created.append(answer["id"])


async def test_burst_beyond_the_queue(live_server: LiveStarter) -> None:
    server = await live_server(queue_size=QUEUE_SIZE)
    tickets: asyncio.Queue[int] = asyncio.Queue()
    for number in range(REQUESTS):
        tickets.put_nowait(number)
    created: list[str] = []
    statuses: Counter[int] = Counter()

    async with asyncio.timeout(BURST_TIMEOUT):
        await asyncio.gather(
            *(client(server.url, seed, tickets, created, statuses) for seed in range(CLIENTS))
        )

    print(f"burst: {REQUESTS} requests from {CLIENTS} clients: {dict(sorted(statuses.items()))}")
    assert statuses.total() == REQUESTS
    assert set(statuses) <= ALLOWED, statuses
    # The queue did overflow, and did not refuse everything.
    assert statuses[429] > 0 and statuses[201] > 0 and statuses[200] > 0, statuses
    assert len(created) == len(set(created)) == statuses[201]

    service = server.app[keys.PREDICTIONS]
    async with asyncio.timeout(FINISH_TIMEOUT):
        for prediction_id in created:
            live = service.live(prediction_id)
            if live is not None:
                await live.done.wait()
    async with aiohttp.ClientSession(server.url, headers=AUTH) as session:
        for prediction_id in created:
            async with session.get(f"/v1/predictions/{prediction_id}") as response:
                assert response.status == 200, prediction_id
                prediction = await response.json()
            assert Status(prediction["status"]).terminal, prediction
            assert prediction["status"] == "succeeded", prediction
