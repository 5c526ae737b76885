"""End to end with real parts: simulator, exporter, Prometheus (shipped rules), Alertmanager.

Every process runs on loopback with free ports, its files in a temporary directory. One scenario
is played once for the module: three configured rooms sit at 0, recordings start in room-1 and
room-2, then room-2's recording is aborted (ZEGO status 4). The tests check that the page for it
reaches Alertmanager's webhook within a minute, for room-2 only, that every rule of
deploy/prometheus/rules.yml evaluates cleanly against the real exporter, and that every query of
the Grafana dashboard returns data (or is listed below as expected to be empty, with why).

Needs the Debian packages `prometheus` and `prometheus-alertmanager` (unpacked into .tools/ by
.ci/tools.sh).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from exporter.demo import free_port
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

APP_ID = 1234567890
SERVER_SECRET = "0123456789abcdef0123456789abcdef"
ROOMS = ("room-1", "room-2", "room-3")
JOB = "zego-cloudrecord"
ABNORMAL_END_ALERT = "ZegoCloudRecordingEndedAbnormally"
ALERT_LATENCY_TARGET_S = 60.0

# Grafana's template variables, as Grafana would expand them with the dashboard's defaults
# ("All" selected, allValue ".*") and a 1s scrape interval.
GRAFANA_VARIABLES = {
    "cluster": ".*",
    "job": JOB,
    "instance": ".*",
    "app": ".*",
    "room": ".*",
    "datasource": "prometheus",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# Dashboard queries allowed to return nothing in this run: a regular expression searched in
# the query, and the reason. A query listed here that does return data is reported, not failed.
EXPECTED_EMPTY: dict[str, str] = {
    r"^label_values\(.*, cluster\)$": "no cluster label with one Prometheus: $cluster is All (.*)",
    r"zego_cloudrecord_tasks_ended_abnormally_by_reason_total": (
        "callback-only metric (--callback.listen-address); this run polls only"
    ),
    r"zego_cloudrecord_callbacks_total": "callback-only metric; this run polls only",
    r"zego_cloudrecord_upload_failures_total": "callback-only metric (upload failures)",
    r"zego_cloudrecord_tasks_lost_total.*\) > 0$": "`> 0`: no task is lost in this run",
    r'code!="0"': "no API call fails in this run, so no series with a non-zero code exists",
    r"upload_outcomes:new\{.*\) > 0$": "`> 0`: no recording's upload fails or is empty here",
}

T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------------




def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25
) -> T:
    """Polls `check` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})"
    )


# --- the parts ---------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.log.parent, start_new_session=True,
            )

    def assert_running(self) -> None:
        assert self.popen is not None and self.popen.poll() is None, (
            f"{self.name} exited with {self.popen and self.popen.returncode}:\n{self.tail()}"
        )

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Notification:
    received: float  # time.monotonic()
    alerts: list[dict[str, Any]]


