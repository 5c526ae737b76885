"""Serving securely: --web.config.file (TLS, client certificates, basic auth, headers, rotation)
and the request limits, over real TLS with certificates made here and real clients."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import structlog
import trustme
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import main
from exporter.config import Secret
from exporter.daemon import Exporter, ListenAddress
from exporter.demo import free_port
from exporter.serve import webconfig
from exporter.serve.web import ServerLimits
from exporter.serve.webconfig import WebConfig, _PasswordCheck, parse_web_config
from tests.conftest import StartExporter, make_config

METRIC = "zego_cloudrecord_exporter_build_info"


def bcrypt_hash(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()  # 4: fast tests


def write_pem(blob: trustme.Blob, path: Path) -> Path:
    blob.write_to_path(str(path))
    return path


def replace_file(path: Path, text: str) -> None:
    """Write a new version as deployment tools do: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Pki:
    ca: trustme.CA
    client_ca: trustme.CA
    dir: Path

    def server_files(self, ca: trustme.CA | None = None, name: str = "server") -> None:
        leaf = (ca or self.ca).issue_cert("localhost", "127.0.0.1")
        write_pem(leaf.private_key_pem, self.dir / f"{name}.key.tmp")
        leaf.cert_chain_pems[0].write_to_path(str(self.dir / f"{name}.crt.tmp"))
        for blob in leaf.cert_chain_pems[1:]:
            blob.write_to_path(str(self.dir / f"{name}.crt.tmp"), append=True)
        os.replace(self.dir / f"{name}.key.tmp", self.dir / f"{name}.key")
        os.replace(self.dir / f"{name}.crt.tmp", self.dir / f"{name}.crt")

    def client_context(self, trust: trustme.CA | None = None, cert_from: trustme.CA | None = None,
                       max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (trust or self.ca).configure_trust(context)
        if cert_from is not None:
            cert_from.issue_cert("prometheus@example.com").configure_cert(context)
        if max_version is not None:
            context.maximum_version = max_version
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(trustme.CA(), trustme.CA(), tmp_path)
    pki.server_files()
    write_pem(pki.client_ca.cert_pem, tmp_path / "client-ca.crt")
    return pki




def web_config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web-config.yml"
    replace_file(path, text)
    return path


TLS_ONLY = """
tls_server_config:
  cert_file: server.crt
  key_file: server.key
"""
MUTUAL_TLS = """
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: client-ca.crt
"""


def with_users(base: str, **users: str) -> str:
    lines = "".join(f"  {name}: {bcrypt_hash(password)}\n" for name, password in users.items())
    return f"{base}\nbasic_auth_users:\n{lines}"


async def fetch(url: str, context: ssl.SSLContext | None = None,
                auth: tuple[str, str] | None = None, method: str = "GET",
                data: bytes | None = None, source: str | None = None
                ) -> tuple[int, dict[str, str], str]:
    """One request on a new connection, from the loopback address `source` if given."""
    headers = {}
    if auth is not None:
        user, password = auth
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()
                                                               ).decode()
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as http, http.request(
            method, url, ssl=context if context is not None else True, headers=headers,
            data=data) as response:
        return response.status, dict(response.headers), await response.text()


