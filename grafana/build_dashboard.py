"""Builds grafana/dashboards/zego-cloudrecord.json: the ZEGO Cloud Recording dashboard as code.

Run `python grafana/build_dashboard.py` after editing; tests/test_ops_grafana.py fails when the
committed JSON differs from what this script produces.
"""

# PromQL expressions stay on one line each: easier to read and to paste into Prometheus.
# ruff: noqa: E501

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "zego-cloudrecord.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
APP = 'app_id=~"$app"'
ROOM = 'app_id=~"$app", room_id=~"$room"'
RI = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    width: int,
    height: int = 8,
    **options: Any,
) -> Panel:
    for ref, t in zip("ABCDEFGH", targets, strict=False):
        t["refId"] = ref
    defaults: dict[str, Any] = {"unit": unit}
    defaults.update(options.pop("defaults", {}))
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": options.pop("overrides", [])},
        "options": options.pop("panel_options", {}),
        "targets": targets,
        "gridPos": {"w": width, "h": height},
        **options,
    }


def timeseries(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    width: int = 12,
    stack: bool = False,
    bars: bool = False,
    **kw: Any,
) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 30 if (stack or bars) else 10,
    }
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults = {"custom": custom, "min": 0, **kw.pop("defaults", {})}
    return panel(
        "timeseries",
        title,
        description,
        unit,
        targets,
        width,
        defaults=defaults,
        panel_options={
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **kw,
    )


def stat(
    title: str, description: str, unit: str, expr: str, thresholds: list[dict[str, Any]], **kw: Any
) -> Panel:
    return panel(
        "stat",
        title,
        description,
        unit,
        [target(expr, legend="", instant=True)],
        4,
        4,
        defaults={
            "thresholds": {"mode": "absolute", "steps": thresholds},
            "color": {"mode": "thresholds"},
            **kw.pop("defaults", {}),
        },
        panel_options={
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "colorMode": "background",
            "graphMode": "none",
        },
        **kw,
    )


def row(title: str) -> Panel:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


GREEN = {"color": "green", "value": None}


def panels() -> list[Panel]:
    return [
        row("Overview"),
        stat(
            "Live recordings",
            "Recording tasks in status recording now, selected apps and rooms.",
            "short",
            f'sum(zego_cloudrecord_tasks{{{ROOM}, status="recording"}})',
            [GREEN],
        ),
        stat(
            "Abnormal ends (1h)",
            "Recordings of the selected apps that ended abnormally in the last hour (recording "
            "rule, restart-safe: restored counters do not count).",
            "short",
            f"sum(app_id:zego_cloudrecord_tasks_ended_abnormally:new1h{{{APP}}})",
            [GREEN, {"color": "red", "value": 1}],
        ),
        stat(
            "Abnormal-end ratio (1h)",
            "Share of the recordings ended in the last hour that ended abnormally. "
            "ZegoCloudRecordingAbnormalEndRatioHigh warns above 10%.",
            "percentunit",
            f"max(app_id:zego_cloudrecord_tasks_ended_abnormally:ratio1h{{{APP}}})",
            [GREEN, {"color": "orange", "value": 0.05}, {"color": "red", "value": 0.1}],
            defaults={"noValue": "no ends"},
        ),
        stat(
            "Upstream up",
            "1 if the last poll cycle of every selected app succeeded (min of zego_cloudrecord_up).",
            "bool_yes_no",
            f"min(zego_cloudrecord_up{{{APP}}})",
            [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        stat(
            "Since last successful poll",
            "Age of the oldest 'last successful poll' among the selected apps. "
            "ZegoCloudRecordPollStale fires above 3 poll intervals.",
            "s",
            f"time() - min(zego_cloudrecord_last_poll_success_timestamp_seconds{{{APP}}})",
            [GREEN, {"color": "orange", "value": 45}, {"color": "red", "value": 120}],
        ),
        stat(
            "Exporter targets up",
            "Scrape targets of job zego-cloudrecord that Prometheus scrapes successfully.",
            "short",
            'sum(up{job="zego-cloudrecord"})',
            [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        row("Recordings"),
        timeseries(
            "Live recordings by room and status",
            "Tasks ZEGO reports per room, by status (initializing, recording, paused).",
            "short",
            [
                target(
                    f"sum by (app_id, room_id, status) (zego_cloudrecord_tasks{{{ROOM}}})",
                    "{{room_id}} {{status}} ({{app_id}})",
                )
            ],
            width=24,
            stack=True,
        ),
        timeseries(
            "Starts and ends",
            "Task events detected per interval, selected apps and rooms.",
            "short",
            [
                target(
                    f"sum(increase(zego_cloudrecord_tasks_{name}_total{{{ROOM}}}[{RI}]))",
                    legend,
                )
                for name, legend in (
                    ("started", "started"),
                    ("ended", "ended (all outcomes)"),
                    ("ended_abnormally", "ended abnormally"),
                    ("paused", "paused"),
                    ("resumed", "resumed"),
                    ("lost", "lost"),
                )
            ],
            bars=True,
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "ended abnormally"},
                    "properties": [
                        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}
                    ],
                }
            ],
        ),
        timeseries(
            "Abnormal ends by room",
            "Recordings that ended abnormally (ZEGO status 4), per room. Each one pages "
            "ZegoCloudRecordingEndedAbnormally.",
            "short",
            [
                target(
                    f"sum by (app_id, room_id) "
                    f"(increase(zego_cloudrecord_tasks_ended_abnormally_total{{{ROOM}}}[{RI}])) > 0",
                    "{{room_id}} ({{app_id}})",
                )
            ],
            bars=True,
        ),
        timeseries(
            "Abnormal ends by quit reason (callbacks)",
            "Abnormal ends reported by ZEGO callbacks, by quit_reason (1 service failed to "
            "start, 2 room login failed, 3 MaxIdleTime, 4 MaxRecordTime, 5 engine failed, "
            "6 network disconnected, 1001-1011 engine/file errors). Empty without callbacks.",
            "short",
            [
                target(
                    f"sum by (quit_reason) "
                    f"(increase(zego_cloudrecord_tasks_ended_abnormally_by_reason_total{{{APP}}}[{RI}])) > 0",
                    "reason {{quit_reason}}",
                )
            ],
            bars=True,
        ),
        timeseries(
            "Tasks lost and upload failures",
            "Tasks the exporter lost track of (no final status), and file upload failures "
            "reported by callbacks, per room.",
            "short",
            [
                target(
                    f"sum by (room_id) (increase(zego_cloudrecord_tasks_lost_total{{{ROOM}}}[{RI}])) > 0",
                    "lost {{room_id}}",
                ),
                target(
                    f"sum by (room_id) (increase(zego_cloudrecord_upload_failures_total{{{ROOM}}}[{RI}])) > 0",
                    "upload failed {{room_id}}",
                ),
            ],
            bars=True,
        ),
        panel(
            "heatmap",
            "Recording duration distribution",
            "Durations of the recordings that ended in each interval (both outcomes), from the "
            "zego_cloudrecord_task_duration_seconds histogram.",
            "s",
            [
                target(
                    f"sum by (le) (increase(zego_cloudrecord_task_duration_seconds_bucket{{{APP}}}[{RI}]))",
                    "{{le}}",
                    format="heatmap",
                )
            ],
            12,
            panel_options={
                "calculate": False,
                "yAxis": {"unit": "s"},
                "cellGap": 1,
                "color": {"scheme": "Oranges", "mode": "scheme"},
                "tooltip": {"show": True, "yHistogram": True},
            },
        ),
        timeseries(
            "Recording duration quantiles",
            "p50 and p90 of the durations of recordings that ended, by outcome "
            "(normal, abnormal). Short abnormal durations point at start-up failures.",
            "s",
            [
                target(
                    f"histogram_quantile({q}, sum by (outcome, le) "
                    f"(rate(zego_cloudrecord_task_duration_seconds_bucket{{{APP}}}[{RI}])))",
                    f"p{int(q * 100)} {{{{outcome}}}}",
                )
                for q in (0.5, 0.9)
            ],
        ),
        timeseries(
            "Callbacks received",
            "ZEGO recording callbacks by event type and handling result (only with "
            "--callback.listen-address).",
            "reqps",
            [
                target(
                    f"sum by (event_type, result) (rate(zego_cloudrecord_callbacks_total{{{APP}}}[{RI}]))",
                    "{{event_type}} {{result}}",
                )
            ],
            width=24,
        ),
        row("Upstream health"),
        timeseries(
            "Upstream up by app",
            "zego_cloudrecord_up: 1 when the app's last poll cycle succeeded.",
            "bool_yes_no",
            [target(f"min by (app_id) (zego_cloudrecord_up{{{APP}}})", "{{app_id}}")],
            defaults={"max": 1},
        ),
        timeseries(
            "API requests by action and code",
            "Calls to ZEGO per second by action and answer: 0 success, 300000003 rate "
            "limited, 1000000xx auth/signature/AppId, http_5xx, timeout, "
            "connection_error, invalid_response.",
            "reqps",
            [
                target(
                    f"sum by (action, code) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}]))",
                    "{{action}} {{code}}",
                )
            ],
            stack=True,
        ),
        timeseries(
            "API request latency",
            "p50 / p90 / p99 of ZEGO API call durations by action (all apps: the histogram "
            "has no app_id label).",
            "s",
            [
                target(
                    f"histogram_quantile({q}, sum by (action, le) "
                    f"(rate(zego_cloudrecord_api_request_duration_seconds_bucket[{RI}])))",
                    f"p{int(q * 100)} {{{{action}}}}",
                )
                for q in (0.5, 0.9, 0.99)
            ],
        ),
        timeseries(
            "API error ratio",
            "Share of ZEGO calls not answered with code 0, by app and action.",
            "percentunit",
            [
                target(
                    f'sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}, code!="0"}}[{RI}])) '
                    f"/ sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}]))",
                    "{{app_id}} {{action}}",
                )
            ],
            defaults={"max": 1},
        ),
        timeseries(
            "Rate-limit budget in use",
            "Requests per second sent to ZEGO divided by the configured rate_limit "
            "(zego_cloudrecord_rate_limit_requests_per_second), by app and action. "
            "Near 100% the limiter makes requests wait.",
            "percentunit",
            [
                target(
                    f"sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}])) "
                    f"/ on (app_id, action) max by (app_id, action) "
                    f"(zego_cloudrecord_rate_limit_requests_per_second{{{APP}}})",
                    "{{app_id}} {{action}}",
                )
            ],
        ),
        timeseries(
            "Rate-limiter wait",
            "Seconds per second that requests spent waiting for the token bucket, by app and "
            "action. Above 0 means the poll cycle is throttled by rate_limit.",
            "s",
            [
                target(
                    f"sum by (app_id, action) (rate(zego_cloudrecord_rate_limit_wait_seconds_total{{{APP}}}[{RI}]))",
                    "{{app_id}} {{action}}",
                )
            ],
        ),
        timeseries(
            "Poll cycle duration",
            "How long the app's last poll cycle took, against the configured poll interval. "
            "A cycle longer than the interval means polls fall behind.",
            "s",
            [
                target(
                    f"max by (app_id) (zego_cloudrecord_poll_duration_seconds{{{APP}}})",
                    "cycle {{app_id}}",
                ),
                target(
                    f"max by (app_id) (zego_cloudrecord_poll_interval_seconds{{{APP}}})",
                    "interval {{app_id}}",
                ),
            ],
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": "interval .*"},
                    "properties": [
                        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}
                    ],
                }
            ],
        ),
        timeseries(
            "Time since last successful poll",
            "Seconds since the app's last successful poll cycle, against 3 poll intervals "
            "(the ZegoCloudRecordPollStale threshold).",
            "s",
            [
                target(
                    f"time() - max by (app_id) (zego_cloudrecord_last_poll_success_timestamp_seconds{{{APP}}})",
                    "{{app_id}}",
                ),
                target(
                    f"3 * max by (app_id) (zego_cloudrecord_poll_interval_seconds{{{APP}}})",
                    "stale threshold {{app_id}}",
                ),
            ],
        ),
        timeseries(
            "Exporter scrape target",
            'Prometheus scrape health of job "zego-cloudrecord" and the exporter versions running.',
            "short",
            [
                target('up{job="zego-cloudrecord"}', "up {{instance}}"),
                target(
                    "count by (version) (zego_cloudrecord_exporter_build_info)",
                    "version {{version}}",
                ),
            ],
            width=24,
        ),
    ]


