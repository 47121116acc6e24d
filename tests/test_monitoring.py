"""Prometheus and Grafana in docker-compose.yml, checked without Docker.

What breaks silently here: a scrape target that names no service or the wrong
port (Prometheus shows the target down, the dashboard stays empty), a Grafana
provisioning path that points where nothing is mounted, and a panel whose
PromQL names a series the code does not register (or by a label it lacks):
Grafana draws "No data" and nobody notices. The series are read from the
registry itself, after importing every nudgeflow module, so a renamed metric
fails here.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import promql_parser
import pytest
import yaml
from dashboard_helpers import record_arm
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import nudgeflow
from nudgeflow.core.dashboard import Samples, summarise
from nudgeflow.core.metrics import Metrics
from nudgeflow.core.outcomes import ATTRIBUTED_REASONS
from nudgeflow.core.settings import Settings
from nudgeflow.dispatch_api.server import create_app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "nudgeflow.json"

# The series the conversion and lift panels read, with the labels they rely on.
ATTRIBUTION_SERIES = {
    "nudgeflow_decided_total": {"rule", "variant", "decision", "reason"},
    "nudgeflow_outcomes_total": {"rule", "variant", "outcome"},
    "nudgeflow_outcome_value_total": {"rule", "variant"},
}
# What the dashboard must show (issue 13): events, triggers by decision, latency and
# timer lag, dead letters, conversions by variant.
REQUIRED = {
    "nudgeflow_events_total", "nudgeflow_triggers_dispatched_total",
    "nudgeflow_triggers_suppressed_total", "nudgeflow_event_to_dispatch_seconds_bucket",
    "nudgeflow_timer_lag_seconds_bucket", "nudgeflow_dead_letters_total",
    "nudgeflow_decided_total", "nudgeflow_outcomes_total",
}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
             "gauge": ("",), "summary": ("_count", "_sum", "")}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
    assert isinstance(found, dict)
    return found


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("."):
            out[target] = (COMPOSE_FILE.parent / source).resolve()
    return out


def _host_path(mounts: dict[str, Path], container_path: str) -> Path:
    """Where a file the container reads lies in the repository, through its mounts."""
    wanted = PurePosixPath(container_path)
    for target, source in mounts.items():
        if wanted == PurePosixPath(target) or PurePosixPath(target) in wanted.parents:
            return source / wanted.relative_to(target)
    msg = f"{container_path} is not mounted"
    raise AssertionError(msg)


def registered_series() -> dict[str, set[str]]:
    """Every sample name the package's code registers, with its labels.

    Every module is imported, so a series registered anywhere at import (ours in
    nudgeflow.core.metrics, bytewax's Kafka lag gauge) is in the default registry.
    A labelled series has no sample until it is first used, so its label names come
    from the collector (prometheus-client keeps them in `_labelnames`).
    """
    for module in pkgutil.walk_packages(nudgeflow.__path__, "nudgeflow."):
        importlib.import_module(module.name)
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        if not isinstance(collector, MetricWrapperBase):
            continue  # the process and platform collectors
        labels = set(collector._labelnames)
        kind = collector._type
        for suffix in _SUFFIXES[kind]:
            bucket = {"le"} if suffix == "_bucket" else set()
            out[collector._name + suffix] = labels | bucket
    return out


def _expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []
    for panel in board["panels"]:
        exprs.extend(target["expr"] for target in panel.get("targets", []))
    return exprs


def parse_promql(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric name, label names its matchers use) of each selector, and the grouping labels.

    Parsed by promql-parser (the Prometheus grammar, in Rust): an expression
    Prometheus would refuse raises ValueError. Grafana's `$__…` variables are
    durations.
    """
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            selectors.append((node.name, labels))
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.AggregateExpr):
            if node.modifier is not None:
                grouping.update(node.modifier.labels)
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.BinaryExpr):
            modifier = node.modifier
            if modifier is not None:
                if modifier.matching is not None:
                    grouping.update(modifier.matching.labels)
                grouping.update(modifier.group_labels or ())  # none for `or`, `and`
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr
                        | promql_parser.SubqueryExpr):
            walk(node.expr)

    walk(promql_parser.parse(re.sub(r"\$__\w+", "5m", expr)))
    return selectors, grouping


