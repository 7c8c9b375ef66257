"""The Grafana dashboard, built with Grafana's typed builders (``grafana-foundation-sdk``),
and the ConfigMap that ships it (``make dashboard``).

:func:`build` gives the SDK's dashboard model; :func:`queries` lists its Prometheus queries
so a test can run each against a real Prometheus (e2e/test_dashboard.py); :func:`render`
gives the ConfigMap in kube-prometheus-stack's sidecar convention (label
``grafana_dashboard: "1"``, the JSON under a ``*.json`` key), which ``manifests/grafana/``
holds. The README's panel table is the specification the unit tests hold this module to.

Queries use the shared metrics contract: every scraped target carries ``namespace``,
``deployment`` and ``component`` (Triton servers also ``slot`` and ``version``;
``autoglm up``'s namespace is ``local``); the control loop exports
``autoglm_autoscaler_*``, ``autoglm_swap_*`` and ``autoglm_active_version``.

The SDK is a development dependency (``pip install autoglm[dev]``): nothing at run time
imports this module.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any, Protocol, Self, TypeVar

import yaml
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

UID = "autoglm"
TITLE = "AutoGLM"
CONFIGMAP = "autoglm-dashboard"
DATA_KEY = "autoglm.json"
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VARIABLE + "}")
NAMESPACE_QUERY = "label_values(autoglm_gateway_requests_total, namespace)"
DEPLOYMENT_QUERY = ('label_values(autoglm_gateway_requests_total{namespace="$namespace"}, '
                    "deployment)")
WIDTH = 24  # Grafana's grid

D = 'namespace="$namespace",deployment="$deployment"'
RI = "$__rate_interval"

Query = tuple[str, str]  # (PromQL, legend)


def rate(metric: str, extra: str = "") -> str:
    sel = f"{D},{extra}" if extra else D
    return f"rate({metric}{{{sel}}}[{RI}])"


def quantile(q: float, metric: str = "autoglm_gateway_request_seconds",
             by: str = "version") -> str:
    return (f"histogram_quantile({q}, sum by ({by}, le) "
            f"({rate(f'{metric}_bucket')}))")


# -- panels, with the SDK's builders -----------------------------------------------------------

class _PanelBuilder(Protocol):
    """What every panel builder of the SDK has (timeseries, stat, state-timeline...)."""

    def build(self) -> dm.Panel: ...
    def id(self, id_val: int) -> Self: ...
    def title(self, title: str) -> Self: ...
    def description(self, description: str) -> Self: ...
    def datasource(self, datasource: dm.DataSourceRef) -> Self: ...
    def targets(self, targets: list[Builder[Dataquery]]) -> Self: ...
    def span(self, w: int) -> Self: ...
    def height(self, h: int) -> Self: ...
    def unit(self, unit: str) -> Self: ...
    def decimals(self, decimals: float) -> Self: ...
    def mappings(self, mappings: list[dm.ValueMapping]) -> Self: ...
    def thresholds(self, thresholds: Builder[dm.ThresholdsConfig]) -> Self: ...
    def color_scheme(self, color: Builder[dm.FieldColor]) -> Self: ...


P = TypeVar("P", bound=_PanelBuilder)
PanelBuilder = stat.Panel | timeseries.Panel | statetimeline.Panel


def _target(ref_id: str, expr: str, legend: str) -> prometheus.Dataquery:
    return (prometheus.Dataquery().ref_id(ref_id).expr(expr).legend_format(legend or "__auto")
            .range().datasource(DATASOURCE))


def _panel(p: P, title: str, queries: Sequence[Query], unit: str, description: str,
           width: int, height: int, decimals: int | None,
           mappings: Sequence[tuple[str, str, str]] = ()) -> P:
    """The settings every panel shares: title, Prometheus queries, unit, size..."""
    targets: list[Builder[Dataquery]] = [_target(chr(ord("A") + i), expr, legend)
                                         for i, (expr, legend) in enumerate(queries)]
    p = (p.title(title).datasource(DATASOURCE).targets(targets).unit(unit)
         .span(width).height(height))
    if description:
        p = p.description(description)
    if decimals is not None:
        p = p.decimals(decimals)
    if mappings:  # (value, text, color): a state shown by name and color
        p = (p.mappings([dm.ValueMap(options={
                value: dm.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, text, color) in enumerate(mappings)})])
             .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
             .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
                 [dm.Threshold(value=None, color="red"), dm.Threshold(value=1, color="green")])))
    return p


def stat_panel(title: str, query: Query, *, unit: str = "short", description: str = "",
               decimals: int | None = None, show_name: bool = False) -> stat.Panel:
    """A single figure (the last value); ``show_name`` shows the series' legend instead (e.g.
    the phase)."""
    p = _panel(stat.Panel(), title, (query,), unit, description, 4, 4, decimals)
    return (p.color_scheme(db.FieldColor().mode(dm.FieldColorModeId.FIXED).fixed_color("blue"))
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("")
                            .values(False))
            .color_mode(common.BigValueColorMode.VALUE)
            .graph_mode(common.BigValueGraphMode.NONE if show_name
                        else common.BigValueGraphMode.AREA)
            .justify_mode(common.BigValueJustifyMode.AUTO)
            .orientation(common.VizOrientation.AUTO)
            .text_mode(common.BigValueTextMode.NAME if show_name
                       else common.BigValueTextMode.AUTO))


def timeseries_panel(title: str, *queries: Query, unit: str = "short", description: str = "",
                     width: int = 12, decimals: int | None = None, bars: bool = False,
                     colors: Sequence[tuple[str, str]] = ()) -> timeseries.Panel:
    """Lines, or stacked ``bars`` (counts per interval); ``colors``: (series, fixed color)."""
    p = (_panel(timeseries.Panel(), title, queries, unit, description, width, 8, decimals)
         .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
         .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
         .line_width(1).fill_opacity(80 if bars else 10)
         .show_points(common.VisibilityMode.NEVER).span_nulls(False)
         .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL if bars
                                            else common.StackingMode.NONE))
         .legend(cb.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True))
         .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING)))
    for name, color in colors:
        p = p.override_by_name(name, [dm.DynamicConfigValue(
            id_val="color", value=dm.FieldColor(mode=dm.FieldColorModeId.FIXED,
                                                fixed_color=color))])
    return p


def state_timeline_panel(title: str, query: Query, *, mappings: Sequence[tuple[str, str, str]],
                         description: str = "") -> statetimeline.Panel:
    """A state over time; ``mappings``: (value, text, color) of each state."""
    return (_panel(statetimeline.Panel(), title, (query,), "short", description, 12, 8, None,
                   mappings)
            .fill_opacity(80).line_width(0)
            .merge_values(True).show_value(common.VisibilityMode.AUTO)
            .align_value(common.TimelineValueAlignment.LEFT).row_height(0.9)
            .legend(cb.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                    .placement(common.LegendPlacement.BOTTOM).show_legend(False))
            .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE)
                     .sort(common.SortOrder.NONE)))


def generation_latency(title: str, metric: str, description: str) -> timeseries.Panel:
    return timeseries_panel(title, *(
        (quantile(q, metric, "slot, version"), f"{{{{slot}}}} v{{{{version}}}} p{p}")
        for q, p in ((0.5, 50), (0.99, 99))), unit="s", width=8, description=description)


def per_replica(q: float, metric: str) -> Query:
    """Quantile ``q`` per router replica: its scrape target's ``instance`` (host:port, with
    ``autoglm up`` and on a cluster alike; a pod's IP there)."""
    return (quantile(q, metric, "slot, version, instance"),
            f"{{{{slot}}}} v{{{{version}}}} {{{{instance}}}} p{round(q * 100)}")


