"""Fuzzing the config reader: any text gives a valid config or a ConfigError, and no secret."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import (
    MAX_APP_ID,
    MAX_ROOM_ID_BYTES,
    MIN_POLL_INTERVAL,
    ConfigError,
    LoadedConfig,
    Secret,
    parse_config,
)
from exporter.zego.limits import HORIZON_S

SOURCE = "config.yml"
BASE_DIR = Path("/nonexistent/config-dir")
ENVIRON = {"ZEGO_SECRET": "env-secret", "EMPTY": ""}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = (
    "zego", "endpoint", "timeout", "pacing", "clock_skew_margin", "poll_interval", "apps",
    "app_id", "rooms", "rate_limit", "max_rooms", "server_secret", "server_secret_file",
    "server_secret_env", "callback_secret", "callback_secret_file", "callback_secret_env", "<<",
)  # fmt: skip
PLAUSIBLE = (
    "15s", "1h30m", "0", "500ms", "*", "https://cloudrecord-api.zego.im/", "http://h:1/",
    "ZEGO_SECRET", "EMPTY", "secret", "/dev/zero", ".", "0.95", "001", "~", "null", "yes",
    "~no-such-user/secret", "room\u00a0", "\u202e", "\x00",
)  # fmt: skip
YAML_PIECES = (
    *KEYS, *PLAUSIBLE, ": ", "\n", "\n  ", "\n    - ", "- ", "[", "]", "{", "}", ", ", "&a ",
    "*a", "!!int ", "!!binary ", "!!timestamp ", "? ", '"', "'", "\\", "|\n  ", "#", "---\n",
    "<<: *a", "\t", "1e999", ".nan", "0x1F", "0o17", "1:30:00", "-1", "2**32",
    "\\ud800", "\\0", "\\e", "\\x85",
)  # fmt: skip

secrets = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(PLAUSIBLE)
)


def documents(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested mappings and lists whose keys are mostly the real field names."""
    keys = st.sampled_from(KEYS) | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=20,
    )


@st.composite
def config_shaped(draw: st.DrawFn, leaves: st.SearchStrategy[Any]) -> Any:
    """A config of the right shape, each field mostly valid, sometimes absent or anything."""
    anything = st.sampled_from(PLAUSIBLE) | documents(leaves)
    choices = st.sampled_from(("valid",) * 8 + ("absent", "anything"))

    def field(name: str, valid: st.SearchStrategy[Any]) -> dict[str, Any]:
        choice = draw(choices)
        if choice == "absent":
            return {}
        return {name: draw(valid if choice == "valid" else anything)}

    room_ids = st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=20) | (
        st.text(st.characters(codec="utf-8"), min_size=1)
    )
    room_lists = st.lists(room_ids, min_size=1, max_size=5, unique=True) | st.lists(
        room_ids | leaves, min_size=1, max_size=5
    )
    rooms = field("rooms", st.just("*") | room_lists)
    secret_form = draw(st.sampled_from(("server_secret", "server_secret_env", "both")))
    app = {
        **field("app_id", st.integers(min_value=1, max_value=MAX_APP_ID)),
        **rooms,
        **(field("server_secret", secrets) if secret_form != "server_secret_env" else {}),
        **(
            field("server_secret_env", st.just("ZEGO_SECRET"))
            if secret_form != "server_secret"
            else {}
        ),
        **field("callback_secret", secrets),
        **field("rate_limit", st.floats(min_value=0.1, max_value=20)),
        **(field("max_rooms", st.integers(min_value=1)) if rooms.get("rooms") == "*" else {}),
    }
    zego = {
        **field("endpoint", st.sampled_from(("https://cloudrecord-api.zego.im/", "http://h:1/"))),
        **field("timeout", st.sampled_from(("10s", "500ms"))),
        **field("pacing", st.floats(min_value=0.1, max_value=1)),
        **field("clock_skew_margin", st.sampled_from(("10m", "0"))),
    }
    return {
        **field("zego", st.just(zego)),
        **field("poll_interval", st.sampled_from(("15s", "1s", "1h"))),
        "apps": draw(st.just([app]) | st.lists(st.just(app) | anything, min_size=1, max_size=3)),
    }


def dumped(document: Any, flow: bool) -> str:
    return yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)


yaml_ish = st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=40).map("".join)


def check_outcome(text: str, secret: str | None = None) -> None:
    """The property: a valid LoadedConfig or a ConfigError of one-line errors; never a secret."""
    try:
        loaded = parse_config(text, SOURCE, BASE_DIR, ENVIRON)
    except ConfigError as error:
        assert error.errors
        for line in error.errors:
            assert line.startswith(f"{SOURCE}: ")
            assert "\n" not in line and "\r" not in line
            assert secret is None or secret not in line
        return
    assert_valid(loaded)
    assert secret is None or all(secret not in warning for warning in loaded.warnings)


def assert_valid(loaded: LoadedConfig) -> None:
    config = loaded.config
    zego = config.zego
    assert zego.endpoint.startswith(("http://", "https://"))
    assert math.isfinite(zego.timeout) and zego.timeout > 0
    assert 0 < zego.pacing <= 1
    assert 0 <= zego.clock_skew_margin < HORIZON_S
    assert MIN_POLL_INTERVAL <= config.poll_interval < HORIZON_S - zego.clock_skew_margin
    assert config.apps
    assert len({app.app_id for app in config.apps}) == len(config.apps)
    for app in config.apps:
        assert type(app.app_id) is int and 0 < app.app_id <= MAX_APP_ID
        assert math.isfinite(app.rate_limit) and app.rate_limit > 0
        assert type(app.max_rooms) is int and app.max_rooms > 0
        for secret in (app.server_secret, app.callback_secret):
            if secret is not None:
                assert isinstance(secret, Secret)
                value = secret.reveal()
                assert value and value.isprintable() and not any(c.isspace() for c in value)
        if app.rooms is not None:
            assert app.rooms and len(set(app.rooms)) == len(app.rooms)
            for room in app.rooms:
                assert room and room == room.strip() and room.isprintable()
                assert len(room.encode()) <= MAX_ROOM_ID_BYTES
    assert all(isinstance(w, str) and "\n" not in w for w in loaded.warnings)


@FUZZ
@given(st.text())
def test_any_text_gives_a_valid_config_or_a_config_error(text: str) -> None:
    check_outcome(text)


@FUZZ
@given(yaml_ish)
def test_yaml_ish_text_gives_a_valid_config_or_a_config_error(text: str) -> None:
    check_outcome(text)


@FUZZ
@given(documents(scalars), st.booleans())
def test_any_yaml_document_gives_a_valid_config_or_a_config_error(
    document: Any, flow: bool
) -> None:
    check_outcome(dumped(document, flow))


@FUZZ
@given(config_shaped(scalars), st.booleans())
def test_config_shaped_document_gives_a_valid_config_or_a_config_error(
    document: Any, flow: bool
) -> None:
    check_outcome(dumped(document, flow))


@FUZZ
@given(st.data(), secrets, st.booleans())
def test_secret_planted_as_any_value_never_appears_in_errors(
    data: st.DataObject, secret: str, flow: bool
) -> None:
    document = data.draw(config_shaped(scalars | st.just(secret) | st.just(f"r-{secret}")))

    check_outcome(dumped(document, flow), secret)


@FUZZ
@given(yaml_ish, st.integers(min_value=0), secrets)
def test_secret_planted_anywhere_in_yaml_ish_text_never_appears_in_errors(
    text: str, position: int, secret: str
) -> None:
    at = position % (len(text) + 1)

    check_outcome(text[:at] + secret + text[at:], secret)
