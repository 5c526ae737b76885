"""Checks for text from outside that becomes a label value, a log field or a stored key."""

from __future__ import annotations


def text_problem(value: object, max_bytes: int) -> str | None:
    """Why `value` cannot be used as an id (a label, a log field, a key), or None if it can."""
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if len(value) > max_bytes:  # before encoding it: a huge string costs nothing more
        return f"is longer than {max_bytes} bytes"
    # Controls split a log line or a label, or move a terminal's cursor; lone surrogates cannot
    # be encoded (the render, the log writer and SQLite would raise); format characters such as
    # U+202E reverse the text around them. Every edge and the state file use this one rule.
    if not value.isprintable():
        return "contains control characters or invalid Unicode"
    if len(value.encode("utf-8")) > max_bytes:
        return f"is longer than {max_bytes} bytes"
    return None
