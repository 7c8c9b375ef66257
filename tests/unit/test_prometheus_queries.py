"""The PromQL of the project and the client's errors, without a Prometheus: the queries
as text, and real sockets that refuse or never answer. The control-loop metrics."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from autoglm.metrics import PHASES, ControlMetrics
from autoglm.procs import free_port
from autoglm.prometheus import (
    MetricsError,
    Prometheus,
    label_selector,
    queue_query,
    tokens_newest_query,
    tokens_query,
)

BASE = {"deployment": "tiny", "component": "router", "slot": "a"}


def test_selector_is_sorted_and_escaped() -> None:
    assert label_selector(BASE) == '{component="router",deployment="tiny",slot="a"}'
    assert label_selector({"x": 'a"b\\c'}) == '{x="a\\"b\\\\c"}'


def test_queries_name_the_contract_series_and_window() -> None:
    assert tokens_query(BASE, 10) == (
        'sum by (expert) (rate(autoglm_expert_tokens_total'
        '{component="router",deployment="tiny",slot="a"}[10s]))')
    assert tokens_newest_query(BASE) == (
        'max(timestamp(autoglm_expert_tokens_total'
        '{component="router",deployment="tiny",slot="a"}))')
    q = queue_query({"deployment": "tiny", "namespace": "ns"}, 0.2)  # window at least 1 s
    assert "rate(autoglm_expert_call_seconds_total{deployment=\"tiny\",namespace=\"ns\"}[1s])" \
        in q
    assert "sum by (expert) (rate(autoglm_expert_calls_total" in q and q.endswith("* 1000")


def test_unreachable_prometheus_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Prometheus(url, timeout=2) as p, pytest.raises(MetricsError) as e:
        p.query("up")
    assert str(e.value) == f"Prometheus at {url} is unreachable: Connection refused"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_timeout_says_so(silent_server: str) -> None:
    with Prometheus(silent_server, timeout=0.3) as p, pytest.raises(MetricsError) as e:
        p.query("up")
    assert str(e.value) == f"Prometheus at {silent_server} did not answer within 0.3 s"


def test_bad_url_says_so() -> None:
    with Prometheus("127.0.0.1:9090") as p, pytest.raises(MetricsError) as e:
        p.query("up")
    assert "bad Prometheus URL '127.0.0.1:9090'" in str(e.value)


def test_control_metrics_follow_decisions_and_swaps() -> None:
    reg = CollectorRegistry()
    m = ControlMetrics(reg)
    tiny = {"namespace": "ns", "deployment": "tiny"}
    m.decision(("ns", "tiny"), [1, 1, 2], [3, 1, 1], [600.0, 50.0, None], 1.5, True)
    v = reg.get_sample_value
    assert v("autoglm_autoscaler_replicas", {**tiny, "expert": "0"}) == 1
    assert v("autoglm_autoscaler_desired_replicas", {**tiny, "expert": "0"}) == 3
    assert v("autoglm_autoscaler_load_tokens_per_second",
             {**tiny, "expert": "0"}) == 600
    assert v("autoglm_autoscaler_load_tokens_per_second",
             {**tiny, "expert": "2"}) is None  # no data: no value
    assert v("autoglm_autoscaler_imbalance", tiny) == 1.5
    assert v("autoglm_autoscaler_metrics_available", tiny) == 1
    assert v("autoglm_autoscaler_decisions_total",
             {**tiny, "expert": "0", "direction": "up"}) == 1
    assert v("autoglm_autoscaler_decisions_total",
             {**tiny, "expert": "2", "direction": "down"}) == 1
    assert v("autoglm_autoscaler_decisions_total",
             {**tiny, "expert": "1", "direction": "up"}) is None
    m.decision(("ns", "tiny"), [3, 1, 1], [3, 1, 1], [None, None, None], 0.0, False)
    assert v("autoglm_autoscaler_metrics_available", tiny) == 0
    assert v("autoglm_autoscaler_imbalance", tiny) == 1.5  # last known

    m.swap(("ns", "tiny"), "Warming", 1)
    m.swap_event(("ns", "tiny"), "Staging")
    phases = {p: v("autoglm_swap_phase", {**tiny, "phase": p}) for p in PHASES}
    assert phases == {p: (1.0 if p == "Warming" else 0.0) for p in PHASES}
    assert v("autoglm_swap_events_total", {**tiny, "reason": "Staging"}) == 1
    assert v("autoglm_active_version", tiny) == 1

    # one operator serves every namespace: a resource of the same name elsewhere is apart
    m.swap(("other-ns", "tiny"), "Idle", 2)
    assert v("autoglm_active_version", tiny) == 1
    assert v("autoglm_active_version", {"namespace": "other-ns", "deployment": "tiny"}) == 2
    m.forget(("ns", "tiny"))
    text = generate_latest(reg).decode()
    assert 'namespace="ns"' not in text and 'namespace="other-ns"' in text
