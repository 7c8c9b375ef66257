"""The gateway's gRPC side on real tritonserver processes: stock ``tritonclient.grpc``
through the gateway gets what it gets from the router directly, and follows flips."""

from __future__ import annotations

import queue
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS
from autoglm.procs import free_port
from autoglm.repository import build
from autoglm.triton import TritonServer

pytestmark = pytest.mark.triton
ADMIN = ("autoglm-admin", "yes")  # what a restricted Triton protocol asks for, as a header
HEADER = f"triton-grpc-protocol-{ADMIN[0]}"  # named so by Triton


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, DataPlane]]:
    """Version 1 and version 2, each a router and one server per expert."""
    repo = tmp_path_factory.mktemp("repo")
    for v in (1, 2):
        build(repo, "tiny-moe", v, PRESETS["tiny"])
    planes = {v: DataPlane(repo, v, tmp_path_factory.mktemp(f"v{v}")) for v in (1, 2)}
    try:
        # one after the other, from this thread: a server dies with the thread that
        # started it (die_with_parent), so no pool
        for p in planes.values():
            p.start()
        yield planes
    finally:
        for p in planes.values():
            p.stop()
        assert not [f for p in planes.values() for s in p.servers() for f in s.shm_regions()]


@pytest.fixture(scope="module")
def restricted(planes: dict[int, DataPlane], tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[TritonServer]:
    """A server whose model-repository gRPC methods need the ADMIN header."""
    server = TritonServer(planes[1].repository, {"expert_0": 1},
                          log_path=tmp_path_factory.mktemp("restricted") / "triton.log",
                          extra_args=["--grpc-restricted-protocol=model-repository:"
                                      f"{ADMIN[0]}={ADMIN[1]}"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def target(planes: dict[int, DataPlane], version: int) -> Target:
    router = planes[version].router
    assert router is not None
    return Target("ab"[version - 1], version, f"http://{router.http_url}", router.grpc_url)


@pytest.fixture
def gateway(planes: dict[int, DataPlane], restricted: TritonServer,
            ) -> Iterator[GatewayServer]:
    """After every server started: this process then forks no child under gRPC load."""
    server = GatewayServer(Routing(target(planes, 1)), free_port(),
                           grpc_port=free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def url(gateway: GatewayServer) -> str:
    return f"127.0.0.1:{gateway.grpc_port}"


def infer(c: grpcclient.InferenceServerClient, ids: NDArray[Any]) -> tuple[NDArray[Any], int]:
    inp = grpcclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    res = c.infer("router", [inp])
    return res.as_numpy("LOGITS"), int(res.as_numpy("MODEL_VERSION")[0])


def metrics(gateway: GatewayServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_stock_client_gets_the_routers_answers(planes: dict[int, DataPlane],
                                               gateway: GatewayServer) -> None:
    router = planes[1].router
    assert router is not None
    rng = np.random.default_rng(3)
    with grpcclient.InferenceServerClient(url(gateway)) as via, \
            grpcclient.InferenceServerClient(router.grpc_url) as direct:
        for _ in range(5):
            ids = rng.integers(0, 256, (int(rng.integers(1, 4)), int(rng.integers(1, 17))))
            (got, v1), (want, v2) = infer(via, ids), infer(direct, ids)
            assert v1 == v2 == 1
            np.testing.assert_array_equal(got, want)
        assert via.is_server_live() and via.is_server_ready()
        assert via.is_model_ready("router", "1") and not via.is_model_ready("router", "2")
        for call in ("get_server_metadata", "get_model_metadata", "get_model_config"):
            args = () if call == "get_server_metadata" else ("router",)
            assert getattr(via, call)(*args, as_json=True) == \
                getattr(direct, call)(*args, as_json=True)
        # a Triton error comes back as Triton said it, not as the gateway's
        with pytest.raises(InferenceServerException) as err:
            via.get_model_metadata("no_such_model")
        assert "no_such_model" in str(err.value)
    text = metrics(gateway)
    assert sample(text, 'autoglm_gateway_requests_total{code="200",slot="a",version="1"}') \
        >= 11
    assert sample(text, 'autoglm_gateway_inflight{slot="a"}') == 0


def test_stream_infer_through_the_gateway(gateway: GatewayServer) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for n in (3, 5):
            inp = grpcclient.InferInput("INPUT_IDS", [1, n], "INT64")
            inp.set_data_from_numpy(np.arange(n, dtype=np.int64).reshape(1, n))
            c.async_stream_infer("router", [inp])
        got = [answers.get(timeout=60) for _ in range(2)]
        c.stop_stream()
    assert [e for _, e in got] == [None, None]
    assert sorted(r.as_numpy("LOGITS").shape[1] for r, _ in got) == [3, 5]
    assert {int(r.as_numpy("MODEL_VERSION")[0]) for r, _ in got} == {1}


def test_each_call_follows_the_flip(planes: dict[int, DataPlane],
                                    gateway: GatewayServer) -> None:
    routing = gateway.gateway.routing
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    served = []
    with grpcclient.InferenceServerClient(url(gateway)) as c:  # one connection throughout
        for version in (1, 2, 1, 2):
            routing.flip(target(planes, version))
            served += [infer(c, ids)[1], infer(c, ids)[1]]
    assert served == [1, 1, 2, 2, 1, 1, 2, 2]
    text = metrics(gateway)
    assert sample(text, 'autoglm_gateway_requests_total{code="200",slot="b",version="2"}') == 4
    assert sample(text, 'autoglm_gateway_inflight{slot="b"}') == 0


def test_metadata_passes_through(restricted: TritonServer, gateway: GatewayServer) -> None:
    gateway.gateway.routing.flip(Target("a", 1, f"http://{restricted.http_url}",
                                        restricted.grpc_url))
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        with pytest.raises(InferenceServerException) as err:
            c.get_model_repository_index()
        assert f"expecting header '{HEADER}'" in str(err.value)
        index = c.get_model_repository_index(headers={HEADER: ADMIN[1]}, as_json=True)
    assert "expert_0" in {m["name"] for m in index["models"]}


def test_unreachable_router_is_a_clear_unavailable(gateway: GatewayServer) -> None:
    port = free_port()  # nothing listens there
    gateway.gateway.routing.flip(Target("b", 2, f"http://127.0.0.1:{port}",
                                        f"127.0.0.1:{port}"))
    with grpcclient.InferenceServerClient(url(gateway)) as c, \
            pytest.raises(InferenceServerException) as err:
        c.is_model_ready("router")
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert f"slot b (127.0.0.1:{port}) unavailable, tried twice" in str(err.value)
    text = metrics(gateway)
    assert sample(text, 'autoglm_gateway_retries_total{slot="b"}') == 1
    assert sample(text, 'autoglm_gateway_requests_total{code="503",slot="b",version="2"}') == 1
