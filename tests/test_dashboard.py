"""The Grafana dashboard (dashboards/sensor-hub.json) and the Prometheus alert rules
(dashboards/alerts.yml) are not decoration: every metric and label their PromQL uses is
exported by a running `hub serve`, and every InfluxQL query of the dashboard runs against
the suite's InfluxDB and returns that hub's data.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from device_sim.client import DeviceClient
from device_sim.local_servers import (
    LocalServer,
    create_database,
    drop_database,
    free_port,
    http_request,
    influxql_series,
)
from hub.gateway.presence import CONNECTION_MEASUREMENT
from tests.support import HubProcess, add_device, hub_settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "sensor-hub.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
# Series Prometheus makes itself, not the hub.
PROMETHEUS_OWN = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "on", "and", "or", "unless", "without", "ignoring", "bool", "offset"}
WAIT_S = 30.0
# What Grafana puts in place of the dashboard's variables and macros.
GRAFANA = {
    "$timeFilter": "time > now() - 2h",
    "$__interval": "1m",
    "$measurement": "environment",
    "$field": "temperature",
}


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana imports it."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel but rows."""
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def promql_expressions() -> list[str]:
    """Every PromQL expression: the dashboard's targets, its variables, the alert rules."""
    exprs = [t["expr"] for p in panels() for t in p["targets"] if "expr" in t]
    for variable in dashboard()["templating"]["list"]:
        if variable.get("datasource", {}).get("type") == "prometheus":
            query = variable["query"]["query"]
            exprs.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", query))
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


def influxql_queries() -> dict[str, str]:
    """Every InfluxQL query of the dashboard, by panel (or variable) title."""
    queries = {
        f"{p['title']} [{t['refId']}]": t["query"]
        for p in panels()
        for t in p["targets"]
        if "query" in t
    }
    for variable in dashboard()["templating"]["list"]:
        if variable.get("datasource", {}).get("type") == "influxdb":
            queries[f"${variable['name']}"] = variable["query"]
    return queries


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    bare = re.sub(r'"[^"]*"', "", expr)  # strings
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(?:by|on|without|ignoring)\s*\([^)]*\)", "", bare)  # groupings
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        rest = bare[match.end() :].lstrip()
        word = match.group()
        if not rest.startswith("(") and word not in PROMQL_WORDS and not word.startswith("$"):
            names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """The labels a PromQL expression matches on or groups by."""
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    return labels


def sample_labels(exposition: str) -> dict[str, set[str]]:
    """Each exported sample name and the label names it carries."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


@dataclass
class Observed:
    """A running hub's /metrics and the answers to the dashboard's InfluxQL queries."""

    exposition: str
    answers: dict[str, list[dict[str, Any]]]


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def observed(influxdb: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """A `hub serve --workers 2` with two devices: `busy-1` streams now and stays connected;
    `silent-1` sent 15 minutes ago (explicit times) and has gone. Queried while `busy-1` is
    online."""
    db = "dashboard_test"
    create_database(influxdb.url, db)
    state = tmp_path_factory.mktemp("dashboard") / "state"
    busy = add_device(hub_settings(state, None), "busy-1")
    silent = add_device(hub_settings(state, None), "silent-1")
    health_port = free_port()

    async def run() -> Observed:
        # Two workers: the supervisor's /metrics carries every sample with its `worker`,
        # and the workers' own metrics (hub_worker_up, restarts), which the panels use.
        hub = HubProcess(state, influxdb, db, "--health-port", str(health_port), "--workers", "2")
        async with hub:
            then = now_ms() - 15 * 60 * 1000
            async with DeviceClient(hub.url, silent) as client:
                old = [{"name": "environment", "time": then + i, "fields": {"temperature": 20.0}}
                       for i in range(3)]  # fmt: skip
                assert (await asyncio.wait_for(client.store(old), WAIT_S)).accepted == 3
            async with DeviceClient(hub.url, busy) as client:
                for n in range(5):
                    fresh = [{"name": "environment", "fields": {"temperature": 21.0 + n}}]
                    assert (await asyncio.wait_for(client.store(fresh), WAIT_S)).accepted == 1
                # Presence events are written every presence_flush_s: wait for both.
                deadline = time.monotonic() + WAIT_S
                while len(events(influxdb, db)) < 3:  # connect, disconnect, connect
                    assert time.monotonic() < deadline, hub.log
                    await asyncio.sleep(0.1)
                _, body = http_request(f"http://127.0.0.1:{health_port}/metrics")
                answers = {
                    title: run_influxql(influxdb, db, query)
                    for title, query in influxql_queries().items()
                }
                return Observed(body.decode(), answers)

    try:
        yield asyncio.run(run())
    finally:
        drop_database(influxdb.url, db)


def events(influx: LocalServer, db: str) -> list[dict[str, Any]]:
    """The hub's connection events so far."""
    series = influxql_series(influx.url, db, f'SELECT "event" FROM "{CONNECTION_MEASUREMENT}"')
    return [row for s in series for row in s["values"]]


def run_influxql(influx: LocalServer, db: str, query: str) -> list[dict[str, Any]]:
    """A dashboard query with Grafana's substitutions, as rows with their series' tags."""
    for variable, value in GRAFANA.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"unsubstituted variable in {query}"
    rows = []
    for series in influxql_series(influx.url, db, query):
        tags = series.get("tags") or {}
        rows += [{**tags, **dict(zip(series["columns"], v, strict=True))} for v in series["values"]]
    return rows


