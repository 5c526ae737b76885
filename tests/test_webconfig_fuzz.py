"""Properties of --web.config.file: any file is either settings or one clear WebConfigError
(never another exception, never a blocked read), and a reload applies exactly when it does not
weaken security, keeping the old settings otherwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.serve.webconfig import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    EXTRA_HEADERS,
    TLS_VERSIONS,
    WebConfig,
    WebConfigError,
    WebSettings,
    load_web_config,
    parse_web_config,
)

BOUNDED = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])
HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real certificate, key and CA files, and things that are not files, for configs to name."""
    path = tmp_path_factory.mktemp("webconfig")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    leaf.private_key_pem.write_to_path(str(path / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(path / "server.crt"))
    ca.cert_pem.write_to_path(str(path / "client-ca.crt"))
    os.mkfifo(path / "fifo")
    (path / "dir").mkdir()
    return path


def replace_file(path: Path, data: str | bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


# Arbitrary files


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
NAMES = ["server.crt", "server.key", "client-ca.crt", "missing.crt", "fifo", "dir", "/dev/zero",
         "", ".", *TLS_VERSIONS, *CLIENT_AUTH_TYPES, *EXTRA_HEADERS, "deny", "nosniff", HASH,
         HASH.replace("$04$", "$99$"), HASH[:-1], *CIPHER_SUITES, *CURVES, "CurveP257", "1s",
         "0", "1m30s", "500ms", "-1s", "1.5h", "prometheus@example.com", "127.0.0.1",
         "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
                    st.sampled_from(NAMES))
KEYS = st.one_of(st.none(), st.booleans(), st.integers(), TEXT, st.sampled_from(NAMES))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)


def section(keys: list[str]) -> st.SearchStrategy[Any]:
    """A mapping of some of `keys` (and now and then another key) to random values."""
    known = st.fixed_dictionaries({}, optional={key: VALUES for key in keys})
    return st.one_of(known, st.builds(lambda d, extra: {**d, **extra}, known,
                                      st.dictionaries(KEYS, VALUES, max_size=2)), VALUES)


TLS_KEYS = ["cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version", "prefer_server_cipher_suites", "cipher_suites", "curve_preferences",
            "cert", "key", "client_ca", "client_allowed_sans"]
# Pieces that make a well-formed value of a toolkit key likely, so the checks past the types run.
TLS_VALUES = st.fixed_dictionaries({}, optional={
    "cert_file": st.just("server.crt"), "key_file": st.just("server.key"),
    "client_auth_type": st.sampled_from(list(CLIENT_AUTH_TYPES)),
    "client_ca_file": st.sampled_from(["client-ca.crt", "missing.crt", ""]),
    "cipher_suites": st.lists(st.sampled_from([*CIPHER_SUITES, "TLS_NOT_A_SUITE"]), max_size=4),
    "curve_preferences": st.lists(st.sampled_from([*CURVES, "CurveP257"]), max_size=3),
    "client_allowed_sans": st.lists(st.sampled_from(NAMES), max_size=3),
    "min_version": st.sampled_from(list(TLS_VERSIONS)),
    "max_version": st.sampled_from(list(TLS_VERSIONS)),
    "cert": st.sampled_from(NAMES), "key": st.sampled_from(NAMES),
    "client_ca": st.sampled_from(NAMES)})
RATE_LIMITS = st.one_of(section(["interval", "burst"]), st.fixed_dictionaries({}, optional={
    "interval": st.one_of(st.sampled_from(NAMES), st.integers(-2, 2)),
    "burst": st.one_of(st.integers(-2, 5), SCALARS)}))
DOCUMENTS = st.one_of(VALUES, st.fixed_dictionaries({}, optional={
    "tls_server_config": st.one_of(section(TLS_KEYS), TLS_VALUES),
    "http_server_config": st.one_of(
        section(["http2"]),
        st.fixed_dictionaries({"headers": st.dictionaries(
            st.one_of(st.sampled_from([*EXTRA_HEADERS, "Server", "x-frame-options"]), KEYS),
            VALUES, max_size=4)})),
    "basic_auth_users": st.one_of(st.dictionaries(KEYS, SCALARS, max_size=3), VALUES),
    "rate_limit": st.one_of(VALUES, RATE_LIMITS),
}))


def assert_settings_or_one_clear_error(path: Path) -> None:
    try:
        web_settings, _ = load_web_config(path)  # parse_web_config, then the files it names
    except WebConfigError as error:
        assert error.errors
        for line in error.errors:
            assert line.startswith(f"{path}: ")
            assert line.isprintable()  # one line: no newline, no control character
    else:
        assert isinstance(web_settings, WebSettings)


@BOUNDED
@given(document=DOCUMENTS)
def test_any_yaml_document_is_settings_or_a_web_config_error(
        workdir: Path, document: Any) -> None:
    path = workdir / "web.yml"
    replace_file(path, yaml.safe_dump(document, allow_unicode=True))
    assert_settings_or_one_clear_error(path)


@BOUNDED
@given(data=st.one_of(st.binary(max_size=200), TEXT.map(str.encode),
                      st.text(st.sampled_from("[]{}:,-&*!|>'\"#%@` \n\tab1?<"), max_size=60)
                      .map(str.encode)))
def test_any_bytes_are_settings_or_a_web_config_error(workdir: Path, data: bytes) -> None:
    path = workdir / "raw.yml"
    replace_file(path, data)
    assert_settings_or_one_clear_error(path)


# The reload rule

VERSIONS = list(TLS_VERSIONS)
# What a client must show, by what this server does: nothing, a verified certificate if it
# sends one, or a verified certificate.
DEMANDS = {"NoClientCert": 0, "RequestClientCert": 1, "VerifyClientCertIfGiven": 1,
           "RequireAnyClientCert": 2, "RequireAndVerifyClientCert": 2}


OTHER_SUITES = ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if draw(st.booleans()):
        low = draw(st.sampled_from(VERSIONS))
        high = draw(st.sampled_from(VERSIONS[VERSIONS.index(low):]))
        tls: dict[str, Any] = {"cert_file": "server.crt", "key_file": "server.key",
                               "min_version": low, "max_version": high}
        auth = draw(st.sampled_from(sorted(DEMANDS)))
        if auth != "NoClientCert":
            tls |= {"client_auth_type": auth, "client_ca_file": "client-ca.crt"}
        if DEMANDS[auth] == 2 and draw(st.booleans()):
            tls["client_allowed_sans"] = draw(st.lists(st.sampled_from(["a.example", "b"]),
                                                       max_size=2))
        if draw(st.booleans()):  # with the suite HTTP/2 needs, as the toolkit requires
            tls["cipher_suites"] = ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", *draw(
                st.lists(st.sampled_from(OTHER_SUITES), unique=True, max_size=2))]
        document["tls_server_config"] = tls
    if draw(st.booleans()):
        document["rate_limit"] = {"interval": draw(st.sampled_from(["0", "1s", "1h"])),
                                  "burst": draw(st.integers(0, 3))}
    users = draw(st.sets(st.sampled_from(["prometheus", "grafana"])))
    if users or draw(st.booleans()):
        document["basic_auth_users"] = {user: HASH for user in sorted(users)}
    if draw(st.booleans()):
        document["http_server_config"] = {"headers": {"X-Frame-Options": "deny"}}
    return document


