"""The Grafana dashboard against its specification, the README's panel table: every panel has
exactly the queries, unit and data source the README gives, and every row of the table is a
panel. Then the committed ConfigMap: the current rendering, in the sidecar's convention, a
dashboard Grafana's own schema (the SDK's model) reads back whole, its data source a
variable it defines. (The queries themselves run against a real Prometheus in
e2e/test_dashboard.py.)"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from autoglm import dashboard as d

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "manifests" / "grafana" / "autoglm-dashboard.yaml"
README = ROOT / "README.md"


# -- the README's table ----------------------------------------------------------------------

@dataclass(frozen=True)
class Described:
    title: str
    queries: tuple[str, ...]
    unit: str
    datasource: dict[str, str]


def cells(line: str) -> list[str]:
    """The cells of a Markdown table row (a | inside `code` is no separator)."""
    out, cell, code = [], "", False
    for ch in line.strip().removeprefix("|").removesuffix("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            out.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return [*out, cell.strip()]


def code(cell: str) -> str:
    span = re.fullmatch(r"`([^`]*)`", cell)
    assert span, f"{cell!r} is not `code`"
    return span.group(1)


def readme_section() -> str:
    text = README.read_text()
    start = text.index("### Dashboards\n")
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else None]


def described() -> list[Described]:
    """The README's panel table, with its `{sel}` shorthand written out."""
    section = readme_section()
    sel = re.search(r"`\{sel\}` stands for[^`]*`(\{[^`]+\})`", section)
    assert sel, "the README defines the {sel} shorthand"
    lines = section.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Panel |"))
    assert cells(lines[header]) == ["Panel", "Queries (in order)", "Unit", "Data source"]
    out = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        title, queries, unit, source = cells(line)
        ds = re.fullmatch(r"(\w+) `([^`]+)`", source)
        assert ds, f"{title}: data source {source!r} is not 'Type `uid`'"
        out.append(Described(
            title, tuple(q.replace("{sel}", sel.group(1)).replace("{sel,", sel.group(1)[:-1] + ",")
                         for q in re.findall(r"`([^`]+)`", queries)),
            code(unit), {"type": ds.group(1).lower(), "uid": ds.group(2)}))
    return out


def panels() -> list[dict[str, Any]]:
    return [p for p in d.dashboard()["panels"] if p["type"] != "row"]


def test_the_readme_table_is_read() -> None:
    table = described()
    assert len(table) >= 20
    assert table[0] == Described(
        "Active version",
        ('autoglm_active_version{namespace="$namespace",deployment="$deployment"}',),
        "short", {"type": "prometheus", "uid": "${datasource}"})
    assert all(not q.count("{sel") for row in table for q in row.queries)


def test_every_panel_has_the_queries_unit_and_datasource_the_readme_gives() -> None:
    table = {row.title: row for row in described()}
    assert len(table) == len(described()), "a panel title twice in the README's table"
    rendered = panels()
    titles = [p["title"] for p in rendered]
    assert len(set(titles)) == len(titles), "two panels with one title"
    wrong = []
    for p in rendered:
        row = table.get(p["title"])
        if row is None:
            wrong.append(f"{p['title']}: a panel the README does not describe")
            continue
        got = Described(p["title"], tuple(t["expr"] for t in p["targets"]),
                        p["fieldConfig"]["defaults"]["unit"], p["datasource"])
        if got != row:
            wrong.append(f"{p['title']}:\n  README   {row}\n  rendered {got}")
        wrong += [f"{p['title']} {t['refId']}: target data source {t['datasource']}"
                  for t in p["targets"] if t["datasource"] != row.datasource]
    wrong += [f"{title}: in the README, not on the dashboard"
              for title in table.keys() - set(titles)]
    assert not wrong, "\n".join(wrong)


def test_queries_lists_every_panel_s_targets_in_order() -> None:
    assert [(title, q.expr) for title, q in d.queries()] == [
        (p["title"], t["expr"]) for p in panels() for t in p["targets"]]


# -- the committed ConfigMap ---------------------------------------------------------------

def test_configmap_file_is_the_current_rendering() -> None:
    assert FILE.read_text() == d.render(), "run `make dashboard` after changing dashboard.py"


