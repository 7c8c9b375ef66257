"""The SLO alerts' PrometheusRule: the committed file is the current rendering, each alert has
its severity and annotations, and its expression is its signal against its threshold.
(Real Prometheus and promtool load it in tests/integration/test_alert_rules.py; the signals
answer on a real ``autoglm up`` in e2e/test_dashboard.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from autoglm import alerts

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "manifests" / "monitoring" / "autoglm-rules.yaml"


def test_rules_file_is_the_current_rendering() -> None:
    assert FILE.read_text() == alerts.render(), "run `make alerts` after changing alerts.py"


def test_the_brief_s_slos_are_alerted_on() -> None:
    rule = yaml.safe_load(FILE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    by_name = {r["alert"]: r for r in group["rules"]}
    assert len(by_name) == len(group["rules"]) == len(alerts.alerts())
    for r in group["rules"]:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    for name, metric, threshold, duration in (
            ("AutoGLMTimeToFirstTokenHigh", "histogram_quantile(0.9, ", "> 2", "5m"),
            ("AutoGLMSaturated", 'autoglm_gateway_requests_total{code="429"}', "> 0.05", "5m"),
            ("AutoGLMKVCacheNearlyFull", "autoglm_kv_cache_capacity_tokens", "> 0.9", "10m"),
            ("AutoGLMGenerationsWaiting", "autoglm_generate_waiting", "> 0", "10m")):
        assert metric in by_name[name]["expr"] and by_name[name]["expr"].endswith(threshold)
        assert by_name[name]["for"] == duration
    for a in alerts.alerts():
        assert by_name[a.name]["expr"] == f"{a.signal} {a.op} {a.threshold:g}" == a.expr
