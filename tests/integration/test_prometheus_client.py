"""autoglm.prometheus against a real Prometheus scraping exporters that speak the router's
and the expert servers' series, with the metrics contract's target labels."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric, UntypedMetricFamily
from prometheus_client.registry import Collector

from autoglm.autoscale import Sample
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.procs import free_port
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.testing import eventually

pytestmark = pytest.mark.prometheus


class Ticking(Collector):
    """Counters derived from one tick count, so that every scrape is consistent: the router
    routes 10 tokens a tick to expert 0 and none to expert 1 (expert 2 has no series);
    expert 0's server queues each request 5 ms."""

    def __init__(self, component: str) -> None:
        self.component, self.n = component, itertools.count()

    def collect(self) -> Iterator[Metric]:
        n = next(self.n)
        if self.component == "router":
            c = CounterMetricFamily("autoglm_expert_tokens", "", labels=["expert"])
            c.add_metric(["0"], 10.0 * n)
            c.add_metric(["1"], 0.0)
            yield c
            t = CounterMetricFamily("autoglm_expert_call_seconds", "", labels=["expert"])
            t.add_metric(["0"], 0.005 * n)  # 5 ms a call
            t.add_metric(["1"], 0.0)
            yield t
            k = CounterMetricFamily("autoglm_expert_calls", "", labels=["expert"])
            k.add_metric(["0"], float(n))
            k.add_metric(["1"], 0.0)
            yield k
        else:  # an expert server's own series: not what the autoscaler reads
            q = UntypedMetricFamily("nv_inference_queue_duration_us", "", labels=["model"])
            q.add_metric(["experts"], 9000.0 * n)
            yield q


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    servers = []
    groups = []
    for component in ("router", "expert"):
        reg = CollectorRegistry()
        reg.register(Ticking(component))
        port = free_port()
        servers.append(start_http_server(port, "127.0.0.1", registry=reg)[0])
        groups.append(({"deployment": "tiny", "component": component, "slot": "a",
                        "version": "1"}, [f"127.0.0.1:{port}"]))
    workdir: Path = tmp_path_factory.mktemp("prom")
    server = PrometheusServer(workdir, free_port())
    server.set_targets(groups)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


def test_expert_sample(prom: PrometheusServer) -> None:
    with Prometheus(prom.url) as p:
        def sample_with_rates() -> Sample | None:
            s = p.expert_sample({"deployment": "tiny"}, "a", 3, 5)
            return s if s.tokens_per_s[0] and s.queue_ms[0] is not None else None

        s = eventually(sample_with_rates, "two scrapes of each exporter", timeout=30)
        assert isinstance(s.tokens_per_s[0], float) and s.tokens_per_s[0] > 0
        assert s.tokens_per_s[1:] == (0.0, None)  # idle expert: 0; no series: None
        assert s.queue_ms[0] == pytest.approx(5.0)
        assert s.queue_ms[1:] == (None, None)  # no calls: no time
        assert s.at > 1e9, "at: epoch seconds of the newest sample (not a monotonic clock)"
        # the other slot, or another deployment, has no data
        with pytest.raises(MetricsError, match=r"^no data: .*slot=\"b\""):
            p.expert_sample({"deployment": "tiny"}, "b", 3, 5)
        with pytest.raises(MetricsError, match="no data"):
            p.expert_sample({"deployment": "tiny", "namespace": "elsewhere"}, "a", 3, 5)


def test_bad_query_and_http_error_say_so(prom: PrometheusServer) -> None:
    with Prometheus(prom.url) as p, pytest.raises(MetricsError) as e:
        p.query("rate(up[")
    assert str(e.value).startswith("bad query 'rate(up[': ")
    assert "parse error" in str(e.value)
    with Prometheus(prom.url + "/nope") as p, pytest.raises(MetricsError) as e:
        p.query("up")
    assert str(e.value).startswith(f"HTTP 404 from Prometheus at {prom.url}/nope")


def test_prometheus_stopped_is_unreachable(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, free_port()).start()
    with Prometheus(server.url) as p:
        assert p.query("vector(1)")[0]["value"][1] == "1"
        server.stop()
        with pytest.raises(MetricsError, match="is unreachable: Connection refused"):
            p.query("vector(1)")