async def tls_exchange(port: int, context: ssl.SSLContext) -> bytes:
    """A raw TLS connection (asyncio + ssl): what comes back for one request, b"" if the server
    hangs up; raises when the handshake fails."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost")
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), timeout=5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def metric_names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


# Basic auth


async def test_wrong_password_is_refused_with_401_and_a_basic_challenge(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="right horse"))
    exporter = await serve(WebConfig(path))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    for auth in (("prometheus", "wrong"), ("nobody", "right horse"), None):
        status, headers, body = await fetch(url, pki.client_context(), auth)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic")
        assert METRIC not in body


async def test_right_password_gets_the_metrics(pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="right horse"))
    exporter = await serve(WebConfig(path))
    status, _, body = await fetch(f"https://localhost:{exporter.bound_port}/metrics",
                                  pki.client_context(), ("prometheus", "right horse"))
    assert status == 200
    assert METRIC in metric_names(body)


async def test_health_endpoints_stay_open_but_the_landing_page_does_not(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="pw"))
    exporter = await serve(WebConfig(path))
    base = f"https://localhost:{exporter.bound_port}"
    assert (await fetch(f"{base}/-/healthy", pki.client_context()))[0] == 200
    assert (await fetch(f"{base}/-/ready", pki.client_context()))[0] == 503  # no cycle yet
    assert (await fetch(f"{base}/", pki.client_context()))[0] == 401
    # No other spelling of a path reaches a protected route without a password.
    assert (await fetch(f"{base}/-/healthy/../metrics", pki.client_context()))[0] == 401
    assert (await fetch(f"{base}/-/healthy/%2e%2e/metrics", pki.client_context()))[0] in (
        401, 404)


async def test_a_good_password_check_is_cached_keyed_without_the_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    check = _PasswordCheck(ttl=60)
    users = {"prometheus": bcrypt_hash("s3cret-pass").encode()}
    assert await check.check(users, "prometheus", b"s3cret-pass")
    assert await check.check(users, "prometheus", b"s3cret-pass")
    assert not await check.check(users, "prometheus", b"wrong")
    assert not await check.check(users, "prometheus", b"wrong")  # failures are not cached
    assert len(calls) == 3
    assert all(b"s3cret-pass" not in key for key in check._good)
    # A new hash for the user (a changed password) misses the cache.
    assert not await check.check({"prometheus": bcrypt_hash("other").encode()}, "prometheus",
                                 b"s3cret-pass")


# TLS


async def test_mutual_tls_refuses_a_client_without_a_certificate(
        pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, MUTUAL_TLS)))
    port = exporter.bound_port
    assert port is not None
    # TLS 1.3: the server checks the client's certificate after the client's side of the
    # handshake, so the client sees the connection closed with no HTTP answer.
    assert await tls_exchange(port, pki.client_context()) == b""
    assert await tls_exchange(port, pki.client_context(cert_from=trustme.CA())) == b""
    with pytest.raises(aiohttp.ClientError):
        await fetch(f"https://localhost:{port}/metrics", pki.client_context())
    answer = await tls_exchange(port, pki.client_context(cert_from=pki.client_ca))
    assert answer.startswith(b"HTTP/1.1 200")


async def test_mutual_tls_serves_a_client_with_a_good_certificate(
        pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, MUTUAL_TLS)))
    status, _, body = await fetch(f"https://localhost:{exporter.bound_port}/metrics",
                                  pki.client_context(cert_from=pki.client_ca))
    assert status == 200
    assert METRIC in metric_names(body)


async def test_a_tls12_client_is_refused_when_min_version_is_tls13(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, TLS_ONLY + "  min_version: TLS13\n")
    exporter = await serve(WebConfig(path))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the handshake itself fails
        await tls_exchange(exporter.bound_port or 0,
                           pki.client_context(max_version=ssl.TLSVersion.TLSv1_2))
    with pytest.raises(aiohttp.ClientError):
        await fetch(url, pki.client_context(max_version=ssl.TLSVersion.TLSv1_2))
    assert (await fetch(url, pki.client_context()))[0] == 200


async def test_plain_http_gets_no_answer_from_a_tls_listener(
        pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, TLS_ONLY)))
    with pytest.raises(aiohttp.ClientError):
        await fetch(f"http://127.0.0.1:{exporter.bound_port}/metrics")


# Headers


async def test_configured_headers_are_on_every_response(
        pki: Pki, serve: StartExporter) -> None:
    text = with_users(TLS_ONLY, prometheus="pw") + """
