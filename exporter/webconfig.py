"""--web.config.file (the Prometheus exporter-toolkit format): TLS, basic auth, response headers.

One file configures every HTTP server of the exporter. `WebConfig` holds the file's current,
valid reading and re-reads it (and the certificate, key and CA files it names) when any of them
changes, so certificates and users rotate without a restart; a broken new version is logged and
the last good one stays in force. Servers use it through `WebConfig.ssl_context()` (handed to
aiohttp's `TCPSite`) and `WebConfig.middlewares()` (basic auth and the extra headers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import hashlib
import hmac
import os
import re
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bcrypt
import structlog
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from exporter.config import _Problems, _StrictLoader, _type_name  # the same one-line errors

log = structlog.get_logger("exporter.webconfig")

TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Python's ssl module (OpenSSL) cannot ask for a client certificate without verifying it, so the
# two toolkit types that accept any certificate verify it against client_ca_file here.
CLIENT_AUTH_TYPES: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_IN_GO: Final = ("RequestClientCert", "RequireAnyClientCert")
# The headers (and, for some, the values) the exporter-toolkit lets a config set; it refuses
# others so that every Prometheus component behaves the same.
EXTRA_HEADERS: Final[Mapping[str, tuple[str, ...] | None]] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
# Probes must work for kubelets and load balancers that hold no password.
OPEN_PATHS: Final = ("/-/healthy", "/-/ready")

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS: Final = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
                    "max_version", "prefer_server_cipher_suites")
_HTTP_KEYS: Final = ("headers", "http2")
# Toolkit settings this exporter does not implement: refused rather than silently ignored.
_UNSUPPORTED: Final = {
    "rate_limit": "is not supported by this exporter",
    "tls_server_config.cert": "is not supported: put the certificate in a file, use cert_file",
    "tls_server_config.key": "is not supported: put the key in a file, use key_file",
    "tls_server_config.client_ca": "is not supported: put the CAs in a file, use client_ca_file",
    "tls_server_config.client_allowed_sans": "is not supported by this exporter",
    "tls_server_config.cipher_suites": "is not supported: Go cipher suite names do not map to "
    "OpenSSL's; the OpenSSL defaults apply",
    "tls_server_config.curve_preferences": "is not supported: the OpenSSL defaults apply",
}
# $2a$, $2b$ or $2y$, a two-digit cost, 22 characters of salt and 31 of hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# bcrypt of a random password nobody knows: checked for unknown users so that a wrong user name
# costs as much time as a wrong password (no user enumeration by timing).
_DUMMY_HASH: Final = b"$2b$10$IeJdrK3w5yvZnGdX4Y3CB..5TJqcM/SlvnDpsQ558/3gxxjCvkj0u"
# bcrypt only uses the first 72 bytes; htpasswd and Go hash just those, so check just those.
_BCRYPT_MAX_PASSWORD: Final = 72


class WebConfigError(Exception):
    """An invalid web config: every problem found, one line each (file, field, problem)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class TLSServerConfig:
    """`tls_server_config`, paths already resolved against the web config file's directory."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True

    def files(self) -> tuple[Path, ...]:
        ca = (self.client_ca_file,) if self.client_ca_file is not None else ()
        return (self.cert_file, self.key_file, *ca)

    def build_ssl_context(self, source: str) -> ssl.SSLContext:
        """A server context for these settings; reads the files. Raises WebConfigError."""
        problems = _Problems(source)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            # TLS 1.0/1.1 are deprecated; a config that asks for them gets a load-time warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = TLS_VERSIONS[self.min_version]
            context.maximum_version = TLS_VERSIONS[self.max_version]
        if self.prefer_server_cipher_suites:
            context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except OSError as error:  # ssl.SSLError is an OSError
            problems.error("tls_server_config",
                           f"cannot load cert_file {self.cert_file} with key_file "
                           f"{self.key_file}: {_ssl_reason(error)}")
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except OSError as error:
                problems.error("tls_server_config.client_ca_file",
                               f"cannot load {self.client_ca_file}: {_ssl_reason(error)}")
        context.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        if problems.errors:
            raise WebConfigError(problems.errors)
        return context


@dataclass(frozen=True)
class WebSettings:
    """One valid reading of the web config file."""

    path: Path
    tls: TLSServerConfig | None = None
    # user name -> bcrypt hash; empty: no basic auth
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def watched_files(self) -> tuple[Path, ...]:
        return (self.path, *(self.tls.files() if self.tls is not None else ()))


def parse_web_config(path: str | Path) -> WebSettings:
    """Read and validate the file's fields (not the files it names). Raises WebConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise WebConfigError([f"{source}: cannot read the web config file: {error.strerror}"]
                             ) from None
    except UnicodeDecodeError:
        raise WebConfigError([f"{source}: the web config file is not UTF-8 text"]) from None
    problems = _Problems(source)
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as error:
        raise WebConfigError([problems.yaml_error(error)]) from None
    except yaml.YAMLError as error:
        raise WebConfigError([f"{source}: invalid YAML: {error}"]) from None
    settings = _Reader(problems, Path(path)).settings(document)
    if problems.errors or settings is None:
        raise WebConfigError(problems.errors)
    return settings


