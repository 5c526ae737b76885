"""The ZEGO Cloud Recording Grafana dashboard, built with Grafana's typed builders
(grafana-foundation-sdk): grafana/dashboards/zego-cloudrecord.json."""

# PromQL expressions stay on one line each: easier to read and to paste into Prometheus.
# ruff: noqa: E501

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from mixin.config import MixinConfig

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
TARGET = 'cluster=~"$cluster", job=~"$job", instance=~"$instance"'  # the exporter's raw series
APP = f'{TARGET}, app_id=~"$app"'
ROOM = f'{APP}, room_id=~"$room"'
RECORDED = 'cluster=~"$cluster", job=~"$job", app_id=~"$app"'  # recording rules drop instance
RI = "$__rate_interval"
GREEN = models.Threshold(value=None, color="green")
# Prometheus' own annotation fields, which the SDK's AnnotationQuery does not model.
ANNOTATION_FORMAT = {"titleFormat": "{{alertname}}", "textFormat": "room {{room_id}}",
                     "step": "60s"}

Target = prometheus.Dataquery
PanelBuilder = stat.Panel | timeseries.Panel | heatmap.Panel | table.Panel
# Colours of the upload outcomes, the same on every panel.
OUTCOME_COLORS = {"uploaded": "green", "backup": "yellow", "failed": "red",
                  "no_files": "orange", "unknown": "purple"}


def target(expr: str, legend: str = "__auto", exemplar: bool = False) -> Target:
    """`exemplar`: for counters the exporter gives {task_id} exemplars (exporter-metrics.yml),
    so a point of the graph names the recording behind it."""
    built = Target().expr(expr).legend_format(legend).datasource(DATASOURCE)
    return built.exemplar(True) if exemplar else built


COLOR_TEXT = models.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"})


def fixed_color(color: str) -> list[models.DynamicConfigValue]:
    return [models.DynamicConfigValue(id_val="color",
                                      value={"mode": "fixed", "fixedColor": color})]


def _queries(targets: Sequence[Target]) -> list[Builder[Any]]:
    return [t.ref_id(ref) for ref, t in zip("ABCDEFGH", targets, strict=False)]


def timeseries_panel(title: str, description: str, unit: str, targets: Sequence[Target],
                     width: int = 12, stack: bool = False, bars: bool = False,
                     max_value: float | None = None) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
        .unit(unit).span(width).height(8).min(0)
        .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
        .fill_opacity(30 if stack or bars else 10)
        .legend(common_builders.VizLegendOptions().show_legend(True)
                .display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.RIGHT).calcs(["lastNotNull", "max"]))
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                 .sort(common.SortOrder.DESCENDING))
        .targets(_queries(targets))
    )
    if stack:
        panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
                       .group("A"))
    if max_value is not None:
        panel.max(max_value)
    return panel


def stat_panel(title: str, description: str, unit: str, expr: str,
               thresholds: list[models.Threshold]) -> stat.Panel:
    return (
        stat.Panel().title(title).description(description).datasource(DATASOURCE)
        .unit(unit).span(4).height(4)
        .thresholds(builders.ThresholdsConfig().mode(models.ThresholdsMode.ABSOLUTE)
                    .steps(thresholds))
        .color_scheme(builders.FieldColor().mode(models.FieldColorModeId.THRESHOLDS))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .with_target(target(expr, "").instant().ref_id("A"))
    )


