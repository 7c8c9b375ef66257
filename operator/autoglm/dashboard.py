"""The Grafana dashboard, as data, and the ConfigMap that ships it (``make dashboard``).

The panels are a list of :class:`Panel` (title, kind, PromQL queries), so a test can run
every query against a real Prometheus. :func:`render` gives the ConfigMap in
kube-prometheus-stack's sidecar convention (label ``grafana_dashboard: "1"``, the JSON
under a ``*.json`` key); ``manifests/grafana/`` holds its output and a unit test keeps the
two equal.

Queries use the shared metrics contract: every scraped target carries ``namespace``,
``deployment`` and ``component`` (Triton servers also ``slot`` and ``version``;
``autoglm up``'s namespace is ``local``); the control loop exports
``autoglm_autoscaler_*``, ``autoglm_swap_*`` and ``autoglm_active_version``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

UID = "autoglm"
CONFIGMAP = "autoglm-dashboard"
DATA_KEY = "autoglm.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NAMESPACE_QUERY = "label_values(autoglm_gateway_requests_total, namespace)"
DEPLOYMENT_QUERY = ('label_values(autoglm_gateway_requests_total{namespace="$namespace"}, '
                    "deployment)")
WIDTH = 24  # Grafana's grid

D = 'namespace="$namespace",deployment="$deployment"'
RI = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | bars | stat | state-timeline
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    stat_text: str = "auto"  # stat: "name" shows the series' legend (e.g. the phase)
    mappings: tuple[tuple[str, str, str], ...] = ()  # (value, text, color)
    colors: tuple[tuple[str, str], ...] = ()  # (series name, fixed color)
    decimals: int | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def rate(metric: str, extra: str = "") -> str:
    sel = f"{D},{extra}" if extra else D
    return f"rate({metric}{{{sel}}}[{RI}])"


def quantile(q: float, metric: str = "autoglm_gateway_request_seconds",
             by: str = "version") -> str:
    return (f"histogram_quantile({q}, sum by ({by}, le) "
            f"({rate(f'{metric}_bucket')}))")


def generation_latency(title: str, metric: str, description: str) -> Panel:
    return Panel(title, "timeseries", tuple(
        Query(quantile(q, metric, "slot, version"), f"{{{{slot}}}} v{{{{version}}}} p{p}")
        for q, p in ((0.5, 50), (0.99, 99))), unit="s", width=8, description=description)


ERRORS = rate("autoglm_gateway_requests_total", 'code!~"2.."')

ROWS: tuple[Row, ...] = (
    Row("Overview", (
        Panel("Active version", "stat", (Query(f"autoglm_active_version{{{D}}}", "version"),),
              description="The model version the gateway sends traffic to.", width=4,
              height=4, decimals=0),
        Panel("Swap phase", "stat",
              (Query(f"autoglm_swap_phase{{{D}}} == 1", "{{phase}}"),),
              description="Phase of the double-buffered swap (Idle between rollouts).",
              width=4, height=4, stat_text="name"),
        Panel("Requests/s", "stat",
              (Query(f"sum({rate('autoglm_gateway_requests_total')})", "req/s"),),
              unit="reqps", width=4, height=4),
        Panel("Gateway p99", "stat",
              (Query("histogram_quantile(0.99, sum by (le) "
                     f"({rate('autoglm_gateway_request_seconds_bucket')}))", "p99"),),
              unit="s", width=4, height=4),
        Panel("Errors (non-2xx)", "stat",
              # no non-2xx series means no error; the denominator still needs traffic data
              (Query(f"(sum({ERRORS}) or vector(0)) / "
                     f"sum({rate('autoglm_gateway_requests_total')})", "errors"),),
              unit="percentunit", width=4, height=4),
        Panel("Expert replicas", "stat",
              (Query(f"sum(autoglm_autoscaler_replicas{{{D}}})", "replicas"),),
              description="Replicas of all experts in the active slot.", width=4, height=4,
              decimals=0),
    )),
    Row("Autoscaling", (
        Panel("Per-expert load (tokens/s)", "timeseries", (
            Query(f"sum by (expert) ({rate('autoglm_expert_tokens_total')})",
                  "expert {{expert}} routed"),
            Query(f"autoglm_autoscaler_load_tokens_per_second{{{D}}}",
                  "expert {{expert}} autoscaler input"),
        ), unit="suffix: tok/s",
            description="Tokens the routers sent to each expert (both slots), and the load "
                        "the autoscaler last read."),
        Panel("Per-expert replicas", "timeseries", (
            Query(f"autoglm_autoscaler_replicas{{{D}}}", "expert {{expert}} current"),
            Query(f"autoglm_autoscaler_desired_replicas{{{D}}}", "expert {{expert}} desired"),
            Query(f'max by (slot, expert) (autoglm_expert_replicas{{{D},component="router"}})',
                  "expert {{expert}} seen by router {{slot}}"),
        ), description="Current and desired replicas of the active slot, and the replicas "
                       "each slot's router balances over.", decimals=0),
        Panel("Load per replica", "timeseries", (
            Query(f"sum by (expert) (autoglm_autoscaler_load_tokens_per_second{{{D}}}) / "
                  f"sum by (expert) (autoglm_autoscaler_replicas{{{D}}})", "expert {{expert}}"),
        ), unit="suffix: tok/s", description="What the autoscaler compares with its target."),
        Panel("Imbalance", "timeseries", (
            Query(f"autoglm_autoscaler_imbalance{{{D}}}", "imbalance"),
        ), unit="percentunit",
            description="(max - mean) / mean of the load per replica over the experts."),
        Panel("Scaling decisions", "bars", (
            Query("sum by (expert, direction) (increase("
                  f"autoglm_autoscaler_decisions_total{{{D}}}[{RI}]))",
                  "expert {{expert}} {{direction}}"),
        ), description="Replica changes the autoscaler decided, per expert and direction."),
        Panel("Metrics availability", "state-timeline", (
            Query(f"autoglm_autoscaler_metrics_available{{{D}}}", "autoscaler metrics"),
        ), description="Whether the autoscaler had fresh metrics; without, it holds the "
                       "replicas (never scales down).",
            mappings=(("1", "available", "green"), ("0", "missing", "red"))),
    )),
    Row("Gateway", (
        Panel("Traffic by version and code", "timeseries", (
            Query(f"sum by (version, code) ({rate('autoglm_gateway_requests_total')})",
                  "v{{version}} {{code}}"),
        ), unit="reqps"),
        Panel("Latency by version", "timeseries", (
            Query(quantile(0.5), "v{{version}} p50"),
            Query(quantile(0.99), "v{{version}} p99"),
        ), unit="s"),
        Panel("In flight per slot", "timeseries", (
            Query(f"sum by (slot) (autoglm_gateway_inflight{{{D}}})", "slot {{slot}}"),
        ), description="Requests in flight through the gateway; a draining slot reaches 0.",
            decimals=0),
        Panel("Expert queue time", "timeseries", (
            Query("sum by (model) (rate(nv_inference_queue_duration_us"
                  f'{{{D},component="expert"}}[{RI}])) / sum by (model) '
                  f'(rate(nv_inference_count{{{D},component="expert"}}[{RI}])) / 1000',
                  "{{model}}"),
        ), unit="ms", description="Mean time a request waits in Triton's queue, per expert "
                                  "(the autoscaler's queue-time guard)."),
    )),
    Row("Generation", (
        generation_latency("Time to first token", "autoglm_time_to_first_token_seconds",
                           "From a generation's arrival at the router to its first token: "
                           "queueing for KV cache and prefill."),
        generation_latency("Inter-token latency", "autoglm_inter_token_latency_seconds",
                           "Between consecutive tokens of one generation: one engine step."),
        Panel("Generated tokens/s", "timeseries", (
            Query(f"sum by (slot, version) ({rate('autoglm_generated_tokens_total')})",
                  "{{slot}} v{{version}}"),
        ), unit="suffix: tok/s", width=8),
        Panel("Sequences", "timeseries", (
            Query(f"sum by (slot) (autoglm_generate_running{{{D}}})", "{{slot}} running"),
            Query(f"sum by (slot) (autoglm_generate_waiting{{{D}}})", "{{slot}} waiting"),
        ), description="Generations running in each slot's engines, and those waiting for "
                       "KV cache.", decimals=0),
        Panel("KV cache use", "timeseries", (
            Query(f"sum by (slot) (autoglm_kv_cache_used_tokens{{{D}}}) / "
                  f"sum by (slot) (autoglm_kv_cache_capacity_tokens{{{D}}})", "{{slot}}"),
        ), unit="percentunit", description="KV cache reserved by running generations "
                                           "(prompt + max_tokens each, reserved at admission)."),
    )),
    Row("Swap", (
        Panel("Swap phase over time", "state-timeline", (
            Query(f"max by (phase) (autoglm_swap_phase{{{D}}})", "{{phase}}"),
        ), mappings=(("1", "current", "blue"), ("0", " ", "transparent"))),
        Panel("Swap events", "bars", (
            Query(f"sum by (reason) (increase(autoglm_swap_events_total{{{D}}}[{RI}]))",
                  "{{reason}}"),
        ), description="Flips (Flipped, FlipBack) and aborted rollouts (RolloutFailed).",
            colors=(("Flipped", "green"), ("FlipBack", "yellow"),
                    ("RolloutFailed", "red"))),
    )),
    Row("Targets", (
        Panel("Scrape targets up", "timeseries", (
            Query(f"sum by (component, slot) (up{{{D}}})", "{{component}} {{slot}}"),
        ), description="Servers Prometheus scrapes successfully, per component and slot.",
            decimals=0),
        Panel("Expert calls and failures", "timeseries", (
            Query(f"sum by (expert) ({rate('autoglm_expert_calls_total')})",
                  "expert {{expert}} calls"),
            Query(f"sum by (expert) ({rate('autoglm_expert_call_failures_total')})",
                  "expert {{expert}} failures"),
        ), unit="reqps", description="The routers' calls to each expert; a failed call is "
                                     "retried on another replica."),
    )),
)

PANELS: tuple[Panel, ...] = tuple(p for row in ROWS for p in row.panels)


def queries() -> list[tuple[str, Query]]:
    """Every query of the dashboard, with its panel's title."""
    return [(p.title, q) for p in PANELS for q in p.queries]


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's variables replaced; KeyError names one without a value."""
    return _VAR.sub(lambda m: values[m.group(1) or m.group(2)], expr)


