"""A callback's body, parsed: its signed envelope first, then its content, validated."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exporter.state.model import QUIT_REASONS
from exporter.text import text_problem
from exporter.zego.limits import (
    CALLBACK_EVENTS,
    EVENT_UPLOADED,
    MAX_ROOM_ID_BYTES,
    MAX_TASK_ID_BYTES,
)
from exporter.zego.models import FileStatus

MAX_BODY_BYTES = 256 * 1024
_FILE_STATUSES = frozenset(s.value for s in FileStatus)
# What a callback may hold: ZEGO's ids and numbers with room to spare, never more.
MAX_NONCE_CHARS = 64
MAX_DEPTH = 8  # ZEGO's bodies nest 3 deep (detail.file_info[].field)
MAX_FILES = 1000
MAX_SEQUENCE = 2**53 - 1
_NONCE = re.compile(rf"[\x21-\x7e]{{1,{MAX_NONCE_CHARS}}}")  # printable ASCII, no spaces
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{40}")  # sha1, hex


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who sent a callback and what its signature covers: checked before anything else."""

    app_id: int
    event_label: str  # ZEGO's event type if documented, else "other": a bounded label
    timestamp: str
    nonce: str
    signature: str
    digest: bytes  # of the whole body: a retry repeats it, a forgery under a stolen nonce not


@dataclass(frozen=True, slots=True)
class Callback:
    """A signed callback's content, validated: only clean ids and ZEGO's documented values."""

    app_id: int
    task_id: str
    room_id: str
    event_type: int
    sequence: int
    sent_s: int
    quit_reason: str  # a documented code, "unknown" (none given) or "other"
    # An upload callback's file statuses (ZEGO's 1-5; anything else is 0: not settled).
    file_statuses: tuple[int, ...] = ()

    @property
    def failed_files(self) -> int:
        """Files of an upload callback whose status is not "uploaded"."""
        return sum(1 for status in self.file_statuses if status != FileStatus.UPLOADED)


# Results that are refused, with their HTTP status; every other result is answered 200.
REJECTED = {"malformed": 400, "unknown_app": 401, "bad_signature": 401,
            "stale": 401, "replayed": 401}


class CallbackRejected(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


def _malformed(reason: str) -> CallbackRejected:
    return CallbackRejected("malformed", reason)


def _depth(value: object) -> int:
    """How deep a parsed JSON value nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:  # past it the answer is known
            continue
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _integer(raw: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _malformed(f"{name} missing, not an integer or out of range")
    return value


def _id(raw: Mapping[str, Any], name: str, max_bytes: int) -> str:
    value = raw.get(name)
    problem = text_problem(value, max_bytes)
    if problem is not None:
        raise _malformed(f"{name} {problem}")
    assert isinstance(value, str)
    return value


def parse_envelope(body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """The JSON object and its envelope, or CallbackRejected("malformed")."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise _malformed(f"nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError):
        raise _malformed("body is not JSON") from None
    if not isinstance(raw, dict):
        raise _malformed("body is not a JSON object")
    if _depth(raw) > MAX_DEPTH:
        raise _malformed(f"nested deeper than {MAX_DEPTH} levels")
    app_id = raw.get("app_id")
    if isinstance(app_id, str) and app_id.isascii() and app_id.isdigit() and len(app_id) <= 10:
        app_id = int(app_id)
    if isinstance(app_id, bool) or not isinstance(app_id, int) or not 0 < app_id < 2**32:
        raise _malformed("app_id missing or not an AppId")
    texts = {}
    for name, pattern in (("timestamp", _TIMESTAMP), ("nonce", _NONCE),
                          ("signature", _SIGNATURE)):
        value = raw.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and name != "signature":
            value = str(value)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _malformed(f"{name} missing or not of ZEGO's form")
        texts[name] = value
    event_type = raw.get("event_type")
    label = str(event_type) if type(event_type) is int and event_type in CALLBACK_EVENTS \
        else "other"
    return Envelope(app_id, label, texts["timestamp"], texts["nonce"], texts["signature"],
                    hashlib.blake2b(body, digest_size=16).digest()), raw


def parse_callback(envelope: Envelope, raw: Mapping[str, Any]) -> Callback:
    """The content of a signed callback, or CallbackRejected("malformed")."""
    detail = raw.get("detail")
    detail = {} if detail is None else detail
    if not isinstance(detail, dict):
        raise _malformed("detail is not an object")
    event_type = _integer(raw, "event_type", -(2**31), 2**31 - 1)
    quit_reason = detail.get("quit_reason")
    file_statuses: tuple[int, ...] = ()
    if event_type == EVENT_UPLOADED:
        files = detail.get("file_info")
        files = [] if files is None else files
        if not isinstance(files, list) or len(files) > MAX_FILES or \
                not all(isinstance(f, dict) for f in files):
            raise _malformed(f"detail.file_info is not a list of at most {MAX_FILES} objects")
        file_statuses = tuple(status if type(status := f.get("status")) is int
                              and status in _FILE_STATUSES else 0 for f in files)
    return Callback(
        app_id=envelope.app_id,
        task_id=_id(raw, "task_id", MAX_TASK_ID_BYTES),
        room_id=_id(raw, "room_id", MAX_ROOM_ID_BYTES),
        event_type=event_type,
        sequence=_integer(raw, "sequence", 0, MAX_SEQUENCE),
        sent_s=int(envelope.timestamp),
        quit_reason=("unknown" if quit_reason is None
                     else str(quit_reason) if type(quit_reason) is int
                     and str(quit_reason) in QUIT_REASONS else "other"),
        file_statuses=file_statuses,
    )