def test_the_promql_parser_finds_selectors_labels_and_grouping() -> None:
    selectors, grouping = parse_promql(
        'histogram_quantile(0.99, sum by (rule, le) (rate(a_bucket{since="x"}[$__rate_interval])))'
        " / on (rule) group_left () sum(b_total) - 1"
    )
    assert selectors == [("a_bucket", {"since"}), ("b_total", set())]
    assert grouping == {"rule", "le"}
    with pytest.raises(ValueError, match="invalid promql"):
        # `group_left` takes a label list: this is not one
        parse_promql("a / on (rule) group_left (sum by (rule) (b))")


def test_every_panel_reads_a_series_the_code_registers_by_labels_it_has() -> None:
    registered = registered_series()
    assert "nudgeflow_events_total" in registered  # the import found them
    known = registered
    used: set[str] = set()
    for expr in _expressions():
        selectors, grouping = parse_promql(expr)
        assert selectors, expr
        labels_here: set[str] = set()
        for name, labels in selectors:
            assert name in known, f"{name} is not registered: {expr}"
            assert labels <= known[name], f"{name} has no label {labels - known[name]}: {expr}"
            labels_here |= known[name]
            used.add(name)
        assert grouping <= labels_here, f"grouping by {grouping - labels_here}: {expr}"
    missing = REQUIRED - used
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


def test_the_attribution_series_are_registered_with_the_labels_the_panels_use() -> None:
    registered = registered_series()
    for name, labels in ATTRIBUTION_SERIES.items():
        assert registered.get(name) == labels, name


