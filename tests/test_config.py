"""Specification of the config file: the tables in tests/configs and the rules they cannot show."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import (
    DEFAULT_ENDPOINT,
    MAX_CONFIG_BYTES,
    MAX_SECRET_FILE_BYTES,
    AppConfig,
    Config,
    ConfigError,
    LoadedConfig,
    Secret,
    ZegoConfig,
    _Problems,  # the reader itself: only to count the duplicate-room check's work
    _Reader,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)

CONFIGS = Path(__file__).parent / "configs"
EXAMPLES = Path(__file__).parent.parent / "examples"
LEAK = "s3cr3t-DO-NOT-LEAK"
TABLE_ENVIRON = {
    "ZEGO_TEST_SECRET": "env-secret-value",
    "ZEGO_TEST_CALLBACK_SECRET": "env-callback-value",
    "ZEGO_TEST_EMPTY": "",
}


def parse(text: str, environ: Mapping[str, str] | None = None, base_dir: Path = CONFIGS) -> Config:
    return parse_config(text, "config.yml", base_dir, environ or {}).config


def errors_of(text: str, environ: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "config.yml", CONFIGS, environ or {})
    return raised.value.errors


def expected_message(path: Path) -> str:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# expect: "), f"{path.name} must start with '# expect: '"
    return first_line.removeprefix("# expect: ")


def write_secret(path: Path, value: str, mode: int = 0o600) -> Path:
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(mode)
    return path


# The tables.


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.ok.yml")), ids=lambda p: p.name)
def test_ok_config_loads(path: Path) -> None:
    loaded = load_config(path, TABLE_ENVIRON)

    assert loaded.config.apps


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.bad.yml")), ids=lambda p: p.name)
def test_bad_config_fails_with_one_line_naming_file_and_problem(path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(path, TABLE_ENVIRON)

    lines = str(raised.value).splitlines()
    matching = [line for line in lines if expected_message(path) in line]
    assert matching, f"expected {expected_message(path)!r} in:\n{raised.value}"
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_tables_cover_both_outcomes() -> None:
    assert len(list(CONFIGS.glob("*.ok.yml"))) >= 5
    assert len(list(CONFIGS.glob("*.bad.yml"))) >= 50


def test_example_config_loads_with_its_secret_file(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "config.yml", tmp_path / "config.yml")
    text = (tmp_path / "config.yml").read_text(encoding="utf-8")
    secret_file = tmp_path / "zego-server-secret"
    write_secret(secret_file, "example-secret")
    text = text.replace("/run/secrets/zego-server-secret", str(secret_file))
    (tmp_path / "config.yml").write_text(text, encoding="utf-8")

    loaded = load_config(tmp_path / "config.yml", {})

    assert loaded.warnings == []
    assert loaded.config.zego.endpoint == DEFAULT_ENDPOINT
    assert loaded.config.apps[0].server_secret.reveal() == "example-secret"


def test_example_config_points_at_the_real_endpoint_and_a_secret_file() -> None:
    text = (EXAMPLES / "config.yml").read_text(encoding="utf-8")

    assert "endpoint: https://cloudrecord-api.zego.im/" in text
    assert "server_secret_file: /run/secrets/zego-server-secret" in text


# Values and defaults.


def test_full_config_is_read_into_typed_values() -> None:
    loaded = load_config(CONFIGS / "full.ok.yml", TABLE_ENVIRON)

    assert loaded.config == Config(
        zego=ZegoConfig(
            endpoint="https://cloudrecord-api.zego.im/",
            timeout=10.0,
            pacing=0.95,
            clock_skew_margin=600.0,
        ),
        poll_interval=15.0,
        apps=(
            AppConfig(
                app_id=1234567890,
                server_secret=Secret("file-secret-value"),
                rooms=("1000", "1230"),
                rate_limit=10.0,
                max_rooms=1000,
                callback_secret=Secret("env-callback-value"),
            ),
        ),
    )


def test_omitted_fields_take_documented_defaults() -> None:
    config = parse('apps: [{app_id: 7, rooms: ["1"], server_secret: x}]')

    assert config.zego == ZegoConfig(
        endpoint="https://cloudrecord-api.zego.im/",
        timeout=10.0,
        pacing=0.95,
        clock_skew_margin=600.0,
    )
    assert config.poll_interval == 15.0
    assert config.apps[0].rate_limit == 10.0
    assert config.apps[0].max_rooms == 1000
    assert config.apps[0].callback_secret is None


def test_star_rooms_mean_every_room_and_keep_max_rooms() -> None:
    config = load_config(CONFIGS / "every_room.ok.yml", TABLE_ENVIRON).config

    assert config.apps[0].rooms is None
    assert config.apps[0].max_rooms == 50


def test_room_ids_keep_leading_zeros_when_quoted() -> None:
    config = load_config(CONFIGS / "several_apps.ok.yml", TABLE_ENVIRON).config

    assert config.apps[1].rooms == ("room-a", "room_b", "0001")


def test_yaml_merge_keys_may_override_a_field() -> None:
    config = load_config(CONFIGS / "yaml_anchors.ok.yml", TABLE_ENVIRON).config

    assert [app.app_id for app in config.apps] == [11, 12]
    assert config.apps[1].rooms == ("1000",)


def test_config_is_immutable() -> None:
    config = parse('apps: [{app_id: 7, rooms: ["1"], server_secret: x}]')

    with pytest.raises(AttributeError):
        config.poll_interval = 1.0  # type: ignore[misc]


# Durations.


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("15s", 15.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1y", 365 * 86400.0),
        ("1h0m1s10ms", 3601.01),
        ("01s", 1.0),
    ],
)
def test_prometheus_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "15",
        "1.5s",
        "-15s",
        "+15s",
        "15S",
        "15 s",
        " 15s",
        "15sec",
        "30m1h",
        "1s1s",
        "1ms1s",
        "h",
        "1µs",
        "1ns",
        "300000y",
    ],
)
def test_non_prometheus_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.5, "500ms"), (5400.0, "1h30m"), (90 * 86400.0, "90d"), (14 * 86400.0, "2w")],
)
def test_durations_format_as_prometheus_writes_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=20 * 365 * 86_400_000))
def test_formatting_then_parsing_a_duration_round_trips(milliseconds: int) -> None:
    seconds = milliseconds / 1000

    assert parse_duration(format_duration(seconds)) == seconds


@given(st.lists(st.integers(min_value=0, max_value=99), min_size=7, max_size=7))
def test_compound_durations_add_up_their_units(amounts: list[int]) -> None:
    units = [
        ("y", 31_536_000_000),
        ("w", 604_800_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ]
    text = "".join(f"{amount}{unit}" for amount, (unit, _) in zip(amounts, units, strict=True))
    total_ms = sum(amount * ms for amount, (_, ms) in zip(amounts, units, strict=True))

    assert parse_duration(text) == total_ms / 1000


# Secrets: where they come from.


def test_server_secret_may_be_inline() -> None:
    config = parse('apps: [{app_id: 7, rooms: ["1"], server_secret: inline-value}]')

    assert config.apps[0].server_secret.reveal() == "inline-value"


def test_server_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret", "from-file")

    config = parse(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "secret"}}}]'
    )

    assert config.apps[0].server_secret.reveal() == "from-file"


def test_server_secret_file_with_crlf_ending_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"from-windows\r\n")
    (tmp_path / "secret").chmod(0o600)

    config = parse(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "secret"}}}]'
    )

    assert config.apps[0].server_secret.reveal() == "from-windows"


def test_relative_secret_file_resolves_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write_secret(tmp_path / "etc" / "zego.secret", "relative-value")
    (tmp_path / "etc" / "config.yml").write_text(
        'apps: [{app_id: 7, rooms: ["1"], server_secret_file: zego.secret}]\n', encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)

    loaded = load_config("etc/config.yml", {})

    assert loaded.config.apps[0].server_secret.reveal() == "relative-value"


def test_server_secret_env_is_read_from_the_given_environment() -> None:
    config = parse(
        'apps: [{app_id: 7, rooms: ["1"], server_secret_env: MY_SECRET}]', {"MY_SECRET": "env"}
    )

    assert config.apps[0].server_secret.reveal() == "env"


def test_environment_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZEGO_TEST_PROCESS_SECRET", "process-env")

    loaded = parse_config(
        'apps: [{app_id: 7, rooms: ["1"], server_secret_env: ZEGO_TEST_PROCESS_SECRET}]',
        "config.yml",
        CONFIGS,
    )

    assert loaded.config.apps[0].server_secret.reveal() == "process-env"


def test_callback_secret_is_optional_and_read_like_the_server_secret(tmp_path: Path) -> None:
    write_secret(tmp_path / "callback", "callback-value")

    config = parse(
        f"apps: [{{app_id: 7, rooms: ['1'], server_secret: x, "
        f"callback_secret_file: {tmp_path / 'callback'}}}]"
    )

    assert config.apps[0].callback_secret == Secret("callback-value")


def test_secret_file_readable_by_others_loads_with_a_warning(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret", "shared", mode=0o644)

    loaded = parse_config(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "secret"}}}]',
        "config.yml",
        tmp_path,
        {},
    )

    assert loaded.config.apps[0].server_secret.reveal() == "shared"
    assert loaded.warnings == [
        f"config.yml: apps[0].server_secret_file: {tmp_path / 'secret'} is readable by group "
        "or others (mode 0644); chmod 600 it"
    ]


def test_secret_file_readable_by_owner_only_gives_no_warning(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret", "private", mode=0o400)

    loaded = parse_config(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "secret"}}}]',
        "config.yml",
        tmp_path,
        {},
    )

    assert loaded.warnings == []


def test_unreadable_secret_file_is_an_error_naming_field_and_path(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (CI runs as root, so no chmod 000).
    (tmp_path / "secret").mkdir()

    errors = errors_of(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "secret"}}}]'
    )

    assert len(errors) == 1
    assert errors[0].startswith(
        f"config.yml: apps[0].server_secret_file: cannot read {tmp_path / 'secret'}: "
    )


def test_missing_secret_file_is_an_error_naming_field_and_path(tmp_path: Path) -> None:
    errors = errors_of(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "absent"}}}]'
    )

    assert errors == [
        f"config.yml: apps[0].server_secret_file: cannot read {tmp_path / 'absent'}: "
        "No such file or directory"
    ]


def test_rate_limit_above_zegos_documented_limit_is_a_warning() -> None:
    loaded = parse_config(
        'apps: [{app_id: 7, rooms: ["1"], server_secret: x, rate_limit: 20}]',
        "config.yml",
        CONFIGS,
        {},
    )

    assert loaded.config.apps[0].rate_limit == 20.0
    assert [w.split(": ")[1] for w in loaded.warnings] == ["apps[0].rate_limit"]


# Secrets: never shown.


def test_secret_hides_its_value_in_repr_str_and_format() -> None:
    secret = Secret(LEAK)

    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:s}"):
        assert shown == "Secret('********')"


def test_secret_reveals_its_value_on_request() -> None:
    assert Secret(LEAK).reveal() == LEAK


def test_secrets_compare_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"


def test_secret_has_no_attribute_dictionary_and_is_immutable() -> None:
    secret = Secret(LEAK)

    assert not hasattr(secret, "__dict__")
    with pytest.raises(AttributeError):
        secret._value = "other"


def test_secret_refuses_to_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(LEAK))


def test_secret_survives_deep_copy_without_showing_itself() -> None:
    config = parse(f'apps: [{{app_id: 7, rooms: ["1"], server_secret: "{LEAK}"}}]')

    assert copy.deepcopy(config) == config


@pytest.mark.parametrize("form", ["inline", "file", "env"])
def test_secret_value_never_appears_in_config_repr(form: str, tmp_path: Path) -> None:
    write_secret(tmp_path / "secret", LEAK)
    field = {
        "inline": f'server_secret: "{LEAK}"',
        "file": f"server_secret_file: {tmp_path / 'secret'}",
        "env": "server_secret_env: LEAKY",
    }[form]
    loaded = parse_config(
        f'apps: [{{app_id: 7, rooms: ["1"], {field}, callback_secret: "{LEAK}"}}]',
        "config.yml",
        tmp_path,
        {"LEAKY": LEAK},
    )

    assert LEAK not in repr(loaded)
    assert LEAK not in str(loaded)
    assert all(LEAK not in warning for warning in loaded.warnings)


LEAKY_MISTAKES = {
    "beside another form": f'server_secret: "{LEAK}", server_secret_env: LEAKY',
    "with a stray space": f'server_secret: "{LEAK} "',
    "in a file with two lines": "server_secret_file: two-lines.secret",
    "in a file that is not UTF-8": "server_secret_file: binary.secret",
    "as a callback secret beside another": f'server_secret: x, callback_secret: "{LEAK}", '
    "callback_secret_env: LEAKY",
    "as an unknown key's value": f'server_secret: x, server_secrets: "{LEAK}"',
    "with the rest of the app invalid": f'server_secret: "{LEAK}", rate_limit: -1, app_id: 0',
}
HEX_SECRET = "9193cc662a4c0ec135ec71fb57194b38"


@pytest.mark.parametrize("form", ["server_secret_env", "server_secret_file", "callback_secret_env"])
def test_secret_pasted_where_a_name_belongs_is_refused_without_echo(form: str) -> None:
    others = "" if form.startswith("server") else "server_secret: x, "
    inline_form = form.rsplit("_", 1)[0]
    for pasted in (HEX_SECRET, HEX_SECRET.upper(), "abcdef" + HEX_SECRET):
        errors = errors_of(f'apps: [{{app_id: 7, rooms: ["1"], {others}{form}: {pasted}}}]')

        assert errors == [
            f"config.yml: apps[0].{form}: looks like a secret itself (not shown); put it in a "
            f"file or an environment variable and name that here, or use {inline_form}"
        ]


@pytest.mark.parametrize("mistake", sorted(LEAKY_MISTAKES))
def test_secret_value_never_appears_in_error_messages(mistake: str, tmp_path: Path) -> None:
    write_secret(tmp_path / "two-lines.secret", f"{LEAK}\n{LEAK}")
    (tmp_path / "binary.secret").write_bytes(LEAK.encode() + b"\xff\xfe" + LEAK.encode())
    (tmp_path / "binary.secret").chmod(0o600)

    with pytest.raises(ConfigError) as raised:
        parse_config(
            f'apps: [{{app_id: 7, rooms: ["1"], {LEAKY_MISTAKES[mistake]}}}]',
            "config.yml",
            tmp_path,
            {"LEAKY": LEAK},
        )

    assert LEAK not in str(raised.value)
    assert LEAK not in repr(raised.value)
    assert all(LEAK not in line for line in raised.value.errors)
    assert all(LEAK not in str(arg) for arg in raised.value.args)


def test_secret_value_never_appears_when_the_whole_config_is_wrong() -> None:
    errors = errors_of(
        f'zego: {{endpoint: "https://x:{LEAK}@h/"}}\n'
        f'apps: [{{app_id: "{LEAK}", rooms: ["1"], server_secret: 5}}]',
    )

    assert len(errors) == 3
    assert all(LEAK not in line for line in errors)


# Reporting.


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of(
        "zego: {timeout: 0s, pacing: 2}\n"
        "poll_interval: 1.5s\n"
        "apps:\n"
        "  - {app_id: abc, rooms: 5, server_secret: x}\n"
        '  - {app_id: 8, rooms: ["1", "1"]}\n'
    )

    assert errors == [
        "config.yml: zego.timeout: must be longer than 0s",
        "config.yml: zego.pacing: must be a fraction of the rate limit above 0 and at most 1 "
        "(e.g. 0.95)",
        'config.yml: poll_interval: "1.5s" is not a duration; write e.g. 500ms, 15s or 1h30m: '
        "whole numbers with units ms s m h d w y",
        "config.yml: apps[0].app_id: must be an integer, got a string",
        'config.yml: apps[0].rooms: must be a non-empty list of room ids or "*"',
        'config.yml: apps[1].rooms[1]: duplicate room id "1" (first at apps[1].rooms[0])',
        "config.yml: apps[1]: one of server_secret, server_secret_file, server_secret_env "
        "is required",
    ]


def test_config_error_str_is_its_lines_joined() -> None:
    error = ConfigError(["a.yml: x: bad", "a.yml: y: worse"])

    assert str(error) == "a.yml: x: bad\na.yml: y: worse"
    assert error.errors == ["a.yml: x: bad", "a.yml: y: worse"]


def test_missing_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "absent.yml")

    assert str(raised.value) == (
        f"{tmp_path / 'absent.yml'}: cannot read the config file: No such file or directory"
    )


def test_loaded_config_carries_config_and_warnings() -> None:
    loaded = load_config(CONFIGS / "minimal.ok.yml", {})

    assert isinstance(loaded, LoadedConfig)
    assert loaded.warnings == []


# The file boundary: regular files only, bounded in size.

MINIMAL = 'apps: [{app_id: 7, rooms: ["1"], server_secret: x}]\n'


@contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO at `path`. If opening it blocks, a writer comes after 5s and leaves at once, so a
    reader that waits sees an empty file and the test fails instead of hanging."""
    os.mkfifo(path)
    finished = threading.Event()

    def rescue() -> None:
        if not finished.wait(5):
            with suppress(OSError):  # nobody was waiting after all
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    rescuer = threading.Thread(target=rescue, daemon=True)
    rescuer.start()
    try:
        yield path
    finally:
        finished.set()
        rescuer.join()


