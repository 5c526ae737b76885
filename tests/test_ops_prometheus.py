"""The Prometheus rules of deploy/prometheus: valid, unit-tested with promtool, documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
CONTRACT = PROMETHEUS_DIR / "exporter-metrics.yml"

PROMQL_WORDS = {
    # functions
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "max_over_time", "min_over_time",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sort", "sort_desc",
    "stddev_over_time", "sum_over_time", "time", "timestamp", "vector",
    # aggregations and keywords
    "sum", "min", "max", "avg", "count", "count_values", "quantile", "stddev", "stdvar",
    "topk", "bottomk", "group", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (good enough for this repository's expressions)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )
    text = re.sub(r"\boffset\s+\S+", "", text)
    names = set(re.findall(r"(?<![\w$.])[A-Za-z_:][\w:]*", text))
    return {n for n in names if n.lower() not in PROMQL_WORDS}



def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def contract_metric_names() -> set[str]:
    metrics: dict[str, dict[str, Any]] = yaml.safe_load(CONTRACT.read_text())["metrics"]
    names = set(metrics)
    for name, spec in metrics.items():
        if spec["type"] == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def alert_tests() -> list[tuple[str, list[Any]]]:
    """(alertname, exp_alerts) of every alert_rule_test in the promtool test files."""
    found = []
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                found.append((check["alertname"], check.get("exp_alerts") or []))
    return found


def test_promtool_accepts_the_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = require_binary("promtool", "prometheus")
    assert RULE_TESTS, "no promtool test files in deploy/prometheus/tests"
    result = subprocess.run(
        [promtool, "test", "rules", *[p.name for p in RULE_TESTS]],
        cwd=PROMETHEUS_DIR / "tests",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_is_tested_firing_and_silent(alert: dict[str, Any]) -> None:
    checks = [exp for name, exp in alert_tests() if name == alert["alert"]]
    assert any(checks), f"{alert['alert']}: no promtool test where it fires"
    assert any(not exp for exp in checks), f"{alert['alert']}: no test where it stays silent"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_has_severity_summary_and_a_runbook_section(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in {"critical", "warning"}
    annotations = alert["annotations"]
    assert annotations["summary"] and annotations["description"]
    url = annotations["runbook_url"]
    assert url.split("#")[0].endswith("/docs/runbook.md"), url
    anchor = url.split("#", 1)[1]
    assert anchor == alert["alert"].lower()
    assert anchor in github_anchors(RUNBOOK.read_text()), f"docs/runbook.md lacks #{anchor}"


@pytest.mark.parametrize("rule", load_rules(), ids=lambda r: r.get("alert") or r["record"])
def test_rules_only_read_contract_metrics_and_recorded_series(rule: dict[str, Any]) -> None:
    unknown = promql_metric_names(rule["expr"]) - contract_metric_names() - recorded_names()
    assert not unknown, f"unknown metric names: {sorted(unknown)}"


def test_recording_rules_follow_level_metric_operation_naming() -> None:
    for name in recorded_names():
        level, metric, operation = name.split(":")
        assert level and operation, name
        assert metric.startswith("zego_cloudrecord_"), name


def test_the_page_for_abnormal_ends_does_not_wait() -> None:
    """Paging within a minute needs no `for` on top of poll + scrape + evaluation."""
    (page,) = [a for a in alerts() if a["alert"] == "ZegoCloudRecordingEndedAbnormally"]
    assert page.get("for", "0s") in {"0s", "0m"}
    assert page["labels"]["severity"] == "critical"


def test_the_metric_name_parser_sees_what_it_should() -> None:
    expr = (
        'sum by (job, app_id) (rate(foo_total{code=~"1|2"}[5m] offset 1h)) '
        "/ on (job) group_left bar:baz:rate5m and time() - up"
    )
    assert promql_metric_names(expr) == {"foo_total", "bar:baz:rate5m", "up"}