def load_web_config(path: str | Path) -> tuple[WebSettings, ssl.SSLContext | None]:
    """Parse the file and load its certificates: what start-up and every reload check."""
    settings = parse_web_config(path)
    context = settings.tls.build_ssl_context(str(path)) if settings.tls is not None else None
    return settings, context


class _Reader:
    def __init__(self, problems: _Problems, path: Path) -> None:
        self.problems = problems
        self.path = path

    def settings(self, document: object) -> WebSettings | None:
        if document is None:
            return WebSettings(self.path)  # an empty file: plain HTTP, no auth, as the toolkit
        top = self.mapping(document, "")
        if top is None:
            return None
        tls = self.tls(top.get("tls_server_config"))
        headers = self.http(top.get("http_server_config"))
        users = self.users(top.get("basic_auth_users"))
        if tls is not None and tls.client_auth_type in _UNVERIFIED_IN_GO:
            self.problems.warning(
                "tls_server_config.client_auth_type",
                f"{tls.client_auth_type}: client certificates are verified against "
                "client_ca_file here (the Go toolkit accepts any certificate)")
        if tls is not None and TLS_VERSIONS[tls.min_version] < ssl.TLSVersion.TLSv1_2:
            self.problems.warning(
                "tls_server_config.min_version",
                f"{tls.min_version} is deprecated and may be refused by OpenSSL's policy")
        return WebSettings(self.path, tls, users, headers, tuple(self.problems.warnings))

    def mapping(self, value: object, where: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problems.error(where, f"must be a mapping, got {_type_name(value)}")
            return None
        allowed = {"": _TOP_KEYS, "tls_server_config": _TLS_KEYS,
                   "http_server_config": _HTTP_KEYS}.get(where)
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                self.problems.error(name, "keys must be strings")
            elif name in _UNSUPPORTED:
                self.problems.error(name, _UNSUPPORTED[name])
            elif allowed is not None and key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problems.error(name, f"unknown setting{hint}")
            else:
                result[key] = item
        return result

    def string(self, value: object, where: str) -> str | None:
        if not isinstance(value, str):
            self.problems.error(where, f"must be a string, got {_type_name(value)}")
            return None
        return value

    def file(self, value: object, where: str) -> Path | None:
        text = self.string(value, where)
        if text is None:
            return None
        if not text:
            self.problems.error(where, "must not be empty")
            return None
        # Relative paths are relative to the web config file, as in the toolkit.
        return self.path.parent / text

    def choice(self, value: object, where: str, choices: Iterable[str], default: str) -> str:
        if value is None:
            return default
        text = self.string(value, where)
        options = list(choices)
        if text is not None and text not in options:
            self.problems.error(where, f"{text!r} is not one of {', '.join(options)}")
            return default
        return text or default

    def tls(self, value: object) -> TLSServerConfig | None:
        if value is None:
            return None
        where = "tls_server_config"
        section = self.mapping(value, where)
        if section is None:
            return None
        cert = key = None
        for name in ("cert_file", "key_file"):
            if section.get(name) is None:
                self.problems.error(f"{where}.{name}", "is required with tls_server_config")
        if section.get("cert_file") is not None:
            cert = self.file(section["cert_file"], f"{where}.cert_file")
        if section.get("key_file") is not None:
            key = self.file(section["key_file"], f"{where}.key_file")
        auth = self.choice(section.get("client_auth_type"), f"{where}.client_auth_type",
                           CLIENT_AUTH_TYPES, "NoClientCert")
        ca = None
        if section.get("client_ca_file") is not None:
            ca = self.file(section["client_ca_file"], f"{where}.client_ca_file")
        if ca is not None and auth == "NoClientCert":
            self.problems.error(f"{where}.client_ca_file",
                                "is set but client_auth_type is NoClientCert: set "
                                "client_auth_type (RequireAndVerifyClientCert to authenticate)")
        if auth != "NoClientCert" and section.get("client_ca_file") is None:
            self.problems.error(f"{where}.client_ca_file",
                                f"is required with client_auth_type {auth} (client "
                                "certificates are verified against it)")
        low = self.choice(section.get("min_version"), f"{where}.min_version", TLS_VERSIONS,
                          "TLS12")
        high = self.choice(section.get("max_version"), f"{where}.max_version", TLS_VERSIONS,
                           "TLS13")
        if TLS_VERSIONS[low] > TLS_VERSIONS[high]:
            self.problems.error(f"{where}.min_version",
                                f"{low} is above max_version {high}: no version is left")
        prefer = section.get("prefer_server_cipher_suites", True)
        if not isinstance(prefer, bool):
            self.problems.error(f"{where}.prefer_server_cipher_suites",
                                f"must be true or false, got {_type_name(prefer)}")
            prefer = True
        if cert is None or key is None:
            return None
        return TLSServerConfig(cert, key, auth, ca, low, high, prefer)

    def http(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        where = "http_server_config"
        section = self.mapping(value, where)
        if section is None:
            return {}
        http2 = section.get("http2", False)
        if not isinstance(http2, bool):
            self.problems.error(f"{where}.http2", f"must be true or false, got {_type_name(http2)}")
        elif http2:
            self.problems.warning(f"{where}.http2", "ignored: this exporter serves HTTP/1.1 only")
        raw = section.get("headers")
        if raw is None:
            return {}
        headers_where = f"{where}.headers"
        if not isinstance(raw, dict):
            self.problems.error(headers_where, f"must be a mapping, got {_type_name(raw)}")
            return {}
        headers: dict[str, str] = {}
        for name, header_value in raw.items():
            here = f"{headers_where}.{name}"
            if name not in EXTRA_HEADERS:
                same = [h for h in EXTRA_HEADERS if h.lower() == str(name).lower()]
                hint = f" (write it {same[0]})" if same else (
                    f": only {', '.join(EXTRA_HEADERS)} can be set")
                self.problems.error(here, f"cannot be configured{hint}")
                continue
            text = self.string(header_value, here)
            if text is None or text == "":
                continue  # blank: unset, as the toolkit documents
            if any(c in text for c in "\r\n\0"):
                self.problems.error(here, "must be one line")
                continue
            allowed = EXTRA_HEADERS[name]
            if allowed is not None and text not in allowed:
                self.problems.error(here, f"{text!r} is not one of {', '.join(allowed)}")
                continue
            headers[name] = text
        return headers

    def users(self, value: object) -> dict[str, bytes]:
        if value is None:
            return {}
        where = "basic_auth_users"
        if not isinstance(value, dict):
            self.problems.error(where, f"must be a mapping of user name to bcrypt hash, got "
                                f"{_type_name(value)}")
            return {}
        users: dict[str, bytes] = {}
        for name, hashed in value.items():
            here = f"{where}.{name}"
            if not isinstance(name, str) or not name or ":" in name:
                self.problems.error(here, "user names must be non-empty strings without ':'")
                continue
            # The hash is a secret: never echo it.
            match = _BCRYPT_HASH.fullmatch(hashed) if isinstance(hashed, str) else None
            if match is None:
                self.problems.error(here, "is not a bcrypt hash ($2y$10$ and 53 characters: "
                                    "make one with htpasswd -nBC 10 \"\" | tr -d ':\\n')")
                continue
            cost = int(match.group(1))
            if not 4 <= cost <= 31:
                self.problems.error(here, f"bcrypt cost {cost} is outside 4..31")
                continue
            users[name] = match.group(0).encode("ascii")
        return users


def _ssl_reason(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return error.strerror or str(error)


def _stamp(paths: Iterable[Path]) -> tuple[object, ...]:
    """What changes when a file is rewritten, replaced or removed; cheap (one stat each)."""
    out: list[object] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((str(path), None))
            continue
        out.append((str(path), st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(out)


class WebConfig:
    """The live web config: the last valid reading of the file, re-read when it changes."""

    def __init__(self, path: str | Path, *, check_interval: float = 1.0,
                 auth_cache_ttl: float = 60.0) -> None:
        """Load `path` (raises WebConfigError); then look for changes at most every
        `check_interval` seconds, when a request or a TLS handshake needs the config."""
        self.path = Path(path)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._settings, self._context = load_web_config(self.path)
        self._stamp = _stamp(self._settings.watched_files())
        self._checked = time.monotonic()
        self._passwords = _PasswordCheck(auth_cache_ttl)
        # Told each reload's result: "applied", "invalid" or "refused" (it would weaken security).
        self.on_reload: Callable[[str], None] = lambda result: None

    @property
    def settings(self) -> WebSettings:
        """The settings in force, after looking for a changed file if it is time to."""
        self.reload_if_changed()
        return self._settings

    @property
    def tls_enabled(self) -> bool:
        return self._settings.tls is not None

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if it or a file it names changed; True if new settings apply."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return False
        with self._lock:
            self._checked = now
            watched = self._settings.watched_files()
            stamp = _stamp(watched)
            if stamp == self._stamp:
                return False
            try:
                settings = parse_web_config(self.path)
                # A failed reading also watches the files it names, so fixing them is seen.
                stamp = _stamp(dict.fromkeys((*watched, *settings.watched_files())))
                context = (settings.tls.build_ssl_context(str(self.path))
                           if settings.tls is not None else None)
                if (settings.tls is None) != (self._settings.tls is None):
                    raise WebConfigError([f"{self.path}: tls_server_config: adding or removing "
                                          "it needs a restart (the listener is HTTP or HTTPS)"])
            except WebConfigError as error:
                self._stamp = stamp  # log a broken version once, not on every request
                for line in error.errors:
                    log.error("web_config_reload_failed", problem=line,
                              kept="the previous web config")
                return False
            self._settings, self._context = settings, context
            self._stamp = _stamp(settings.watched_files())
        for warning in settings.warnings:
            log.warning("web_config_warning", problem=warning)
        log.info("web_config_reloaded", path=str(self.path), tls=settings.tls is not None,
                 users=len(settings.users), headers=sorted(settings.headers))
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        """For a server's `ssl_context`: each new TLS connection uses the current certificate,
        key, client CAs and versions. None when the file has no tls_server_config."""
        if self._context is None:
            return None
        return _ReloadingSSLContext(self)

    def _current_ssl_context(self) -> ssl.SSLContext:
        self.reload_if_changed()
        assert self._context is not None  # TLS cannot be removed by a reload
        return self._context

    def middlewares(self, open_paths: Iterable[str] = OPEN_PATHS) -> list[Middleware]:
        """aiohttp middlewares, outermost first: the configured response headers (on every
        response, errors included), then basic auth for every route but `open_paths`."""
        open_set = frozenset(open_paths)

        @web.middleware
        async def extra_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
            headers = self.settings.headers
            try:
                response = await handler(request)
            except web.HTTPException as error:
                error.headers.update(headers)
                raise
            if not response.prepared:
                response.headers.update(headers)
            return response

        @web.middleware
        async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
            users = self.settings.users
            resource = request.match_info.route.resource
            # Decided on the matched route, not the raw path, so no spelling of a path slips by.
            if not users or (resource is not None and resource.canonical in open_set):
                return await handler(request)
            credentials = _basic_credentials(request.headers.get(hdrs.AUTHORIZATION))
            if credentials is not None and await self._passwords.check(users, *credentials):
                return await handler(request)
            raise web.HTTPUnauthorized(headers={
                hdrs.WWW_AUTHENTICATE: 'Basic realm="zego-cloudrecord-exporter", charset="UTF-8"'
            })

        return [extra_headers, basic_auth]


class _ReloadingSSLContext(ssl.SSLContext):
    """Hands every new connection to the web config's current context: asyncio (and blocking
    servers) create each connection's TLS object through wrap_bio / wrap_socket."""

    _web_config: WebConfig

    def __new__(cls, web_config: WebConfig) -> _ReloadingSSLContext:
        context = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)
        context._web_config = web_config
        return context

    def __init__(self, web_config: WebConfig) -> None:
        pass  # set up in __new__; SSLContext.__init__ takes no config

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self._web_config._current_ssl_context().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: Any, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self._web_config._current_ssl_context().wrap_socket(
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, server_hostname,
            session)


def _basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        return user.decode("utf-8"), password
    except (binascii.Error, UnicodeDecodeError):
        return None


class _PasswordCheck:
    """bcrypt checks, one at a time off the event loop, successes remembered for `ttl` seconds.

    bcrypt is slow on purpose (tens of ms at cost 10); Prometheus sends the same credentials on
    every scrape, so, like the toolkit, a good check is cached. The cache key is an HMAC (with a
    key made at start-up) of user, hash and password: no password is kept in memory in clear,
    and a changed hash misses the cache at once.
    """

    MAX_ENTRIES: Final = 256

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._key = os.urandom(32)
        self._good: OrderedDict[bytes, float] = OrderedDict()
        self._lock: asyncio.Lock | None = None

    async def check(self, users: Mapping[str, bytes], user: str, password: bytes) -> bool:
        hashed = users.get(user)
        known = hashed is not None
        hashed = hashed if hashed is not None else _DUMMY_HASH
        password = password[:_BCRYPT_MAX_PASSWORD]
        key = self._cache_key(user, hashed, password)
        expires = self._good.get(key)
        if known and expires is not None and expires > time.monotonic():
            return True
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # bcrypt is CPU-bound: one check at a time, as the toolkit
            good = await asyncio.to_thread(_bcrypt_matches, password, hashed)
        if not (good and known):
            return False
        self._good[key] = time.monotonic() + self.ttl
        self._good.move_to_end(key)
        while len(self._good) > self.MAX_ENTRIES:
            self._good.popitem(last=False)
        return True

    def _cache_key(self, user: str, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode("utf-8"), hashed, password):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)  # compares in constant time
    except ValueError:  # e.g. a NUL byte in the password
        return False
