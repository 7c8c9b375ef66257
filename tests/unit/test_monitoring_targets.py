"""The test harness's stand-in for Kubernetes service discovery: what the operator's
PodMonitor selects, labelled as the Prometheus Operator's generated job labels it."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm.k8s import builders
from autoglm.testing.monitoring import targets

MONITOR = builders.monitor_objects("tiny", "ns", builders.owner_reference("tiny", "uid"))[0]


def pod(name: str, labels: dict[str, str], ip: str = "198.18.0.7", phase: str = "Running",
        port: str = "metrics") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "triton", "ports": [
                {"name": "http", "containerPort": 8000},
                {"name": port, "containerPort": 8002}]}]},
            "status": {"phase": phase, "podIP": ip}}


def test_the_monitor_selects_its_instances_running_pods_at_the_named_port() -> None:
    expert = pod("tiny-a-expert-1-x", builders.labels("tiny", "expert", "a", 1, 3))
    got = targets(MONITOR, [
        expert,
        pod("other-a-expert-1-x", builders.labels("other", "expert", "a", 1, 3)),
        pod("tiny-pending", builders.labels("tiny", "expert", "a", 1, 3), phase="Pending"),
        pod("tiny-no-port", builders.labels("tiny", "expert", "a", 1, 3), port="web"),
    ])
    assert got == [({"namespace": "ns", "pod": "tiny-a-expert-1-x", "container": "triton",
                     "job": "ns/tiny", "deployment": "tiny", "component": "expert",
                     "slot": "a", "version": "3"}, ["198.18.0.7:8002"])]


def test_a_gateway_pod_has_no_slot_label() -> None:
    (labels, _), = targets(MONITOR, [pod("tiny-gw", builders.labels("tiny", "gateway"))])
    assert labels["component"] == "gateway" and "slot" not in labels


def test_relabelings_it_cannot_apply_are_refused() -> None:
    monitor = {**MONITOR, "spec": {**MONITOR["spec"], "podMetricsEndpoints": [
        {"port": "metrics", "relabelings": [{"sourceLabels": ["a"], "targetLabel": "b",
                                             "action": "hashmod", "modulus": 2}]}]}}
    with pytest.raises(ValueError, match="not supported"):
        targets(monitor, [pod("tiny-gw", builders.labels("tiny", "gateway"))])
