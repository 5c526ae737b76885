"""ZEGO server API signatures (SignatureVersion 2.0) and the common query parameters."""

from __future__ import annotations

import hashlib
import secrets

SIGNATURE_VERSION = "2.0"


def signature(app_id: int, nonce: str, server_secret: str, timestamp: int) -> str:
    """md5(AppId + SignatureNonce + ServerSecret + Timestamp), lowercase hex."""
    text = f"{app_id}{nonce}{server_secret}{timestamp}"
    return hashlib.md5(text.encode()).hexdigest()


def new_nonce() -> str:
    """16 hex characters from 8 random bytes, fresh for every request."""
    return secrets.token_hex(8)


def common_params(action: str, app_id: int, server_secret: str, now: float) -> dict[str, str]:
    """The query string of one request, signed afresh."""
    nonce = new_nonce()
    timestamp = int(now)
    return {
        "Action": action,
        "AppId": str(app_id),
        "SignatureNonce": nonce,
        "Timestamp": str(timestamp),
        "SignatureVersion": SIGNATURE_VERSION,
        "Signature": signature(app_id, nonce, server_secret, timestamp),
    }
