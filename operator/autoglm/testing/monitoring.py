"""What the Prometheus Operator would make of a PodMonitor: a Prometheus scrape job.

The Prometheus Operator is not run in the test cluster (it would need its own images of
Prometheus and its config reloader); a Prometheus on the host scrapes with the equivalent
configuration instead, generated from the PodMonitor the AutoGLM operator created, so what
the operator's PodMonitor selects is what gets scraped. The rules follow the Prometheus
Operator's generator (pkg/prometheus/promcfg.go): pods of the monitor's namespace, kept by
its ``matchLabels`` and the endpoint's named port, with ``namespace``/``pod``/``container``
target labels, then the endpoint's own ``relabelings``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The Prometheus Operator's PodMonitor kind, schemaless: what the AutoGLM operator looks for
# before it creates PodMonitors.
PODMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "PodMonitor", "plural": "podmonitors",
                       "singular": "podmonitor"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                 "openAPIV3Schema": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def _meta_label(label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabeling(r: Mapping[str, Any]) -> dict[str, Any]:
    """A PodMonitor relabeling (camelCase) as Prometheus configuration (snake_case)."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label",
             "regex": "regex", "replacement": "replacement", "separator": "separator",
             "action": "action", "modulus": "modulus"}
    out = {names[k]: v for k, v in r.items() if k in names}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def scrape_configs(monitor: Mapping[str, Any], kubeconfig: Path) -> list[dict[str, Any]]:
    """One scrape job per endpoint of ``monitor`` (a PodMonitor object), discovering pods
    through the API server with ``kubeconfig``."""
    meta, spec = monitor["metadata"], monitor["spec"]
    ns = meta["namespace"]
    keep = [{"source_labels": [_meta_label(k)], "regex": re.escape(v), "action": "keep"}
            for k, v in sorted(spec.get("selector", {}).get("matchLabels", {}).items())]
    jobs = []
    for i, ep in enumerate(spec.get("podMetricsEndpoints", [])):
        relabel = [
            *keep,
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": re.escape(ep["port"]), "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)",
             "action": "drop"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"],
             "target_label": "container"},
            {"target_label": "job", "replacement": f"{ns}/{meta['name']}"},
            *(_relabeling(r) for r in ep.get("relabelings", [])),
        ]
        job: dict[str, Any] = {
            "job_name": f"podMonitor/{ns}/{meta['name']}/{i}",
            "honor_labels": bool(ep.get("honorLabels", False)),
            "metrics_path": ep.get("path", "/metrics"),
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig),
                                       "namespaces": {"names": [ns]}}],
            "relabel_configs": relabel,
        }
        if "interval" in ep:
            job["scrape_interval"] = ep["interval"]
        jobs.append(job)
    return jobs