def overview() -> list[PanelBuilder]:
    return [
        stat_panel(
            "Live recordings",
            "Recording tasks in status recording now, selected apps and rooms.",
            "short",
            f'sum(zego_cloudrecord_tasks{{{ROOM}, status="recording"}})',
            [GREEN],
        ),
        stat_panel(
            "Abnormal ends (1h)",
            "Recordings of the selected apps that ended abnormally in the last hour (recording "
            "rule, restart-safe: restored counters do not count).",
            "short",
            f"sum(app_id:zego_cloudrecord_tasks_ended_abnormally:new1h{{{RECORDED}}})",
            [GREEN, models.Threshold(value=1, color="red")],
        ),
        stat_panel(
            "Abnormal-end ratio (1h)",
            "Share of the recordings ended in the last hour that ended abnormally. "
            "ZegoCloudRecordingAbnormalEndRatioHigh warns above 10%.",
            "percentunit",
            f"max(app_id:zego_cloudrecord_tasks_ended_abnormally:ratio1h{{{RECORDED}}})",
            [GREEN, models.Threshold(value=0.05, color="orange"),
             models.Threshold(value=0.1, color="red")],
        ).no_value("no ends"),
        stat_panel(
            "Upstream up",
            "1 if the last poll cycle of every selected app succeeded (min of zego_cloudrecord_up).",
            "bool_yes_no",
            f"min(zego_cloudrecord_up{{{APP}}})",
            [models.Threshold(value=None, color="red"), models.Threshold(value=1, color="green")],
        ),
        stat_panel(
            "Since last successful poll",
            "Age of the oldest 'last successful poll' among the selected apps. "
            "ZegoCloudRecordingPollStale fires above 3 poll intervals.",
            "s",
            f"time() - min(zego_cloudrecord_last_poll_success_timestamp_seconds{{{APP}}})",
            [GREEN, models.Threshold(value=45, color="orange"),
             models.Threshold(value=120, color="red")],
        ),
        stat_panel(
            "Exporter targets up",
            "Scrape targets of the selected jobs and instances that Prometheus scrapes "
            "successfully.",
            "short",
            f"sum(up{{{TARGET}}})",
            [models.Threshold(value=None, color="red"), models.Threshold(value=1, color="green")],
        ),
    ]


def recordings() -> list[PanelBuilder]:
    events = (("started", "started"), ("ended", "ended (all outcomes)"),
              ("ended_abnormally", "ended abnormally"), ("paused", "paused"),
              ("resumed", "resumed"), ("lost", "lost"))
    return [
        timeseries_panel(
            "Live recordings by room and status",
            "Tasks ZEGO reports per room, by status (initializing, recording, paused).",
            "short",
            [target(f"sum by (app_id, room_id, status) (zego_cloudrecord_tasks{{{ROOM}}})",
                    "{{room_id}} {{status}} ({{app_id}})")],
            width=24,
            stack=True,
        ),
        timeseries_panel(
            "Starts and ends",
            "Task events detected per interval, selected apps and rooms.",
            "short",
            [target(f"sum(increase(zego_cloudrecord_tasks_{name}_total{{{ROOM}}}[{RI}]))", legend,
                    exemplar=True)
             for name, legend in events],
            bars=True,
        ).override_by_name("ended abnormally", fixed_color("red")),
        timeseries_panel(
            "Abnormal ends by room",
            "Recordings that ended abnormally (ZEGO status 4), per room. Each one pages "
            "ZegoCloudRecordingEndedAbnormally; the exemplars name their TaskIds.",
            "short",
            [target(f"sum by (app_id, room_id) (increase(zego_cloudrecord_tasks_ended_abnormally_total{{{ROOM}}}[{RI}])) > 0",
                    "{{room_id}} ({{app_id}})", exemplar=True)],
            bars=True,
        ),
        timeseries_panel(
            "Abnormal ends by quit reason (callbacks)",
            "Abnormal ends reported by ZEGO callbacks, by quit_reason (1 service failed to "
            "start, 2 room login failed, 3 MaxIdleTime, 4 MaxRecordTime, 5 engine failed, "
            "6 network disconnected, 1001-1011 engine/file errors). Empty without callbacks.",
            "short",
            [target(f"sum by (quit_reason) (increase(zego_cloudrecord_tasks_ended_abnormally_by_reason_total{{{APP}}}[{RI}])) > 0",
                    "reason {{quit_reason}}")],
            bars=True,
        ),
        timeseries_panel(
            "Tasks lost and upload failures",
            "Tasks the exporter lost track of (no final status), and file upload failures "
            "reported by callbacks, per room.",
            "short",
            [target(f"sum by (room_id) (increase(zego_cloudrecord_tasks_lost_total{{{ROOM}}}[{RI}])) > 0",
                    "lost {{room_id}}", exemplar=True),
             target(f"sum by (room_id) (increase(zego_cloudrecord_upload_failures_total{{{ROOM}}}[{RI}])) > 0",
                    "upload failed {{room_id}}")],
            bars=True,
        ),
        heatmap.Panel()
        .title("Recording duration distribution")
        .description("Durations of the recordings that ended in each interval (both outcomes), "
                     "from the zego_cloudrecord_task_duration_seconds histogram.")
        .datasource(DATASOURCE).unit("s").span(12).height(8)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .cell_gap(1)
        .color(heatmap.HeatmapColorOptions().mode(heatmap_models.HeatmapColorMode.SCHEME)
               .scheme("Oranges").fill("dark-orange").steps(64).exponent(0.5))
        .mode(common.TooltipDisplayMode.SINGLE).show_y_histogram()
        .with_target(target(f"sum by (le) (increase(zego_cloudrecord_task_duration_seconds_bucket{{{APP}}}[{RI}]))",
                            "{{le}}").format(PromQueryFormat.HEATMAP).ref_id("A")),
        timeseries_panel(
            "Recording duration quantiles",
            "p50 and p90 of the durations of recordings that ended, by outcome "
            "(normal, abnormal). Short abnormal durations point at start-up failures.",
            "s",
            [target(f"histogram_quantile({q}, sum by (outcome, le) (rate(zego_cloudrecord_task_duration_seconds_bucket{{{APP}}}[{RI}])))",
                    f"p{int(q * 100)} {{{{outcome}}}}")
             for q in (0.5, 0.9)],
        ),
        timeseries_panel(
            "Callbacks received",
            "ZEGO recording callbacks by event type and handling result (only with "
            "--callback.listen-address).",
            "reqps",
            [target(f"sum by (event_type, result) (rate(zego_cloudrecord_callbacks_total{{{APP}}}[{RI}]))",
                    "{{event_type}} {{result}}")],
            width=24,
        ),
    ]


