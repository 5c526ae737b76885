"""The Grafana dashboard and provisioning of grafana/: complete, reading only real metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "zego-cloudrecord.json"
CONTRACT = ROOT / "deploy" / "prometheus" / "exporter-metrics.yml"
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules.yml"

PROMQL_WORDS = {
    "abs", "absent", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count_over_time",
    "delta", "deriv", "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "label_values", "last_over_time", "max_over_time", "min_over_time",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "sum_over_time", "time",
    "timestamp", "vector", "sum", "min", "max", "avg", "count", "quantile", "topk", "bottomk",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "offset", "bool", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (Grafana variables like $app are ignored)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(([^,)]+),[^)]*\)", r"(\1)", text)
    names = set(re.findall(r"(?<![\w$.])[A-Za-z_:][\w:]*", text))
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def allowed_metric_names() -> set[str]:
    metrics: dict[str, dict[str, Any]] = yaml.safe_load(CONTRACT.read_text())["metrics"]
    names = set(metrics)
    for name, spec in metrics.items():
        if spec["type"] == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    rules = yaml.safe_load(RULES_FILE.read_text())
    names |= {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    return names | {"ALERTS"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


def data_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def all_targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in data_panels() for t in p["targets"]]


def test_committed_dashboard_is_what_the_builder_produces() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec and spec.loader
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert DASHBOARD_FILE.read_text() == builder.render(), (
        "grafana/dashboards/zego-cloudrecord.json is stale: run python grafana/build_dashboard.py"
    )


def test_dashboard_has_datasource_app_and_room_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("app", "room"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["multi"] and variables[name]["includeAll"]
    assert "$app" in variables["room"]["definition"], "rooms should follow the selected apps"


@pytest.mark.parametrize("panel", list(data_panels()), ids=lambda p: p["title"])
def test_every_panel_has_datasource_unit_and_description(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["fieldConfig"]["defaults"].get("unit"), "missing unit"
    assert len(panel.get("description", "")) > 20, "missing description"
    assert panel["targets"], "no queries"
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize(("title", "expr"), all_targets(), ids=lambda v: str(v)[:60])
def test_queries_read_only_exporter_metrics_and_recording_rules(title: str, expr: str) -> None:
    names = promql_metric_names(expr)
    assert names, f"{title}: no metric in {expr!r}"
    unknown = names - allowed_metric_names()
    assert not unknown, f"{title}: unknown metric names {sorted(unknown)}"


@pytest.mark.parametrize(("title", "expr"), all_targets(), ids=lambda v: str(v)[:60])
def test_rates_use_the_rate_interval(title: str, expr: str) -> None:
    for function, window in re.findall(r"\b(rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
        assert window == "$__rate_interval", f"{title}: {function}() over [{window}]"


def test_variables_and_annotations_read_only_exporter_metrics() -> None:
    board = dashboard()
    queries = [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    queries += [a["expr"] for a in board["annotations"]["list"]]
    for query in queries:
        assert promql_metric_names(query) <= allowed_metric_names(), query


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]


def test_dashboard_covers_what_on_call_needs() -> None:
    text = json.dumps(dashboard())
    for metric in (
        "zego_cloudrecord_tasks{",
        "zego_cloudrecord_tasks_started_total",
        "zego_cloudrecord_tasks_ended_abnormally_total",
        "zego_cloudrecord_tasks_ended_abnormally_by_reason_total",
        "zego_cloudrecord_task_duration_seconds_bucket",
        "zego_cloudrecord_up",
        "zego_cloudrecord_api_requests_total",
        "zego_cloudrecord_api_request_duration_seconds_bucket",
        "zego_cloudrecord_rate_limit_wait_seconds_total",
        "zego_cloudrecord_rate_limit_requests_per_second",
        "zego_cloudrecord_poll_duration_seconds",
    ):
        assert metric in text, f"no panel uses {metric}"
    assert any(p["type"] == "heatmap" for p in data_panels())


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/zego.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
