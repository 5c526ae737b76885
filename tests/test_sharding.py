"""Sharding: every room polled by exactly one replica, budgets split, the StatefulSet example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter.cli import main
from exporter.config import AppConfig, Config, Secret, ZegoConfig
from exporter.sharding import Shard, room_key, shard_config

ROOT = Path(__file__).resolve().parent.parent
SECRET = Secret("0123456789abcdef0123456789abcdef")


def config(*apps: AppConfig) -> Config:
    return Config(zego=ZegoConfig(), poll_interval=15.0, apps=apps)


def listed(app_id: int, rooms: int, rate_limit: float = 10.0) -> AppConfig:
    return AppConfig(app_id, SECRET, tuple(f"room-{i}" for i in range(rooms)), rate_limit)


def test_every_room_lands_on_exactly_one_shard() -> None:
    whole = config(listed(1, 500), listed(2, 7), AppConfig(3, SECRET, None))
    seen: dict[tuple[int, str], int] = {}
    for index in range(4):
        for app in shard_config(whole, Shard(4, index)).apps:
            for room in app.rooms or ("*",):
                assert (app.app_id, room) not in seen
                seen[(app.app_id, room)] = index
    expected = {(a.app_id, r) for a in whole.apps for r in (a.rooms or ("*",))}
    assert set(seen) == expected


def test_the_split_is_stable_and_roughly_even() -> None:
    shard = Shard(4, 0)
    assert shard.of(room_key(1, "room-1")) == Shard(4, 3).of("1/room-1")  # same hash everywhere
    counts = [len(shard_config(config(listed(1, 4000)), Shard(4, i)).apps[0].rooms or ())
              for i in range(4)]
    assert sum(counts) == 4000
    assert min(counts) > 900


def test_an_app_with_all_rooms_goes_whole_to_one_shard_with_its_whole_budget() -> None:
    whole = config(AppConfig(77, SECRET, None, rate_limit=10.0))
    parts = [shard_config(whole, Shard(3, i)).apps for i in range(3)]
    owners = [apps for apps in parts if apps]
    assert len(owners) == 1
    assert owners[0][0].rooms is None and owners[0][0].rate_limit == 10.0


def test_an_app_split_across_shards_divides_its_rate_limit() -> None:
    whole = config(listed(1, 100, rate_limit=12.0))
    limits = [shard_config(whole, Shard(3, i)).apps[0].rate_limit for i in range(3)]
    assert limits == [4.0, 4.0, 4.0]
    assert sum(limits) <= 12.0


def test_an_app_on_fewer_shards_than_replicas_shares_among_those_only() -> None:
    app = AppConfig(9, SECRET, ("only-room",), rate_limit=10.0)
    parts = [shard_config(config(app), Shard(5, i)).apps for i in range(5)]
    assert [len(p) for p in parts].count(1) == 1
    (mine,) = [p[0] for p in parts if p]
    assert mine.rate_limit == 10.0


def test_the_budget_is_kept_whole_when_a_shared_limiter_enforces_it() -> None:
    whole = config(listed(1, 100, rate_limit=12.0))
    assert shard_config(whole, Shard(3, 1), divide_budget=False).apps[0].rate_limit == 12.0


def test_one_shard_is_the_config_itself() -> None:
    whole = config(listed(1, 3))
    assert shard_config(whole, Shard()) is whole


@pytest.mark.parametrize(("count", "index"), [(0, 0), (3, 3), (3, -1)])
def test_bad_shard_flags_are_refused(count: int, index: int, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET.reveal())
    secret.chmod(0o600)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"apps": [{"app_id": 1, "server_secret_file": str(secret),
                                              "rooms": ["a"]}]}))
    code = main([f"--config.file={path}", f"--shard.count={count}", f"--shard.index={index}"])
    assert code == 1
    assert "--shard." in capsys.readouterr().err