def uploads() -> list[PanelBuilder]:
    outcomes = timeseries_panel(
        "Upload outcomes",
        "Ended recordings by what became of their files, per interval: uploaded, backup (kept "
        "in ZEGO's backup storage for 3 days), failed (ZegoCloudRecordingUploadFailed), "
        "no_files (an empty recording: ZegoCloudRecordingNoFiles), unknown (not settled an "
        "hour after the end, or ZEGO forgot the task). The exemplars name the TaskIds.",
        "short",
        [target(f"sum by (outcome) (increase(zego_cloudrecord_upload_outcomes_total{{{ROOM}}}[{RI}]))",
                "{{outcome}}", exemplar=True)],
        stack=True,
        bars=True,
    )
    for outcome, color in OUTCOME_COLORS.items():
        outcomes.override_by_name(outcome, fixed_color(color))
    # Restart-safe counts from the recording rules the alerts use, over the dashboard's range.
    by_room = (
        table.Panel().title("Failed and empty recordings by room")
        .description("Rooms with recordings whose upload failed or that ended with no files, "
                     "over the dashboard's time range (counted like the alerts: a restart "
                     "adds nothing). Open /api/v1/events?room_id=... on the exporter for the "
                     "TaskIds.")
        .datasource(DATASOURCE).unit("short").span(12).height(8)
        .targets(_queries([
            target(f'sum by (app_id, room_id) (sum_over_time(app_id_room_id_outcome:zego_cloudrecord_upload_outcomes:new{{{RECORDED}, room_id=~"$room", outcome="{outcome}"}}[$__range])) > 0', "")
            .instant().format(PromQueryFormat.TABLE)
            for outcome in ("failed", "no_files")]))
        .transformations([
            models.DataTransformerConfig(id_val="merge", options={}),
            models.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True},
                "renameByName": {"app_id": "app", "room_id": "room", "Value #A": "failed",
                                 "Value #B": "no files"}}),
        ])
        .sort_by([common_builders.TableSortByFieldState().display_name("failed").desc(True)])
        .override_by_name("failed", [*fixed_color("red"), COLOR_TEXT])
        .override_by_name("no files", [*fixed_color("orange"), COLOR_TEXT])
    )
    skipped = timeseries_panel(
        "Upload look-ups postponed",
        "DescribeRecordStatus look-ups of ended recordings that the request budget left for a "
        "later cycle, per interval and app. Lasting, it delays the upload outcomes (and their "
        "alerts); after an hour they count as unknown. Raise rate_limit or poll_interval.",
        "short",
        [target(f"sum by (app_id) (increase(zego_cloudrecord_upload_lookups_skipped_total{{{APP}}}[{RI}]))",
                "{{app_id}}")],
        width=24,
        bars=True,
    )
    return [outcomes, by_room, skipped]