def test_config_file_that_is_a_fifo_is_refused_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    with fifo(tmp_path / "config.yml") as path, pytest.raises(ConfigError) as raised:
        load_config(path, {})

    assert str(raised.value) == (
        f"{path}: cannot read the config file: it is a FIFO, not a regular file"
    )


def test_config_file_that_is_a_device_is_refused_without_reading_it() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("/dev/zero", {})

    assert str(raised.value) == (
        "/dev/zero: cannot read the config file: it is a character device, not a regular file"
    )


def test_config_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_bytes(MINIMAL.encode() + b"#" * (MAX_CONFIG_BYTES - len(MINIMAL)) + b"\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path, {})

    assert str(raised.value) == f"{path}: cannot read the config file: it is larger than 16 MiB"


def test_size_limit_leaves_room_for_100000_of_the_longest_room_ids() -> None:
    rooms = "".join(f'      - "{index:0128d}"\n' for index in range(100_000))
    text = f"apps:\n  - app_id: 7\n    server_secret_file: secret\n    rooms:\n{rooms}"

    assert len(text.encode()) < MAX_CONFIG_BYTES


@pytest.mark.parametrize("form", ["server_secret_file", "callback_secret_file"])
def test_secret_file_that_is_a_fifo_is_refused_naming_field_and_file(
    form: str, tmp_path: Path
) -> None:
    others = "" if form.startswith("server") else "server_secret: x, "
    with fifo(tmp_path / "secret") as path:
        errors = errors_of(f'apps: [{{app_id: 7, rooms: ["1"], {others}{form}: {path}}}]')

    assert errors == [
        f"config.yml: apps[0].{form}: cannot read {path}: it is a FIFO, not a regular file"
    ]


@pytest.mark.parametrize("form", ["server_secret_file", "callback_secret_file"])
def test_secret_file_that_is_a_device_is_refused_without_reading_it(form: str) -> None:
    others = "" if form.startswith("server") else "server_secret: x, "

    errors = errors_of(f'apps: [{{app_id: 7, rooms: ["1"], {others}{form}: /dev/zero}}]')

    assert errors == [
        f"config.yml: apps[0].{form}: cannot read /dev/zero: "
        "it is a character device, not a regular file"
    ]


def test_secret_file_at_the_size_limit_loads_and_one_byte_more_is_refused(
    tmp_path: Path,
) -> None:
    write_secret(tmp_path / "at-limit", "a" * (MAX_SECRET_FILE_BYTES - 1))
    write_secret(tmp_path / "over-limit", "a" * MAX_SECRET_FILE_BYTES)

    loaded = parse(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "at-limit"}}}]'
    )
    errors = errors_of(
        f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {tmp_path / "over-limit"}}}]'
    )

    assert loaded.apps[0].server_secret.reveal() == "a" * (MAX_SECRET_FILE_BYTES - 1)
    assert errors == [
        f"config.yml: apps[0].server_secret_file: cannot read {tmp_path / 'over-limit'}: "
        "it is larger than 64 KiB"
    ]


