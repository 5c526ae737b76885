"""The exporter-toolkit's own web config cases (prometheus/exporter-toolkit, web/testdata and the
table in web/tls_config_test.go): each file loads here exactly when it loads in the toolkit, but
for the documented differences, and a refused one says why in the toolkit's terms.

The YAML files are in tests/toolkit/ (see its README); the certificates and keys they name are
made here with trustme, under the toolkit's file names.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from exporter.serve.webconfig import WebConfigError, load_web_config

TOOLKIT_DATA = Path(__file__).parent / "toolkit"
INLINE = "web_config_noAuth_tlsInline.good.yml"
MISSING = "somefile"  # the toolkit's case for a web config file that does not exist


@dataclass(frozen=True)
class Case:
    """A toolkit file: the toolkit's verdict (None: it loads; else its ErrorMap name) and ours
    (None: it loads; else a pattern our one-line error matches)."""

    toolkit: str | None
    ours: str | None


CASES: dict[str, Case] = {
    # TestYAMLFiles
    MISSING: Case("No such file", r"cannot read the web config file"),
    "web_config_empty.yml": Case(None, None),
    "web_config_junk.yml": Case("YAML error", r"must be a mapping"),
    "web_config_junk_key.yml": Case("YAML error", r"cert_filse: unknown setting"),
    "web_config_noAuth_certPath_empty.bad.yml": Case(
        "Invalid Cert or CertPath", r"cert_file: missing one of cert or cert_file"),
    "web_config_noAuth_cert_empty.bad.yml": Case(
        "Invalid Cert or CertPath", r"cert_file: missing one of cert or cert_file"),
    "web_config_noAuth_keyPath_empty.bad.yml": Case(
        "Invalid Key or KeyPath", r"key_file: missing one of key or key_file"),
    "web_config_noAuth_key_empty.bad.yml": Case(
        "Invalid Key or KeyPath", r"key_file: missing one of key or key_file"),
    "web_config_noAuth_certPath_keyPath_empty.bad.yml": Case(
        "Invalid Cert or CertPath", r"cert_file: missing one of cert or cert_file"),
    "web_config_noAuth_certPath_invalid.bad.yml": Case(
        "No such file", r"cannot load cert_file .*somefile.*No such file"),
    "web_config_noAuth_keyPath_invalid.bad.yml": Case(
        "No such file", r"cannot load cert_file .*server\.cert.*No such file"),
    "web_config_noAuth_certPath_keyPath_invalid.bad.yml": Case(
        "No such file", r"cannot load cert_file .*somefile.*No such file"),
    "web_config_noAuth.bad.yml": Case(
        "ClientCA set without policy",
        r"client CA's have been configured without a Client Auth Policy"),
    # The toolkit reads the CA file before it checks the policy; the policy is checked first here.
    "web_config_auth_clientCAs_invalid.bad.yml": Case(
        "No such file", r"client CA's have been configured without a Client Auth Policy"),
    "web_config_auth_user_list_invalid.bad.yml": Case(
        "Bad password", r"basic_auth_users.john: is not a bcrypt hash"),
    "web_config_noAuth_inventedCiphers.bad.yml": Case(
        "Unknown cipher", r"unknown cipher: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048"),
    "web_config_noAuth_inventedCurves.bad.yml": Case(
        "Unknown curve", r"unknown curve: CurveP257"),
    "web_config_noAuth_wrongTLSVersion.bad.yml": Case(
        "Unknown TLS version", r"min_version: 'TLS111' is not one of"),
    # TestServerBehaviour: the file loads; what a client then gets is tested over HTTPS in
    # test_web_security.py.
    "web_config_noAuth.good.yml": Case(None, None),
    INLINE: Case(None, None),
    "web_config_noAuth_allCiphers.good.yml": Case(None, None),
    "web_config_noAuth_someCiphers.good.yml": Case(None, None),
    "web_config_noAuth_someCiphers_noOrder.good.yml": Case(None, None),
    "web_config_noAuth_allCurves.good.yml": Case(None, None),
    "web_config_noAuth_someCurves.good.yml": Case(None, None),
    "web_config_noAuth_noHTTP2.good.yml": Case(None, None),
    "web_config_noAuth_noHTTP2Cipher.bad.yml": Case(
        "No HTTP2 cipher", r"TLSConfig.CipherSuites is missing an HTTP/2-required"),
    "web_config_headers.good.yml": Case(None, None),
    "web_config_headers_content_type_options.bad.yml": Case(
        "Invalid value", r"X-Content-Type-Options: 'sniff' is not one of"),
    "web_config_headers_frame_options.bad.yml": Case(
        "Invalid value", r"X-Frame-Options: 'foo' is not one of"),
    "web_config_headers_extra_header.bad.yml": Case(
        "Invalid header", r"headers.Content-Type: cannot be configured"),
    "tls_config_noAuth.requireanyclientcert.good.yml": Case(None, None),
    "tls_config_noAuth.requireandverifyclientcert.good.yml": Case(None, None),
    "web_config_auth_client_san.good.yaml": Case(None, None),
    "web_config_auth_client_san.bad.yaml": Case(None, None),  # the client is refused, not the file
    "web_config_rate_limiter_nonblocking.yaml": Case(None, None),
    "web_config_rate_limiter_one_second.yaml": Case(None, None),
    # TestConfigReloading
    "web_config_noAuth.good.blocking.yml": Case(None, None),
    # TestUsers
    "web_config_users_noTLS.good.yml": Case(None, None),
    "web_config_users.good.yml": Case(None, None),
}

# Files whose verdict here differs from the toolkit's, and why. Empty: every verdict matches.
# (What a loaded file then does can still differ: see DIFFERENT_BEHAVIOUR.)
DIFFERENT_VERDICTS: dict[str, str] = {}

# Files that load in both but serve differently, because Python's ssl is not Go's crypto/tls.
DIFFERENT_BEHAVIOUR = {
    "tls_config_noAuth.requireanyclientcert.good.yml":
        "RequireAnyClientCert: Go accepts any client certificate; Python's ssl cannot ask for "
        "one without verifying it, so it must come from client_ca_file (a warning says so)",
    "web_config_noAuth_allCurves.good.yml":
        "curve_preferences: Python 3.11's ssl sets one curve, so only the first this OpenSSL "
        "supports (CurveP256) is offered (a warning says so); X25519MLKEM768 needs OpenSSL 3.5",
}


@pytest.fixture(scope="module")
def toolkit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toolkit's YAML files next to certificates and keys with the toolkit's names."""
    path = tmp_path_factory.mktemp("toolkit")
    for source in TOOLKIT_DATA.iterdir():
        if source.suffix in (".yml", ".yaml"):
            shutil.copy(source, path / source.name)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(path / "server.crt"))
    server.private_key_pem.write_to_path(str(path / "server.key"))
    ca.cert_pem.write_to_path(str(path / "tls-ca-chain.pem"))
    for name, identities in (("client_selfsigned", ("prometheus@example.com",)),
                             ("client2_selfsigned", ("test3",))):
        client_ca = trustme.CA()
        client = client_ca.issue_cert(*identities)
        client_ca.cert_pem.write_to_path(str(path / f"{name}.pem"))
        client.private_key_and_cert_chain_pem.write_to_path(str(path / f"{name}.key"))
    # The toolkit's inline case, with this run's certificate and key inline.
    inline = server.cert_chain_pems[0].bytes().decode().replace("\n", "\n    ")
    key = server.private_key_pem.bytes().decode().replace("\n", "\n    ")
    (path / INLINE).write_text(f"tls_server_config:\n  cert: |\n    {inline.rstrip()}\n"
                               f"  key: |\n    {key.rstrip()}\n"
                               '  client_auth_type: "VerifyClientCertIfGiven"\n')
    return path


