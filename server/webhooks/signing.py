"""Webhook signatures in the Standard Webhooks scheme, as Replicate signs them.

Each request carries `webhook-id` (the same on every retry of one delivery),
`webhook-timestamp` (unix seconds of this attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`). The key is the bytes behind the
`whsec_` prefix of the secret, in standard base64 with no `_` in it: replicate-python splits
the secret on `_` and wants exactly two parts (compatibility reference, section 3.2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"
SECRET_PREFIX = "whsec_"


class SecretInvalid(ValueError):
    pass


def new_webhook_id() -> str:
    """A message id like Standard Webhooks' `msg_...`: 26 random base32 characters."""
    return "msg_" + base64.b32encode(secrets.token_bytes(16)).decode("ascii").lower().rstrip("=")


class WebhookSigner:
    """Signs webhook bodies with one secret `whsec_<standard base64>`."""

    def __init__(self, secret: str) -> None:
        prefix, _, encoded = secret.partition("_")
        if f"{prefix}_" != SECRET_PREFIX or "_" in encoded:
            raise SecretInvalid("a webhook secret is 'whsec_' and standard base64 without '_'")
        try:
            self._key = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise SecretInvalid(f"the webhook secret is not valid base64: {exc}") from exc
        if not self._key:
            raise SecretInvalid("the webhook secret is empty")
        self.secret = secret

    @classmethod
    def generate(cls) -> WebhookSigner:
        return cls(SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii"))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> WebhookSigner:
        """The secret kept in `data_dir/webhook-secret`, made (owner-only) on first start."""
        path = data_dir / SECRET_FILE
        if path.exists():
            return cls(path.read_text(encoding="utf-8").strip())
        signer = cls.generate()
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(signer.secret + "\n")
        log.info("generated a webhook signing secret in %s", path)
        return signer

    def signature(self, webhook_id: str, timestamp: int, body: bytes) -> str:
        """The `webhook-signature` value for exactly these body bytes."""
        signed = f"{webhook_id}.{timestamp}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode("ascii")

    def headers(self, webhook_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
        """The three signature headers of one attempt, stamped with the current time."""
        timestamp = int(time.time() if now is None else now)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(webhook_id, timestamp, body),
        }