@pytest.mark.parametrize(
    "name",
    ['"a\\0b"', '"a\\ud800b"', '"~a\\0b/secret"', '"~\\udcff/secret"'],
    ids=["nul", "lone surrogate", "nul in user", "surrogate in user"],
)
def test_secret_file_name_no_file_system_can_hold_is_refused(name: str) -> None:
    errors = errors_of(f'apps: [{{app_id: 7, rooms: ["1"], server_secret_file: {name}}}]')

    assert errors == [
        "config.yml: apps[0].server_secret_file: must be a file path without control "
        "characters or invalid Unicode"
    ]


def test_secret_file_under_an_unknown_users_home_is_a_missing_file() -> None:
    errors = errors_of(
        'apps: [{app_id: 7, rooms: ["1"], server_secret_file: ~no-such-user-here/secret}]'
    )

    assert errors == [
        f"config.yml: apps[0].server_secret_file: cannot read "
        f"{CONFIGS / '~no-such-user-here/secret'}: No such file or directory"
    ]


# The YAML boundary: bounded nesting and integers, and nothing but a ConfigError comes out.


@pytest.mark.parametrize("field", ["poll_interval", "app_id"])
def test_integer_of_5000_digits_is_refused_naming_line_and_column(field: str) -> None:
    digits = "1" * 5000
    text = (
        f"poll_interval: {digits}\n{MINIMAL}"
        if field == "poll_interval"
        else f"apps: [{{app_id: {digits}, rooms: ['1'], server_secret: x}}]\n"
    )

    errors = errors_of(text)

    column = 16 if field == "poll_interval" else 17
    assert errors == [
        f"config.yml: line 1, column {column}: invalid YAML: an integer longer than 100 characters"
    ]


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 2000 + "]" * 2000,
        "{a: " * 2000 + "1" + "}" * 2000,
        "\n".join(" " * depth + "a:" for depth in range(2000)),
    ],
    ids=["flow lists", "flow mappings", "block mappings"],
)
def test_nesting_2000_deep_is_refused_as_too_deep(nested: str) -> None:
    errors = errors_of(f"{MINIMAL}zego:\n {nested.replace(chr(10), chr(10) + ' ')}\n")

    assert len(errors) == 1
    assert errors[0].startswith("config.yml: line ")
    assert errors[0].endswith("invalid YAML: nested deeper than 64 levels")


