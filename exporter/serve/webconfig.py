"""--web.config.file (the Prometheus exporter-toolkit format): TLS, basic auth, headers, rate limit.

One file configures every HTTP server of the exporter, and a file node_exporter accepts works
here (tests/test_webconfig_toolkit.py holds the toolkit's own cases and the few differences).
`WebConfig` holds the file's current, valid reading and re-reads it (and the certificate, key
and CA files it names) when any of them changes, so certificates and users rotate without a
restart. Reloads fail closed: a broken new version, or one that would weaken security (see
`reload_refusals`), is logged once and the last good one stays in force. Servers use it through
`WebConfig.ssl_context()` (handed to aiohttp's `TCPSite`) and `WebConfig.middlewares()`
(client_allowed_sans, rate_limit, basic auth and the extra headers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import difflib
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
import stat
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import bcrypt
import structlog
import yaml
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from exporter.config import _Problems, _StrictLoader, _type_name  # the same one-line errors
from exporter.files import FileRefused, read_regular_file

log = structlog.get_logger("exporter.serve.webconfig")

TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Python's ssl module (OpenSSL) cannot ask for a client certificate without verifying it, so the
# two toolkit types that accept any certificate verify it against the client CAs here.
CLIENT_AUTH_TYPES: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_IN_GO: Final = ("RequestClientCert", "RequireAnyClientCert")
# Go's names for the cipher suites the toolkit accepts (crypto/tls CipherSuites()), as OpenSSL
# names them; None for the TLS 1.3 suites, which neither Go nor OpenSSL's cipher list configures.
CIPHER_SUITES: Final[Mapping[str, str | None]] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
# HTTP/2 (RFC 7540, 9.2.2) needs one of these; with http2 on (the toolkit's default) Go's server
# refuses to start on a TLS 1.2 suite list without one, so the file is refused here too.
_HTTP2_SUITES: Final = ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
# Go's curve names and OpenSSL's.
CURVES: Final = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
                 "X25519": "X25519", "X25519MLKEM768": "X25519MLKEM768"}
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

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS: Final = ("cert_file", "key_file", "cert", "key", "client_auth_type", "client_ca_file",
                    "client_ca", "min_version", "max_version", "prefer_server_cipher_suites",
                    "cipher_suites", "curve_preferences", "client_allowed_sans")
_HTTP_KEYS: Final = ("headers", "http2")
_RATE_LIMIT_KEYS: Final = ("interval", "burst")
# A Go duration (time.ParseDuration), e.g. 1s, 1m30s, 500ms.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                          "h": 3600.0}
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
    """`tls_server_config`, paths already resolved against the web config file's directory.

    The certificate, key and client CAs come from a file or inline (`cert`, `key`, `client_ca`,
    PEM text); the file wins when both are set, as in the toolkit. Without client CAs, client
    certificates are verified against the system CAs, as Go does."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca: str | None = field(default=None, repr=False)
    cipher_suites: tuple[str, ...] = ()  # Go's names; empty: OpenSSL's defaults
    ecdh_curve: str | None = None  # OpenSSL's name; None: OpenSSL's defaults
    # None: no check; otherwise a verified client certificate needs one of these SANs.
    client_allowed_sans: tuple[str, ...] | None = None

    def files(self) -> tuple[Path, ...]:
        return tuple(path for path in (self.cert_file, self.key_file, self.client_ca_file)
                     if path is not None)

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
        self._restrict_ciphers(context, problems)
        if self.ecdh_curve is not None:
            context.set_ecdh_curve(self.ecdh_curve)  # checked when the file was read
        try:
            with self._key_pair_files() as (cert, key):
                context.load_cert_chain(cert, key)
        except OSError as error:  # ssl.SSLError is an OSError
            problems.error("tls_server_config",
                           f"cannot load {self._named('cert')} with {self._named('key')}: "
                           f"{_ssl_reason(error)}")
        context.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        try:
            if self.client_ca_file is not None:
                context.load_verify_locations(cafile=self.client_ca_file)
            elif self.client_ca is not None:
                context.load_verify_locations(cadata=self.client_ca)
            elif context.verify_mode != ssl.CERT_NONE:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (OSError, ValueError) as error:
            problems.error("tls_server_config.client_ca_file" if self.client_ca_file else
                           "tls_server_config.client_ca",
                           f"cannot load {self._named('client_ca')}: {_ssl_reason(error)}")
        if problems.errors:
            raise WebConfigError(problems.errors)
        return context

    def _restrict_ciphers(self, context: ssl.SSLContext, problems: _Problems) -> None:
        """TLS 1.2 and below: only the configured suites (TLS 1.3's are not configurable)."""
        if not self.cipher_suites:
            return
        wanted = {name: CIPHER_SUITES[name] for name in self.cipher_suites
                  if CIPHER_SUITES[name] is not None}
        if not wanted:
            # Only TLS 1.3 suites named: as in Go, no TLS 1.2 suite is left.
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            return
        with contextlib.suppress(ssl.SSLError):  # none available: named below
            context.set_ciphers(":".join(str(openssl) for openssl in wanted.values()))
        available = {cipher["name"] for cipher in context.get_ciphers()}
        missing = [name for name, openssl in wanted.items() if openssl not in available]
        if missing:
            problems.error("tls_server_config.cipher_suites",
                           f"not available in this OpenSSL: {', '.join(missing)}")

    def _named(self, what: str) -> str:
        path = {"cert": self.cert_file, "key": self.key_file,
                "client_ca": self.client_ca_file}[what]
        return f"{what}_file {path}" if path is not None else f"the inline {what}"

    @contextlib.contextmanager
    def _key_pair_files(self) -> Iterator[tuple[Path, Path]]:
        """The certificate and key as files: ssl loads a key pair only from files, so inline
        ones are written to a private directory (0700, files 0600) deleted once loaded."""
        if self.cert_file is not None and self.key_file is not None:
            yield self.cert_file, self.key_file
            return
        with tempfile.TemporaryDirectory(prefix="exporter-webconfig-") as private:
            cert = self.cert_file or _private_file(Path(private) / "cert.pem", self.cert or "")
            key = self.key_file or _private_file(Path(private) / "key.pem", self.key or "")
            yield cert, key


