"""--web.config.file (the Prometheus exporter-toolkit format): TLS, basic auth, response headers.

One file configures every HTTP server of the exporter. `WebConfig` holds the file's current,
valid reading and re-reads it (and the certificate, key and CA files it names) when any of them
changes, so certificates and users rotate without a restart. Reloads fail closed: a broken new
version, or one that would weaken security (see `reload_refusals`), is logged once and the last
good one stays in force. Servers use it through `WebConfig.ssl_context()` (handed to aiohttp's
`TCPSite`) and `WebConfig.middlewares()` (basic auth and the extra headers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
import stat
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bcrypt
import structlog
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from exporter.config import _Problems, _StrictLoader, _type_name  # the same one-line errors
from exporter.files import FileRefused, read_regular_file

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
# The salt and digest of a bcrypt hash of a random password nobody knows, checked for unknown
# users at the configured users' cost so that a wrong user name costs as much time as a wrong
# password (no user enumeration by timing). bcrypt's work depends on the cost, not on the salt
# or digest, so no hash is computed per cost.
_DUMMY_SALT_AND_DIGEST: Final = b"IeJdrK3w5yvZnGdX4Y3CB..5TJqcM/SlvnDpsQ558/3gxxjCvkj0u"
# bcrypt only uses the first 72 bytes; htpasswd and Go hash just those, so check just those.
_BCRYPT_MAX_PASSWORD: Final = 72
# The web config and the files it names are small; anything bigger is not one of them.
MAX_FILE_BYTES: Final = 1024 * 1024
# The format needs 3 levels; PyYAML builds nested values recursively, so a deeper file is
# refused before it is built.


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
        # ssl opens these itself: a FIFO would block it and /dev/zero would never end.
        for name, path in (("cert_file", self.cert_file), ("key_file", self.key_file),
                           ("client_ca_file", self.client_ca_file)):
            problem = _unusable_file(path) if path is not None else None
            if problem is not None:
                problems.error(f"tls_server_config.{name}", problem)
        if problems.errors:
            raise WebConfigError(problems.errors)
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
        text = read_regular_file(path, MAX_FILE_BYTES).content.decode("utf-8")
    except FileRefused as refused:
        raise WebConfigError([f"{source}: cannot read the web config file: {refused}"]) from None
    except UnicodeDecodeError:
        raise WebConfigError([f"{source}: the web config file is not UTF-8 text"]) from None
    problems = _Problems(source)
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # bounded depth and integers
    except yaml.YAMLError as error:
        raise WebConfigError([problems.yaml_error(error)]) from None
    settings = _Reader(problems, Path(path)).settings(document)
    if problems.errors or settings is None:
        raise WebConfigError(problems.errors)
    return settings


def _unusable_file(path: Path) -> str | None:
    """Why a file the web config names must not be handed to ssl, if it must not. A missing or
    unreadable one is left to ssl, whose error names it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return f"{path} is larger than 1 MiB"
    return None


def reload_refusals(old: WebSettings, new: WebSettings) -> list[str]:
    """Why `new` may not replace `old` while the exporter runs (empty: it may).

    Reloads fail closed: a new version that is valid but would weaken security is refused like
    a broken one, and `old` stays in force until a restart. Weakening is: removing every
    basic_auth_users entry (an empty file, `{}` or only comments included), adding or removing
    tls_server_config (the listener is HTTP or HTTPS), lowering min_version, or asking less of
    client certificates (client_auth_type from required to optional to none; client_ca_file
    goes with it). Users, passwords, headers, certificates, keys and client CAs change live.
    """
    refusals: list[str] = []
    if old.users and not new.users:
        refusals.append("basic_auth_users: removing every user would turn basic auth off")
    if (old.tls is None) != (new.tls is None):
        refusals.append("tls_server_config: adding or removing it needs a restart (the "
                        "listener is HTTP or HTTPS)")
    if old.tls is not None and new.tls is not None:
        if TLS_VERSIONS[new.tls.min_version] < TLS_VERSIONS[old.tls.min_version]:
            refusals.append(f"tls_server_config.min_version: lowering it from "
                            f"{old.tls.min_version} to {new.tls.min_version}")
        # Ranked by what this server does: none < optional (verified if given) < required.
        if (CLIENT_AUTH_TYPES[new.tls.client_auth_type]
                < CLIENT_AUTH_TYPES[old.tls.client_auth_type]):
            refusals.append(f"tls_server_config.client_auth_type: weakening it from "
                            f"{old.tls.client_auth_type} to {new.tls.client_auth_type}")
    return refusals


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
            name = _field(where, key)
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
        if "\0" in text:
            self.problems.error(where, "must not contain a NUL character")
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
            here = _field(headers_where, name)
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
            here = _field(where, name)
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