def rows() -> list[tuple[str, list[PanelBuilder]]]:
    """The dashboard's rows and their panels, in order (fresh builders at each call)."""
    errors = rate("autoglm_gateway_requests_total", 'code!~"2.."')
    requests = rate("autoglm_gateway_requests_total")
    # 0, not no data, while nothing is refused: the other codes' series, times 0
    refused = rate("autoglm_gateway_requests_total", 'code="429"')
    saturated = f"{refused} or 0 * {requests}"
    return [
        ("Overview", [
            stat_panel("Active version", (f"autoglm_active_version{{{D}}}", "version"),
                       description="The model version the gateway sends traffic to.",
                       decimals=0),
            stat_panel("Swap phase", (f"autoglm_swap_phase{{{D}}} == 1", "{{phase}}"),
                       description="Phase of the double-buffered swap (Idle between rollouts).",
                       show_name=True),
            stat_panel("Requests/s", (f"sum({requests})", "req/s"), unit="reqps"),
            stat_panel("Gateway p99", ("histogram_quantile(0.99, sum by (le) "
                                       f"({rate('autoglm_gateway_request_seconds_bucket')}))",
                                       "p99"), unit="s"),
            # no non-2xx series means no error; the denominator still needs traffic data
            stat_panel("Errors (non-2xx)",
                       (f"(sum({errors}) or vector(0)) / sum({requests})", "errors"),
                       unit="percentunit"),
            stat_panel("Expert replicas", (f"sum(autoglm_autoscaler_replicas{{{D}}})",
                                           "replicas"),
                       description="Replicas of all experts in the active slot.", decimals=0),
        ]),
        ("Autoscaling", [
            timeseries_panel(
                "Per-expert load (tokens/s)",
                (f"sum by (expert) ({rate('autoglm_expert_tokens_total')})",
                 "expert {{expert}} routed"),
                (f"autoglm_autoscaler_load_tokens_per_second{{{D}}}",
                 "expert {{expert}} autoscaler input"),
                unit="suffix: tok/s",
                description="Tokens the routers sent to each expert (both slots), and the "
                            "load the autoscaler last read."),
            timeseries_panel(
                "Per-expert replicas",
                (f"autoglm_autoscaler_replicas{{{D}}}", "expert {{expert}} current"),
                (f"autoglm_autoscaler_desired_replicas{{{D}}}", "expert {{expert}} desired"),
                (f'max by (slot, expert) (autoglm_expert_replicas{{{D},component="router"}})',
                 "expert {{expert}} seen by router {{slot}}"),
                description="Current and desired replicas of the active slot, and the "
                            "replicas each slot's router balances over.", decimals=0),
            timeseries_panel(
                "Load per replica",
                (f"sum by (expert) (autoglm_autoscaler_load_tokens_per_second{{{D}}}) / "
                 f"sum by (expert) (autoglm_autoscaler_replicas{{{D}}})", "expert {{expert}}"),
                unit="suffix: tok/s", description="What the autoscaler compares with its target."),
            timeseries_panel(
                "Imbalance", (f"autoglm_autoscaler_imbalance{{{D}}}", "imbalance"),
                unit="percentunit",
                description="(max - mean) / mean of the load per replica over the experts."),
            timeseries_panel(
                "Expert server imbalance",
                (f"autoglm_placement_imbalance{{{D}}}", "imbalance"),
                unit="percentunit",
                description="(max - mean) / mean of the load per expert server of the active "
                            "slot: what rebalances even out by moving experts live."),
            timeseries_panel(
                "Live moves",
                ("sum by (outcome) (increase("
                 f"autoglm_placement_moves_total{{{D}}}[{RI}]))", "{{outcome}}"),
                bars=True,
                description="Expert replicas moved between running servers by rebalances "
                            "(abandoned: the target did not load it in time; the old replica "
                            "kept serving)."),
            timeseries_panel(
                "Scaling decisions",
                ("sum by (expert, direction) (increase("
                 f"autoglm_autoscaler_decisions_total{{{D}}}[{RI}]))",
                 "expert {{expert}} {{direction}}"),
                bars=True,
                description="Replica changes the autoscaler decided, per expert and direction."),
            state_timeline_panel(
                "Metrics availability",
                (f"autoglm_autoscaler_metrics_available{{{D}}}", "autoscaler metrics"),
                mappings=(("1", "available", "green"), ("0", "missing", "red")),
                description="Whether the autoscaler had fresh metrics; without, it holds the "
                            "replicas (never scales down)."),
        ]),
        ("Gateway", [
            timeseries_panel(
                "Traffic by version and code",
                (f"sum by (version, code) ({requests})", "v{{version}} {{code}}"),
                unit="reqps"),
            timeseries_panel(
                "Latency by version",
                (quantile(0.5), "v{{version}} p50"), (quantile(0.99), "v{{version}} p99"),
                unit="s"),
            timeseries_panel(
                "In flight per slot",
                (f"sum by (slot) (autoglm_gateway_inflight{{{D}}})", "slot {{slot}}"),
                description="Requests in flight through the gateway; a draining slot "
                            "reaches 0.", decimals=0),
            timeseries_panel(
                "Expert call time",
                ("sum by (expert) (rate(autoglm_expert_call_seconds_total"
                 f'{{{D},component="router"}}[{RI}])) / sum by (expert) '
                 f'(rate(autoglm_expert_calls_total{{{D},component="router"}}[{RI}])) * 1000',
                 "expert {{expert}}"),
                unit="ms", description="Mean time of the routers' calls carrying each "
                                       "expert's rows: its servers' queue and compute (the "
                                       "autoscaler's guard)."),
        ]),
        ("Generation", [
            generation_latency("Time to first token", "autoglm_time_to_first_token_seconds",
                               "From a generation's arrival at the router to its first "
                               "token: queueing for KV cache and prefill."),
            generation_latency("Inter-token latency", "autoglm_inter_token_latency_seconds",
                               "Between consecutive tokens of one generation: one engine "
                               "step."),
            timeseries_panel(
                "Generated tokens/s",
                (f"sum by (slot, version) ({rate('autoglm_generated_tokens_total')})",
                 "{{slot}} v{{version}}"),
                unit="suffix: tok/s", width=8),
            timeseries_panel(
                "Sequences",
                (f"sum by (slot) (autoglm_generate_running{{{D}}})", "{{slot}} running"),
                (f"sum by (slot) (autoglm_generate_waiting{{{D}}})", "{{slot}} waiting"),
                description="Generations running in each slot's engines, and those waiting "
                            "for KV cache.", decimals=0),
            timeseries_panel(
                "KV cache use",
                (f"sum by (slot) (autoglm_kv_cache_used_tokens{{{D}}}) / "
                 f"sum by (slot) (autoglm_kv_cache_capacity_tokens{{{D}}})", "{{slot}}"),
                unit="percentunit", description="KV cache reserved by running generations "
                                                "(prompt + max_tokens each, reserved at "
                                                "admission)."),
            timeseries_panel(
                "Time to first token per replica",
                *(per_replica(q, "autoglm_time_to_first_token_seconds") for q in (0.5, 0.9)),
                unit="s", width=8,
                description="Per router replica: its queue time and prefill."),
            timeseries_panel(
                "Inter-token latency p90 per replica",
                per_replica(0.9, "autoglm_inter_token_latency_seconds"), unit="s", width=8,
                description="Per router replica: one engine step of a running generation."),
            timeseries_panel(
                "Queue time p90 per replica",
                per_replica(0.9, "autoglm_queue_seconds"), unit="s", width=8,
                description="From a generation's arrival at a router replica to its admission "
                            "into the running batch: waiting for KV cache or a batch place."),
            timeseries_panel(
                "Prefix cache hit rate",
                (f"sum by (slot) ({rate('autoglm_prefix_cache_hit_tokens_total')}) / "
                 f"sum by (slot) ({rate('autoglm_prompt_tokens_total')})", "{{slot}}"),
                unit="percentunit", width=8,
                description="Share of the admitted prompts' tokens found in the prefix cache "
                            "(not prefilled)."),
            timeseries_panel(
                "KV cache tokens",
                *((f"sum by (slot) (autoglm_kv_cache_{name}_tokens{{{D}}})",
                   f"{{{{slot}}}} {name}") for name in ("used", "cached", "capacity")),
                unit="short", width=8,
                description="Reserved by running generations, held only for prefix reuse "
                            "(reclaimable), and the capacity, per slot."),
            timeseries_panel(
                "Saturation (429)",
                (f"sum by (slot) ({saturated}) / sum by (slot) ({requests})", "{{slot}}"),
                unit="percentunit", width=8,
                description="Share of the gateway's requests answered 429: a router's waiting "
                            "queue was full (AUTOGLM_MAX_WAITING)."),
        ]),
        ("Swap", [
            state_timeline_panel(
                "Swap phase over time",
                (f"max by (phase) (autoglm_swap_phase{{{D}}})", "{{phase}}"),
                mappings=(("1", "current", "blue"), ("0", " ", "transparent"))),
            timeseries_panel(
                "Swap events",
                (f"sum by (reason) (increase(autoglm_swap_events_total{{{D}}}[{RI}]))",
                 "{{reason}}"),
                bars=True,
                description="Flips (Flipped, FlipBack) and aborted rollouts (RolloutFailed).",
                colors=(("Flipped", "green"), ("FlipBack", "yellow"),
                        ("RolloutFailed", "red"))),
        ]),
        ("Targets", [
            timeseries_panel(
                "Scrape targets up",
                (f"sum by (component, slot) (up{{{D}}})", "{{component}} {{slot}}"),
                description="Servers Prometheus scrapes successfully, per component and slot.",
                decimals=0),
            timeseries_panel(
                "Expert calls and failures",
                (f"sum by (expert) ({rate('autoglm_expert_calls_total')})",
                 "expert {{expert}} calls"),
                (f"sum by (expert) ({rate('autoglm_expert_call_failures_total')})",
                 "expert {{expert}} failures"),
                unit="reqps", description="The routers' calls to each expert; a failed call "
                                          "is retried on another replica."),
        ]),
    ]