def _matchers(expr: str, name: str) -> list[dict[str, tuple[str, str]]]:
    """Each selector of `name` in `expr`: label -> (match operator, value)."""
    found: list[dict[str, tuple[str, str]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name == name:
                found.append({m.name: (str(m.op).rsplit(".", 1)[-1], m.value)
                              for m in node.matchers.matchers})
            return
        for attr in ("vector_selector", "expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(re.sub(r"\$__\w+", "5m", expr)))
    return found


def test_the_panels_count_only_the_measured_decisions_as_the_report_does() -> None:
    # `nudgeflow report` measures a trigger that was dispatched or held back as one of
    # ATTRIBUTED_REASONS (nudgeflow.core.outcomes): a panel dividing by every decision
    # would count frequency-capped triggers that never reached the experiment.
    reasons = "|".join(sorted(ATTRIBUTED_REASONS))
    dispatched = {"decision": ("Equal", "dispatched")}
    held = {"decision": ("Equal", "suppressed"), "reason": ("Re", reasons)}
    using = [e for e in _expressions() if "nudgeflow_decided_total" in e]
    assert using, "no panel reads the decisions"
    for expr in using:
        selectors = _matchers(expr, "nudgeflow_decided_total")
        kinds = []
        for found in selectors:
            # Beyond the measured rule, a selector may pick an arm (`variant`).
            rule = {k: v for k, v in found.items() if k != "variant"}
            assert rule in (dispatched, held), (found, expr)
            kinds.append("dispatched" if rule == dispatched else "held")
        assert kinds.count("dispatched") == kinds.count("held"), expr  # always both


def test_prometheus_scrapes_the_flows_health_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    args = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_file = _host_path(_mounts(prometheus), args["config.file"])
    assert config_file.is_file()
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    targets = {
        target: job.get("metrics_path", "/metrics")
        for job in config["scrape_configs"] for static in job["static_configs"]
        for target in static["targets"]
    }
    # The flow's health server: its service name, the port its settings give it
    # (process id unset: port + 0), on every interface of its container.
    env = services["flow"]["environment"]
    port = int(env.get("NUDGEFLOW_HEALTH_PORT", Settings.model_fields["health_port"].default))
    assert env["NUDGEFLOW_HEALTH_HOST"] == "0.0.0.0"
    assert targets == {f"flow:{port}": "/metrics"}
    assert f"127.0.0.1:{port}:{port}" in services["flow"]["ports"]
    # The reference dispatch API serves no metrics: nothing else to scrape.
    paths = {getattr(route, "path", "") for route in create_app().routes}
    assert "/metrics" not in paths, "the dispatch API has metrics now: scrape it too"


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    mounts = _mounts(grafana)
    provisioning = _host_path(mounts, "/etc/grafana/provisioning")
    assert provisioning.is_dir()

    (datasource_file,) = (provisioning / "datasources").glob("*.yaml")
    (source,) = yaml.safe_load(datasource_file.read_text(encoding="utf-8"))["datasources"]
    assert source["type"] == "prometheus"
    # The Prometheus service by name, on the port it listens on (its default, 9090).
    assert source["url"] == "http://prometheus:9090"
    assert "--web.listen-address" not in " ".join(services["prometheus"]["command"])

    (provider_file,) = (provisioning / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file"
    folder = _host_path(mounts, provider["options"]["path"])
    assert folder == DASHBOARD.parent.resolve()
    assert DASHBOARD in set(folder.glob("*.json"))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(mounts, home) == DASHBOARD.resolve()

    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "nudgeflow"
    for panel in board["panels"]:
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"] == {"type": "prometheus", "uid": source["uid"]}


def test_monitoring_ports_are_on_loopback_and_data_in_a_named_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    volumes = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["volumes"]
    assert "prometheus-data:/prometheus" in services["prometheus"]["volumes"]
    assert "prometheus-data" in volumes


def _promtool() -> str:
    """Prometheus's promtool: on the PATH, or where scripts/test.sh puts it (the venv)."""
    venv = str(Path(sys.executable).parent)
    found = shutil.which("promtool") or shutil.which("promtool", path=venv)
    if found is None:
        reason = "promtool missing: scripts/test.sh extracts it from Debian's prometheus"
        if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if v) + "}"


def test_the_panels_compute_what_the_page_shows(tmp_path: Path) -> None:
    """Prometheus itself (`promtool test rules`) evaluates the experiment table's PromQL
    over counters the flow's own `Metrics` recorded; each column must be, to the last
    bit, what the page's summary (the report's definitions) makes of the same counters."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    record_arm(m, "cart", "holdout", suppressed={"holdout": 100, "frequency_cap": 7},
               converted=10)
    record_arm(m, "cart", "now", dispatched=180, suppressed={"frequency_cap": 20},
               converted=27, cart_recovered=12, value_each=40.0)
    record_arm(m, "cart", "after_1h", dispatched=150, suppressed={"cancelled": 50}, converted=16)
    record_arm(m, "cart", "late", dispatched=50)  # no conversion: a rate of 0, a lift
    record_arm(m, "plain", "", dispatched=10, converted=1)  # no experiment: no lift
    record_arm(m, "r2", "holdout", suppressed={"holdout": 20})  # never converted
    record_arm(m, "r2", "treatment", dispatched=80, converted=4)
    record_arm(m, "r3", "holdout", suppressed={"no_channel": 5})  # none measured
    record_arm(m, "r3", "a", dispatched=10, converted=1)
    rows = summarise(registry)["experiments"]["variants"]

    # Every counter as a series that went from 0 to its value over the 10 minutes.
    series = [
        {"series": name + _labels(labels), "values": f"0 {value!r}"}
        for name in ("nudgeflow_decided_total", "nudgeflow_outcomes_total",
                     "nudgeflow_outcome_value_total")
        for labels, value in Samples(registry).get(name)
    ]
    want: dict[str, Callable[[dict[str, Any]], float | None]] = {
        "measured": lambda r: r["attributed"] or None,  # nothing measured: no series
        "converted": lambda r: r["outcomes"].get("converted"),
        "conversion": lambda r: r["conversion_rate"],
        "lift (pp)": lambda r: None if r["lift"] is None else 100 * r["lift"],
        "relative lift": lambda r: r["relative_lift"],
        "cart recovered": lambda r: r["outcomes"].get("cart_recovered"),
        "revenue": lambda r: r["revenue"] or None,
    }
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    table = next(p for p in board["panels"] if p["title"].startswith("Conversions and lift"))
    names = next(t for t in table["transformations"] if t["id"] == "organize")[
        "options"]["renameByName"]
    tests: list[dict[str, Any]] = []
    for target in table["targets"]:
        column = want[names[f"Value #{target['refId']}"]]
        expected = [(row, column(row)) for row in rows]
        tests.append({
            "expr": target["expr"].replace("$__range", "15m"),
            "eval_time": "10m",
            "exp_samples": [
                {"labels": _labels({"rule": row["rule"], "variant": row["variant"]}),
                 "value": value}
                for row, value in expected if value is not None
            ],
        })
    assert len(tests) == len(want)
    spec = tmp_path / "panels.yml"
    spec.write_text(yaml.safe_dump({"tests": [{
        "interval": "10m", "input_series": series, "promql_expr_test": tests,
    }]}), encoding="utf-8")
    result = subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