def upstream_health() -> list[PanelBuilder]:
    return [
        timeseries_panel(
            "Upstream up by app",
            "zego_cloudrecord_up: 1 when the app's last poll cycle succeeded.",
            "bool_yes_no",
            [target(f"min by (app_id) (zego_cloudrecord_up{{{APP}}})", "{{app_id}}")],
            max_value=1,
        ),
        timeseries_panel(
            "API requests by action and code",
            "Calls to ZEGO per second by action and answer: 0 success, 300000003 rate "
            "limited, 1000000xx auth/signature/AppId, http_5xx, timeout, "
            "connection_error, invalid_response.",
            "reqps",
            [target(f"sum by (action, code) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}]))",
                    "{{action}} {{code}}")],
            stack=True,
        ),
        timeseries_panel(
            "API request latency",
            "p50 / p90 / p99 of ZEGO API call durations by action (all apps: the histogram "
            "has no app_id label).",
            "s",
            [target(f"histogram_quantile({q}, sum by (action, le) (rate(zego_cloudrecord_api_request_duration_seconds_bucket{{{TARGET}}}[{RI}])))",
                    f"p{int(q * 100)} {{{{action}}}}")
             for q in (0.5, 0.9, 0.99)],
        ),
        timeseries_panel(
            "API error ratio",
            "Share of ZEGO calls not answered with code 0, by app and action.",
            "percentunit",
            [target(f'sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}, code!="0"}}[{RI}])) '
                    f"/ sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}]))",
                    "{{app_id}} {{action}}")],
            max_value=1,
        ),
        timeseries_panel(
            "Rate-limit budget in use",
            "Requests per second sent to ZEGO divided by the configured rate_limit "
            "(zego_cloudrecord_rate_limit_requests_per_second), by app and action. "
            "Near 100% the limiter makes requests wait.",
            "percentunit",
            [target(f"sum by (app_id, action) (rate(zego_cloudrecord_api_requests_total{{{APP}}}[{RI}])) "
                    f"/ on (app_id, action) max by (app_id, action) (zego_cloudrecord_rate_limit_requests_per_second{{{APP}}})",
                    "{{app_id}} {{action}}")],
        ),
        timeseries_panel(
            "Rate-limiter wait",
            "Seconds per second that requests spent waiting for the token bucket, by app and "
            "action. Above 0 means the poll cycle is throttled by rate_limit.",
            "s",
            [target(f"sum by (app_id, action) (rate(zego_cloudrecord_rate_limit_wait_seconds_total{{{APP}}}[{RI}]))",
                    "{{app_id}} {{action}}")],
        ),
        timeseries_panel(
            "Poll cycle duration",
            "How long the app's last poll cycle took, against the configured poll interval. "
            "A cycle longer than the interval means polls fall behind.",
            "s",
            [target(f"max by (app_id) (zego_cloudrecord_poll_duration_seconds{{{APP}}})",
                    "cycle {{app_id}}"),
             target(f"max by (app_id) (zego_cloudrecord_poll_interval_seconds{{{APP}}})",
                    "interval {{app_id}}")],
        ).override_by_regexp("interval .*", [
            models.DynamicConfigValue(id_val="custom.lineStyle",
                                      value={"fill": "dash", "dash": [10, 10]})]),
        timeseries_panel(
            "Time since last successful poll",
            "Seconds since the app's last successful poll cycle, against 3 poll intervals "
            "(the ZegoCloudRecordingPollStale threshold).",
            "s",
            [target(f"time() - max by (app_id) (zego_cloudrecord_last_poll_success_timestamp_seconds{{{APP}}})",
                    "{{app_id}}"),
             target(f"3 * max by (app_id) (zego_cloudrecord_poll_interval_seconds{{{APP}}})",
                    "stale threshold {{app_id}}")],
        ),
        timeseries_panel(
            "Exporter scrape target",
            "Prometheus scrape health of the selected exporter targets, and the exporter "
            "versions running.",
            "short",
            [target(f"up{{{TARGET}}}", "up {{instance}}"),
             target(f"count by (version) (zego_cloudrecord_exporter_build_info{{{TARGET}}})",
                    "version {{version}}")],
            width=24,
        ),
    ]


