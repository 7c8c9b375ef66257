"""The test harness's stand-in for Kubernetes service discovery: what the operator's
PodMonitor selects, labelled as the Prometheus Operator's generated job labels it."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm.k8s import builders
from autoglm.testing.monitoring import targets

MONITOR = builders.monitor_objects("tiny", "ns", builders.owner_reference("tiny", "uid"))[0]


def pod(name: str, labels: dict[str, str], ip: str = "198.18.0.7", phase: str = "Running",
        port: str = "metrics", init: bool = False) -> dict[str, Any]:
    container = {"name": "triton", "ports": [{"name": "http", "containerPort": 8000},
                                             {"name": port, "containerPort": 8002}]}
    spec = {"initContainers": [container], "containers": []} if init \
        else {"containers": [container]}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec,
            "status": {"phase": phase, "podIP": ip}}


def test_the_monitor_selects_its_instances_pods_at_the_named_port() -> None:
    """As the job the real Prometheus Operator generated for this PodMonitor: a pod that has
    an IP and has not ended, init containers' ports included."""
    labels = builders.labels("tiny", "expert", "a", 1, 3)
    got = targets(MONITOR, [
        pod("tiny-a-expert-1-x", labels),
        pod("other-a-expert-1-x", builders.labels("other", "expert", "a", 1, 3)),
        pod("tiny-pending", labels, phase="Pending"),
        pod("tiny-no-ip", labels, phase="Pending", ip=""),
        pod("tiny-failed", labels, phase="Failed"),
        pod("tiny-done", labels, phase="Succeeded"),
        pod("tiny-no-port", labels, port="web"),
        pod("tiny-init", labels, init=True),
    ])
    want = {"namespace": "ns", "container": "triton", "job": "ns/tiny", "endpoint": "metrics",
            "deployment": "tiny", "component": "expert", "slot": "a", "version": "3"}
    assert got == [({**want, "pod": name}, ["198.18.0.7:8002"])
                   for name in ("tiny-a-expert-1-x", "tiny-pending", "tiny-init")]


def test_the_monitor_keeps_the_series_own_labels() -> None:
    """Triton's ``version`` label stays ``version`` (not ``exported_version``), as under
    ``autoglm up``."""
    endpoint, = MONITOR["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True


def test_a_gateway_pod_has_no_slot_label() -> None:
    (labels, _), = targets(MONITOR, [pod("tiny-gw", builders.labels("tiny", "gateway"))])
    assert labels["component"] == "gateway" and "slot" not in labels


def test_relabelings_it_cannot_apply_are_refused() -> None:
    monitor = {**MONITOR, "spec": {**MONITOR["spec"], "podMetricsEndpoints": [
        {"port": "metrics", "relabelings": [{"sourceLabels": ["a"], "targetLabel": "b",
                                             "action": "hashmod", "modulus": 2}]}]}}
    with pytest.raises(ValueError, match="not supported"):
        targets(monitor, [pod("tiny-gw", builders.labels("tiny", "gateway"))])