http_server_config:
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    Strict-Transport-Security: max-age=31536000
"""
    exporter = await serve(WebConfig(web_config_file(pki.dir, text)))
    base = f"https://localhost:{exporter.bound_port}"
    context = pki.client_context()
    for path, auth, want in (("/metrics", ("prometheus", "pw"), 200), ("/metrics", None, 401),
                             ("/-/healthy", None, 200), ("/nowhere", ("prometheus", "pw"), 404)):
        status, headers, _ = await fetch(base + path, context, auth)
        assert status == want
        assert headers["X-Frame-Options"] == "deny"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Strict-Transport-Security"] == "max-age=31536000"


# Rotation


async def test_a_new_password_takes_effect_without_a_restart(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="old"))
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    assert (await fetch(url, pki.client_context(), ("prometheus", "old")))[0] == 200
    replace_file(path, with_users(TLS_ONLY, prometheus="new"))
    assert (await fetch(url, pki.client_context(), ("prometheus", "old")))[0] == 401
    assert (await fetch(url, pki.client_context(), ("prometheus", "new")))[0] == 200


async def test_a_new_certificate_is_used_for_new_connections_without_a_restart(
        pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, TLS_ONLY), check_interval=0))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    new_ca = trustme.CA()
    with pytest.raises(aiohttp.ClientError):
        await fetch(url, pki.client_context(trust=new_ca))
    pki.server_files(new_ca)  # cert_file and key_file replaced; the web config is unchanged
    assert (await fetch(url, pki.client_context(trust=new_ca)))[0] == 200
    with pytest.raises(aiohttp.ClientError):
        await fetch(url, pki.client_context())  # the old certificate is no longer served


async def test_a_broken_new_file_keeps_the_old_config_and_logs_an_error(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="pw"))
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    with structlog.testing.capture_logs() as logs:
        replace_file(path, with_users(TLS_ONLY, prometheus="pw") + "  broken: [\n")
        assert (await fetch(url, pki.client_context(), ("prometheus", "pw")))[0] == 200
        assert (await fetch(url, pki.client_context(), ("prometheus", "pw")))[0] == 200
        # A new certificate whose key does not match is refused too; the old one stays.
        replace_file(path, with_users(TLS_ONLY, prometheus="pw"))
        (pki.dir / "server.key").write_text(trustme.CA().issue_cert("x").private_key_pem
                                            .bytes().decode())
        assert (await fetch(url, pki.client_context(), ("prometheus", "pw")))[0] == 200
    failures = [e for e in logs if e["event"] == "web_config_reload_failed"]
    assert len(failures) == 2  # once per broken version, not once per request
    assert "invalid YAML" in failures[0]["problem"]
    assert "key_file" in failures[1]["problem"]


# Reloads fail closed


async def refused_over_tls(port: int, context: ssl.SSLContext) -> bool:
    """True if a client with `context` gets no metrics: the handshake fails or no answer."""
    try:
        answer = await tls_exchange(port, context)
    except (ssl.SSLError, ConnectionError):
        return True
    return not answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("text", ["", "{}\n", "basic_auth_users: {}\n",
                                  "# users moved elsewhere\n"],
                         ids=["empty", "empty mapping", "no users", "comments only"])
async def test_a_reload_that_would_turn_basic_auth_off_is_refused(
        text: str, tmp_path: Path, serve: StartExporter) -> None:
    path = web_config_file(tmp_path, with_users("", prometheus="pw"))
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    with structlog.testing.capture_logs() as logs:
        replace_file(path, text)
        for _ in range(3):
            assert (await fetch(url))[0] == 401
        assert (await fetch(url, auth=("prometheus", "pw")))[0] == 200
    assert exporter.state.web_config_reloads == {("metrics", "refused"): 1}
    refusals = [e for e in logs if e["event"] == "web_config_reload_refused"]
    assert len(refusals) == 1  # once per file version, not once per request
    assert refusals[0]["log_level"] == "warning"
    assert "basic_auth_users" in refusals[0]["problem"]


WEAKER_TLS = {  # old, new, a client the old file refuses
    "min_version lowered": (TLS_ONLY + "  min_version: TLS13\n", TLS_ONLY,
                            {"max_version": ssl.TLSVersion.TLSv1_2}),
    "client certificates dropped": (MUTUAL_TLS, TLS_ONLY, {}),
    "client certificates optional": (
        MUTUAL_TLS, MUTUAL_TLS.replace("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"),
        {}),
}


@pytest.mark.parametrize("case", sorted(WEAKER_TLS))
async def test_a_reload_that_would_weaken_tls_is_refused(
        case: str, pki: Pki, serve: StartExporter) -> None:
    old, new, client = WEAKER_TLS[case]
    path = web_config_file(pki.dir, old)
    web_config = WebConfig(path, check_interval=0)
    exporter = await serve(web_config)
    port = exporter.bound_port or 0
    before = web_config.settings
    replace_file(path, new)
    assert await refused_over_tls(port, pki.client_context(**client))
    assert web_config.settings == before
    assert exporter.state.web_config_reloads == {("metrics", "refused"): 1}
    assert await refused_over_tls(port, pki.client_context(**client))  # still, on a new look


async def test_a_reload_that_would_remove_tls_is_refused(pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, TLS_ONLY)
    exporter = await serve(WebConfig(path, check_interval=0))
    replace_file(path, "")
    assert (await fetch(f"https://localhost:{exporter.bound_port}/metrics",
                        pki.client_context()))[0] == 200
    assert exporter.state.web_config_reloads == {("metrics", "refused"): 1}


STRONGER_OR_EQUAL = {  # old, new: applied live
    "min_version raised": (TLS_ONLY, TLS_ONLY + "  min_version: TLS13\n"),
    "client certificates required": (TLS_ONLY, MUTUAL_TLS),
    "basic auth added": (TLS_ONLY, with_users(TLS_ONLY, prometheus="pw")),
    "users changed": (with_users(TLS_ONLY, prometheus="pw"), with_users(TLS_ONLY, grafana="x")),
    "headers dropped": (TLS_ONLY + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
                        TLS_ONLY),
}


@pytest.mark.parametrize("case", sorted(STRONGER_OR_EQUAL))
async def test_a_reload_that_does_not_weaken_security_is_applied_live(
        case: str, pki: Pki, serve: StartExporter) -> None:
    old, new = STRONGER_OR_EQUAL[case]
    path = web_config_file(pki.dir, old)
    web_config = WebConfig(path, check_interval=0)
    exporter = await serve(web_config)
    replace_file(path, new)
    assert web_config.settings.users.keys() == parse_web_config(path).users.keys()
    assert web_config.settings.tls == parse_web_config(path).tls
    assert web_config.settings.headers == parse_web_config(path).headers
    assert exporter.state.web_config_reloads == {("metrics", "applied"): 1}


async def test_basic_auth_added_by_a_reload_is_enforced(tmp_path: Path,
                                                         serve: StartExporter) -> None:
    path = web_config_file(tmp_path, "")
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    assert (await fetch(url))[0] == 200
    replace_file(path, with_users("", prometheus="pw"))
    assert (await fetch(url))[0] == 401
    assert (await fetch(url, auth=("prometheus", "pw")))[0] == 200


async def test_each_changed_file_is_counted_once_as_applied_invalid_or_refused(
        tmp_path: Path, serve: StartExporter) -> None:
    path = web_config_file(tmp_path, with_users("", prometheus="pw"))
    web_config = WebConfig(path, check_interval=0)
    exporter = await serve(web_config)
    for text in (with_users("", prometheus="new"), "basic_auth_users: [\n", "",
                 with_users("", prometheus="newer")):
        replace_file(path, text)
        for _ in range(2):
            web_config.reload_if_changed()
    assert exporter.state.web_config_reloads == {
        ("metrics", "applied"): 2, ("metrics", "invalid"): 1, ("metrics", "refused"): 1}


async def test_an_unexpected_error_while_reloading_keeps_the_last_good_config(
        pki: Pki, serve: StartExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="pw"))
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"https://localhost:{exporter.bound_port}/metrics"

    def broken(path: str | Path) -> webconfig.WebSettings:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(webconfig, "parse_web_config", broken)
    with structlog.testing.capture_logs() as logs:
        replace_file(path, with_users(TLS_ONLY, prometheus="pw"))
        # The first look at the changed file happens in a TLS handshake, then in a handler.
        assert (await fetch(url, pki.client_context(), ("prometheus", "pw")))[0] == 200
        assert (await fetch(url, pki.client_context()))[0] == 401
    assert exporter.state.web_config_reloads == {("metrics", "invalid"): 1}
    failures = [e for e in logs if e["event"] == "web_config_reload_failed"]
    assert [f["problem"] for f in failures] == [f"{path}: RuntimeError: disk on fire"]


# Basic auth under a flood of wrong passwords

GOOD = b"right horse"


@dataclass
class HeldBcrypt:
    """Password checks in arrival order (`arrivals`) and bcrypt runs in order (`calls`);
    a wrong password's bcrypt run waits for `release`, so a flood stays in flight."""

    arrivals: int = 0
    calls: list[bytes] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def held_bcrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBcrypt]:
    held = HeldBcrypt()
    real_matches, real_check = webconfig._bcrypt_matches, _PasswordCheck.check

    def matches(password: bytes, hashed: bytes) -> bool:
        held.calls.append(password)
        if password != GOOD:
            held.release.wait(timeout=60)
        return real_matches(password, hashed)

    async def check(self: _PasswordCheck, *args: Any, **kwargs: Any) -> bool:
        held.arrivals += 1
        return await real_check(self, *args, **kwargs)

    monkeypatch.setattr(webconfig, "_bcrypt_matches", matches)
    monkeypatch.setattr(_PasswordCheck, "check", check)
    yield held
    held.release.set()  # never leave a worker thread waiting


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`; the limit only stops a broken test from hanging."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


@pytest.mark.parametrize("flooders", [1, 10])
async def test_a_flood_of_wrong_passwords_does_not_queue_ahead_of_a_new_login(
        flooders: int, tmp_path: Path, serve: StartExporter, held_bcrypt: HeldBcrypt) -> None:
    path = web_config_file(tmp_path, with_users("", prometheus=GOOD.decode()))
    exporter = await serve(WebConfig(path))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    flood = [asyncio.create_task(fetch(url, auth=("prometheus", f"guess {i}"),
                                       source=f"127.0.0.{2 + i % flooders}"))
             for i in range(200)]
    await until(lambda: held_bcrypt.arrivals == 200)
    login = asyncio.create_task(fetch(url, auth=("prometheus", GOOD.decode())))
    await until(lambda: held_bcrypt.arrivals == 201)
    held_bcrypt.release.set()
    assert (await login)[0] == 200
    statuses = Counter(status for status, _, _ in await asyncio.gather(*flood))
    # Each flooding address has at most one check running or waiting; its others are refused
    # at once, so the new login waits for at most one check per flooding address.
    assert held_bcrypt.calls.index(GOOD) <= flooders
    assert statuses == {401: flooders, 429: 200 - flooders}


async def test_a_new_login_is_refused_at_once_when_the_bcrypt_queue_is_full(
        tmp_path: Path, serve: StartExporter, held_bcrypt: HeldBcrypt) -> None:
    path = web_config_file(tmp_path, with_users("", prometheus=GOOD.decode()))
    web_config = WebConfig(path)
    exporter = await serve(web_config)
    capacity = web_config._passwords.capacity
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    flood = [asyncio.create_task(fetch(url, auth=("prometheus", f"guess {i}"),
                                       source=f"127.0.1.{i}"))
             for i in range(capacity + 10)]
    await until(lambda: held_bcrypt.arrivals == capacity + 10)
    status, headers, _ = await fetch(url, auth=("prometheus", GOOD.decode()))
    assert status == 429
    assert headers["Retry-After"] == "1"
    held_bcrypt.release.set()
    statuses = Counter(status for status, _, _ in await asyncio.gather(*flood))
    assert statuses == {401: capacity, 429: 10}
    assert exporter.state.refused[("metrics", "rate_limited")] == 11
    assert GOOD not in held_bcrypt.calls


async def test_a_cached_login_never_waits_for_bcrypt_during_a_flood(
        tmp_path: Path, serve: StartExporter, held_bcrypt: HeldBcrypt) -> None:
    path = web_config_file(tmp_path, with_users("", prometheus=GOOD.decode()))
    exporter = await serve(WebConfig(path))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    assert (await fetch(url, auth=("prometheus", GOOD.decode())))[0] == 200
    # The flood comes from the login's own address and holds the bcrypt worker.
    flood = [asyncio.create_task(fetch(url, auth=("prometheus", f"guess {i}")))
             for i in range(200)]
    await until(lambda: held_bcrypt.arrivals == 201)
    assert (await fetch(url, auth=("prometheus", GOOD.decode())))[0] == 200
    assert not held_bcrypt.release.is_set()
    held_bcrypt.release.set()
    await asyncio.gather(*flood)
    assert held_bcrypt.calls.count(GOOD) == 1


async def test_a_cached_login_stays_cached_while_it_is_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    check = _PasswordCheck(ttl=60, clock=lambda: now[0])
    users = {"prometheus": bcrypt_hash("pw").encode()}
    runs: list[float] = []
    real = webconfig._bcrypt_matches
    monkeypatch.setattr(webconfig, "_bcrypt_matches",
                        lambda p, h: runs.append(now[0]) or real(p, h))
    # Every scrape within the ttl of the one before, then idle for longer than the ttl.
    for at in (0, 50, 100, 150, 300):
        now[0] = at
        assert await check.check(users, "prometheus", b"pw")
    assert runs == [0, 300]


# Unknown users


@pytest.mark.parametrize(("costs", "expected"), [((5,), 5), ((6, 5, 6), 6), ((5, 6), 6)])
async def test_an_unknown_user_costs_a_bcrypt_check_at_the_users_cost(
        costs: tuple[int, ...], expected: int, tmp_path: Path, serve: StartExporter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "".join(f"  user{i}: {bcrypt_hash('pw', cost)}\n" for i, cost in enumerate(costs))
    path = web_config_file(tmp_path, f"basic_auth_users:\n{lines}")
    exporter = await serve(WebConfig(path))
    checked: list[bytes] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: checked.append(h) or real(p, h))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    assert (await fetch(url, auth=("nobody", "pw")))[0] == 401
    assert [h[:7] for h in checked] == [f"$2b${expected:02d}$".encode()]


# Bad files at start-up


BAD_FILES = {
    "unknown key": ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                    "  min_versoin: TLS13\n",
                    "tls_server_config.min_versoin: unknown setting (did you mean min_version?)"),
    "client auth type": (TLS_ONLY + "  client_auth_type: Always\n",
                         "tls_server_config.client_auth_type: 'Always' is not one of"),
    "missing key": ("tls_server_config:\n  cert_file: server.crt\n",
                    "tls_server_config.key_file: missing one of key or key_file"),
    "missing cert file": ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
                          "tls_server_config: cannot load cert_file"),
    "ca without auth": (TLS_ONLY + "  client_ca_file: client-ca.crt\n",
                        "tls_server_config.client_ca_file: is set but client_auth_type is "
                        "NoClientCert"),
    "any cert without ca": (TLS_ONLY + "  client_auth_type: RequireAnyClientCert\n",
                            "tls_server_config.client_ca_file: is required with client_auth_type "
                            "RequireAnyClientCert: Python's ssl cannot ask for a certificate "
                            "without verifying it"),
    "versions": (TLS_ONLY + "  min_version: TLS13\n  max_version: TLS12\n",
                 "tls_server_config.min_version: TLS13 is above max_version TLS12"),
    "header": ("http_server_config:\n  headers:\n    Server: nginx\n",
               "http_server_config.headers.Server: cannot be configured"),
    "header value": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                     "http_server_config.headers.X-Frame-Options: 'allow' is not one of"),
    "not bcrypt": ("basic_auth_users:\n  prometheus: hunter2\n",
                   "basic_auth_users.prometheus: is not a bcrypt hash"),
    "rate limit interval": ("rate_limit:\n  interval: soon\n",
                            "rate_limit.interval: must be a duration such as 1s"),
    "unknown cipher": (TLS_ONLY + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
                       "tls_server_config.cipher_suites: unknown cipher: TLS_RSA_WITH_RC4_128_SHA"),
    "sans without a required certificate": (
        TLS_ONLY + "  client_allowed_sans: [prometheus]\n",
        "tls_server_config.client_allowed_sans: client_allowed_sans requires client_auth_type"),
    "yaml": ("basic_auth_users: [\n", "line 2, column 1: invalid YAML"),
    "nested too deep": ("basic_auth_users: " + "[" * 5000 + "]" * 5000 + "\n",
                        "line 1, column 82: invalid YAML: nested deeper than 64 levels"),
    "huge integer": ("basic_auth_users:\n  prometheus: " + "9" * 5000 + "\n",
                     "line 2, column 15: invalid YAML: an integer longer than 100 characters"),
    "impossible date": ("basic_auth_users:\n  prometheus: 2026-13-45\n",
                        "line 2, column 15: invalid YAML: not a valid YAML timestamp"),
    "too large": ("#" * (1 << 20) + "\n",
                  "cannot read the web config file: it is larger than 1 MiB"),
    "nul in a path": (TLS_ONLY.replace("server.key", '"server\\0.key"'),
                      "tls_server_config.key_file: must not contain a NUL character"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_web_config_file_is_one_clear_line_and_exit_1(
        case: str, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    text, expected = BAD_FILES[case]
    path = web_config_file(pki.dir, text)
    config = pki.dir / "config.yml"
    config.write_text('apps: [{app_id: 7, rooms: ["1"], server_secret: "abc"}]\n')
    assert main([f"--web.config.file={path}", f"--config.file={config}",
                 "--web.listen-address=127.0.0.1:0", "--storage.path=", "--config.check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"{path}: {expected}" or err.startswith(f"{path}: {expected}")
    assert len(err.splitlines()) == 1
    assert "hunter2" not in err  # a would-be secret is never echoed


# Files that are not web configs


def check_in_child(web_config: Path) -> subprocess.CompletedProcess[str]:
    """`--config.check` with `web_config` in a child process with 1 GiB of address space and a
    time limit, so a reader that blocks or reads forever fails the test instead of the run."""
    config = web_config.parent / "config.yml"
    config.write_text('apps: [{app_id: 7, rooms: ["1"], server_secret: "abc"}]\n')
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from exporter.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run(
        [sys.executable, "-c", code, f"--web.config.file={web_config}",
         f"--config.file={config}", "--config.check"],
        capture_output=True, text=True, timeout=60, check=False)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


NOT_REGULAR = {  # what the web config file names, made in tmp_path
    "web config is a FIFO": lambda d: fifo(d / "web.yml"),
    "web config is /dev/zero": lambda d: Path("/dev/zero"),
    "web config is a directory": lambda d: d,
    "cert_file is a FIFO": lambda d: web_config_file(d, TLS_ONLY.replace(
        "server.crt", str(fifo(d / "cert.fifo")))),
    "key_file is /dev/zero": lambda d: web_config_file(d, TLS_ONLY.replace(
        "server.key", "/dev/zero")),
    "client_ca_file is a FIFO": lambda d: web_config_file(d, MUTUAL_TLS.replace(
        "client-ca.crt", str(fifo(d / "ca.fifo")))),
}


@pytest.mark.parametrize("case", sorted(NOT_REGULAR))
def test_a_file_that_is_not_a_regular_file_is_refused_at_once_in_one_line(
        case: str, pki: Pki) -> None:
    path = NOT_REGULAR[case](pki.dir)
    result = check_in_child(path)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a regular file" in result.stderr


# Request limits


async def test_an_oversized_body_gets_413(pki: Pki, serve: StartExporter) -> None:
    exporter = await serve()
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    assert (await fetch(url, data=b"x" * (64 * 1024 + 1)))[0] == 413
    assert (await fetch(url, method="POST", data=b"x" * (1024 * 1024)))[0] == 413


async def test_methods_other_than_get_and_head_get_405_with_allow(
        serve: StartExporter) -> None:
    exporter = await serve()
    base = f"http://127.0.0.1:{exporter.bound_port}"
    for method, path in (("POST", "/metrics"), ("PUT", "/metrics"), ("DELETE", "/-/healthy"),
                         ("OPTIONS", "/")):
        status, headers, _ = await fetch(base + path, method=method, data=b"{}")
        assert status == 405
        assert set(headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert (await fetch(base + "/metrics", method="HEAD"))[0] == 200


async def test_oversized_request_lines_and_headers_are_refused(
        serve: StartExporter) -> None:
    exporter = await serve()
    base = f"http://127.0.0.1:{exporter.bound_port}"
    assert (await fetch(base + "/metrics?" + "a" * 5000))[0] == 400
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics", headers={"X-Big": "a" * 9000}) as response:
            assert response.status == 400
        many = {f"X-H{i}": "1" for i in range(100)}
        async with http.get(base + "/metrics", headers=many) as response:
            assert response.status == 400


async def test_a_client_sending_headers_slowly_is_disconnected(
        serve: StartExporter) -> None:
    exporter = await serve(limits=ServerLimits(read_timeout=1.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", exporter.bound_port)
    started = time.monotonic()

    async def trickle() -> None:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
        for i in range(40):
            await asyncio.sleep(0.1)
            writer.write(f"X-Slow-{i}: 1\r\n".encode())
            await writer.drain()

    sender = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), timeout=3.5)
    except ConnectionResetError:
        answer = b""
    finally:
        sender.cancel()
        writer.close()
    assert answer == b""  # closed without a response
    assert time.monotonic() - started < 3.0


async def test_a_client_sending_a_body_slowly_gets_408(serve: StartExporter) -> None:
    exporter = await serve(limits=ServerLimits(read_timeout=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", exporter.bound_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nab")
    try:
        answer = await asyncio.wait_for(reader.read(100), timeout=3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")


# The exporter-toolkit settings (see also test_webconfig_toolkit.py)


def client_with_cert(pki: Pki, *identities: str, **options: Any) -> ssl.SSLContext:
    """A client trusting the server, showing a certificate from the client CA for `identities`."""
    context = pki.client_context(**options)
    pki.client_ca.issue_cert(*identities).configure_cert(context)
    return context


def only_suite(context: ssl.SSLContext, openssl_name: str) -> ssl.SSLContext:
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 suites are not configurable
    context.set_ciphers(openssl_name)
    return context


async def test_cipher_suites_refuse_a_client_offering_only_an_excluded_suite(
        pki: Pki, serve: StartExporter) -> None:
    # trustme's keys are ECDSA, so the ECDSA suites are the ones that can be negotiated.
    text = TLS_ONLY + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
    exporter = await serve(WebConfig(web_config_file(pki.dir, text)))
    port = exporter.bound_port or 0
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_exchange(port, only_suite(pki.client_context(),
                                            "ECDHE-ECDSA-AES256-GCM-SHA384"))
    answer = await tls_exchange(port, only_suite(pki.client_context(),
                                                 "ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert answer.startswith(b"HTTP/1.1 200")


async def test_curve_preferences_refuse_a_client_offering_only_another_curve(
        pki: Pki, serve: StartExporter) -> None:
    text = TLS_ONLY + "  min_version: TLS13\n  curve_preferences: [CurveP521]\n"
    exporter = await serve(WebConfig(web_config_file(pki.dir, text)))
    port = exporter.bound_port or 0
    p384, p521 = pki.client_context(), pki.client_context()
    p384.set_ecdh_curve("secp384r1")
    p521.set_ecdh_curve("secp521r1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_exchange(port, p384)
    assert (await tls_exchange(port, p521)).startswith(b"HTTP/1.1 200")


async def test_an_inline_certificate_and_key_are_served(pki: Pki, serve: StartExporter) -> None:
    def inline(name: str) -> str:
        return (pki.dir / name).read_text().strip().replace("\n", "\n    ")

    text = (f"tls_server_config:\n  cert: |\n    {inline('server.crt')}\n"
            f"  key: |\n    {inline('server.key')}\n")
    (pki.dir / "server.key").unlink()  # nothing is read from the files
    (pki.dir / "server.crt").unlink()
    exporter = await serve(WebConfig(web_config_file(pki.dir, text)))
    status, _, body = await fetch(f"https://localhost:{exporter.bound_port}/metrics",
                                  pki.client_context())
    assert status == 200
    assert METRIC in metric_names(body)


def test_an_inline_key_is_loaded_from_a_private_file_that_is_then_removed(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    key = (pki.dir / "server.key").read_text().strip().replace("\n", "\n    ")
    text = TLS_ONLY.replace("  key_file: server.key\n", f"  key: |\n    {key}\n")
    seen: list[tuple[int, int]] = []
    real = ssl.SSLContext.load_cert_chain

    def load_cert_chain(self: ssl.SSLContext, certfile: Any, keyfile: Any = None,
                        password: Any = None) -> None:
        seen.append((os.stat(keyfile).st_mode & 0o777, os.stat(Path(keyfile).parent).st_mode
                     & 0o777))
        seen_paths.append(Path(keyfile))
        real(self, certfile, keyfile, password)

    seen_paths: list[Path] = []
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)
    webconfig.load_web_config(web_config_file(pki.dir, text))
    assert seen == [(0o600, 0o700)]
    assert not seen_paths[0].exists()
    assert not seen_paths[0].parent.exists()


SANS = """  client_allowed_sans:
    - prometheus@example.com
    - scraper.example
    - 127.0.0.9
    - 2001:db8::9
"""


@pytest.mark.parametrize("identity", ["prometheus@example.com", "scraper.example", "127.0.0.9",
                                      "2001:db8::9"], ids=["email", "DNS", "IPv4", "IPv6"])
async def test_a_client_certificate_with_an_allowed_san_is_served(
        identity: str, pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, MUTUAL_TLS + SANS)))
    status, _, body = await fetch(f"https://localhost:{exporter.bound_port}/metrics",
                                  client_with_cert(pki, identity))
    assert status == 200
    assert METRIC in metric_names(body)


async def test_a_client_certificate_without_an_allowed_san_gets_403(
        pki: Pki, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(pki.dir, MUTUAL_TLS + SANS)))
    base = f"https://localhost:{exporter.bound_port}"
    for path in ("/metrics", "/-/healthy"):
        status, _, body = await fetch(base + path, client_with_cert(pki, "grafana@example.com",
                                                                    "127.0.0.1"))
        assert status == 403
        assert METRIC not in body


RATE_LIMITED = "rate_limit:\n  interval: 1h\n  burst: 2\n"


async def test_requests_beyond_the_rate_limit_burst_get_429(
        tmp_path: Path, serve: StartExporter) -> None:
    exporter = await serve(WebConfig(web_config_file(tmp_path, RATE_LIMITED)))
    base = f"http://127.0.0.1:{exporter.bound_port}"
    statuses = [(await fetch(base + path))[0] for path in ("/metrics", "/-/healthy",
                                                           "/metrics", "/-/healthy")]
    assert statuses == [200, 200, 429, 429]  # one bucket for every route; 1h: no refill here
    assert exporter.state.refused[("metrics", "rate_limited")] == 2


def test_the_rate_limit_bucket_refills_one_token_per_interval() -> None:
    now = [0.0]
    bucket = webconfig._TokenBucket(webconfig.RateLimit(interval=10.0, burst=2),
                                    clock=lambda: now[0])
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    now[0] = 9.0
    assert not bucket.allow()
    now[0] = 10.0
    assert [bucket.allow(), bucket.allow()] == [True, False]
    now[0] = 1000.0  # never more than burst
    assert [bucket.allow() for _ in range(3)] == [True, True, False]


async def test_a_rate_limit_with_burst_0_refuses_every_request(
        tmp_path: Path, serve: StartExporter) -> None:
    # The toolkit's web_config_rate_limiter_one_second.yaml: golang.org/x/time/rate allows
    # nothing with a burst of 0.
    path = web_config_file(tmp_path, 'rate_limit:\n  interval: "1s"\n  burst: 0\n')
    exporter = await serve(WebConfig(path))
    assert (await fetch(f"http://127.0.0.1:{exporter.bound_port}/metrics"))[0] == 429


async def test_a_header_value_that_yaml_reads_as_a_number_is_sent_as_written(
        tmp_path: Path, serve: StartExporter) -> None:
    path = web_config_file(tmp_path, "http_server_config:\n  headers:\n    X-XSS-Protection: 1\n")
    exporter = await serve(WebConfig(path))
    status, headers, _ = await fetch(f"http://127.0.0.1:{exporter.bound_port}/metrics")
    assert status == 200
    assert headers["X-XSS-Protection"] == "1"


async def test_verify_client_cert_if_given_without_a_ca_uses_the_system_cas(
        pki: Pki, serve: StartExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenSSL's system CAs, here the client CA alone.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.dir / "client-ca.crt"))
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.dir / "no-such-dir"))
    text = TLS_ONLY + "  client_auth_type: VerifyClientCertIfGiven\n"
    exporter = await serve(WebConfig(web_config_file(pki.dir, text)))
    port = exporter.bound_port or 0
    assert (await tls_exchange(port, pki.client_context())).startswith(b"HTTP/1.1 200")
    system_issued = client_with_cert(pki, "prometheus@example.com")
    assert (await tls_exchange(port, system_issued)).startswith(b"HTTP/1.1 200")
    other = pki.client_context(cert_from=trustme.CA())  # verified if given, and refused
    assert await refused_over_tls(port, other)


async def test_a_reload_that_drops_client_allowed_sans_is_refused(
        pki: Pki, serve: StartExporter) -> None:
    path = web_config_file(pki.dir, MUTUAL_TLS + SANS)
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"https://localhost:{exporter.bound_port}/metrics"
    outsider = client_with_cert(pki, "grafana@example.com")
    assert (await fetch(url, outsider))[0] == 403
    replace_file(path, MUTUAL_TLS)
    assert (await fetch(url, outsider))[0] == 403
    assert exporter.state.web_config_reloads == {("metrics", "refused"): 1}


async def test_a_new_rate_limit_applies_live(tmp_path: Path, serve: StartExporter) -> None:
    path = web_config_file(tmp_path, RATE_LIMITED)
    exporter = await serve(WebConfig(path, check_interval=0))
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    assert [(await fetch(url))[0] for _ in range(3)] == [200, 200, 429]
    replace_file(path, RATE_LIMITED.replace("burst: 2", "burst: 3"))
    assert [(await fetch(url))[0] for _ in range(4)] == [200, 200, 200, 429]
    replace_file(path, "")
    assert [(await fetch(url))[0] for _ in range(4)] == [200] * 4
    assert exporter.state.web_config_reloads == {("metrics", "applied"): 2}


async def test_widened_cipher_suites_apply_live(pki: Pki, serve: StartExporter) -> None:
    narrow = TLS_ONLY + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
    path = web_config_file(pki.dir, narrow)
    exporter = await serve(WebConfig(path, check_interval=0))
    port = exporter.bound_port or 0
    aes256 = only_suite(pki.client_context(), "ECDHE-ECDSA-AES256-GCM-SHA384")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_exchange(port, aes256)
    replace_file(path, narrow.replace("]", ", TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]"))
    assert (await tls_exchange(port, aes256)).startswith(b"HTTP/1.1 200")
    assert exporter.state.web_config_reloads == {("metrics", "applied"): 1}


# The command line, end to end



def test_the_cli_serves_tls_and_basic_auth_from_web_config_file(pki: Pki) -> None:
    path = web_config_file(pki.dir, with_users(TLS_ONLY, prometheus="pw"))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--demo", f"--web.listen-address=127.0.0.1:{port}",
         f"--web.config.file={path}", "--log.format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    async def scrape() -> tuple[int, int]:
        url = f"https://localhost:{port}/metrics"
        for _ in range(100):
            try:
                denied = (await fetch(url, pki.client_context()))[0]
                allowed = (await fetch(url, pki.client_context(), ("prometheus", "pw")))[0]
                return denied, allowed
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
        raise AssertionError("the exporter never listened")

    try:
        assert asyncio.run(scrape()) == (401, 200)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert '"tls": true' in err and '"basic_auth": true' in err


def test_the_example_web_config_is_valid() -> None:
    example = Path(__file__).parents[1] / "examples" / "web-config.yml"
    settings = parse_web_config(example)
    assert settings.tls is not None and settings.tls.min_version == "TLS12"
    assert set(settings.users) == {"prometheus"}
    assert settings.headers["X-Frame-Options"] == "deny"


async def test_the_callback_listener_serves_tls_and_only_post(pki: Pki, tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:9/", ("a",))
    app = replace(config.apps[0], callback_secret=Secret("cb-secret"))
    exporter = Exporter(replace(config, apps=(app,)),
                        callback_web_config=WebConfig(web_config_file(tmp_path, TLS_ONLY)))
    await exporter.start(None, schedule=False, callback_listen=ListenAddress("127.0.0.1", 0))
    url = f"https://127.0.0.1:{exporter.callback_port}/callback"
    try:
        async with aiohttp.ClientSession() as http:
            context = pki.client_context()
            async with http.post(url, data=b"{}", ssl=context) as response:
                assert response.status == 400  # reached the receiver: a malformed callback
            async with http.get(url, ssl=context) as response:
                assert response.status == 405
            with pytest.raises(aiohttp.ClientError):
                async with http.post(url.replace("https", "http"), data=b"{}") as response:
                    await response.read()
    finally:
        await exporter.stop()