def our_verdict(path: Path) -> str | None:
    """None if the file loads (settings and certificates), else its error lines."""
    try:
        load_web_config(path)
    except WebConfigError as error:
        return str(error)
    return None


def test_every_toolkit_file_is_a_case() -> None:
    files = {p.name for p in TOOLKIT_DATA.iterdir() if p.suffix in (".yml", ".yaml")}
    assert files | {INLINE, MISSING} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_toolkit_file_gets_our_expected_verdict(name: str, toolkit_dir: Path) -> None:
    verdict = our_verdict(toolkit_dir / name)
    expected = CASES[name].ours
    if expected is None:
        assert verdict is None
    else:
        assert verdict is not None
        assert re.search(expected, verdict), verdict  # among its problems, one line each


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_toolkit_file_loads_here_exactly_when_it_loads_in_the_toolkit(
        name: str, toolkit_dir: Path) -> None:
    loads_here = our_verdict(toolkit_dir / name) is None
    loads_there = CASES[name].toolkit is None
    assert (loads_here == loads_there) != (name in DIFFERENT_VERDICTS)


def test_the_documented_differences_name_real_cases() -> None:
    assert set(DIFFERENT_VERDICTS) <= set(CASES)
    assert set(DIFFERENT_BEHAVIOUR) <= set(CASES)
    assert all(CASES[name].toolkit is None for name in DIFFERENT_BEHAVIOUR)


def test_the_toolkit_files_that_load_with_a_caveat_say_so(toolkit_dir: Path) -> None:
    for name in DIFFERENT_BEHAVIOUR:
        settings, _ = load_web_config(toolkit_dir / name)
        assert settings.warnings, name