def variable(name: str, label: str, query: str, all_value: str | None = ".*"
             ) -> builders.QueryVariable:
    """A multi-value query variable, "All" selected. Without `all_value` Grafana's All is the
    list of the values found, so it never widens the query beyond them."""
    built = (builders.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
             .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
             .sort(models.VariableSort.NUMERICAL_ASC).multi(True).include_all(True)
             .current(models.VariableOption(selected=True, text=["All"], value=["$__all"])))
    return built if all_value is None else built.all_value(all_value)


def variables(config: MixinConfig) -> list[builders.QueryVariable | builders.DatasourceVariable]:
    targets = f"up{{{config.job_selector}"
    return [
        builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        # Optional: without a cluster label (one Prometheus) All matches every series.
        variable("cluster", "Cluster", f"label_values({targets}}}, cluster)"),
        variable("job", "Job", f'label_values({targets}, cluster=~"$cluster"}}, job)', None),
        variable("instance", "Instance",
                 f'label_values({targets}, cluster=~"$cluster", job=~"$job"}}, instance)', None),
        variable("app", "App", f"label_values(zego_cloudrecord_up{{{TARGET}}}, app_id)"),
        variable("room", "Room",
                 f'label_values(zego_cloudrecord_tasks_started_total{{{APP}}}, room_id)'),
    ]


def dashboard(config: MixinConfig) -> dict[str, Any]:
    board = (
        builders.Dashboard("ZEGO Cloud Recording").uid("zego-cloudrecord")
        .description("Recordings, abnormal ends and upstream health seen by "
                     "zego-cloudrecord-exporter.")
        .tags(["zego", "cloud-recording", "zego-cloudrecord-exporter"])
        .editable().tooltip(models.DashboardCursorSync.CROSSHAIR).refresh("30s")
        .time("now-6h", "now").timezone("")
        .variables(list(variables(config)))
        .annotation(
            builders.AnnotationQuery().name("Recording alerts").datasource(DATASOURCE)
            .enable(True).icon_color("red")
            .expr('ALERTS{alertname=~"ZegoCloudRecording.*", alertstate="firing", '
                  'cluster=~"$cluster", job=~"$job", app_id=~"$app"}'))
    )
    panel_id = 0
    for title, panels in (("Overview", overview()), ("Recordings", recordings()),
                          ("Uploads", uploads()), ("Upstream health", upstream_health())):
        panel_id += 1
        board.with_row(builders.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board.with_panel(panel.id(panel_id))
    document: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for annotation in document["annotations"]["list"]:
        annotation.update(ANNOTATION_FORMAT)
    return document


def render_dashboard(config: MixinConfig) -> str:
    return json.dumps(dashboard(config), indent=2) + "\n"