class WebhookReceiver:
    """Alertmanager's webhook receiver: keeps every notification with its arrival time."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.notifications.append(Notification(time.monotonic(), body["alerts"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def firing(self, alertname: str) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [
                (n.received, alert["labels"])
                for n in self.notifications
                for alert in n.alerts
                if alert["status"] == "firing" and alert["labels"].get("alertname") == alertname
            ]


@dataclass
class Stack:
    directory: Path
    simulator_url: str
    exporter_url: str
    prometheus_url: str
    alertmanager_url: str
    webhook: WebhookReceiver
    processes: list[Process] = field(default_factory=list)
    abort_at: float = 0.0  # time.monotonic() when room-2's recording was aborted
    aborted_task: str = ""  # its TaskId
    alert_latency: float = 0.0

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = http_json(url)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus refused {expr!r}: {exc.read().decode()}") from exc
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def label_values(self, label: str, selector: str) -> list[str]:
        query = urllib.parse.urlencode({"match[]": selector})
        answer = http_json(f"{self.prometheus_url}api/v1/label/{label}/values?{query}")
        assert answer["status"] == "success", answer
        values: list[str] = answer["data"]
        return values

    def control(self, op: str, room_id: str | None = None, task_id: str | None = None) -> str:
        answer = http_json(
            f"{self.simulator_url}_sim/control",
            {"op": op, "app_id": APP_ID, "room_id": room_id, "task_id": task_id},
        )
        task: str = answer["task_id"]
        return task

    def room_values(self, expr: str) -> dict[str, float]:
        return {s["metric"].get("room_id", ""): float(s["value"][1]) for s in self.query(expr)}

    def assert_all_running(self) -> None:
        for process in self.processes:
            process.assert_running()

    def print_logs(self) -> None:
        for process in self.processes:
            print(f"\n----- {process.name} ({process.log}), last lines -----\n{process.tail()}")


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def exporter_supports(flag: str) -> bool:
    helptext = subprocess.run(
        [sys.executable, "-m", "exporter", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    return flag in helptext


def build_stack(directory: Path) -> Stack:
    prometheus = require_binary("prometheus", "prometheus")
    alertmanager = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    sim_port, exp_port, prom_port, am_port = (free_port() for _ in range(4))
    webhook = WebhookReceiver()
    stack = Stack(
        directory=directory,
        simulator_url=f"http://127.0.0.1:{sim_port}/",
        exporter_url=f"http://127.0.0.1:{exp_port}/",
        prometheus_url=f"http://127.0.0.1:{prom_port}/",
        alertmanager_url=f"http://127.0.0.1:{am_port}/",
        webhook=webhook,
    )

    # The simulator: no random recordings, only the ones this test scripts.
    scenario = write_yaml(directory / "scenario.yml", {
        "seed": 11,
        "rooms": len(ROOMS),
        "apps": [{"app_id": APP_ID, "server_secret": SERVER_SECRET, "rooms": list(ROOMS)}],
        "lifecycle": {"arrivals_per_hour": 0, "init_seconds": [1, 1]},
    })
    simulator_argv = [
        sys.executable, "-m", "exporter.simulator", "--listen-address", f"127.0.0.1:{sim_port}",
        "--scenario", str(scenario), "--seed", "11",
    ]

    exporter_config = write_yaml(directory / "exporter.yml", {
        "zego": {"endpoint": stack.simulator_url},
        "poll_interval": "1s",
        "apps": [{"app_id": APP_ID, "server_secret": SERVER_SECRET, "rooms": list(ROOMS)}],
    })
    exporter_argv = [
        sys.executable, "-m", "exporter", f"--config.file={exporter_config}",
        f"--web.listen-address=127.0.0.1:{exp_port}",
    ]
    if exporter_supports("--storage.path"):
        exporter_argv.append(f"--storage.path={directory / 'state.db'}")

    rules = directory / "rules.yml"
    shutil.copyfile(RULES_FILE, rules)  # as shipped, byte for byte
    prometheus_config = write_yaml(directory / "prometheus.yml", {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}],
        },
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exp_port}"]}]},
        ],
    })
    prometheus_argv = [
        prometheus, f"--config.file={prometheus_config}",
        f"--storage.tsdb.path={directory / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=info",
        "--enable-feature=exemplar-storage",  # the event counters' {task_id} exemplars
    ]

    alertmanager_config = write_yaml(directory / "alertmanager.yml", {
        "route": {
            "receiver": "webhook",
            "group_by": ["alertname", "app_id", "room_id"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "webhook", "webhook_configs": [{"url": webhook.url, "send_resolved": True}]},
        ],
    })
    alertmanager_argv = [
        alertmanager, f"--config.file={alertmanager_config}",
        f"--storage.path={directory / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{am_port}",
        "--cluster.listen-address=",
    ]

    for name, argv in (
        ("simulator", simulator_argv),
        ("exporter", exporter_argv),
        ("alertmanager", alertmanager_argv),
        ("prometheus", prometheus_argv),
    ):
        stack.processes.append(Process(name, argv, directory / f"{name}.log"))
    return stack


def start_stack(stack: Stack) -> None:
    stack.webhook.start()
    readiness = {
        "simulator": f"{stack.simulator_url}_sim/health",
        "exporter": f"{stack.exporter_url}-/ready",
        "alertmanager": f"{stack.alertmanager_url}-/ready",
        "prometheus": f"{stack.prometheus_url}-/ready",
    }
    for process in stack.processes:
        process.start()
        url = readiness[process.name]

        def ready(process: Process = process, url: str = url) -> bool:
            process.assert_running()
            return http_ok(url)

        wait_for(f"{process.name} to be ready ({url})", ready, timeout=20)

    wait_for(
        "Prometheus to discover the Alertmanager",
        lambda: http_json(f"{stack.prometheus_url}api/v1/alertmanagers")["data"][
            "activeAlertmanagers"
        ],
        timeout=10,
    )
    wait_for(
        "the rule groups to load",
        lambda: len(http_json(f"{stack.prometheus_url}api/v1/rules")["data"]["groups"]) == 2,
        timeout=10,
    )


def play_scenario(stack: Stack) -> None:
    """All rooms at 0, starts in room-1 and room-2, then an abnormal end in room-2."""
    zero = {room: 0.0 for room in ROOMS}
    app = f'app_id="{APP_ID}"'
    wait_for(
        "a few scrapes with every room's counters at 0",
        lambda: stack.room_values(f"zego_cloudrecord_tasks_started_total{{{app}}}") == zero
        and stack.room_values(f"zego_cloudrecord_tasks_ended_abnormally_total{{{app}}}") == zero
        and stack.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 3 and up{{job="{JOB}"}} == 1'),
        timeout=20,
    )
    # The rules need the room's series at 0 in the past before an event: wait until the
    # high-water-mark rule has history, i.e. records a value, for every room.
    wait_for(
        "the `:new` recording rule to have history for every room",
        lambda: stack.room_values(
            f"app_id_room_id:zego_cloudrecord_tasks_ended_abnormally:new{{{app}}}"
        ) == zero,
        timeout=15,
    )

    stack.control("start", room_id="room-1")
    task = stack.control("start", room_id="room-2")
    wait_for(
        "Prometheus to see the starts in room-1 and room-2",
        lambda: stack.room_values(f"zego_cloudrecord_tasks_started_total{{{app}}}")
        == {"room-1": 1.0, "room-2": 1.0, "room-3": 0.0},
        timeout=20,
    )

    stack.control("abort", task_id=task)
    stack.abort_at, stack.aborted_task = time.monotonic(), task
    arrivals = wait_for(
        f"{ABNORMAL_END_ALERT} for room-2 at the webhook",
        lambda: [t for t, labels in stack.webhook.firing(ABNORMAL_END_ALERT)
                 if labels.get("room_id") == "room-2"],
        timeout=ALERT_LATENCY_TARGET_S + 15,
    )
    stack.alert_latency = min(arrivals) - stack.abort_at
    print(f"\n{ABNORMAL_END_ALERT} for room-2 reached the webhook "
          f"{stack.alert_latency:.1f}s after the abort")
    # Give a wrongly firing alert for another room time to show: several evaluations and
    # Alertmanager group waits.
    time.sleep(4)


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The four processes, started once for the module, with the scenario played."""
    stack = build_stack(tmp_path_factory.mktemp("e2e"))
    try:
        start_stack(stack)
        play_scenario(stack)
        yield stack
    except BaseException:
        stack.print_logs()
        raise
    finally:
        for process in reversed(stack.processes):
            process.stop()
        stack.webhook.stop()