def layout(items: list[Panel]) -> list[Panel]:
    """Assigns ids and flows panels left to right, top to bottom."""
    x = y = row_height = 0
    for panel_id, item in enumerate(items, start=1):
        item["id"] = panel_id
        grid = item["gridPos"]
        if x + grid["w"] > 24 or item["type"] == "row":
            x, y, row_height = 0, y + row_height, 0
        grid["x"], grid["y"] = x, y
        x += grid["w"]
        row_height = max(row_height, grid["h"])
        if item["type"] == "row":
            x, y, row_height = 0, y + grid["h"], 0
    return items


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3,
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "zego-cloudrecord",
        "title": "ZEGO Cloud Recording",
        "description": "Recordings, abnormal ends and upstream health seen by zego-cloudrecord-exporter.",
        "tags": ["zego", "cloud-recording", "zego-cloudrecord-exporter"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "name": "Recording alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertname=~"ZegoCloudRecording.*", alertstate="firing", app_id=~"$app"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "room {{room_id}}",
                    "step": "60s",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "refresh": 1,
                    "current": {},
                    "hide": 0,
                },
                variable("app", "App", "label_values(zego_cloudrecord_up, app_id)"),
                variable(
                    "room",
                    "Room",
                    'label_values(zego_cloudrecord_tasks_started_total{app_id=~"$app"}, room_id)',
                ),
            ]
        },
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