def _private_file(path: Path, text: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)
    return path


@dataclass(frozen=True)
class RateLimit:
    """`rate_limit`: a token bucket over all requests, as the toolkit's (golang.org/x/time/rate):
    one token every `interval` seconds, at most `burst` held; an interval of 0 is no limit."""

    interval: float
    burst: int


class _TokenBucket:
    """The toolkit's limiter, by hand: a dozen lines, and the project's RateLimiter paces
    outgoing calls rather than refusing incoming ones."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.limit.burst),
                           self._tokens + (now - self._at) / self.limit.interval)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(frozen=True)
class WebSettings:
    """One valid reading of the web config file."""

    path: Path
    tls: TLSServerConfig | None = None
    # user name -> bcrypt hash; empty: no basic auth
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None

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
    goes with it), or dropping client_allowed_sans. Users, passwords, headers, certificates,
    keys, client CAs, allowed SANs, cipher suites, curves and rate_limit change live.
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
        if old.tls.client_allowed_sans is not None and new.tls.client_allowed_sans is None:
            refusals.append("tls_server_config.client_allowed_sans: removing it would accept "
                            "any verified client certificate")
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
        headers, http2 = self.http(top.get("http_server_config"))
        users = self.users(top.get("basic_auth_users"))
        rate_limit = self.rate_limit(top.get("rate_limit"))
        if tls is not None and tls.client_auth_type in _UNVERIFIED_IN_GO:
            self.problems.warning(
                "tls_server_config.client_auth_type",
                f"{tls.client_auth_type}: client certificates are verified against the client "
                "CAs here (the Go toolkit accepts any certificate)")
        if (tls is not None and http2 and tls.cipher_suites
                and TLS_VERSIONS[tls.min_version] < ssl.TLSVersion.TLSv1_3
                and not set(_HTTP2_SUITES) & set(tls.cipher_suites)):
            self.problems.error(
                "tls_server_config.cipher_suites",
                "TLSConfig.CipherSuites is missing an HTTP/2-required AES_128_GCM_SHA256 cipher "
                f"(one of {' or '.join(_HTTP2_SUITES)}): node_exporter refuses this file with "
                "http2 on, its default; add one, or set http_server_config.http2: false")
        if tls is not None and TLS_VERSIONS[tls.min_version] < ssl.TLSVersion.TLSv1_2:
            self.problems.warning(
                "tls_server_config.min_version",
                f"{tls.min_version} is deprecated and may be refused by OpenSSL's policy")
        return WebSettings(self.path, tls, users, headers, tuple(self.problems.warnings),
                           rate_limit)

    def mapping(self, value: object, where: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problems.error(where, f"must be a mapping, got {_type_name(value)}")
            return None
        allowed = {"": _TOP_KEYS, "tls_server_config": _TLS_KEYS,
                   "http_server_config": _HTTP_KEYS, "rate_limit": _RATE_LIMIT_KEYS}.get(where)
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = _field(where, key)
            if not isinstance(key, str):
                self.problems.error(name, "keys must be strings")
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
        cert_file, cert = self.file_or_inline(section, "cert", required=True)
        key_file, key = self.file_or_inline(section, "key", required=True)
        ca_file, ca = self.file_or_inline(section, "client_ca", required=False)
        auth = self.choice(section.get("client_auth_type"), f"{where}.client_auth_type",
                           CLIENT_AUTH_TYPES, "NoClientCert")
        has_ca = ca_file is not None or ca is not None
        if has_ca and auth == "NoClientCert":
            self.problems.error(f"{where}.client_ca_file",
                                "is set but client_auth_type is NoClientCert (client CA's have "
                                "been configured without a Client Auth Policy): set "
                                "client_auth_type (RequireAndVerifyClientCert to authenticate)")
        if auth == "RequireAnyClientCert" and not has_ca:
            # Go accepts any certificate here; OpenSSL can only require a verified one.
            self.problems.error(f"{where}.client_ca_file",
                                "is required with client_auth_type RequireAnyClientCert: "
                                "Python's ssl cannot ask for a certificate without verifying "
                                "it, so set the CA that issued your clients' certificates")
        elif auth == "RequireAndVerifyClientCert" and not has_ca:
            self.problems.warning(f"{where}.client_ca_file",
                                  "not set: client certificates are verified against the "
                                  "system CAs, so any certificate a public CA issued is "
                                  "accepted; set client_ca_file to trust only your CA")
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
        suites = self.string_list(section.get("cipher_suites"), f"{where}.cipher_suites")
        for name in suites or ():
            if name not in CIPHER_SUITES:
                self.problems.error(f"{where}.cipher_suites", f"unknown cipher: {_shown(name)}")
        curve = self.curve(section.get("curve_preferences"), f"{where}.curve_preferences")
        sans = self.string_list(section.get("client_allowed_sans"),
                                f"{where}.client_allowed_sans")
        if sans is not None and auth not in ("RequireAnyClientCert",
                                             "RequireAndVerifyClientCert"):
            self.problems.error(f"{where}.client_allowed_sans",
                                "client_allowed_sans requires client_auth_type to be one of "
                                "RequireAnyClientCert or RequireAndVerifyClientCert")
        if (cert_file is None and cert is None) or (key_file is None and key is None):
            return None
        return TLSServerConfig(
            cert_file=cert_file, key_file=key_file, client_auth_type=auth,
            client_ca_file=ca_file, min_version=low, max_version=high,
            prefer_server_cipher_suites=prefer, cert=cert, key=key, client_ca=ca,
            cipher_suites=tuple(name for name in suites or () if name in CIPHER_SUITES),
            ecdh_curve=curve, client_allowed_sans=sans)

    def file_or_inline(self, section: Mapping[str, Any], name: str,
                       required: bool) -> tuple[Path | None, str | None]:
        """`<name>_file` (a path) or `<name>` (PEM text); empty counts as unset, as in the
        toolkit, and the file wins when both are set."""
        where = f"tls_server_config.{name}"
        path = text = None
        if section.get(f"{name}_file") not in (None, ""):
            path = self.file(section[f"{name}_file"], f"{where}_file")
        if section.get(name) not in (None, ""):
            text = self.string(section[name], where)
            if path is not None:
                self.problems.warning(where, f"ignored: {name}_file is set")
                text = None
        if required and section.get(f"{name}_file") in (None, "") and section.get(name) in (
                None, ""):
            self.problems.error(f"{where}_file", f"missing one of {name} or {name}_file")
        return path, text

    def string_list(self, value: object, where: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.problems.error(where, f"must be a list of strings, got {_type_name(value)}")
            return None
        items = [self.string(item, where) for item in value]
        return tuple(item for item in items if item is not None)

    def curve(self, value: object, where: str) -> str | None:
        """The one curve applied: Python's ssl (3.11) sets a single curve (set_ecdh_curve), so
        the first one this OpenSSL supports stands for the list."""
        names = self.string_list(value, where)
        if not names:
            return None
        unknown = [name for name in names if name not in CURVES]
        for name in unknown:
            self.problems.error(where, f"unknown curve: {_shown(name)}")
        supported = [name for name in names if name in CURVES and _openssl_has_curve(CURVES[name])]
        if unknown:
            return None
        if not supported:
            self.problems.error(where, f"none of {', '.join(names)} is supported by this "
                                "OpenSSL")
            return None
        if len(names) > 1:
            skipped = [name for name in names if name not in supported]
            note = f" ({', '.join(skipped)} not supported by this OpenSSL)" if skipped else ""
            self.problems.warning(where, f"only {supported[0]} applies: Python's ssl sets one "
                                  f"curve, so clients that do not offer it cannot connect{note}")
        return CURVES[supported[0]]

    def rate_limit(self, value: object) -> RateLimit | None:
        if value is None:
            return None
        section = self.mapping(value, "rate_limit")
        if section is None:
            return None
        interval = _duration(section.get("interval", 0))
        if interval is None:
            self.problems.error("rate_limit.interval",
                                "must be a duration such as 1s, 500ms or 1m30s, or 0")
        burst = section.get("burst", 0)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            self.problems.error("rate_limit.burst", "must be a whole number, 0 or more")
            return None
        if not interval:
            return None  # as in the toolkit: an interval of 0 is no limit
        return RateLimit(interval, burst)

    def http(self, value: object) -> tuple[dict[str, str], bool]:
        """The headers, and whether http2 is on (the toolkit's default)."""
        if value is None:
            return {}, True
        where = "http_server_config"
        section = self.mapping(value, where)
        if section is None:
            return {}, True
        http2 = section.get("http2", True)
        if not isinstance(http2, bool):
            self.problems.error(f"{where}.http2", f"must be true or false, got {_type_name(http2)}")
            http2 = True
        elif section.get("http2") is True:
            self.problems.warning(f"{where}.http2", "ignored: this exporter serves HTTP/1.1 only")
        raw = section.get("headers")
        if raw is None:
            return {}, http2
        headers_where = f"{where}.headers"
        if not isinstance(raw, dict):
            self.problems.error(headers_where, f"must be a mapping, got {_type_name(raw)}")
            return {}, http2
        headers: dict[str, str] = {}
        for name, header_value in raw.items():
            here = _field(headers_where, name)
            if name not in EXTRA_HEADERS:
                same = [h for h in EXTRA_HEADERS if h.lower() == str(name).lower()]
                hint = f" (write it {same[0]})" if same else (
                    f": only {', '.join(EXTRA_HEADERS)} can be set")
                self.problems.error(here, f"cannot be configured{hint}")
                continue
            text = self.string(_scalar_text(header_value), here)
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
        return headers, http2

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


def _scalar_text(value: object) -> object:
    """A YAML scalar as the toolkit reads it into a string (`X-XSS-Protection: 1` is "1")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _duration(value: object) -> float | None:
    """A Go duration (1s, 1m30s, 500ms, "0") or 0, in seconds; None if it is neither."""
    if (value == 0 and not isinstance(value, bool)) or value == "0":
        return 0.0
    if not isinstance(value, str) or not value:
        return None
    parts = _DURATION_PART.findall(value)
    if "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


@cache
def _openssl_has_curve(name: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ecdh_curve(name)
    except ValueError:
        return False
    return True


def _field(where: str, key: object) -> str:
    """A field's name for a problem line: a key that would break the line (a newline, or just
    too long) is shown quoted and cut."""
    text = _shown(str(key))
    return f"{where}.{text}" if where else text


def _shown(text: str) -> str:
    """Text from the file as a problem line shows it: quoted and cut if it would break the line
    (a newline, or just too long)."""
    if not text.isprintable() or len(text) > 64:
        return repr(text[:64]) + ("..." if len(text) > 64 else "")
    return text


def _ssl_reason(error: OSError | ValueError) -> str:
    if isinstance(error, ValueError):  # e.g. cadata that is not PEM text
        return str(error)
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
        self._bucket: _TokenBucket | None = None  # rate_limit's, kept while it is unchanged
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

    def _rate_limited(self, limit: RateLimit | None) -> bool:
        """True if rate_limit refuses this request; a changed rate_limit starts a full bucket."""
        if limit is None:
            return False
        if self._bucket is None or self._bucket.limit != limit:
            self._bucket = _TokenBucket(limit)
        return not self._bucket.allow()

    def middlewares(self, open_paths: Iterable[str] = OPEN_PATHS) -> list[Middleware]:
        """aiohttp middlewares, outermost first: the configured response headers (on every
        response, errors included), client_allowed_sans (403 for a certificate without one of
        them; Go refuses it in the handshake), rate_limit (429 for every route, as the
        toolkit), then basic auth for every route but `open_paths`."""
        open_set = frozenset(open_paths)

        @web.middleware
        async def allowed_sans(request: web.Request, handler: Handler) -> web.StreamResponse:
            tls = self.settings.tls
            if tls is not None and tls.client_allowed_sans is not None:
                transport = request.transport
                peer = transport.get_extra_info("peercert") if transport is not None else None
                if not _has_allowed_san(peer, tls.client_allowed_sans):
                    raise web.HTTPForbidden(text="client certificate has no allowed SAN\n")
            return await handler(request)

        @web.middleware
        async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self._rate_limited(self.settings.rate_limit):
                raise web.HTTPTooManyRequests()  # counted with every 429 by the listener's edge
            return await handler(request)

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

        return [extra_headers, allowed_sans, rate_limit, basic_auth]


class _ReloadingSSLContext(ssl.SSLContext):
    """Hands every new connection to the web config's current context: asyncio (and blocking
    servers) create each connection's TLS object through wrap_bio / wrap_socket."""

    web_config: WebConfig

    def __new__(cls, web_config: WebConfig) -> _ReloadingSSLContext:
        context = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)
        context.web_config = web_config
        return context

    def __init__(self, web_config: WebConfig) -> None:
        pass  # set up in __new__; SSLContext.__init__ takes no config

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self.web_config._current_ssl_context().wrap_bio(  # noqa: SLF001
            incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: Any, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self.web_config._current_ssl_context().wrap_socket(  # noqa: SLF001
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, server_hostname,
            session)


def _has_allowed_san(peer: object, allowed: Iterable[str]) -> bool:
    """Whether a verified client certificate (ssl's getpeercert() form) has one of `allowed`
    among its DNS, IP, email and URI SANs; IP addresses compare as addresses."""
    if not isinstance(peer, dict):
        return False  # no certificate, or one ssl did not verify
    wanted = {_san_key(name) for name in allowed}
    for kind, value in peer.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI", "IP Address") and _san_key(value) in wanted:
            return True
    return False


def _san_key(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


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
