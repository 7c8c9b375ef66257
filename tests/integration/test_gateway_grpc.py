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
from autoglm.testing import eventually
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
    server = TritonServer(planes[1].repository, {"experts": 1},
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
    assert "experts" in {m["name"] for m in index["models"]}


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


class Stream:
    """A ``tritonclient.grpc`` stream through the gateway: answers by request id."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.client = client
        self.answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, request_id: str, n: int = 6) -> None:
        inp = grpcclient.InferInput("INPUT_IDS", [1, n], "INT64")
        inp.set_data_from_numpy(np.arange(n, dtype=np.int64).reshape(1, n))
        self.client.async_stream_infer("router", [inp], request_id=request_id)

    def receive(self) -> tuple[str, int]:
        """The next answer's (request id, MODEL_VERSION); fails on a stream error."""
        result, error = self.answers.get(timeout=120)
        assert error is None, error
        return result.get_response().id, int(result.as_numpy("MODEL_VERSION")[0])

    def ask(self, request_id: str) -> int:
        self.send(request_id)
        got, version = self.receive()
        assert got == request_id
        return version


def test_a_stream_follows_the_flip_request_by_request(planes: dict[int, DataPlane],
                                                      gateway: GatewayServer) -> None:
    """One stream, requests before and after a flip: each goes to the slot active when it
    arrives; the old slot is let go at once (its in-flight count drops while the stream
    stays open), so retiring it does not touch the stream."""
    gw = gateway.gateway
    retiring = planes[1].start_router()  # version 1's own router, stopped in this test
    try:
        gw.routing.flip(Target("a", 1, f"http://{retiring.http_url}", retiring.grpc_url))
        with grpcclient.InferenceServerClient(url(gateway)) as c:
            s = Stream(c)
            assert s.ask("1") == 1
            assert gw.inflight.get("a") == 1  # the stream's leg to slot a is open
            gw.routing.flip(target(planes, 2))
            assert s.ask("2") == 2
            eventually(lambda: gw.inflight.get("a") == 0,
                       "the stream to let go of the old slot", timeout=60, interval=0.05)
            assert gw.inflight.get("b") == 1
            retiring.stop()  # the old slot retires while the stream stays open
            assert [s.ask(str(n)) for n in range(3, 8)] == [2] * 5
            c.stop_stream()
            assert s.answers.empty()  # no error came after the last answer
    finally:
        planes[1].stop_router(retiring)
        assert not retiring.shm_regions()
    eventually(lambda: gw.inflight.get("b") == 0, "the stream to end", timeout=60,
               interval=0.05)
    text = metrics(gateway)
    # one leg per slot, each ended OK
    assert sample(text, 'autoglm_gateway_requests_total{code="200",slot="a",version="1"}') == 1
    assert sample(text, 'autoglm_gateway_requests_total{code="200",slot="b",version="2"}') == 1


def test_requests_back_to_back_across_a_flip_all_get_answers(
        planes: dict[int, DataPlane], gateway: GatewayServer) -> None:
    """Requests in flight on the old slot at the flip are answered there; the ones that
    arrive after it, by the new slot; none is lost."""
    gw = gateway.gateway
    n, flip_at = 60, 30
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        s = Stream(c)
        for i in range(flip_at):
            s.send(str(i))
        got = dict([s.receive()])  # at least one on the old slot
        gw.routing.flip(target(planes, 2))
        for i in range(flip_at, n):
            s.send(str(i))
        while len(got) < n:
            request_id, version = s.receive()
            assert request_id not in got
            got[request_id] = version
        c.stop_stream()
        assert s.answers.empty()
    versions = [got[str(i)] for i in range(n)]
    assert set(versions) <= {1, 2} and versions[0] == 1
    # a stream's requests arrive in order, so those the old slot served come first...
    assert versions == sorted(versions)
    # ... and every one sent after the flip went to the new slot
    assert versions[flip_at:] == [2] * (n - flip_at)
    eventually(lambda: gw.inflight.get("a") == 0 and gw.inflight.get("b") == 0,
               "both legs to end", timeout=60, interval=0.05)


def test_a_generation_on_a_stream_finishes_on_its_slot(planes: dict[int, DataPlane],
                                                       gateway: GatewayServer) -> None:
    """A decoupled ``generate`` request (many responses) started before the flip gets all its
    responses from the old slot, while the stream's next request goes to the new one."""
    gw = gateway.gateway
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Once upon a time"], dtype=np.object_))
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("generate", [prompt], request_id="gen",
                             parameters={"max_tokens": 80, "temperature": 0,
                                         "ignore_eos": True})
        first, error = answers.get(timeout=120)
        assert error is None, error
        gw.routing.flip(target(planes, 2))
        inp = grpcclient.InferInput("INPUT_IDS", [1, 4], "INT64")
        inp.set_data_from_numpy(np.arange(4, dtype=np.int64).reshape(1, 4))
        c.async_stream_infer("router", [inp], request_id="after")
        results = [first]
        while True:
            result, error = answers.get(timeout=120)
            assert error is None, error
            results.append(result)
            done = [r for r in results if r.get_response().id == "gen"
                    and r.as_numpy("finish_reason")[0]]
            if done and any(r.get_response().id == "after" for r in results):
                break
        c.stop_stream()
        assert answers.empty()
    generated = [r for r in results if r.get_response().id == "gen"]
    assert {int(r.as_numpy("model_version")[0]) for r in generated} == {1}
    assert sum(len(r.as_numpy("output_ids")) for r in generated) == 80
    assert int(generated[-1].as_numpy("completion_tokens")[0]) == 80
    assert generated[-1].as_numpy("finish_reason")[0] == b"length"
    (after,) = [r for r in results if r.get_response().id == "after"]
    assert int(after.as_numpy("MODEL_VERSION")[0]) == 2
    eventually(lambda: gw.inflight.get("a") == 0 and gw.inflight.get("b") == 0,
               "both legs to end", timeout=60, interval=0.05)


def test_a_stream_whose_client_goes_away_cancels_its_legs(gateway: GatewayServer) -> None:
    gw = gateway.gateway
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Once"], dtype=np.object_))
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("generate", [prompt], parameters={"max_tokens": 120,
                                                               "ignore_eos": True})
        result, error = answers.get(timeout=120)
        assert error is None, error
        assert not result.as_numpy("finish_reason")[0]  # still generating
        assert gw.inflight.get("a") == 1
        c.stop_stream(cancel_requests=True)
    eventually(lambda: gw.inflight.get("a") == 0, "the leg to be cancelled", timeout=60,
               interval=0.05)
    text = metrics(gateway)
    assert sample(text, 'autoglm_gateway_requests_total{code="499",slot="a",version="1"}') == 1


def test_a_stream_to_an_unreachable_slot_fails_naming_it(gateway: GatewayServer) -> None:
    port = free_port()  # nothing listens there
    gateway.gateway.routing.flip(Target("b", 2, f"http://127.0.0.1:{port}",
                                        f"127.0.0.1:{port}"))
    with grpcclient.InferenceServerClient(url(gateway)) as c:
        s = Stream(c)
        s.send("1")
        result, error = s.answers.get(timeout=120)
        c.stop_stream()
    assert result is None and error.status() == "StatusCode.UNAVAILABLE"
    assert f"slot b (127.0.0.1:{port}) unavailable" in str(error)
    text = metrics(gateway)
    assert sample(text, 'autoglm_gateway_requests_total{code="503",slot="b",version="2"}') == 1
    assert sample(text, 'autoglm_gateway_inflight{slot="b"}') == 0