def _field(where: str, key: object) -> str:
    """A field's name for a problem line: a key that would break the line (a newline, or just
    too long) is shown quoted and cut."""
    text = str(key)
    if not text.isprintable() or len(text) > 64:
        text = repr(text[:64]) + ("..." if len(text) > 64 else "")
    return f"{where}.{text}" if where else text


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
        except (OSError, ValueError):
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
        self._watched = self._settings.watched_files()
        self._stamp = _stamp(self._watched)
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
        """Re-read the file if it or a file it names changed; True if new settings apply.

        Never raises: it runs inside requests and TLS handshakes. Each changed version is tried,
        logged and reported to `on_reload` once: "applied", "invalid" (it cannot be used) or
        "refused" (`reload_refusals`); the last good settings stay in force unless applied."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return False
        with self._lock:
            self._checked = now
            stamp = _stamp(self._watched)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            result, problems = self._reload()
        if result == "invalid":
            for line in problems:
                log.error("web_config_reload_failed", problem=line,
                          kept="the previous web config")
        elif result == "refused":
            log.warning("web_config_reload_refused",
                        problem=f"{self.path}: " + "; ".join(problems),
                        kept="the previous web config: restart the exporter to apply this one")
        else:
            for warning in problems:
                log.warning("web_config_warning", problem=warning)
            log.info("web_config_reloaded", path=str(self.path), tls=self.tls_enabled,
                     users=len(self._settings.users), headers=sorted(self._settings.headers))
        self.on_reload(result)
        return result == "applied"

    def _reload(self) -> tuple[str, list[str]]:
        """Under the lock: the result of reading the changed files, and its problems (or, when
        applied, its warnings)."""
        old = self._settings
        try:
            settings = parse_web_config(self.path)
            # Watch the files the new version names too, so that fixing one of them is seen.
            self._watched = tuple(dict.fromkeys((*old.watched_files(),
                                                 *settings.watched_files())))
            self._stamp = _stamp(self._watched)
            context = (settings.tls.build_ssl_context(str(self.path))
                       if settings.tls is not None else None)
            refusals = reload_refusals(old, settings)
        except WebConfigError as error:
            return "invalid", error.errors
        except Exception as error:  # a bug or an OS surprise: contained like a broken file
            return "invalid", [f"{self.path}: {type(error).__name__}: {error}"]
        if refusals:
            return "refused", refusals
        self._settings, self._context = settings, context
        self._watched = settings.watched_files()
        self._stamp = _stamp(self._watched)
        return "applied", list(settings.warnings)

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
            if credentials is not None:
                try:
                    good = await self._passwords.check(users, *credentials,
                                                       client=request.remote or "")
                except AuthBusy:  # counted with every 429 by the listener's edge
                    raise web.HTTPTooManyRequests(headers={hdrs.RETRY_AFTER: "1"}) from None
                if good:
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


class AuthBusy(Exception):
    """A password check that could not be queued: refused at once (429), not made to wait."""


class _PasswordCheck:
    """bcrypt checks off the event loop, bounded and fair; good credentials remembered.

    bcrypt is slow on purpose (tens of ms at cost 10); Prometheus sends the same credentials on
    every scrape, so, like the toolkit, a good check is cached, for `ttl` seconds after its last
    use: a scraper never waits for bcrypt again while it keeps scraping. The cache key is an
    HMAC (with a key made at start-up) of user, hash and password: no password is kept in memory
    in clear, and a changed hash misses the cache at once.

    A flood of wrong passwords must not starve a real login: `workers` threads run the checks
    (bcrypt releases the GIL), at most `queue` more wait in arrival order, and each client (an
    IPv4 address, an IPv6 /64) has at most one check running or waiting. Any other check is
    refused at once (AuthBusy) rather than queued, so a new login waits for at most one check
    per other client, and never for one client's flood.
    """

    MAX_ENTRIES: Final = 256
    # At most half the CPUs, so that serving and polling keep running through a flood.
    WORKERS: Final = max(1, min(4, (os.cpu_count() or 2) // 2))
    # At cost 12 (about 0.25 s a check) on one worker, a login that gets a place is answered in
    # about 4 s, inside Prometheus's default 10 s scrape timeout.
    QUEUE: Final = 16

    def __init__(self, ttl: float, *, workers: int = WORKERS, queue: int = QUEUE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.workers = workers
        self.capacity = workers + queue  # checks running or waiting
        self._clock = clock
        self._key = os.urandom(32)
        self._good: OrderedDict[bytes, float] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._clients: set[str] = set()  # each with one check running or waiting
        self._refused = 0  # since the queue was last empty: a busy spell is logged, not each

    async def check(self, users: Mapping[str, bytes], user: str, password: bytes,
                    client: str = "") -> bool:
        """True if `password` is `user`'s. Raises AuthBusy if the check cannot be queued."""
        hashed = users.get(user)
        known = hashed is not None
        hashed = hashed if hashed is not None else _dummy_hash(users)
        password = password[:_BCRYPT_MAX_PASSWORD]
        key = self._cache_key(user, hashed, password)
        expires = self._good.get(key)
        if known and expires is not None and expires > self._clock():
            self._remember(key)
            return True
        good = await self._bcrypt(password, hashed, _client_group(client))
        if not (good and known):
            return False
        self._remember(key)
        return True

    async def _bcrypt(self, password: bytes, hashed: bytes, client: str) -> bool:
        if client in self._clients or len(self._clients) >= self.capacity:
            if not self._refused:
                log.warning("basic_auth_busy", client=client, pending=len(self._clients),
                            note="password checks are refused with 429 until none is pending")
            self._refused += 1
            raise AuthBusy
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="bcrypt")
        self._clients.add(client)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, _bcrypt_matches, password, hashed)
        finally:
            self._clients.discard(client)
            if not self._clients and self._refused:
                log.info("basic_auth_busy_ended", refused=self._refused)
                self._refused = 0

    def _remember(self, key: bytes) -> None:
        self._good[key] = self._clock() + self.ttl
        self._good.move_to_end(key)
        while len(self._good) > self.MAX_ENTRIES:
            self._good.popitem(last=False)

    def _cache_key(self, user: str, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode("utf-8"), hashed, password):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()


def _dummy_hash(users: Mapping[str, bytes]) -> bytes:
    """The hash checked for an unknown user: the most common cost among `users` (the higher on
    a tie), so that as many user names as possible cost the same."""
    costs = Counter(hashed[4:6] for hashed in users.values())
    cost = max(costs, key=lambda c: (costs[c], c), default=b"10")
    return b"$2b$" + cost + b"$" + _DUMMY_SALT_AND_DIGEST


def _client_group(address: str) -> str:
    """Who a request counts as for fairness: its IPv4 address, or its IPv6 /64 (what one host
    is usually given)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # e.g. "" for a Unix socket
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)  # compares in constant time
    except ValueError:  # e.g. a NUL byte in the password
        return False