# -- the dashboard -------------------------------------------------------------------------

def variables() -> list[Builder[dm.VariableModel]]:
    """The data source, then the namespace and the deployment (in the order Grafana resolves
    them: the deployments are those of the namespace chosen)."""
    def query_variable(name: str, label: str, query: str) -> db.QueryVariable:
        return (db.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dm.VariableSort.ALPHABETICAL_ASC).hide(dm.VariableHide.DONT_HIDE)
                .include_all(False).multi(False).regex(""))

    return [
        db.DatasourceVariable(DATASOURCE_VARIABLE).label("Data source")
        .type(DATASOURCE.type_val or "").hide(dm.VariableHide.DONT_HIDE)
        .include_all(False).multi(False).regex(""),
        query_variable("namespace", "Namespace", NAMESPACE_QUERY),
        query_variable("deployment", "Deployment", DEPLOYMENT_QUERY),
    ]


def build() -> dm.Dashboard:
    """The dashboard, as the SDK's model (rows expanded: their panels follow them at the top
    level; the SDK lays the panels out on the grid, left to right)."""
    b = (db.Dashboard(TITLE).uid(UID).tags(["autoglm"]).editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-1h", "now")
         .timezone("").version(1).links([]).annotations([]).variables(variables()))
    pid = 1
    for title, panels in rows():
        b = b.with_row(db.Row(title).id(pid).collapsed(False))
        pid += 1
        for p in panels:
            b = b.with_panel(p.id(pid))
            pid += 1
    return b.build()


def dashboard() -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana reads it."""
    out: dict[str, Any] = json.loads(json.dumps(build(), cls=JSONEncoder))
    return out


def queries() -> list[tuple[str, pm.Dataquery]]:
    """Every query of the dashboard (``.expr``, ``.legend_format``), with its panel's title."""
    found = []
    for p in build().panels or []:
        if isinstance(p, dm.Panel):
            for t in p.targets or []:
                assert isinstance(t, pm.Dataquery), p.title
                found.append((p.title or "", t))
    return found


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's variables replaced; KeyError names one without a value."""
    return _VAR.sub(lambda m: values[m.group(1) or m.group(2)], expr)


# -- the ConfigMap -------------------------------------------------------------------------

def configmap() -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP, "labels": {"grafana_dashboard": "1"}},
        "data": {DATA_KEY: json.dumps(build(), cls=JSONEncoder, indent=1) + "\n"},
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