@pytest.fixture
def stack(running_stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The running stack; prints the tail of every process's log when the test fails."""
    failed_before = request.session.testsfailed
    yield running_stack
    if request.session.testsfailed > failed_before:
        running_stack.print_logs()


# --- the tests ---------------------------------------------------------------------------


def test_abnormal_end_pages_for_its_room_within_a_minute(stack: Stack) -> None:
    stack.assert_all_running()
    alerts = [labels for _, labels in stack.webhook.firing(ABNORMAL_END_ALERT)]
    room_2 = [labels for labels in alerts if labels.get("room_id") == "room-2"]
    assert room_2, alerts
    assert room_2[0]["app_id"] == str(APP_ID)
    assert room_2[0]["severity"] == "critical"
    assert room_2[0]["job"] == JOB
    assert stack.alert_latency < ALERT_LATENCY_TARGET_S, (
        f"the page took {stack.alert_latency:.1f}s, target {ALERT_LATENCY_TARGET_S:.0f}s"
    )


def test_the_abnormal_end_names_its_task_in_an_exemplar(stack: Stack) -> None:
    """From the alert's room to the recording: Prometheus stored the counter's exemplar."""
    now = time.time()
    query = urllib.parse.urlencode({
        "query": 'zego_cloudrecord_tasks_ended_abnormally_total{room_id="room-2"}',
        "start": now - 600, "end": now})
    answer = wait_for("the exemplar in Prometheus", lambda: http_json(
        f"{stack.prometheus_url}api/v1/query_exemplars?{query}")["data"], timeout=10)
    exemplars = [e for series in answer for e in series["exemplars"]]
    assert [e["labels"] for e in exemplars] == [{"task_id": stack.aborted_task}], answer
    assert abs(float(exemplars[0]["timestamp"]) - (now - (time.monotonic() - stack.abort_at))) \
        < 30


def test_no_abnormal_end_alert_for_the_other_rooms(stack: Stack) -> None:
    at_webhook = {labels.get("room_id") for _, labels in stack.webhook.firing(ABNORMAL_END_ALERT)}
    assert at_webhook == {"room-2"}
    in_prometheus = stack.query(f'ALERTS{{alertname="{ABNORMAL_END_ALERT}"}}')
    assert {s["metric"]["room_id"] for s in in_prometheus} == {"room-2"}
    # Nothing else fires either: a healthy exporter against a healthy upstream.
    firing = {labels["alertname"] for n in stack.webhook.notifications for labels in
              (a["labels"] for a in n.alerts)}
    assert firing == {ABNORMAL_END_ALERT}


def test_the_pages_events_link_lists_the_aborted_task(stack: Stack) -> None:
    """From the page to the recording: the link Prometheus rendered opens the room's events on
    the exporter, the abnormal end first, naming its task."""
    alerts = http_json(f"{stack.prometheus_url}api/v1/alerts")["data"]["alerts"]
    (page,) = [a for a in alerts if a["labels"]["alertname"] == ABNORMAL_END_ALERT]
    url = page["annotations"]["events_url"]
    assert url == (f"{stack.exporter_url}api/v1/events?app_id={APP_ID}&room_id=room-2")
    events = http_json(url)["events"]
    assert {e["room_id"] for e in events} == {"room-2"}
    assert (events[0]["task_id"], events[0]["event"]) == (stack.aborted_task, "ended_abnormally")
    assert page["annotations"]["runbook_url"] == (
        f"{stack.exporter_url}runbook#{ABNORMAL_END_ALERT.lower()}")


def test_every_rule_evaluates_without_error(stack: Stack) -> None:
    groups = http_json(f"{stack.prometheus_url}api/v1/rules")["data"]["groups"]
    shipped = yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in shipped)
    problems = [
        f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}"
        for group in groups for rule in group["rules"] if rule["health"] != "ok"
    ]
    assert not problems, problems