# -- Grafana JSON ---------------------------------------------------------------------------

def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit, "color": {"mode": "palette-classic"}}
    if p.decimals is not None:
        defaults["decimals"] = p.decimals
    if p.mappings:
        defaults["mappings"] = [{"type": "value", "options": {
            v: {"text": text, "color": color, "index": i}
            for i, (v, text, color) in enumerate(p.mappings)}}]
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute",
                                  "steps": [{"color": "red", "value": None},
                                            {"color": "green", "value": 1}]}
    options: dict[str, Any]
    kind = p.kind
    if p.kind in ("timeseries", "bars"):
        kind = "timeseries"
        bars = p.kind == "bars"
        defaults["custom"] = {
            "drawStyle": "bars" if bars else "line", "lineWidth": 1,
            "fillOpacity": 80 if bars else 10, "showPoints": "never",
            "spanNulls": False, "stacking": {"mode": "normal" if bars else "none"}}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif p.kind == "stat":
        defaults["color"] = {"mode": "fixed", "fixedColor": "blue"} if not p.mappings else (
            defaults["color"])
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area" if p.stat_text == "auto" else
                   "none", "justifyMode": "auto", "orientation": "auto",
                   "textMode": p.stat_text}
    elif p.kind == "state-timeline":
        defaults["custom"] = {"fillOpacity": 80, "lineWidth": 0}
        options = {"mergeValues": True, "showValue": "auto", "alignValue": "left",
                   "rowHeight": 0.9,
                   "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                   "tooltip": {"mode": "single", "sort": "none"}}
    else:
        raise ValueError(f"{p.title}: unknown panel kind {p.kind!r}")
    overrides = [{"matcher": {"id": "byName", "options": name},
                  "properties": [{"id": "color", "value": {"mode": "fixed",
                                                           "fixedColor": color}}]}
                 for name, color in p.colors]
    targets = [{"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto",
                "range": True, "refId": chr(ord("A") + i)} for i, q in enumerate(p.queries)]
    out: dict[str, Any] = {
        "id": pid, "type": kind, "title": p.title, "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": options, "targets": targets}
    if p.description:
        out["description"] = p.description
    return out


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        x, line = 0, 0
        for p in row.panels:
            if x + p.width > WIDTH:
                x, y, line = 0, y + line, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, line = pid + 1, x + p.width, max(line, p.height)
        y += line
    return {
        "uid": UID, "title": "AutoGLM", "tags": ["autoglm"], "editable": True,
        "schemaVersion": 39, "version": 1, "graphTooltip": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
             "includeAll": False, "multi": False, "options": [], "regex": ""},
            {"name": "namespace", "label": "Namespace", "type": "query",
             "datasource": DATASOURCE, "definition": NAMESPACE_QUERY,
             "query": NAMESPACE_QUERY, "current": {}, "hide": 0, "refresh": 2, "sort": 1,
             "includeAll": False, "multi": False, "options": [], "regex": ""},
            {"name": "deployment", "label": "Deployment", "type": "query",
             "datasource": DATASOURCE, "definition": DEPLOYMENT_QUERY,
             "query": DEPLOYMENT_QUERY, "current": {}, "hide": 0, "refresh": 2, "sort": 1,
             "includeAll": False, "multi": False, "options": [], "regex": ""},
        ]},
        "panels": panels,
    }


def configmap() -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP, "labels": {"grafana_dashboard": "1"}},
        "data": {DATA_KEY: json.dumps(dashboard(), indent=1) + "\n"},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    # the dashboard JSON as a literal block: readable, and diffs line by line
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    """manifests/grafana/autoglm-dashboard.yaml, exactly."""
    return ("# Generated by `make dashboard` from operator/autoglm/dashboard.py; do not edit.\n"
            + yaml.dump(configmap(), Dumper=_Dumper, sort_keys=False, width=1000))


if __name__ == "__main__":
    sys.stdout.write(render())
