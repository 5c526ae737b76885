"""Splits the configured apps and rooms across replicas (--shard.count, --shard.index).

Every replica reads the same config and keeps what a stable hash gives it: a listed room goes
to shard `sha1("app_id/room_id") mod N`, an app with rooms "*" goes whole to shard
`sha1("app_id") mod N`. An app whose rooms land on several shards shares its ZEGO budget: each
of those replicas polls with `rate_limit / shards holding its rooms`, so together they stay
within the app's limit (unless a shared budget, --ratelimit.redis-url, enforces the total).
"""

from __future__ import annotations

import dataclasses
import hashlib

from exporter.config import AppConfig, Config


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    count: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("--shard.count must be >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard.index must be in [0, {self.count - 1}]")

    def of(self, key: str) -> int:
        """The shard `key` belongs to: stable across processes, versions and machines."""
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).digest()
        return int.from_bytes(digest[:8], "big") % self.count

    def owns(self, key: str) -> bool:
        return self.of(key) == self.index


def room_key(app_id: int, room_id: str) -> str:
    return f"{app_id}/{room_id}"


def shard_app(app: AppConfig, shard: Shard, divide_budget: bool = True) -> AppConfig | None:
    """This shard's part of one app (None: nothing), with its share of the budget."""
    if app.rooms is None:
        return app if shard.owns(str(app.app_id)) else None
    owners = [shard.of(room_key(app.app_id, room)) for room in app.rooms]
    mine = tuple(room for room, owner in zip(app.rooms, owners, strict=True)
                 if owner == shard.index)
    if not mine:
        return None
    rate_limit = app.rate_limit / len(set(owners)) if divide_budget else app.rate_limit
    return dataclasses.replace(app, rooms=mine, rate_limit=rate_limit)


def shard_config(config: Config, shard: Shard, divide_budget: bool = True) -> Config:
    """The config this replica polls: its apps and rooms only."""
    if shard.count == 1:
        return config
    apps = tuple(part for app in config.apps
                 if (part := shard_app(app, shard, divide_budget)) is not None)
    return dataclasses.replace(config, apps=apps)
