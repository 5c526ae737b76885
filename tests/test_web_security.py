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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

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
from exporter.web import ServerLimits
from exporter.webconfig import WebConfig, _PasswordCheck, parse_web_config
from tests.conftest import make_config

METRIC = "zego_cloudrecord_exporter_build_info"


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()  # cost 4: fast tests


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


StartExporter = Callable[..., Awaitable[Exporter]]


@pytest.fixture
async def serve() -> AsyncIterator[StartExporter]:
    """Start an Exporter (not polling) on loopback with the given web config and limits."""
    started: list[Exporter] = []

    async def start(web_config: WebConfig | None = None,
                    limits: ServerLimits | None = None) -> Exporter:
        exporter = Exporter(make_config("http://127.0.0.1:9/", ("a",)),
                            web_config=web_config, web_limits=limits)
        await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        await exporter.stop()


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
                data: bytes | None = None) -> tuple[int, dict[str, str], str]:
    headers = {}
    if auth is not None:
        user, password = auth
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()
                                                               ).decode()
    async with aiohttp.ClientSession() as http, http.request(
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


# Bad files at start-up


BAD_FILES = {
    "unknown key": ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                    "  min_versoin: TLS13\n",
                    "tls_server_config.min_versoin: unknown setting (did you mean min_version?)"),
    "client auth type": (TLS_ONLY + "  client_auth_type: Always\n",
                         "tls_server_config.client_auth_type: 'Always' is not one of"),
    "missing key": ("tls_server_config:\n  cert_file: server.crt\n",
                    "tls_server_config.key_file: is required"),
    "missing cert file": ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
                          "tls_server_config: cannot load cert_file"),
    "ca without auth": (TLS_ONLY + "  client_ca_file: client-ca.crt\n",
                        "tls_server_config.client_ca_file: is set but client_auth_type is "
                        "NoClientCert"),
    "auth without ca": (TLS_ONLY + "  client_auth_type: RequireAndVerifyClientCert\n",
                        "tls_server_config.client_ca_file: is required with client_auth_type"),
    "versions": (TLS_ONLY + "  min_version: TLS13\n  max_version: TLS12\n",
                 "tls_server_config.min_version: TLS13 is above max_version TLS12"),
    "header": ("http_server_config:\n  headers:\n    Server: nginx\n",
               "http_server_config.headers.Server: cannot be configured"),
    "header value": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                     "http_server_config.headers.X-Frame-Options: 'allow' is not one of"),
    "not bcrypt": ("basic_auth_users:\n  prometheus: hunter2\n",
                   "basic_auth_users.prometheus: is not a bcrypt hash"),
    "unsupported": ("rate_limit:\n  interval: 1s\n", "rate_limit: is not supported"),
    "yaml": ("basic_auth_users: [\n", "line 2, column 1: invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_web_config_file_is_one_clear_line_and_exit_1(
        case: str, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    text, expected = BAD_FILES[case]
    path = web_config_file(pki.dir, text)
    config = pki.dir / "config.yml"
    config.write_text('apps: [{app_id: 7, rooms: ["1"], server_secret: "abc"}]\n')
    assert main([f"--web.config.file={path}", f"--config.file={config}",
                 "--web.listen-address=127.0.0.1:0", "--storage.path="]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"{path}: {expected}" or err.startswith(f"{path}: {expected}")
    assert len(err.splitlines()) == 1
    assert "hunter2" not in err  # a would-be secret is never echoed


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
