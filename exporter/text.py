"""Checks for text from outside that becomes a label value, a log field or a stored key."""

from __future__ import annotations

import re

# C0 and C1 controls (a log line or label split in two, a terminal escape) and lone surrogates
# (not encodable: the render, the log writer and SQLite would raise on them).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(value: object, max_bytes: int) -> str | None:
    """Why `value` cannot be used as an id (a label, a log field, a key), or None if it can."""
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if len(value) > max_bytes:  # before encoding it: a huge string costs nothing more
        return f"is longer than {max_bytes} bytes"
    if _UNSAFE.search(value):
        return "contains control characters or invalid Unicode"
    if len(value.encode("utf-8")) > max_bytes:
        return f"is longer than {max_bytes} bytes"
    return None
