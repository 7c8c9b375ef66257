"""Every query of the Grafana dashboard, and the signal of every SLO alert
(manifests/monitoring/autoglm-rules.yaml), answers on a real `autoglm up`: real Triton
servers, the real Prometheus scraping them, traffic through the gateway, the autoscaler at
work and one version rolled, so that every series the dashboard and the alerts read
exists."""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml

from autoglm import alerts, dashboard
from autoglm.metrics import LOCAL_NAMESPACE
from autoglm.models.tiny import PRESETS
from autoglm.repository import build
from autoglm.testing import eventually
from autoglm.testing.up import UpProcess as Up

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
# What Grafana gives the variables at a 1 s scrape interval and a short time range.
VARIABLES = {"namespace": LOCAL_NAMESPACE, "deployment": NAME, "__rate_interval": "30s",
             "__interval": "5s", "__range": "5m"}
DECISIONS = (f'autoglm_autoscaler_decisions_total{{namespace="{LOCAL_NAMESPACE}",'
             f'deployment="{NAME}"}}')


def spec_file(home: Path) -> Path:
    """The tiny example, autoscaled every second on a low target (so decisions happen under
    the test's traffic), at most one extra replica so a swap stays small."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    spec = doc["spec"]
    spec["experts"].update(minReplicas=1, maxReplicas=2, replicaBudget=5)
    spec["autoscaling"].update(target=20, intervalSeconds=1, stabilizationSeconds=0)
    spec["rollout"].update(keepPreviousSeconds=600)
    file = home / "tiny.yaml"
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return file


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("home")
    for version in (1, 2):  # built beforehand: the rollout then only starts servers
        build(home / "models" / NAME, "tiny-moe", version, PRESETS["tiny"])
    with Up.serving(spec_file(home), home) as u:
        yield u


def traffic(port: int, stop: threading.Event, errors: list[str]) -> None:
    """Steady requests, paced to leave the two cores to the rollout (still ~20x the
    autoscaling target in tokens/s)."""
    rng = np.random.default_rng(threading.get_ident() % 2**32)
    with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        while not stop.wait(0.05):
            inp = httpclient.InferInput("INPUT_IDS", [1, 8], "INT64")
            inp.set_data_from_numpy(rng.integers(0, 256, (1, 8)).astype(np.int64))
            try:
                c.infer("router", [inp])
            except Exception as e:
                errors.append(str(e))


def generations(port: int, stop: threading.Event, errors: list[str]) -> None:
    """Streamed completions through the OpenAI API, for the generation panels."""
    body = json.dumps({"model": "tiny-moe", "prompt": "Once upon a time", "max_tokens": 8,
                       "stream": True, "ignore_eos": True}).encode()
    while not stop.wait(0.3):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                if not r.read().rstrip().endswith(b"data: [DONE]"):
                    errors.append("a stream ended without [DONE]")
        except Exception as e:
            errors.append(f"generation: {e}")


def api(prometheus_port: int, path: str, **params: str) -> tuple[object, str]:
    """(data, "") of a Prometheus HTTP API call, or (None, why it failed)."""
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())["data"], ""
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
        return None, f"HTTP {e.code}: {body.get('error', '')}"


def vector(prometheus_port: int, promql: str) -> list[dict[str, Any]]:
    data, why = api(prometheus_port, "query", query=promql)
    assert isinstance(data, dict), why
    return list(data["result"])


def failures(prometheus_port: int) -> list[str]:
    """Every dashboard query and alert signal that does not answer with data, with why, at
    once."""
    failed = []
    # label_values(metric{sel}, label) is Grafana's call of the label values API
    for var, query, metric in (
            ("namespace", dashboard.NAMESPACE_QUERY, "autoglm_gateway_requests_total"),
            ("deployment", dashboard.DEPLOYMENT_QUERY,
             dashboard.expand('autoglm_gateway_requests_total{namespace="$namespace"}',
                              VARIABLES))):
        values, why = api(prometheus_port, f"label/{var}/values", **{"match[]": metric})
        if not isinstance(values, list) or VARIABLES[var] not in values:
            failed.append(f"variable {var}: {query} -> {why or values}")
    checks = [(title, dashboard.expand(q.expr, VARIABLES)) for title, q in dashboard.queries()]
    # an alert's signal is its expression without the threshold: the series it could fire on
    checks += [(f"alert {a.name}", a.signal) for a in alerts.alerts()]
    for title, expr in checks:
        data, why = api(prometheus_port, "query", query=expr)
        result = data.get("result") if isinstance(data, dict) else None
        if why:
            failed.append(f"{title}: {expr} -> {why}")
        elif not result:
            failed.append(f"{title}: {expr} -> empty")
        elif all(math.isnan(float(s["value"][1])) for s in result):
            failed.append(f"{title}: {expr} -> only NaN (no samples in the window)")
    return failed


def test_every_dashboard_query_has_data(up: Up) -> None:
    errors: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=traffic, args=(up.port, stop, errors))
               for _ in range(2)]
    clients.append(threading.Thread(target=generations, args=(up.port, stop, errors)))
    # A step that does not happen is noted, not fatal: the queries still run, so one
    # failure lists every query without data.
    notes: list[str] = []

    def wait(probe: Callable[[], object], what: str, timeout: float) -> None:
        try:
            eventually(probe, what, timeout=timeout, interval=1.0)
        except AssertionError as e:
            notes.append(str(e))

    last: list[str] = []

    def all_answer() -> bool:
        last[:] = failures(up.prometheus_port)
        return not last

    for c in clients:
        c.start()
    try:
        # the autoscaler acts on v1's load first (it pauses during a swap)
        wait(lambda: vector(up.prometheus_port, DECISIONS), "a scaling decision", 90)
        up.file.write_text(re.sub(r"version: 1\b", "version: 2", up.file.read_text(),
                                  count=1))
        wait(lambda: up.said("Flipped") or up.said("RolloutFailed"), "the rollout", 180)
        if up.said("RolloutFailed"):
            notes.append("the rollout to version 2 failed")
        else:
            wait(lambda: up.said("Drained"), "the old slot to drain", 60)
        # series appear within a scrape or two of their first sample
        wait(all_answer, "every dashboard query to have data", 45)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
    total = len(dashboard.queries()) + 2 + len(alerts.alerts())
    if last:
        pytest.fail("\n".join([*notes, f"{len(last)} of {total} dashboard queries and alert "
                                "signals have no data:", *last]), pytrace=False)
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[0]}"
    decisions = sum(float(v["value"][1]) for v in vector(up.prometheus_port, DECISIONS))
    print(f"\nall {len(dashboard.queries())} dashboard queries, both variables and "
          f"{len(alerts.alerts())} alert signals answered with data ({decisions:.0f} scaling "
          "decision(s))")