def committed() -> dict[str, Any]:
    cm = yaml.safe_load(FILE.read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key.endswith(".json")
    board: dict[str, Any] = json.loads(cm["data"][key])
    return board


def test_configmap_follows_the_sidecar_convention() -> None:
    assert committed()["uid"] == d.UID
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    assert "grafana/autoglm-dashboard.yaml" in kustomization["resources"]


def test_the_dashboard_json_is_one_grafana_s_schema_reads_back_whole() -> None:
    # the SDK's model drops what the schema does not know: a raw key would not come back
    board = committed()
    again = json.loads(json.dumps(dm.Dashboard.from_json(board), cls=JSONEncoder))
    assert again == board
    assert {p["type"] for p in board["panels"]} <= {"row", "timeseries", "stat",
                                                    "state-timeline"}
    assert all(not p["collapsed"] and not p["panels"] for p in board["panels"]
               if p["type"] == "row"), "an expanded row's panels follow it, not in it"


def test_ids_and_ref_ids_are_unique() -> None:
    board = committed()
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    for p in board["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs), p["title"]


def test_every_datasource_is_the_datasource_variable() -> None:
    board = committed()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    refs = [p["datasource"] for p in board["panels"] if p["type"] != "row"]
    refs += [t["datasource"] for p in board["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in variables.values() if "datasource" in v]
    assert refs
    for ref in refs:
        name = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
        assert name, f"{ref}: not a template variable"
        assert name.group(1) in variables, f"{ref}: no such variable"
        variable = variables[name.group(1)]
        assert variable["type"] == "datasource" and variable["query"] == ref["type"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in d.dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ns, dep = variables["namespace"], variables["deployment"]
    for v in (ns, dep):
        assert v["type"] == "query" and v["datasource"] == {"type": "prometheus",
                                                             "uid": "${datasource}"}
        assert v["refresh"] == 2  # on time range change: new deployments appear
    assert ns["query"] == "label_values(autoglm_gateway_requests_total, namespace)"
    # the deployments of the namespace chosen (same-name resources in two namespaces apart)
    assert dep["query"] == ('label_values(autoglm_gateway_requests_total'
                            '{namespace="$namespace"}, deployment)')
    names = list(variables)
    assert names.index("namespace") < names.index("deployment")  # Grafana resolves in order


def test_every_query_is_narrowed_to_the_namespace_and_deployment() -> None:
    for p in panels():
        assert p["targets"], p["title"]
        for t in p["targets"]:
            selectors = re.findall(r"\{([^}]*)\}", t["expr"])
            assert selectors, t["expr"]
            assert all('namespace="$namespace",deployment="$deployment"' in s
                       for s in selectors), t["expr"]


def test_the_brief_s_metrics_are_shown() -> None:
    exprs = " ".join(q.expr for _, q in d.queries())
    for metric in ("autoglm_expert_tokens_total", "autoglm_autoscaler_replicas",
                   "autoglm_autoscaler_desired_replicas",
                   "autoglm_autoscaler_load_tokens_per_second", "autoglm_autoscaler_imbalance",
                   "autoglm_autoscaler_metrics_available", "autoglm_autoscaler_decisions_total",
                   "autoglm_gateway_requests_total", "autoglm_gateway_request_seconds_bucket",
                   "autoglm_gateway_inflight", "autoglm_swap_phase", "autoglm_swap_events_total",
                   "autoglm_active_version", "autoglm_queue_seconds_bucket",
                   "autoglm_prefix_cache_hit_tokens_total", "autoglm_kv_cache_cached_tokens"):
        assert metric in exprs, metric


def test_layout_fills_the_grid_without_overlap() -> None:
    all_panels = d.dashboard()["panels"]
    cells_taken: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= d.WIDTH, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells_taken, f"{p['title']} overlaps another panel"
        cells_taken |= mine
    rows = [p for p in all_panels if p["type"] == "row"]
    assert [r["title"] for r in rows] == [title for title, _ in d.rows()]
    # each row's panels sit below it and above the next row
    order = [p["gridPos"]["y"] for p in all_panels]
    assert all(p["gridPos"]["y"] > r["gridPos"]["y"] for r in rows for p in
               all_panels[all_panels.index(r) + 1:])
    assert order == sorted(order)


def test_expand_replaces_grafana_variables_and_names_unknown_ones() -> None:
    values = {"deployment": "tiny", "__rate_interval": "30s"}
    assert d.expand('rate(x{deployment="$deployment"}[$__rate_interval])', values) == (
        'rate(x{deployment="tiny"}[30s])')
    assert d.expand("${deployment}", values) == "tiny"
    with pytest.raises(KeyError, match="__range"):
        d.expand("x[$__range]", values)
    for _, q in d.queries():  # every variable a query uses is one the e2e test gives
        d.expand(q.expr, {"namespace": "n", "deployment": "x", "__rate_interval": "30s"})
