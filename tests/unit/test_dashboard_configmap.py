"""The Grafana dashboard: the committed ConfigMap is the rendering, and the JSON is one
Grafana and kube-prometheus-stack's sidecar can load (the queries themselves run against a
real Prometheus in e2e/test_dashboard.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm import dashboard as d

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "manifests" / "grafana" / "autoglm-dashboard.yaml"


def test_configmap_file_is_generated_from_the_module() -> None:
    assert FILE.read_text() == d.render(), "run `make dashboard` after changing dashboard.py"


def test_configmap_follows_the_sidecar_convention() -> None:
    cm = yaml.safe_load(FILE.read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key.endswith(".json")
    assert json.loads(cm["data"][key]) == d.dashboard()
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    assert "grafana/autoglm-dashboard.yaml" in kustomization["resources"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in d.dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ns, dep = variables["namespace"], variables["deployment"]
    for v in (ns, dep):
        assert v["type"] == "query" and v["datasource"] == {"type": "prometheus",
                                                             "uid": "${datasource}"}
    assert ns["query"] == "label_values(autoglm_gateway_requests_total, namespace)"
    # the deployments of the namespace chosen (same-name resources in two namespaces apart)
    assert dep["query"] == ('label_values(autoglm_gateway_requests_total'
                            '{namespace="$namespace"}, deployment)')
    names = list(variables)
    assert names.index("namespace") < names.index("deployment")  # Grafana resolves in order


def panels() -> list[dict[str, Any]]:
    return [p for p in d.dashboard()["panels"] if p["type"] != "row"]


def test_every_panel_queries_the_selected_datasource_and_deployment() -> None:
    for p in panels():
        assert p["datasource"] == d.DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == d.DATASOURCE
            # every selector of the query is narrowed to the namespace and deployment
            selectors = re.findall(r"\{([^}]*)\}", re.sub(r"\{\{\w+\}\}", "", t["expr"]))
            assert selectors, t["expr"]
            assert all('namespace="$namespace",deployment="$deployment"' in s
                       for s in selectors), t["expr"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_the_brief_s_panels_are_there() -> None:
    exprs = " ".join(q.expr for _, q in d.queries())
    for metric in ("autoglm_expert_tokens_total", "autoglm_autoscaler_replicas",
                   "autoglm_autoscaler_desired_replicas",
                   "autoglm_autoscaler_load_tokens_per_second", "autoglm_autoscaler_imbalance",
                   "autoglm_autoscaler_metrics_available", "autoglm_autoscaler_decisions_total",
                   "autoglm_gateway_requests_total", "autoglm_gateway_request_seconds_bucket",
                   "autoglm_gateway_inflight", "autoglm_swap_phase", "autoglm_swap_events_total",
                   "autoglm_active_version"):
        assert metric in exprs, metric


def test_layout_ids_and_grid() -> None:
    all_panels = d.dashboard()["panels"]
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= d.WIDTH, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_expand_replaces_grafana_variables_and_names_unknown_ones() -> None:
    values = {"deployment": "tiny", "__rate_interval": "30s"}
    assert d.expand('rate(x{deployment="$deployment"}[$__rate_interval])', values) == (
        'rate(x{deployment="tiny"}[30s])')
    assert d.expand("${deployment}", values) == "tiny"
    with pytest.raises(KeyError, match="__range"):
        d.expand("x[$__range]", values)
    for _, q in d.queries():  # every variable a query uses is one the e2e test gives
        d.expand(q.expr, {"namespace": "n", "deployment": "x", "__rate_interval": "30s"})
