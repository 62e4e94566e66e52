"""Webhook signatures: the Standard Webhooks vector, the secret, and the official helpers.

The official clients' own verification code checks what the real server sent: replicate's
`Webhooks.validate` (Python) and `validateWebhook` from npm `replicate@1.4.0`, installed
into a temp dir and run with node.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from replicate.client import Client as ReplicateClient
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

from server.webhooks.signing import WebhookSigner
from tests.conftest import AUTH, TOKEN, AppStarter
from tests.test_webhooks_delivery import Client, create, idle
from tests.webhook_receiver import Received, WebhookReceiver

# The Standard Webhooks (Svix) test vector, as in the reference, section 3.2.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

JS_CHECK = """
const { validateWebhook } = require("replicate");
let raw = "";
process.stdin.on("data", (chunk) => (raw += chunk));
process.stdin.on("end", async () => {
  const results = [];
  for (const { headers, body, secret } of JSON.parse(raw)) {
    // Both documented forms: a request-like object, and the fields one by one.
    const request = new Request("http://receiver.test/hook", { method: "POST", headers, body });
    results.push([
      await validateWebhook({ headers: request.headers, body: await request.text() }, secret),
      await validateWebhook({
        id: headers["webhook-id"],
        timestamp: headers["webhook-timestamp"],
        signature: headers["webhook-signature"],
        body,
        secret,
      }),
    ]);
  }
  console.log(JSON.stringify(results));
});
"""


def test_signature_matches_the_standard_webhooks_vector() -> None:
    signer = WebhookSigner(VECTOR_SECRET)
    assert signer.signature(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    headers = signer.headers(VECTOR_ID, VECTOR_BODY, now=VECTOR_TIMESTAMP + 0.9)
    assert headers == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }


@pytest.mark.parametrize("bad", ["whsec_abc_def", "secret_MfKQ9r8G", "whsec_not base64!"])
def test_malformed_secrets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        WebhookSigner(bad)


async def test_secret_is_generated_once_and_kept(start_app: AppStarter, tmp_path: Path) -> None:
    client = await start_app()
    assert (await client.get("/v1/webhooks/default/secret")).status == 401
    key = (await (await client.get("/v1/webhooks/default/secret", headers=AUTH)).json())["key"]
    prefix, encoded = key.split("_")  # replicate-python needs exactly two parts
    assert prefix == "whsec"
    assert len(base64.b64decode(encoded, validate=True)) == 32
    kept = tmp_path / "data" / "webhook-secret"
    assert kept.read_text().strip() == key
    assert kept.stat().st_mode & 0o077 == 0
    await client.close()
    again = await start_app()
    assert (await (await again.get("/v1/webhooks/default/secret", headers=AUTH)).json()) == {
        "key": key
    }


@pytest.fixture
async def official(start_app: AppStarter) -> AsyncIterator[tuple[Client, ReplicateClient]]:
    client = await start_app()
    base = str(client.server.make_url("")).rstrip("/")
    rc = ReplicateClient(api_token=TOKEN, base_url=base)
    yield client, rc
    sync_client = getattr(rc, "_Client__client", None)
    if sync_client is not None:
        await asyncio.to_thread(sync_client.close)


async def signed_deliveries(client: Client, receiver: WebhookReceiver) -> list[Received]:
    prediction = await create(client, webhook=receiver.url())
    await idle(client)
    received = receiver.for_prediction(prediction["id"])
    assert [r.json()["status"] for r in received] == ["processing", "processing", "succeeded"]
    return received


async def test_python_client_validates_our_webhooks(
    official: tuple[Client, ReplicateClient], webhook_receiver: WebhookReceiver
) -> None:
    client, rc = official
    secret = await asyncio.to_thread(rc.webhooks.default.secret)
    assert isinstance(secret, WebhookSigningSecret) and secret.key.startswith("whsec_")
    for received in await signed_deliveries(client, webhook_receiver):
        body = received.body.decode()
        Webhooks.validate(headers=received.headers, body=body, secret=secret, tolerance=300)
        request = httpx.Request(
            "POST", webhook_receiver.url(), headers=received.headers, content=received.body
        )
        Webhooks.validate(request=request, secret=secret)
        with pytest.raises(InvalidSignatureError):
            Webhooks.validate(headers=received.headers, body=body + " ", secret=secret)


@pytest.fixture(scope="session")
def replicate_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm `replicate@1.4.0` in a temp dir; skipped only where node or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to check the JavaScript client's validateWebhook")
    where = tmp_path_factory.mktemp("replicate-js")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "replicate@1.4.0"],
        cwd=where,
        check=True,
        timeout=300,
        capture_output=True,
    )
    (where / "check.js").write_text(JS_CHECK)
    return where


async def validate_with_js(where: Path, cases: list[dict[str, object]]) -> list[list[bool]]:
    node = shutil.which("node")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node,
        "check.js",
        cwd=where,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(json.dumps(cases).encode())
    assert process.returncode == 0, err.decode()
    results = json.loads(out)
    assert isinstance(results, list)
    return results


async def test_javascript_client_validates_our_webhooks(
    start_app: AppStarter, webhook_receiver: WebhookReceiver, replicate_js: Path
) -> None:
    client = await start_app()
    secret = (await (await client.get("/v1/webhooks/default/secret", headers=AUTH)).json())["key"]
    cases: list[dict[str, object]] = []
    for received in await signed_deliveries(client, webhook_receiver):
        cases.append(
            {"headers": received.headers, "body": received.body.decode(), "secret": secret}
        )
    tampered = {**cases[-1], "body": str(cases[-1]["body"]).replace("succeeded", "failed")}
    vector: dict[str, object] = {
        "headers": {
            "webhook-id": VECTOR_ID,
            "webhook-timestamp": str(VECTOR_TIMESTAMP),
            "webhook-signature": VECTOR_SIGNATURE,
        },
        "body": VECTOR_BODY.decode(),
        "secret": VECTOR_SECRET,
    }
    results = await validate_with_js(replicate_js, [*cases, tampered, vector])
    assert results == [[True, True]] * len(cases) + [[False, False], [True, True]]
