"""The exporter's typed, validated configuration: every error is one line naming the field."""

from __future__ import annotations

import difflib
import hmac
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import yaml

from exporter.files import FileRefused, read_regular_file
from exporter.zego.limits import HORIZON_S, MAX_ROOM_ID_BYTES, RATE_LIMIT_PER_S

DEFAULT_ENDPOINT: Final = "https://cloudrecord-api.zego.im/"
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_PACING: Final = 0.95
DEFAULT_CLOCK_SKEW_MARGIN: Final = 600.0
DEFAULT_POLL_INTERVAL: Final = 15.0
DEFAULT_RATE_LIMIT: Final = RATE_LIMIT_PER_S
DEFAULT_MAX_ROOMS: Final = 1000

MIN_POLL_INTERVAL: Final = 1.0
MAX_APP_ID: Final = 2**32 - 1
# Room for 100,000 room ids of the longest length ZEGO allows, one per line.
MAX_CONFIG_BYTES: Final = 16 << 20
# A ZEGO secret is 32 characters; room for a PEM-sized surprise, not for /dev/zero.
MAX_SECRET_FILE_BYTES: Final = 64 << 10
# A config is 5 levels deep; the bound keeps PyYAML's recursive composer and constructor far
# from Python's recursion limit.
MAX_YAML_DEPTH: Final = 64
# Python refuses decimal strings over 4,300 digits and YAML's base-60 form costs quadratic time;
# no field needs more than 10 digits.
MAX_YAML_INT_CHARS: Final = 100

_SERVER_SECRET_FORMS: Final = ("server_secret", "server_secret_file", "server_secret_env")
_CALLBACK_SECRET_FORMS: Final = ("callback_secret", "callback_secret_file", "callback_secret_env")
_TOP_KEYS: Final = ("zego", "poll_interval", "apps")
_ZEGO_KEYS: Final = ("endpoint", "timeout", "pacing", "clock_skew_margin")
_APP_KEYS: Final = (
    "app_id",
    "rooms",
    "rate_limit",
    "max_rooms",
    *_SERVER_SECRET_FORMS,
    *_CALLBACK_SECRET_FORMS,
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# ZEGO secrets are long hex strings; a value with such a run in it is never echoed in a message.
_LOOKS_LIKE_SECRET = re.compile(r"[0-9A-Fa-f]{16,}")
_NOT_SHOWN: Final = "(value not shown: it looks like a secret)"
_SHOWN_CHARS: Final = 40
_SHOWN_NAME_CHARS: Final = 256
_DURATION_HINT: Final = "write e.g. 500ms, 15s or 1h30m: whole numbers with units ms s m h d w y"


class Secret:
    """A credential that never shows its value: not in repr, str, format, pickles or errors."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The secret itself: call this only where the value is used (signing, verifying)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value in clear into whatever receives the bytes.
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self


@dataclass(frozen=True, slots=True)
class ZegoConfig:
    """How to reach ZEGO's server API and how politely to use it."""

    endpoint: str = DEFAULT_ENDPOINT
    timeout: float = DEFAULT_TIMEOUT
    pacing: float = DEFAULT_PACING
    clock_skew_margin: float = DEFAULT_CLOCK_SKEW_MARGIN


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One ZEGO app to watch: its credentials, its rooms (None means every room) and its budget."""

    app_id: int
    server_secret: Secret
    rooms: tuple[str, ...] | None
    rate_limit: float = DEFAULT_RATE_LIMIT
    max_rooms: int = DEFAULT_MAX_ROOMS
    callback_secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    zego: ZegoConfig
    poll_interval: float
    apps: tuple[AppConfig, ...]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A valid configuration and the warnings found while loading it."""

    config: Config
    warnings: list[str] = field(default_factory=list)


class ConfigError(Exception):
    """An invalid configuration: every problem found, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(self.errors)


# Durations, exactly as Prometheus' model.ParseDuration / Duration.String handle them.

_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$",
    re.ASCII,
)
_UNIT_MS: Final = (
    ("y", 365 * 86_400_000),
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
)
# Go's time.Duration is int64 nanoseconds; Prometheus refuses anything longer.
_MAX_DURATION_MS: Final = (2**63 - 1) // 1_000_000


def parse_duration(text: str) -> float:
    """Parse a Prometheus duration (`500ms`, `15s`, `1h30m`, `1w`; bare `0` too) into seconds."""
    if text == "0":
        return 0.0
    if text == "":
        raise ValueError("empty duration string")
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"not a valid duration string: {text!r}")
    total_ms = sum(
        int(amount) * unit_ms
        for amount, (_, unit_ms) in zip(match.groups(), _UNIT_MS, strict=True)
        if amount is not None
    )
    if total_ms > _MAX_DURATION_MS:
        raise ValueError(f"duration out of range: {text!r}")
    return total_ms / 1000


def format_duration(seconds: float) -> str:
    """Write seconds (whole milliseconds) as Prometheus would: `1h30m`, `90d`, `0s`."""
    remaining = round(seconds * 1000)
    if remaining < 0:
        raise ValueError("a duration cannot be negative")
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, unit_ms in _UNIT_MS:
        # Years and weeks only when exact, as Prometheus does: 90d reads better than 12w6d.
        if unit in ("y", "w") and remaining % unit_ms:
            continue
        amount, remaining = divmod(remaining, unit_ms)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


# Loading.


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate the config file at `path`; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = read_regular_file(path, MAX_CONFIG_BYTES).content.decode("utf-8")
    except FileRefused as refused:
        raise ConfigError([f"{source}: cannot read the config file: {refused}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: the config file is not UTF-8 text"]) from None
    return parse_config(text, source, Path(path).parent, environ)


def parse_config(
    text: str, source: str, base_dir: Path, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Validate config `text`; `source` names it in messages, secret files are under `base_dir`."""
    problems = _Problems(source)
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as error:
        raise ConfigError([problems.yaml_error(error)]) from None
    except yaml.YAMLError as error:
        raise ConfigError([problems.yaml_error(error)]) from None
    reader = _Reader(problems, base_dir, os.environ if environ is None else environ)
    config = reader.config(document)
    if problems.errors or config is None:
        raise ConfigError(problems.errors)
    return LoadedConfig(config=config, warnings=problems.warnings)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, deep nesting and long integers, and lets no error
    but a YAMLError out."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # Checked while composing, before the recursive constructor ever sees the tree.
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested deeper than {MAX_YAML_DEPTH} levels",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception:
            # PyYAML's scalar constructors raise ValueError, KeyError or AttributeError for a
            # value its tag cannot hold (`!!bool maybe`, `2020-13-45`); their text may quote it.
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid YAML {kind}", node.start_mark
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_YAML_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer longer than {MAX_YAML_INT_CHARS} characters",
                node.start_mark,
            )
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        merge_keys = 0
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # One `<<` per mapping (`<<: [*a, *b]` merges several): PyYAML deletes each from
                # the middle of a list, quadratic in their number. Keys merged in are meant to be
                # overridden, so they are not checked for duplicates.
                merge_keys += 1
                if merge_keys > 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, 'duplicate key "<<" (write <<: [*a, *b])', key_node.start_mark
                    )
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_quoted(key)}", key_node.start_mark
                )
            if isinstance(key, str | int | float | bool):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


