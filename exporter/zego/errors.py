"""ZEGO return codes, and the typed errors the client raises, classified by what to do."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Return codes from ZEGO's documentation (see ../shared/zego-api.md)."""

    SUCCESS = 0
    APP_ID_FORMAT = 100000001
    TIMESTAMP_EMPTY = 100000002
    TIMESTAMP_FORMAT = 100000003
    SIGNATURE_EXPIRED = 100000004
    SIGNATURE_ERROR = 100000005
    ACTION_EMPTY = 100000006
    ACTION_UNSUPPORTED = 100000007
    NONCE_EMPTY = 100000008
    SIGNATURE_EMPTY = 100000009
    SECRET_LOOKUP_FAILED = 100000010
    APP_CONFIG_FAILED = 100000011
    SIGNATURE_VERSION_EMPTY = 100000013
    SIGNATURE_VERSION_UNSUPPORTED = 100000014
    GATEWAY_INTERNAL = 100000015
    NO_PRODUCTION_ENV = 100000016
    SERVICE_NOT_ENABLED = 100000017
    RECORDING_NOT_ENABLED = 300000002
    RATE_LIMITED = 300000003
    INVALID_PARAMETER = 300000004
    GATEWAY_VALIDATION = 300000005
    TOO_MANY_TASKS = 300000006
    TASK_NOT_FOUND = 300001000
    TASK_ALREADY_ENDED = 300001001
    SYSTEM_ERROR = 300010000


class Kind(enum.Enum):
    """What a caller should do about an error."""

    RETRYABLE = "retryable"  # transient: back off and try again
    CREDENTIALS = "credentials"  # config or account problem: fail the app, do not hammer
    REQUEST = "request"  # our request is wrong: a bug, retrying will not help
    NOT_FOUND = "not_found"  # the task does not exist (or is out of ZEGO's 3-day horizon)
    UNKNOWN = "unknown"  # a code ZEGO's docs do not list


RETRYABLE_CODES = frozenset({Code.RATE_LIMITED, Code.SYSTEM_ERROR, Code.GATEWAY_INTERNAL})
CREDENTIAL_CODES = frozenset(
    {
        Code.APP_ID_FORMAT,
        Code.SIGNATURE_EXPIRED,  # after one re-signed retry (see client)
        Code.SIGNATURE_ERROR,
        Code.SECRET_LOOKUP_FAILED,
        Code.APP_CONFIG_FAILED,
        Code.NO_PRODUCTION_ENV,
        Code.SERVICE_NOT_ENABLED,
        Code.RECORDING_NOT_ENABLED,
    }
)
NOT_FOUND_CODES = frozenset({Code.TASK_NOT_FOUND})


def classify(code: int) -> Kind:
    if code in RETRYABLE_CODES:
        return Kind.RETRYABLE
    if code in CREDENTIAL_CODES:
        return Kind.CREDENTIALS
    if code in NOT_FOUND_CODES:
        return Kind.NOT_FOUND
    if code in Code.__members__.values() or 100000000 <= code < 100000100:
        return Kind.REQUEST
    return Kind.UNKNOWN


class ZegoError(Exception):
    """Any failure of one ZEGO API call. `label` is what metrics count it as."""

    kind: Kind = Kind.UNKNOWN

    @property
    def label(self) -> str:
        return "error"


class ZegoApiError(ZegoError):
    """ZEGO answered with a non-zero Code."""

    def __init__(self, action: str, code: int, message: str, request_id: str = "") -> None:
        self.action = action
        self.code = code
        self.message = message
        self.request_id = request_id
        self.kind = classify(code)
        super().__init__(f"{action}: ZEGO code {code} ({self.kind.value}): {message!r}"
                         + (f" request_id={request_id}" if request_id else ""))

    @property
    def label(self) -> str:
        return str(self.code)


class ZegoTransportError(ZegoError):
    """No usable answer: connection error, timeout or HTTP 5xx."""

    kind = Kind.RETRYABLE

    def __init__(self, action: str, reason: str, label: str) -> None:
        self.action = action
        self._label = label
        super().__init__(f"{action}: {reason}")

    @property
    def label(self) -> str:
        return self._label


class ZegoResponseError(ZegoError):
    """An answer that is not ZEGO's shape: non-JSON, truncated, wrong types, missing Code."""

    kind = Kind.RETRYABLE

    def __init__(self, action: str, reason: str) -> None:
        self.action = action
        super().__init__(f"{action}: invalid response: {reason}")

    @property
    def label(self) -> str:
        return "invalid_response"