def weakens(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """The rule, stated on the documents: users all removed, TLS added or removed, a lower
    min_version, less asked of client certificates, or client_allowed_sans dropped (rate_limit
    and cipher_suites change live)."""
    if old.get("basic_auth_users") and not new.get("basic_auth_users"):
        return True
    if ("tls_server_config" in old) != ("tls_server_config" in new):
        return True
    if "tls_server_config" not in old:
        return False
    was, now = old["tls_server_config"], new["tls_server_config"]
    return (VERSIONS.index(now["min_version"]) < VERSIONS.index(was["min_version"])
            or DEMANDS[now.get("client_auth_type", "NoClientCert")]
            < DEMANDS[was.get("client_auth_type", "NoClientCert")]
            or ("client_allowed_sans" in was and "client_allowed_sans" not in now))


def as_text(document: dict[str, Any], empty: str) -> str:
    return yaml.safe_dump(document) if document else empty


@BOUNDED
@given(old=valid_documents(), new=valid_documents(),
       empty=st.sampled_from(["", "{}\n", "# nothing here\n", "basic_auth_users: {}\n"]))
def test_a_reload_applies_exactly_when_it_does_not_weaken_security(
        workdir: Path, old: dict[str, Any], new: dict[str, Any], empty: str) -> None:
    path = workdir / "reload.yml"
    replace_file(path, as_text(old, empty))
    web_config = WebConfig(path, check_interval=0)
    results: list[str] = []
    web_config.on_reload = results.append
    before, context = web_config.settings, web_config._context
    replace_file(path, as_text(new, empty))
    applied = web_config.reload_if_changed(force=True)
    assert applied == (not weakens(old, new))
    assert results == ["applied" if applied else "refused"]
    if applied:
        assert web_config.settings == parse_web_config(path)
    else:
        assert web_config.settings == before
        assert web_config._context is context
