"""The mixin's settings (mixin/config.yml), validated: each mistake is one line naming the key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# One or more PromQL label matchers, as written between braces: job="x", env=~"prod|stage".
# Backquotes are refused: the selector is also written inside a Go template raw string.
_MATCHER = r'\s*[A-Za-z_]\w*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\`\n]|\\.)*"\s*'
SELECTOR = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*")
SEVERITY = re.compile(r"[\w.-]+")
RUNBOOK_PLACEHOLDERS = re.compile(r"\{(\w*)\}")
KEYS = {"job_selector", "runbook_url", "severities"}
OPTIONAL_KEYS = {"events_url"}  # added later: a config written before still loads
EVENTS_PLACEHOLDERS = {"exporter", "app_id", "room_id"}
DEFAULT_EVENTS_URL = "http://{exporter}/api/v1/events?app_id={app_id}&room_id={room_id}"
SEVERITY_KEYS = {"page", "ticket"}


class ConfigError(ValueError):
    """A mixin config that cannot be used; the message names the key."""


@dataclass(frozen=True)
class MixinConfig:
    job_selector: str  # label matchers of the exporter's targets, e.g. job="zego-cloudrecord"
    runbook_url: str  # with {anchor} and optionally {exporter}
    severity_page: str
    severity_ticket: str
    # The per-room alerts' events_url: with {room_id}, optionally {app_id} and {exporter}.
    events_url: str = DEFAULT_EVENTS_URL


def parse_config(document: Any) -> MixinConfig:
    if not isinstance(document, dict):
        raise ConfigError("the config must be a mapping of job_selector, runbook_url, "
                          "severities (and optionally events_url)")
    _exact_keys("", document, KEYS, OPTIONAL_KEYS)
    selector = _string("job_selector", document["job_selector"])
    if not SELECTOR.fullmatch(selector):
        raise ConfigError(f'job_selector: {selector!r} is not label matchers like job="name"')
    url = _string("runbook_url", document["runbook_url"])
    unknown = set(RUNBOOK_PLACEHOLDERS.findall(url)) - {"anchor", "exporter"}
    if unknown or "{anchor}" not in url:
        raise ConfigError("runbook_url: must contain {anchor}; {exporter} is the only other "
                          "placeholder")
    severities = document["severities"]
    if not isinstance(severities, dict):
        raise ConfigError("severities: must be a mapping of page and ticket")
    _exact_keys("severities.", severities, SEVERITY_KEYS)
    for key in sorted(SEVERITY_KEYS):
        value = _string(f"severities.{key}", severities[key])
        if not SEVERITY.fullmatch(value):
            raise ConfigError(f"severities.{key}: {value!r} is not a plain label value")
    events = _string("events_url", document.get("events_url", DEFAULT_EVENTS_URL))
    unknown = set(RUNBOOK_PLACEHOLDERS.findall(events)) - EVENTS_PLACEHOLDERS
    if unknown or "{room_id}" not in events:
        raise ConfigError("events_url: must contain {room_id}; {app_id} and {exporter} are the "
                          "only other placeholders")
    return MixinConfig(selector.strip(), url, severities["page"], severities["ticket"], events)


def load_config(path: Path) -> MixinConfig:
    try:
        return parse_config(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not YAML: {error}") from None


def _exact_keys(prefix: str, mapping: dict[Any, Any], keys: set[str],
                optional: set[str] | None = None) -> None:
    missing, extra = keys - set(mapping), set(mapping) - keys - (optional or set())
    if missing:
        raise ConfigError(f"{prefix}{sorted(missing)[0]}: missing")
    if extra:
        raise ConfigError(f"{prefix}{sorted(map(str, extra))[0]}: unknown key")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return value
