"""ZEGO recording-callback signatures: what a sender signs and what a receiver must check."""

from __future__ import annotations

import hashlib
import hmac


def callback_signature(secret: str, timestamp: str, nonce: str) -> str:
    """sha1 of the callback secret, timestamp and nonce sorted and joined, lowercase hex."""
    text = "".join(sorted([secret, timestamp, nonce]))
    return hashlib.sha1(text.encode()).hexdigest()


def verify_callback_signature(secret: str, timestamp: str, nonce: str, signature: str) -> bool:
    """Whether `signature` (any case) is the one ZEGO would send, compared in constant time."""
    expected = callback_signature(secret, timestamp, nonce)
    # As bytes: compare_digest refuses str with non-ASCII characters (TypeError).
    return hmac.compare_digest(expected.encode(), signature.lower().encode("utf-8", "replace"))
