"""What a Prometheus configured by the Prometheus Operator scrapes for a PodMonitor.

The Prometheus the Prometheus Operator runs cannot start here: its pod needs the upstream
Prometheus and config-reloader images, which are never pulled. And Debian's Prometheus is
built without Kubernetes service discovery. So the test harness discovers instead:
:func:`targets` turns the PodMonitor the AutoGLM operator created, and the pods the API
server lists, into file-based targets with the labels the Prometheus Operator's generated job
gives them. Its rules (checked against the job the real operator, v0.94.1, generated for
AutoGLM's PodMonitor, scraped by a Prometheus with Kubernetes discovery): pods of the
monitor's namespace that have an IP and are not Failed or Succeeded, carrying its
``matchLabels``, at each container port (init containers' too) the endpoint names, labelled
``namespace``, ``container``, ``pod``, ``job`` and ``endpoint``, then by the endpoint's own
``relabelings``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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

Target = tuple[dict[str, str], list[str]]  # (labels, ["ip:port"]), as PrometheusServer takes


def _meta(pod: Mapping[str, Any]) -> dict[str, str]:
    """The ``__meta_kubernetes_pod_label_*`` labels Kubernetes discovery gives a pod."""
    return {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in pod["metadata"].get("labels", {}).items()}


def _relabel(labels: dict[str, str], rules: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The ``replace`` relabelings (one source label, default regex and replacement): what
    the operator's PodMonitors use; anything else is refused, not guessed."""
    for r in rules:
        if r.get("action", "replace").lower() != "replace" or len(r["sourceLabels"]) != 1 \
                or set(r) - {"sourceLabels", "targetLabel", "action"}:
            raise ValueError(f"relabeling not supported by the test harness: {dict(r)}")
        value = labels.get(r["sourceLabels"][0], "")
        if value:
            labels[r["targetLabel"]] = value
        else:  # the default regex (.*) matches "": the label is set empty, that is removed
            labels.pop(r["targetLabel"], None)
    return labels


def targets(monitor: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[Target]:
    """What ``monitor`` (a PodMonitor) selects among ``pods`` (of its namespace)."""
    meta, spec = monitor["metadata"], monitor["spec"]
    want = spec.get("selector", {}).get("matchLabels", {})
    out: list[Target] = []
    for ep in spec.get("podMetricsEndpoints", []):
        for pod in pods:
            labels = pod["metadata"].get("labels", {})
            status = pod.get("status", {})
            if status.get("phase") in ("Failed", "Succeeded") or not status.get("podIP") \
                    or any(labels.get(k) != v for k, v in want.items()):
                continue
            for c in (*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]):
                for port in c.get("ports", []):
                    if port.get("name") != ep["port"]:
                        continue
                    base = {**_meta(pod), "namespace": meta["namespace"],
                            "pod": pod["metadata"]["name"], "container": c["name"],
                            "job": f"{meta['namespace']}/{meta['name']}",
                            "endpoint": ep["port"]}
                    final = {k: v for k, v in _relabel(base, ep.get("relabelings", [])).items()
                             if not k.startswith("__")}
                    out.append((final, [f"{status['podIP']}:{port['containerPort']}"]))
    return out