def expand_grafana_variables(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression of every dashboard, variables included."""
    queries: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((f"{panel['title']} [{target['refId']}]", target["expr"]))
            walk(panel.get("panels", []))

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                text = query["query"] if isinstance(query, dict) else query
                queries.append((f"variable ${variable['name']}", text))
        for annotation in dashboard["annotations"]["list"]:
            if annotation.get("expr"):
                queries.append((f"annotation {annotation['name']}", annotation["expr"]))
        walk(dashboard["panels"])
    return queries


def run_dashboard_query(stack: Stack, expr: str) -> tuple[int, int]:
    """How many series (or label values) the query returns, and how many of them are NaN."""
    expanded = expand_grafana_variables(expr)
    label_values = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expanded)
    if label_values:
        return len(stack.label_values(label_values.group(2), label_values.group(1))), 0
    series = stack.query(expanded)
    return len(series), sum(1 for s in series if math.isnan(float(s["value"][1])))


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    rows: list[tuple[str, int, str]] = []
    missing: list[str] = []
    for where, expr in queries:
        count, nan = run_dashboard_query(stack, expr)
        # NaN (e.g. a quantile of an outcome with no ends) shows nothing on a panel.
        count -= nan
        reason = next((why for key, why in EXPECTED_EMPTY.items() if re.search(key, expr)), "")
        if count:
            verdict = "data" + (f" (+{nan} NaN)" if nan else "")
            verdict += " (listed as expected empty)" if reason else ""
        elif reason:
            verdict = f"empty, expected: {reason}"
        else:
            verdict = "EMPTY"
            missing.append(f"{where}: {expr}")
        rows.append((where, count, verdict))

    header = "dashboard query (all apps and rooms, 1m rate interval)"
    width = max(len(header), *(len(where) for where, _, _ in rows))
    print(f"\n{header:<{width}}  series  result")
    for where, count, verdict in rows:
        print(f"{where:<{width}}  {count:>6}  {verdict}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)