class _Problems:
    """Errors and warnings found so far, each already one line naming the source and the field."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(self._line(path, problem))

    def warning(self, path: str, problem: str) -> None:
        self.warnings.append(self._line(path, problem))

    def _line(self, path: str, problem: str) -> str:
        return f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}"

    def yaml_error(self, error: yaml.YAMLError) -> str:
        if isinstance(error, yaml.MarkedYAMLError):
            mark = error.problem_mark or error.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = error.problem or error.context or "syntax error"
        elif isinstance(error, yaml.reader.ReaderError):
            where = f"character {error.position + 1}: "
            code = ord(error.character) if isinstance(error.character, str) else error.character
            problem = f"the character U+{code:04X} is not allowed"
        else:
            where, problem = "", str(error)
        # The problem may quote the source (a tag, an anchor, a key); one line, no secrets.
        problem = " ".join(_LOOKS_LIKE_SECRET.sub(_NOT_SHOWN, problem).split())
        return f"{self.source}: {where}invalid YAML: {problem}"


_MISSING: Final = object()


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _quoted(value: object, limit: int = _SHOWN_CHARS) -> str:
    """`value` for a message: quoted, escaped, cut short, and withheld if it could be a secret."""
    text = value if isinstance(value, str) else repr(value)
    if _LOOKS_LIKE_SECRET.search(text):
        return _NOT_SHOWN
    if len(text) > limit:
        text = text[:limit] + "..."
    return f'"{text}"' if text.isprintable() else repr(text)


def _shown_name(name: str) -> str:
    """A key, path or variable name for a message: as written if that is safe, else _quoted."""
    if (
        len(name) <= _SHOWN_NAME_CHARS
        and name.isprintable()
        and not _LOOKS_LIKE_SECRET.search(name)
    ):
        return name
    return _quoted(name, limit=_SHOWN_NAME_CHARS)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Turns the parsed YAML document into typed config, recording every problem on the way."""

    def __init__(self, problems: _Problems, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.problems = problems
        self.base_dir = base_dir
        self.environ = environ

    def error(self, path: str, problem: str) -> None:
        self.problems.error(path, problem)

    def config(self, document: object) -> Config | None:
        if document is None:
            self.error(
                "", "the file is empty; expected a mapping with zego, poll_interval and apps"
            )
            return None
        if not isinstance(document, dict):
            self.error(
                "",
                f"must be a mapping with zego, poll_interval and apps, got {_type_name(document)}",
            )
            return None
        self.unknown_keys(document, _TOP_KEYS, "")
        zego = self.zego(document.get("zego", _MISSING))
        poll_interval = self.duration(document.get("poll_interval", _MISSING), "poll_interval")
        if poll_interval is None:
            poll_interval = DEFAULT_POLL_INTERVAL
        elif poll_interval < MIN_POLL_INTERVAL:
            self.error("poll_interval", "must be at least 1s")
        # DescribeTasks only looks back 3 days; a poll cycle longer than what is left of that
        # window once the skew margin is taken off would let tasks start and end unseen.
        elif zego is not None and poll_interval >= HORIZON_S - zego.clock_skew_margin:
            limit = format_duration(HORIZON_S - zego.clock_skew_margin)
            self.error(
                "poll_interval",
                "must be shorter than ZEGO's 3-day query window less zego.clock_skew_margin "
                f"({limit})",
            )
        apps = self.apps(document.get("apps", _MISSING))
        if zego is None or apps is None:
            return None
        return Config(zego=zego, poll_interval=poll_interval, apps=apps)

    def unknown_keys(self, mapping: dict[Any, Any], allowed: Iterable[str], path: str) -> None:
        allowed = tuple(allowed)
        for key in mapping:
            if key in allowed:
                continue
            if not isinstance(key, str):
                self.error(path, f"unexpected key {_quoted(key)}: keys must be field names")
                continue
            # difflib's cost grows with the key's length; no field name is near this long.
            hint = difflib.get_close_matches(key, allowed, n=1) if len(key) <= 64 else []
            advice = f'did you mean "{hint[0]}"?' if hint else f"allowed: {', '.join(allowed)}"
            if _shown_name(key) == key:
                self.error(_join(path, key), f"unknown key ({advice})")
            else:
                self.error(path, f"unknown key {_shown_name(key)} ({advice})")

    def zego(self, section: object) -> ZegoConfig | None:
        if section is _MISSING:
            return ZegoConfig()
        if not isinstance(section, dict):
            self.error("zego", f"must be a mapping, got {_type_name(section)}")
            return None
        self.unknown_keys(section, _ZEGO_KEYS, "zego")
        errors_before = len(self.problems.errors)
        endpoint = self.endpoint(section.get("endpoint", _MISSING))
        timeout = self.duration(section.get("timeout", _MISSING), "zego.timeout")
        if timeout is not None and timeout <= 0:
            self.error("zego.timeout", "must be longer than 0s")
        pacing = self.number(section.get("pacing", _MISSING), "zego.pacing")
        if pacing is not None and not 0 < pacing <= 1:
            self.error(
                "zego.pacing",
                "must be a fraction of the rate limit above 0 and at most 1 (e.g. 0.95)",
            )
        margin = self.duration(section.get("clock_skew_margin", _MISSING), "zego.clock_skew_margin")
        if margin is not None and margin >= HORIZON_S:
            self.error("zego.clock_skew_margin", "must be shorter than ZEGO's 3-day query window")
        if len(self.problems.errors) > errors_before:
            return None
        return ZegoConfig(
            endpoint=DEFAULT_ENDPOINT if endpoint is None else endpoint,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            pacing=DEFAULT_PACING if pacing is None else pacing,
            clock_skew_margin=DEFAULT_CLOCK_SKEW_MARGIN if margin is None else margin,
        )

    def endpoint(self, value: object) -> str | None:
        if value is _MISSING:
            return None
        path = "zego.endpoint"
        if not isinstance(value, str):
            self.error(path, f"must be an http:// or https:// URL, got {_type_name(value)}")
            return None
        # The URL itself is not echoed: a mistaken one may carry credentials.
        if not value.isprintable() or " " in value:
            self.error(path, "must not contain spaces or control characters")
            return None
        try:
            url = urlsplit(value)
            url.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            self.error(path, "is not a valid URL")
            return None
        if url.scheme not in ("http", "https"):
            self.error(path, "must be an http:// or https:// URL")
        elif not url.hostname:
            self.error(path, "must name a host, e.g. https://cloudrecord-api.zego.im/")
        elif url.username is not None or url.password is not None:
            self.error(path, "must not contain credentials; use server_secret_* in apps")
        elif url.query or url.fragment:
            self.error(path, "must not have a query string or fragment")
        else:
            return value
        return None

    def duration(self, value: object, path: str) -> float | None:
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self.error(
                path, f"must be a duration string, got {_type_name(value)}; {_DURATION_HINT}"
            )
            return None
        try:
            return parse_duration(value)
        except ValueError:
            self.error(path, f"{_quoted(value)} is not a duration; {_DURATION_HINT}")
            return None

    def number(self, value: object, path: str) -> float | None:
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(path, f"must be a number, got {_type_name(value)}")
            return None
        if not math.isfinite(value):
            self.error(path, "must be a finite number")
            return None
        return float(value)

    def integer(self, value: object, path: str) -> int | None:
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {_type_name(value)}")
            return None
        return value

    def apps(self, value: object) -> tuple[AppConfig, ...] | None:
        if value is _MISSING:
            self.error("apps", "is required: a list of ZEGO apps to watch")
            return None
        if not isinstance(value, list) or not value:
            self.error("apps", "must be a non-empty list of ZEGO apps to watch")
            return None
        apps: list[AppConfig] = []
        first_index: dict[int, int] = {}
        valid = True
        for index, entry in enumerate(value):
            path = f"apps[{index}]"
            app = self.app(entry, path)
            if app is None:
                valid = False
                continue
            if app.app_id in first_index:
                self.error(
                    f"{path}.app_id",
                    f"duplicate of apps[{first_index[app.app_id]}].app_id ({app.app_id})",
                )
                valid = False
                continue
            first_index[app.app_id] = index
            apps.append(app)
        return tuple(apps) if valid else None

    def app(self, entry: object, path: str) -> AppConfig | None:
        if not isinstance(entry, dict):
            self.error(
                path, f"must be a mapping with app_id, rooms and a secret, got {_type_name(entry)}"
            )
            return None
        self.unknown_keys(entry, _APP_KEYS, path)
        errors_before = len(self.problems.errors)

        app_id = self.integer(entry.get("app_id", _MISSING), f"{path}.app_id")
        if "app_id" not in entry:
            self.error(f"{path}.app_id", "is required")
        elif app_id is not None and not 0 < app_id <= MAX_APP_ID:
            self.error(f"{path}.app_id", f"must be between 1 and {MAX_APP_ID} (a uint32)")

        rooms = self.rooms(entry.get("rooms", _MISSING), f"{path}.rooms")

        rate_limit = self.number(entry.get("rate_limit", _MISSING), f"{path}.rate_limit")
        if rate_limit is not None and rate_limit <= 0:
            self.error(f"{path}.rate_limit", "must be a number of requests per second above 0")
        elif rate_limit is not None and rate_limit > RATE_LIMIT_PER_S:
            self.problems.warning(
                f"{path}.rate_limit",
                f"is above ZEGO's documented DescribeTasks limit of {RATE_LIMIT_PER_S:g} "
                "requests/s; expect code 300000003 (frequency exceeds the limit)",
            )

        max_rooms = self.integer(entry.get("max_rooms", _MISSING), f"{path}.max_rooms")
        if max_rooms is not None and max_rooms <= 0:
            self.error(f"{path}.max_rooms", "must be an integer above 0")
        elif "max_rooms" in entry and isinstance(entry.get("rooms"), list):
            self.error(
                f"{path}.max_rooms",
                'only applies with rooms: "*"; an explicit room list is its own limit',
            )

        server_secret = self.secret(entry, path, _SERVER_SECRET_FORMS, required=True)
        callback_secret = self.secret(entry, path, _CALLBACK_SECRET_FORMS, required=False)

        if len(self.problems.errors) > errors_before or app_id is None or server_secret is None:
            return None
        return AppConfig(
            app_id=app_id,
            server_secret=server_secret,
            rooms=rooms if isinstance(rooms, tuple) else None,
            rate_limit=DEFAULT_RATE_LIMIT if rate_limit is None else rate_limit,
            max_rooms=DEFAULT_MAX_ROOMS if max_rooms is None else max_rooms,
            callback_secret=callback_secret,
        )

    def rooms(self, value: object, path: str) -> tuple[str, ...] | str | None:
        shape = 'must be a non-empty list of room ids or "*"'
        if value is _MISSING:
            self.error(path, 'is required: a list of room ids, or "*" for every room of the app')
            return None
        if value == "*":
            return "*"
        if isinstance(value, str):
            self.error(path, f"{shape} (for one room write [{_quoted(value)}])")
            return None
        if not isinstance(value, list) or not value:
            self.error(path, shape)
            return None
        if value == ["*"]:
            self.error(path, 'write rooms: "*" (not a list) to watch every room of the app')
            return None
        first_index: dict[str, int] = {}
        valid = True
        for index, room in enumerate(value):
            room_path = f"{path}[{index}]"
            problem = _room_id_problem(room)
            if problem is not None:
                self.error(room_path, problem)
                valid = False
            elif room in first_index:
                self.error(
                    room_path,
                    f"duplicate room id {_quoted(room)} (first at {path}[{first_index[room]}])",
                )
                valid = False
            else:
                first_index[room] = index
        return tuple(first_index) if valid else None

    def secret(
        self, entry: dict[Any, Any], path: str, forms: tuple[str, str, str], required: bool
    ) -> Secret | None:
        present = [form for form in forms if form in entry]
        if not present:
            if required:
                self.error(path, f"one of {', '.join(forms)} is required")
            return None
        if len(present) > 1:
            self.error(
                path,
                f"only one of {', '.join(forms)} may be set, found {' and '.join(present)}",
            )
            return None
        form = present[0]
        form_path = f"{path}.{form}"
        value = entry[form]
        # Never echo `value` in this method: for the inline form it is the secret itself.
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float) else ""
            self.error(form_path, f"must be a string, got {_type_name(value)}{hint}")
            return None
        if form != forms[0] and _LOOKS_LIKE_SECRET.fullmatch(value):
            self.error(
                form_path,
                f"looks like a secret itself (not shown); put it in a file or an environment "
                f"variable and name that here, or use {forms[0]}",
            )
            return None
        if form.endswith("_file"):
            secret = self.secret_from_file(value, form_path)
        elif form.endswith("_env"):
            secret = self.secret_from_env(value, form_path)
        else:
            secret = value
            if not secret:
                self.error(form_path, "must not be empty")
                return None
        if secret is None:
            return None
        if any(char.isspace() for char in secret):
            self.error(
                form_path,
                "contains spaces or line breaks, which ZEGO secrets never do (a copy-paste slip?)",
            )
            return None
        if not secret.isprintable():
            self.error(
                form_path,
                "contains control characters or invalid Unicode, which ZEGO secrets never do",
            )
            return None
        return Secret(secret)

    def secret_from_file(self, name: str, path: str) -> str | None:
        if not name:
            self.error(path, "must be a file path, got an empty string")
            return None
        if not name.isprintable():
            self.error(path, "must be a file path without control characters or invalid Unicode")
            return None
        # os.path leaves `~unknown-user` as written, where Path.expanduser raises RuntimeError.
        file = self.base_dir / os.path.expanduser(name)
        shown = _shown_name(str(file))
        try:
            content, mode = read_regular_file(file, MAX_SECRET_FILE_BYTES)
        except FileRefused as refused:
            self.error(path, f"cannot read {shown}: {refused}")
            return None
        if mode & 0o077:
            self.problems.warning(
                path,
                f"{shown} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                "chmod 600 it",
            )
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            # The decoder's own message quotes the offending bytes, which belong to the secret.
            self.error(path, f"{shown} is not UTF-8 text")
            return None
        secret = text.rstrip("\r\n")
        if not secret:
            self.error(path, f"{shown} is empty")
            return None
        return secret

    def secret_from_env(self, name: str, path: str) -> str | None:
        if not _ENV_NAME.fullmatch(name):
            self.error(path, "must be an environment variable name (letters, digits, _)")
            return None
        shown = _shown_name(name)
        if name not in self.environ:
            self.error(path, f"environment variable {shown} is not set")
            return None
        secret = self.environ[name]
        if not secret:
            self.error(path, f"environment variable {shown} is empty")
            return None
        return secret


def _room_id_problem(room: object) -> str | None:
    """Why `room` cannot be a room id (it becomes a label value, a log field and a store key)."""
    if isinstance(room, bool) or not isinstance(room, str):
        hint = (
            "; quote room ids, because YAML reads an unquoted 001 as the number 1"
            if isinstance(room, int | float) and not isinstance(room, bool)
            else ""
        )
        return f"room ids must be strings, got {_type_name(room)}{hint}"
    if not room:
        return "room ids must not be empty"
    if room != room.strip() or not room.isprintable():
        # isprintable() is False for lone surrogates too, which would not encode for the store.
        return "room ids must not have surrounding spaces, control characters or invalid Unicode"
    if len(room.encode()) > MAX_ROOM_ID_BYTES:
        return f"room ids are at most {MAX_ROOM_ID_BYTES} bytes"
    return None