# --- The file --------------------------------------------------------------------------------


@pytest.mark.unit
def test_dashboard_is_importable_with_datasource_variables() -> None:
    """JSON with a uid, a Prometheus and an InfluxDB datasource variable that every panel and
    query variable uses, unique panel ids, and panels inside Grafana's 24 columns."""
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["prometheus"]["type"] == variables["influxdb"]["type"] == "datasource"
    assert (variables["prometheus"]["query"], variables["influxdb"]["query"]) == (
        "prometheus",
        "influxdb",
    )
    uses = {"prometheus": "${prometheus}", "influxdb": "${influxdb}"}
    for panel in panels():
        assert panel["datasource"]["uid"] == uses[panel["datasource"]["type"]], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.unit
def test_dashboard_covers_what_operators_watch() -> None:
    """Hub health (connections, refusals, readings, rejections, ack and write latency, InfluxDB
    errors, spool size and age, dead letters, per hub) and the fleet (devices online,
    readings per device, connection events)."""
    exprs = " ".join(promql_expressions())
    for metric in (
        "hub_connections", "hub_handshakes_refused_total", "hub_readings_received_total",
        "hub_readings_stored_total", "hub_readings_rejected_total", "hub_ack_latency_seconds",
        "hub_influx_write_duration_seconds", "hub_influx_errors_total", "hub_spool_bytes",
        "hub_spool_oldest_age_seconds", "hub_dead_letter_points_total",
    ):  # fmt: skip
        assert metric in exprs, metric
    assert 'instance=~"$instance"' in exprs
    titles = " ".join(influxql_queries())
    for title in ("Devices online", "Readings per device", "Connection events", "Silent devices"):
        assert title in titles


@pytest.mark.unit
def test_alert_rules_cover_the_spool_influxdb_and_dead_letters() -> None:
    """The rules file is Prometheus' format with the alerts docs/deploy.md describes."""
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"HubSpoolGrowing", "HubInfluxDBRefusingWrites", "HubSpoolFull", "HubDown"} <= names
    assert all(set(rule) <= {"alert", "expr", "for", "labels", "annotations"} for rule in rules)
    documented = (ROOT / "docs" / "deploy.md").read_text()
    assert all(name in documented for name in names)


# --- Against a running hub --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("expr", promql_expressions())
def test_every_promql_metric_and_label_is_exported(observed: Observed, expr: str) -> None:
    """Each series an expression selects is in a running hub's /metrics, and each label it
    matches or groups by is on those series (instance and job come from Prometheus)."""
    exported = sample_labels(observed.exposition)
    assert metric_names(expr), f"no metric found in {expr}"
    names = metric_names(expr) - PROMETHEUS_OWN
    missing = names - set(exported)
    assert not missing, f"{expr}: not exported: {missing}"
    carried: set[str] = set().union(*(exported[name] for name in names))
    assert label_names(expr) - TARGET_LABELS - {"le"} <= carried - {"le"}, expr
    if any(name.endswith("_bucket") for name in names):
        assert "le" in carried


@pytest.mark.unit
def test_the_parser_finds_metric_names() -> None:
    """The checks above see through functions, groupings, matchers and ranges."""
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(hub_x_bucket{instance=~"$i"}'
        "[$__rate_interval]))) > 1 and on (instance) hub_y == 0"
    )
    assert metric_names(expr) == {"hub_x_bucket", "hub_y"}
    assert label_names(expr) == {"le", "instance"}


@pytest.mark.e2e
def test_the_influxql_queries_return_the_hubs_data(observed: Observed) -> None:
    """Every query runs; each answers with what the hub wrote for its two devices."""
    answers = observed.answers
    for title, rows in answers.items():
        assert rows, f"{title}: no data"
    # Devices online: busy-1 only (silent-1's last event is its disconnect).
    (online,) = answers["Devices online [A]"]
    assert online["count"] == 1
    connects = sum(r["count"] for r in answers["Connection events [A]"])
    disconnects = sum(r["count"] for r in answers["Connection events [B]"])
    assert (connects, disconnects) == (2, 1)
    per_device = answers["Readings per device ($measurement.$field) [A]"]
    counts = {
        d: sum(r["count"] for r in per_device if r["device"] == d) for d in ("busy-1", "silent-1")
    }
    assert counts == {"busy-1": 5, "silent-1": 3}
    silent = answers["Silent devices: readings in each 10 minutes of the last hour [A]"]
    last = {r["device"]: r["count"] for r in sorted(silent, key=lambda r: r["time"])}
    assert last == {"busy-1": 5, "silent-1": 0}
    latest = answers["Latest connection events [A]"]
    assert {(r["device"], r["event"]) for r in latest} == {
        ("silent-1", "connected"), ("silent-1", "disconnected"), ("busy-1", "connected"),
    }  # fmt: skip
    measurements = [r["name"] for r in answers["$measurement"]]
    assert "environment" in measurements and CONNECTION_MEASUREMENT in measurements
    regex = next(v for v in dashboard()["templating"]["list"] if v["name"] == "measurement")
    pattern = regex["regex"].strip("/")
    assert [m for m in measurements if re.fullmatch(pattern, m)] == ["environment"]
    assert [r["fieldKey"] for r in answers["$field"]] == ["temperature"]