def test_nesting_within_the_limit_is_read_as_usual() -> None:
    errors = errors_of(f"{MINIMAL}extra: {'[' * 60}{']' * 60}\n")

    assert errors == ["config.yml: extra: unknown key (allowed: zego, poll_interval, apps)"]


@pytest.mark.parametrize(
    "value", ["2020-13-45", "!!bool maybe", "!!int abc", "!!float x", "!!timestamp soon"]
)
def test_value_its_yaml_tag_cannot_hold_is_a_yaml_error(value: str) -> None:
    errors = errors_of(f"poll_interval: {value}\n{MINIMAL}")

    assert len(errors) == 1
    assert errors[0].startswith("config.yml: line 1, column 16: invalid YAML: not a valid YAML ")


def test_second_merge_key_in_one_mapping_is_a_duplicate_key() -> None:
    errors = errors_of(
        "defaults: &d {rate_limit: 5}\n"
        'apps: [{<<: *d, <<: *d, app_id: 7, rooms: ["1"], server_secret: x}]\n'
    )

    assert errors == [
        'config.yml: line 2, column 17: invalid YAML: duplicate key "<<" (write <<: [*a, *b])'
    ]


def test_control_character_in_the_text_is_one_line_naming_its_position() -> None:
    errors = errors_of(f"poll_interval: 15s\x01\n{MINIMAL}")

    assert errors == ["config.yml: character 19: invalid YAML: the character U+0001 is not allowed"]


