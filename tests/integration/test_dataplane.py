"""The data plane on real tritonserver processes: a router server and expert servers that each
hold several experts."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from autoglm import canary
from autoglm.local.dataplane import DataPlane
from autoglm.models.decoder import forward
from autoglm.models.tiny import PRESETS
from autoglm.placement import Placement, place
from autoglm.repository import build, load_reference
from autoglm.testing import eventually
from autoglm.triton import TritonServer

pytestmark = pytest.mark.triton
VERSION = 1
# The longest a routed-token count waits in the router before Triton exports it: its endpoint
# refresh period (AUTOGLM_RESOLVE_SECONDS, 2 s), which flushes the counters too, and a margin.
FLUSH_LAG = 2.5


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    build(path, "tiny-moe", VERSION, PRESETS["tiny"])
    build(path, "tiny-moe", VERSION + 1, PRESETS["tiny"])  # coexists, never loaded
    return path


@pytest.fixture(scope="module")
def plane(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataPlane]:
    dp = DataPlane(repo, VERSION, tmp_path_factory.mktemp("plane"), capacity=2)
    dp.start(1)  # 4 experts on 2 servers
    try:
        yield dp
    finally:
        dp.stop()
        assert not [f for s in dp.servers() for f in s.shm_regions()], "shared memory left"
        assert all(s.popen is None for s in dp.servers())


def infer(server: TritonServer, ids: NDArray[Any]) -> tuple[NDArray[Any], int]:
    with httpclient.InferenceServerClient(server.http_url) as c:
        inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        res = c.infer("router", [inp])
        return res.as_numpy("LOGITS"), int(res.as_numpy("MODEL_VERSION")[0])


def metric(url: str, name: str, expert: int) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf'^{name}{{expert="{expert}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def check_against_reference(plane: DataPlane, repo: Path, rounds: int, seed: int) -> None:
    assert plane.router is not None
    ref = load_reference(repo, VERSION)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        b, s = int(rng.integers(1, 4)), int(rng.integers(1, 17))
        ids = rng.integers(0, ref.cfg.vocab_size, (b, s)).astype(np.int64)
        logits, version = infer(plane.router, ids)
        assert version == VERSION
        expected = ref(torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_outputs_equal_the_reference_with_1_2_and_3_replicas(plane: DataPlane,
                                                             repo: Path) -> None:
    assert plane.router is not None
    # the server holds exactly the version it was told, though version 2 is on disk
    base = f"http://{plane.router.http_url}/v2/models/router/versions"
    assert urllib.request.urlopen(f"{base}/1/ready").status == 200
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{base}/2/ready")
    assert len(plane.expert_servers) == 2
    check_against_reference(plane, repo, rounds=8, seed=1)
    for replicas in (2, 3):
        before = {id(s) for s in plane.servers()}
        plane.reshape(place([replicas] * plane.num_experts, plane.capacity,
                            current=plane.placement))
        assert {id(s) for s in plane.servers()} >= before, "what each server held stays"
        new = [servers[-1] for servers in plane.experts.values()]
        assert all(id(s) not in before for s in new)
        # within a resolve period the router sends the new replicas their share
        url, want = plane.router.metrics_url, float(replicas)
        eventually(lambda: all(metric(url, "autoglm_expert_replicas", e) == want  # noqa: B023
                               for e in range(plane.num_experts)),
                   f"the router to see {replicas} replicas per expert", timeout=30)
        check_against_reference(plane, repo, rounds=12, seed=replicas)
        for e, server in enumerate(new):  # counted by the server, flushed within 0.5 s
            def served(e: int = e, server: TritonServer = server) -> bool:
                if metric(server.metrics_url, "autoglm_expert_served_tokens_total", e) > 0:
                    return True
                # not yet (its share is a share: on a loaded machine 12 rounds may miss it)
                check_against_reference(plane, repo, rounds=1, seed=e)
                return False

            eventually(served, f"the new replica of expert {e} to get traffic", timeout=30,
                       interval=0.5)


def test_routed_token_counters_on_the_metrics_endpoint(plane: DataPlane) -> None:
    assert plane.router is not None
    url = plane.router.metrics_url
    cfg = PRESETS["tiny"]
    time.sleep(FLUSH_LAG)  # what earlier tests routed has reached Triton
    before = sum(metric(url, "autoglm_expert_tokens_total", e) for e in range(cfg.num_experts))
    infer(plane.router, np.zeros((2, 7), dtype=np.int64) + 5)
    # summed in the router, handed to Triton within a flush period
    eventually(lambda: sum(metric(url, "autoglm_expert_tokens_total", e)
                           for e in range(cfg.num_experts)) - before
               == cfg.layers * 2 * 7 * cfg.top_k, "the routed tokens counted", timeout=10)
    text = urllib.request.urlopen(url).read().decode()
    for name in ("autoglm_expert_calls_total", "autoglm_expert_call_seconds_total",
                 "autoglm_expert_replicas", "nv_inference_request_success"):
        assert name in text


def test_killed_replica_does_not_fail_requests(plane: DataPlane, repo: Path) -> None:
    victim = plane.experts[0][0]
    victim.kill()  # a crash: the endpoints file still lists it
    check_against_reference(plane, repo, rounds=10, seed=7)
    with grpcclient.InferenceServerClient(plane.router.grpc_url if plane.router else "") as c:
        inp = grpcclient.InferInput("INPUT_IDS", [1, 4], "INT64")
        inp.set_data_from_numpy(np.arange(4, dtype=np.int64).reshape(1, 4))
        assert c.infer("router", [inp]).as_numpy("MODEL_VERSION")[0] == VERSION


def test_unreachable_expert_fails_clearly_then_recovers(plane: DataPlane, repo: Path) -> None:
    assert plane.router is not None
    dead = list(plane.experts[1])
    for s in dead:
        s.kill()
    lost = [e for e, servers in plane.experts.items() if all(s in dead for s in servers)]
    ids = np.arange(64, dtype=np.int64).reshape(4, 16) % PRESETS["tiny"].vocab_size
    with pytest.raises(InferenceServerException) as err:
        infer(plane.router, ids)
    assert f"expert {min(lost)} unavailable" in str(err.value)
    # back on the same addresses: no router restart, no endpoint change
    for s in dead:
        assert plane.restart(s)
    router = plane.router
    eventually(lambda: infer(router, ids)[1] == VERSION, "requests to succeed again",
               timeout=30)
    check_against_reference(plane, repo, rounds=4, seed=11)
    eventually(lambda: metric(router.metrics_url, "autoglm_expert_replicas", 1)
               == float(len(dead)), "the router to see every server of expert 1 again",
               timeout=10)


def test_canary_passes_on_the_router_and_says_why_otherwise(plane: DataPlane) -> None:
    """The canary needs nothing but the router's HTTP port (the operator's situation)."""
    assert plane.router is not None
    url, metrics = f"http://{plane.router.http_url}", plane.router.metrics_url

    def routed() -> list[float]:
        """The routed-token counters once what the router summed has reached Triton: it
        flushes within its endpoint refresh period (2 s) at the latest."""
        time.sleep(FLUSH_LAG)
        return [metric(metrics, "autoglm_expert_tokens_total", e) for e in range(4)]

    before = routed()
    ok, detail = canary.check(url, VERSION)
    assert ok is True, detail
    assert f"version {VERSION} answered" in detail
    # the canary is not user load: the autoscaling signal did not move
    assert routed() == before
    # a version this server does not serve is not an answer: the swap keeps waiting
    ok, detail = canary.check(url, VERSION + 1)
    assert ok is None and "answered 404" in detail and "version 2" in detail, detail
    ok, detail = canary.check("http://127.0.0.1:9", VERSION, timeout=2)
    assert ok is None and "127.0.0.1:9" in detail


def test_a_server_holding_several_experts_killed(repo: Path,
                                                 tmp_path_factory: pytest.TempPathFactory,
                                                 ) -> None:
    """Server 0 holds experts 0 and 1; server 1 holds a replica of 0 only. Server 0 killed:
    requests that route to expert 0 (and not 1) all succeed on the other replica; those
    that route to expert 1 fail clearly; all succeed again once it is restarted."""
    dp = DataPlane(repo, VERSION, tmp_path_factory.mktemp("mixed"), capacity=2)
    dp.start(Placement(tuple(map(frozenset, ({0, 1}, {0}, {2, 3})))))
    try:
        assert dp.router is not None
        ref = load_reference(repo, VERSION)
        rng = np.random.default_rng(5)
        inputs = [rng.integers(0, ref.cfg.vocab_size, (1, 2)).astype(np.int64)
                  for _ in range(60)]
        uses = [set(forward(ref.router, torch.from_numpy(x), ref.local_fanout)[1])
                for x in inputs]
        spared = [x for x, u in zip(inputs, uses, strict=True) if 0 in u and 1 not in u]
        lost = [x for x, u in zip(inputs, uses, strict=True) if 1 in u]
        assert len(spared) >= 3 and len(lost) >= 3, (len(spared), len(lost))
        victim = dp.expert_servers[0].server
        victim.kill()
        for x in spared:  # expert 0's other replica answers: none of these fails
            logits, version = infer(dp.router, x)
            assert version == VERSION
            np.testing.assert_allclose(logits, ref(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
        for x in lost:
            with pytest.raises(InferenceServerException, match="expert 1 unavailable"):
                infer(dp.router, x)
        assert dp.restart(victim)
        router = dp.router
        # back within the router's next refreshes of its endpoints (one may still apply
        # the view of the file from while the server restarted, without it)
        eventually(lambda: all(infer(router, x)[1] == VERSION for x in lost),
                   "expert 1 back", timeout=30)
        for x in lost:
            np.testing.assert_allclose(infer(router, x)[0], ref(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
    finally:
        dp.stop()
        assert not [f for s in dp.servers() for f in s.shm_regions()], "shared memory left"


def test_experts_move_between_serving_servers_under_load(
        repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Live moves (no restart): under steady load, experts 0 and 1 move between two
    servers and back, six moves; every answer arrives and equals the reference. A move to a
    server that died is abandoned, and the expert serves on from where it was."""
    dp = DataPlane(repo, VERSION, tmp_path_factory.mktemp("moves"), capacity=3)
    dp.start(Placement((frozenset({0, 2}), frozenset({1, 3}))))
    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []
    try:
        router = dp.router
        assert router is not None
        ref = load_reference(repo, VERSION)
        rng = np.random.default_rng(11)
        inputs = [rng.integers(0, ref.cfg.vocab_size, (2, 6)).astype(np.int64)
                  for _ in range(8)]
        wanted = [ref(torch.from_numpy(x)).numpy() for x in inputs]

        def load() -> None:
            i = 0
            while not stop.is_set():
                x, want = inputs[i % len(inputs)], wanted[i % len(inputs)]
                try:
                    logits, _ = infer(router, x)
                    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
                    answered.append(i)
                except (InferenceServerException, AssertionError) as e:
                    failures.append(str(e)[:200])
                i += 1

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        a, b = (x.server for x in dp.expert_servers)
        for expert, source, target in [(0, a, b), (1, b, a), (0, b, a), (1, a, b),
                                       (0, a, b), (0, b, a)]:
            before = len(answered)
            assert dp.move(expert, source, target), (expert, source.grpc_url)

            def more(n: int = before) -> bool:
                return len(answered) > n + 5
            eventually(more, "answers after the move", 30)
        assert dp.placement == Placement((frozenset({0, 2}), frozenset({1, 3})))
        stop.set()
        worker.join(timeout=30)
        assert not failures, failures[:3]
        print(f"\n{len(answered)} answers across 6 live moves, 0 failed")
        # a move to a server that is gone is abandoned: expert 2 serves on from a
        b.kill()
        assert not dp.move(2, a, b, timeout=5)
        assert 2 in dp.expert_servers[0].held
        only_a = [x for x in (rng.integers(0, ref.cfg.vocab_size, (1, 1)).astype(np.int64)
                              for _ in range(200))
                  if set(forward(ref.router, torch.from_numpy(x), ref.local_fanout)[1])
                  <= {0, 2}]
        assert only_a, "inputs that route to experts 0 and 2 only"
        for x in only_a[:2]:
            np.testing.assert_allclose(infer(router, x)[0], ref(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
    finally:
        stop.set()
        dp.stop()
        assert not [f for s in dp.servers() for f in s.shm_regions()], "shared memory left"
