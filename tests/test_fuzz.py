"""Fuzz every route that /openapi.json documents, against the real server on loopback.

schemathesis turns the server's own OpenAPI document into Hypothesis strategies for each
operation, valid requests (positive) and requests that break the schema (negative), and
checks each answer: never a 5xx, and status code, content type and body as documented.
Whatever the document lists when the test runs is fuzzed, so a route added to it is covered
without touching this file.

The requests go out with `requests` (schemathesis's transport) on a worker thread while the
server keeps running on the test's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import attrs
import hypothesis
import hypothesis.errors
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err
from schemathesis.generation.case import Case

from tests.conftest import AUTH, LiveStarter

#: Examples per operation and generation mode; with about twenty operations and two modes
#: the whole test takes about a minute on two cores.
MAX_EXAMPLES = 60
#: Stop starting new operations after this long (the run is bounded even if routes grow).
TIME_BUDGET = 120.0
#: Each request's own limit; `Prefer: wait` is clamped to 2 s by the server under test.
REQUEST_TIMEOUT = 15.0
#: Generated webhooks are pointed here (the discard port on loopback: nothing listens, so
#: deliveries fail fast and nothing leaves the machine).
LOOPBACK_WEBHOOK_HOST = "127.0.0.1:9"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _keep_on_loopback(body: dict[str, Any]) -> None:
    """Rewrite the host of a generated webhook URL to a closed loopback port."""
    webhook = body.get("webhook")
    if not isinstance(webhook, str):
        return
    try:
        parts = urlsplit(webhook)
    except ValueError:
        return  # the server must answer 422 for it; nothing would be delivered
    if parts.hostname:
        body["webhook"] = parts._replace(netloc=LOOPBACK_WEBHOOK_HOST).geturl()


def _aim_at_model(body: dict[str, Any], ref: str | None) -> None:
    """Point a create at a served model (a random `version` is nearly always a 404)."""
    if ref is None:
        return
    for field in ("version", "model"):
        if field in body:
            body[field] = ref


@attrs.define
class Fuzzer:
    """Sends generated requests to one server and keeps what went wrong."""

    base_url: str
    refs: list[str]
    session: requests.Session
    #: Distinct failures, by operation, status and first line of the check's message.
    failures: dict[str, str] = attrs.field(factory=dict)
    statuses: Counter[int] = attrs.field(factory=Counter)

    def operation(self, operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode) -> None:
        """Up to MAX_EXAMPLES requests to one operation."""

        @given(case=operation.as_strategy(mode), ref=st.sampled_from([None, *self.refs]))
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Case[Any], ref: str | None) -> None:
            if isinstance(case.body, dict):
                _aim_at_model(case.body, ref)
                _keep_on_loopback(case.body)
            self.send(operation, mode, case)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Without parameters or a body an operation has nothing to break; but a documented
            # request that no valid example satisfies is a wrong document.
            if mode is GenerationMode.POSITIVE:
                self.failures[f"{operation.label} unsatisfiable"] = (
                    f"{operation.label}: no request satisfies the documented schema"
                )

    def send(
        self, operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode, case: Case[Any]
    ) -> None:
        response = case.call(
            base_url=self.base_url, session=self.session, headers=AUTH, timeout=REQUEST_TIMEOUT
        )
        self.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except AssertionError as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            self.failures.setdefault(
                f"{operation.label} {response.status_code} {first}",
                f"{operation.label} ({mode.value}): {text}\n"
                f"  reproduce: {case.as_curl_command(headers=AUTH)}",
            )


def fuzz(
    raw_schema: dict[str, Any], base_url: str, refs: list[str]
) -> tuple[list[str], Counter[int]]:
    """Run every documented operation; return the distinct failures and the statuses seen."""
    schema = schemathesis.openapi.from_dict(raw_schema)
    deadline = time.monotonic() + TIME_BUDGET
    with requests.Session() as session:
        fuzzer = Fuzzer(base_url, refs, session)
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                fuzzer.failures[str(result.err())] = f"invalid operation: {result.err()}"
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if time.monotonic() > deadline:
                    fuzzer.failures["time"] = f"out of time before {result.ok().label} ({mode})"
                    break
                fuzzer.operation(result.ok(), mode)
    return list(fuzzer.failures.values()), fuzzer.statuses


async def test_every_documented_route_survives_fuzzing(live_server: LiveStarter) -> None:
    server = await live_server(max_wait_seconds=2, queue_size=64)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/openapi.json") as response,
    ):
        assert response.status == 200
        raw_schema = await response.json()
    assert raw_schema["paths"], "the server documents no routes"

    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.get(f"{server.url}/v1/models") as response,
    ):
        models = (await response.json())["results"]
    refs = [f"{m['owner']}/{m['name']}" for m in models]
    refs += [f"{ref}:{m['latest_version']['id']}" for ref, m in zip(refs, models, strict=True)]

    failures, statuses = await asyncio.to_thread(fuzz, raw_schema, server.url, refs)

    operations = sum(
        1 for item in raw_schema["paths"].values() for method in item if method != "parameters"
    )
    print(f"fuzz: {statuses.total()} requests over {operations} operations: {dict(statuses)}")
    assert not failures, f"{len(failures)} distinct failures:\n\n" + "\n\n".join(failures)
    # The fuzzer really talked to the server: more than a handful per documented operation.
    assert statuses.total() >= 5 * operations, statuses
    # Valid creates reached the models: some were created, some refused by validation.
    assert statuses[201] > 0 and statuses[422] > 0, statuses
    assert not any(status >= 500 for _, _, status in server.seen)