# Cost: every check is linear in the size of the config.


def test_100000_rooms_load() -> None:
    rooms = ", ".join(f'"room-{index}"' for index in range(100_000))

    config = parse(f"apps: [{{app_id: 7, server_secret: x, rooms: [{rooms}]}}]")

    assert config.apps[0].rooms is not None
    assert len(config.apps[0].rooms) == 100_000


class CountedRoomId(str):
    """A room id that counts how often it is compared with another."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountedRoomId.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_duplicate_room_check_compares_each_room_id_a_bounded_number_of_times() -> None:
    room_ids = [CountedRoomId(f"room-{index}") for index in range(2000)]
    reader = _Reader(_Problems("config.yml"), CONFIGS, {})
    CountedRoomId.comparisons = 0

    rooms = reader.rooms([*room_ids, room_ids[0]], "apps[0].rooms")

    assert rooms is None
    assert reader.problems.errors == [
        'config.yml: apps[0].rooms[2000]: duplicate room id "room-0" (first at apps[0].rooms[0])'
    ]
    assert CountedRoomId.comparisons <= 2 * len(room_ids)


# Room ids become label values, log fields and store keys.


@pytest.mark.parametrize(
    "room",
    ["\\ud800", "\\udcff", "a\\x01b", "\\e[31mred", "a\\x7fb", "a\\u202eb", "a\\u2028b"],
    ids=[
        "lone high surrogate",
        "lone low surrogate",
        "control",
        "escape",
        "delete",
        "bidi override",
        "line separator",
    ],
)
def test_room_id_with_control_characters_or_lone_surrogates_is_refused(room: str) -> None:
    errors = errors_of(f'apps: [{{app_id: 7, rooms: ["ok", "{room}"], server_secret: x}}]')

    assert errors == [
        "config.yml: apps[0].rooms[1]: room ids must not have surrounding spaces, control "
        "characters or invalid Unicode"
    ]


def test_room_ids_in_any_script_are_accepted() -> None:
    config = parse('apps: [{app_id: 7, rooms: ["会议室-1", "комната"], server_secret: x}]')

    assert config.apps[0].rooms == ("会议室-1", "комната")


@pytest.mark.parametrize("secret", ['"ab\\x01cd"', '"ab\\ud800cd"'], ids=["control", "surrogate"])
def test_secret_with_control_characters_or_lone_surrogates_is_refused(secret: str) -> None:
    errors = errors_of(f'apps: [{{app_id: 7, rooms: ["1"], server_secret: {secret}}}]')

    assert errors == [
        "config.yml: apps[0].server_secret: contains control characters or invalid Unicode, "
        "which ZEGO secrets never do"
    ]


def test_secret_from_the_environment_with_undecodable_bytes_is_refused() -> None:
    errors = errors_of(
        'apps: [{app_id: 7, rooms: ["1"], server_secret_env: SECRET}]', {"SECRET": "ab\udcffcd"}
    )

    assert errors == [
        "config.yml: apps[0].server_secret_env: contains control characters or invalid "
        "Unicode, which ZEGO secrets never do"
    ]


def test_endpoint_with_control_characters_is_refused() -> None:
    errors = errors_of(f'zego: {{endpoint: "https://h\\x01st/"}}\n{MINIMAL}')

    assert errors == ["config.yml: zego.endpoint: must not contain spaces or control characters"]


def test_unknown_key_with_control_characters_is_shown_escaped() -> None:
    errors = errors_of(f'"\\e[31mred": 1\n{MINIMAL}')

    assert errors == ["config.yml: unknown key '\\x1b[31mred' (allowed: zego, poll_interval, apps)"]


# Values that could be secrets are never echoed, wherever they were pasted.

NOT_SHOWN = "(value not shown: it looks like a secret)"
SECRET_AS_VALUE = {
    "poll_interval": f"poll_interval: {HEX_SECRET}\n{MINIMAL}",
    "zego.timeout": f"zego: {{timeout: {HEX_SECRET}}}\n{MINIMAL}",
    "a room id": f'apps: [{{app_id: 7, rooms: "{HEX_SECRET}", server_secret: x}}]',
    "a duplicate room id": f"apps: [{{app_id: 7, rooms: [{HEX_SECRET}, {HEX_SECRET}], "
    "server_secret: x}]",
    "a room id with a prefix": f'apps: [{{app_id: 7, rooms: ["r-{HEX_SECRET}", '
    f'"r-{HEX_SECRET}"], server_secret: x}}]',
    "an unknown key": f"{HEX_SECRET}: 1\n{MINIMAL}",
    "an unknown key in an app": f'apps: [{{app_id: 7, rooms: ["1"], server_secret: x, '
    f"{HEX_SECRET}: 1}}]",
    "an unknown key's value": f"pol_interval: {HEX_SECRET}\n{MINIMAL}",
    "an app_id": f'apps: [{{app_id: "{HEX_SECRET}", rooms: ["1"], server_secret: x}}]',
    "an unquoted numeric app_id": f'apps: [{{app_id: {"9" * 32}, rooms: ["1"], server_secret: x}}]',
    "an endpoint": f"zego: {{endpoint: {HEX_SECRET}}}\n{MINIMAL}",
    "an endpoint's path": f"zego: {{endpoint: 'https://h/{HEX_SECRET}?q'}}\n{MINIMAL}",
    "a YAML tag": f"poll_interval: !{HEX_SECRET} 1\n{MINIMAL}",
    "a YAML alias": f"poll_interval: *{HEX_SECRET}\n{MINIMAL}",
    "a duplicate key": f"{HEX_SECRET}: 1\n{HEX_SECRET}: 2\n{MINIMAL}",
    "a binary key": f"? !!binary {HEX_SECRET}\n: 1\n{MINIMAL}",
    "a secret file's directory": f'apps: [{{app_id: 7, rooms: ["1"], '
    f"server_secret_file: /run/{HEX_SECRET}/secret}}]",
    "an environment variable name with a prefix": f'apps: [{{app_id: 7, rooms: ["1"], '
    f"server_secret_env: S_{HEX_SECRET}}}]",
}


@pytest.mark.parametrize("place", sorted(SECRET_AS_VALUE))
def test_secret_pasted_as_another_value_is_never_echoed(place: str) -> None:
    errors = errors_of(SECRET_AS_VALUE[place])

    assert errors
    assert all(HEX_SECRET not in line and "\n" not in line for line in errors)
    assert all("9" * 16 not in line for line in errors)


def test_withheld_value_still_names_its_field() -> None:
    errors = errors_of(SECRET_AS_VALUE["poll_interval"])

    assert errors == [
        f"config.yml: poll_interval: {NOT_SHOWN} is not a duration; write e.g. 500ms, 15s or "
        "1h30m: whole numbers with units ms s m h d w y"
    ]
