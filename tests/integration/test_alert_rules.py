"""The shipped PrometheusRule (manifests/monitoring/autoglm-rules.yaml) in real Prometheus
tools: ``promtool check rules`` accepts its groups, and a real Prometheus loads them, evaluates
every rule without error and puts each alert in ``pending`` for exactly the series that
breach it: exporters speaking the router's and the gateway's series for one deployment,
slot a over every threshold, slot b under all of them. (The alerts' signals are asked of the
Prometheus of a real ``autoglm up`` in e2e/test_dashboard.py.)"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from autoglm import alerts
from autoglm.local.prometheus_server import PrometheusServer, prometheus_binary
from autoglm.procs import free_port
from autoglm.testing import eventually

pytestmark = pytest.mark.prometheus
ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "manifests" / "monitoring" / "autoglm-rules.yaml"
TARGET = {"namespace": "ns", "deployment": "tiny"}


def binary(name: str) -> Path:
    """``prometheus`` or ``promtool`` (Debian's package ships both side by side): a missing
    one fails the test with the way to get it, never skips it."""
    try:
        prometheus = prometheus_binary()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    if name == "prometheus":
        return prometheus
    found = prometheus.parent / name
    if found.exists():
        return found
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} not found beside {prometheus} nor on PATH: Debian's prometheus "
                    "package ships it (bash .ci/prometheus.sh)", pytrace=False)
    return Path(on_path)


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file (what the Prometheus Operator
    writes for the Prometheus it runs)."""
    rule = yaml.safe_load(FILE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    out: Path = tmp_path_factory.mktemp("rules") / "autoglm.rules.yml"
    out.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return out


def test_promtool_checks_the_rules(rule_file: Path) -> None:
    r = subprocess.run([str(binary("promtool")), "check", "rules", str(rule_file)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts.alerts())} rules found" in r.stdout


class Router(Collector):
    """A router's generation series, consistent at every scrape (derived from one tick
    count): ``hot`` over every alert's threshold (time to first token 2.5-5 s, 95% of its
    KV cache reserved, 3 waiting), else well under."""

    def __init__(self, hot: bool) -> None:
        self.hot, self.n = hot, itertools.count(1)

    def collect(self) -> Iterator[Metric]:
        n = 10.0 * next(self.n)
        ttft = HistogramMetricFamily("autoglm_time_to_first_token_seconds", "",
                                     labels=["version"])
        bounds = ("0.1", "2.5", "5.0", "+Inf")
        below = 0.0 if self.hot else n  # what lies under 2.5 s
        ttft.add_metric(["1"], list(zip(bounds, (below, below, n, n), strict=True)),
                        sum_value=n * (4.0 if self.hot else 0.05))
        yield ttft
        for name, value in (("autoglm_kv_cache_used_tokens", 950.0 if self.hot else 100.0),
                            ("autoglm_kv_cache_capacity_tokens", 1000.0),
                            ("autoglm_generate_waiting", 3.0 if self.hot else 0.0)):
            g = GaugeMetricFamily(name, "", labels=["version"])
            g.add_metric(["1"], value)
            yield g


class Gateway(Collector):
    """The gateway's requests: 2 in 22 answered 429 (over the deployment's 5% bound)."""

    def __init__(self) -> None:
        self.n = itertools.count(1)

    def collect(self) -> Iterator[Metric]:
        n = float(next(self.n))
        c = CounterMetricFamily("autoglm_gateway_requests", "", labels=["slot", "version",
                                                                        "code"])
        c.add_metric(["a", "1", "200"], 10 * n)
        c.add_metric(["a", "1", "429"], 2 * n)
        c.add_metric(["b", "2", "200"], 10 * n)
        yield c


@pytest.fixture(scope="module")
def prom(rule_file: Path, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[PrometheusServer, dict[str, str]]]:
    """A real Prometheus with the rules, scraping the exporters; and each slot's router's
    ``instance``."""
    binary("prometheus")
    servers, groups, instances = [], [], {}
    for slot, collector in (("a", Router(hot=True)), ("b", Router(hot=False)),
                            ("", Gateway())):
        reg = CollectorRegistry()
        reg.register(collector)
        port = free_port()
        servers.append(start_http_server(port, "127.0.0.1", registry=reg)[0])
        labels = {**TARGET, "component": "router" if slot else "gateway"}
        if slot:
            labels["slot"] = slot
            instances[slot] = f"127.0.0.1:{port}"
        groups.append((labels, [f"127.0.0.1:{port}"]))
    server = PrometheusServer(tmp_path_factory.mktemp("prom"), free_port(),
                              rule_files=[rule_file])
    server.set_targets(groups)
    try:
        try:
            server.start()
        except RuntimeError as e:  # e.g. a rule it cannot load: its log says which
            log = (server.workdir / "prometheus.log").read_text()[-2000:]
            pytest.fail(f"{e}:\n{log}", pytrace=False)
        yield server, instances
    finally:
        server.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


def rules(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10) as r:
        groups: list[dict[str, Any]] = json.loads(r.read())["data"]["groups"]
    return groups


def test_prometheus_loads_the_rules_and_each_alert_pends_on_what_breaches_it(
        prom: tuple[PrometheusServer, dict[str, str]]) -> None:
    server, instances = prom
    shipped = yaml.safe_load(FILE.read_text())["spec"]["groups"]

    def all_pending() -> list[dict[str, Any]] | None:
        loaded = rules(server.url)
        every = [r for g in loaded for r in g["rules"]]
        return loaded if every and all(r["state"] == "pending" for r in every) else None

    try:
        loaded: list[dict[str, Any]] | None = eventually(all_pending, "every alert pending",
                                                         timeout=60, interval=0.5)
    except AssertionError:
        loaded = None
    if loaded is None:
        pytest.fail("not every alert went pending:\n" + "\n".join(
            f"{r['name']}: health {r['health']} {r.get('lastError', '')}, state "
            f"{r['state']}" for g in rules(server.url) for r in g["rules"]), pytrace=False)
    assert [g["name"] for g in loaded] == [g["name"] for g in shipped]
    for group, want in zip(loaded, shipped, strict=True):
        assert [r["name"] for r in group["rules"]] == [r["alert"] for r in want["rules"]]
        for got, rule in zip(group["rules"], want["rules"], strict=True):
            assert got["health"] == "ok", (got["name"], got.get("lastError"))
            assert got["type"] == "alerting" and got["query"] == rule["expr"]
            assert got["labels"] == rule["labels"] and "severity" in rule["labels"]
            assert got["annotations"] == rule["annotations"]
            assert set(rule["annotations"]) == {"summary", "description"}
    router = {**TARGET, "slot": "a"}
    expected = {  # what each alert names: slot b and the deployment's healthy parts never
        "AutoGLMTimeToFirstTokenHigh": router,
        "AutoGLMSaturated": TARGET,
        "AutoGLMKVCacheNearlyFull": {**router, "instance": instances["a"]},
        "AutoGLMGenerationsWaiting": {**router, "instance": instances["a"]},
    }
    got = {r["name"]: [{k: v for k, v in a["labels"].items()
                        if k not in ("alertname", "severity")} for a in r["alerts"]]
           for g in loaded for r in g["rules"]}
    assert got == {name: [labels] for name, labels in expected.items()}
