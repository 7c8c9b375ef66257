"""The fault matrix of `autoglm up` under steady load: parts SIGKILLed one after the other
while clients send requests through the gateway, every request counted.

One `autoglm up` (2 experts) for the cases in order, a steady load from ``CLIENTS``
``tritonclient.http`` clients throughout (a client that gets an error pauses ``BACKOFF``
and reconnects, as a retrying client does):

(a) an expert replica killed while its expert has 2 replicas: 0 failed (the router retries
    on the other replica), and the runtime starts it again;
(b) Prometheus killed: 0 failed, the autoscaler holds the replicas, Prometheus restarted;
(c) the router killed: requests fail (the gateway: slot unreachable, or an answer cut off)
    until the runtime has started it again, on its ports;
(d) the only replica of an expert killed (1 replica each, by an edit of the file): requests
    fail fast naming the expert, then recover by themselves (the replica restarted);
(e) `autoglm up` itself SIGKILLed and started again on the same home and ports: the new one
    reclaims what the dead one left (processes, shared memory, ports) and serves.

Nothing is lost: every request sent gets an answer (a result or an error), every result
equals the in-process reference of version 1 (`load_reference`, itself tied to transformers
in the model tests; computed before the load starts, so a system that is wrong in a
consistent way fails too), and failures happen only inside a case that allows them. The
figures (failed answers, time to the first failure, time to serve again) are printed, never
asserted on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import yaml

from autoglm.procs import kill_all, process_start, processes_with
from autoglm.repository import load_reference
from autoglm.testing import eventually
from autoglm.testing.up import UpProcess as Up
from autoglm.triton import shm_group_marker, shm_group_regions

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 2
PACE = 0.02  # seconds between a client's requests: the runtime needs the cores too
BACKOFF = 0.1  # after a failed request
SERVED_AGAIN = 20  # successful answers after a restart that count as "serving again"
INPUTS = np.random.default_rng(14).integers(0, 256, (8, 1, 8)).astype(np.int64)


@dataclass
class Result:
    sent: float
    done: float
    ok: bool
    error: str = ""
    wrong: bool = False  # answered, but not the reference's logits


@dataclass
class Load:
    """``CLIENTS`` threads sending requests through the gateway until stopped."""

    port: int
    reference: dict[int, Any]  # input index → the in-process model's logits
    results: list[Result] = field(default_factory=list)
    sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a request never answered"

    def _client(self, n: int) -> None:
        url = f"127.0.0.1:{self.port}"
        client = httpclient.InferenceServerClient(url, connection_timeout=10,
                                                  network_timeout=60)
        i = n
        while not self.stop.wait(PACE):
            i = (i + 1) % len(INPUTS)
            inp = httpclient.InferInput("INPUT_IDS", list(INPUTS[i].shape), "INT64")
            inp.set_data_from_numpy(INPUTS[i])
            with self._lock:
                self.sent += 1
            t0 = time.monotonic()
            try:
                logits = client.infer("router", [inp]).as_numpy("LOGITS")
            except Exception as e:  # every failure is counted, whatever raised it
                self.results.append(Result(t0, time.monotonic(), False, str(e)))
                client.close()
                time.sleep(BACKOFF)
                client = httpclient.InferenceServerClient(url, connection_timeout=10,
                                                          network_timeout=60)
                continue
            wrong = logits is None or not np.allclose(logits, self.reference[i], rtol=1e-4,
                                                      atol=1e-4)
            self.results.append(Result(t0, time.monotonic(), True, wrong=wrong))
        client.close()

    def successes_since(self, t: float) -> int:
        return sum(r.ok for r in list(self.results) if r.sent >= t)


@dataclass
class Figure:
    case: str
    requests: int
    failed: int
    first_failure: float | None  # seconds from the kill to the first failed answer
    serving_again: float | None  # from the kill to the first success after the last failure
    restored: float  # from the kill to the runtime's line that it was restored
    error: str = ""  # the first failure's message


@dataclass
class Run:
    up: Up
    load: Load
    ups: list[Up] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    windows: list[tuple[float, float, bool]] = field(default_factory=list)  # may fail?


def config(replicas: int) -> str:
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["spec"]["model"].update(numExperts=2, topK=2)  # every token to both experts
    doc["spec"]["experts"].update(minReplicas=replicas, maxReplicas=replicas)
    # the autoscaler runs (and must hold the replicas when Prometheus is gone); its target
    # is far above the load, so the bounds alone decide the replicas
    doc["spec"]["autoscaling"] = {"enabled": True, "prometheusUrl": "http://127.0.0.1:9090",
                                  "signal": "tokens", "target": 100000, "intervalSeconds": 2}
    return str(yaml.safe_dump(doc, sort_keys=False))


def status(up: Up) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((up.home / "run" / "tiny" / "status.json").read_text())
    return data


def replicas(up: Up) -> dict[str, int]:
    counts: dict[str, int] = status(up)["slots"]["a"]["expert_replicas"]
    return counts


def reclaim(up: Up) -> None:
    """Whatever a failed test left of ``up``'s servers (only its groups)."""
    kill_all(processes_with([shm_group_marker(g) for g in up.groups]))
    for g in up.groups:
        for f in shm_group_regions(g):
            f.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("home")
    file = home / "tiny.yaml"
    file.write_text(config(2))
    up = Up.start(file, home)
    r = Run(up, Load(up.port, {}), [up])
    try:
        up.wait_serving()
        model = load_reference(home / "models" / "tiny", 1)
        with torch.no_grad():
            r.load.reference.update({i: model(torch.from_numpy(x)).numpy()
                                     for i, x in enumerate(INPUTS)})
        r.load.start()
        eventually(lambda: r.load.successes_since(0) >= 50, "steady load", timeout=120)
        yield r
    finally:
        r.load.join()
        code = r.up.stop()
        for u in r.ups:
            print("\n".join(u.text))
            if u is not r.up:
                reclaim(u)
        table(r)
    assert code == 0, f"autoglm up exited {code}"
    assert r.up.said("stopped: no process")
    left = [x for u in r.ups for x in u.leftovers() if u is r.up or not x.startswith("port")]
    assert not left, left
    results = r.load.results
    assert r.load.sent == len(results), "every request answered"
    assert not [x for x in results if x.wrong], "no wrong answers"
    stray = [x for x in results if not x.ok and not any(
        t0 <= x.done <= t1 and may for t0, t1, may in r.windows)]
    assert not stray, f"{len(stray)} failed outside the cases, e.g. {stray[0].error}"


def table(r: Run) -> None:
    results = r.load.results
    print(f"\nfault matrix: {len(results)} requests from {CLIENTS} clients, "
          f"{sum(not x.ok for x in results)} failed, {sum(x.wrong for x in results)} wrong")
    print("| fault | requests during | failed | first failure after | serving again after "
          "| restored after |")
    print("|---|---|---|---|---|---|")

    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} s"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f} ms"

    for f in r.figures:
        print(f"| {f.case} | {f.requests} | {f.failed} | {ms(f.first_failure)} | "
              f"{s(f.serving_again)} | {s(f.restored)} |")
    for f in r.figures:
        if f.error:
            print(f"  {f.case}: {f.error[:300]}")


def fault(r: Run, case: str, kill: Callable[[], None], restored: str,
          may_fail: bool) -> Figure:
    """Kill, wait for the runtime's line ``restored`` (a regex) and for clients served
    again; the case's figures."""
    up, mark = r.up, len(r.up.lines)
    t_kill = time.monotonic()
    kill()
    if r.up is not up:  # (e) started another
        up, mark = r.up, 0
    eventually(lambda: any(re.search(restored, line) for _, line in up.lines[mark:]),
               f"{case}: {restored!r}", timeout=300)
    t_restored = next(t for t, line in up.lines[mark:] if re.search(restored, line))
    eventually(lambda: r.load.successes_since(t_restored) >= SERVED_AGAIN,
               f"{case}: served again", timeout=120)
    t_end = time.monotonic()
    r.windows.append((t_kill, t_end, may_fail))
    during = [x for x in list(r.load.results) if x.done >= t_kill and x.sent <= t_end]
    failed = [x for x in during if not x.ok]
    last_failure = max((x.done for x in failed), default=None)
    again = min((x.done for x in during if x.ok and last_failure is not None
                 and x.sent >= last_failure), default=None)
    fig = Figure(case, len(during), len(failed),
                 failed[0].done - t_kill if failed else None,
                 again - t_kill if again is not None else None,
                 t_restored - t_kill, failed[0].error if failed else "")
    r.figures.append(fig)
    print(fig)
    if not may_fail:
        assert not failed, f"{case}: {len(failed)} failed, e.g. {failed[0].error}"
    return fig


def test_a_expert_server_killed_others_hold_its_experts_nothing_fails(run: Run) -> None:
    """A server holding both experts dies; the other server holds a replica of each."""
    assert replicas(run.up) == {"0": 2, "1": 2}
    servers = status(run.up)["slots"]["a"]["servers"]
    assert [x["experts"] for x in servers] == [[0, 1], [0, 1]], "packed: 2 experts a server"
    pid = status(run.up)["slots"]["a"]["expert_servers"]["0"][1]["pid"]
    fault(run, "expert server killed (its experts held elsewhere too)",
          lambda: os.kill(pid, signal.SIGKILL),
          r"a: expert server 2/2 \(experts 0,1\) restarted", may_fail=False)
    assert status(run.up)["slots"]["a"]["expert_servers"]["0"][1]["pid"] != pid
    assert replicas(run.up) == {"0": 2, "1": 2}


def test_b_prometheus_killed_scaling_holds_serving_unaffected(run: Run) -> None:
    up = run.up
    eventually(lambda: up.said("autoscaler: metrics available"), "metrics", timeout=120)
    pid = status(up)["prometheus_pid"]
    mark, held = len(up.lines), []

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: up.said("holding replicas", mark), "the autoscaler to hold")
        held.append(replicas(up))

    fault(run, "Prometheus killed", kill, r"prometheus restarted on", may_fail=False)
    assert held == [{"0": 2, "1": 2}]
    assert replicas(up) == {"0": 2, "1": 2}
    assert not [line for line in up.text[mark:] if "autoscaler: expert" in line]
    assert status(up)["prometheus_pid"] != pid


def test_c_router_killed_fails_then_recovers(run: Run) -> None:
    pid = status(run.up)["slots"]["a"]["router_pid"]
    fig = fault(run, "router killed", lambda: os.kill(pid, signal.SIGKILL),
                r"a: router restarted", may_fail=True)
    assert process_start(pid) is None, "the router was killed"
    new = status(run.up)["slots"]["a"]["router_pid"]
    assert new != pid and process_start(new) is not None, "and the runtime started another"
    assert fig.failed > 0, "its requests cannot be served while it is down"
    # the gateway's word for it: refused (unreachable) or cut off mid-answer (unavailable)
    assert re.search(r"slot a (unreachable|unavailable)", fig.error), fig.error
    assert fig.serving_again is not None, "serving came back"


def test_d_only_server_killed_fails_fast_then_recovers(run: Run) -> None:
    up, mark = run.up, len(run.up.lines)
    up.file.write_text(config(1))
    eventually(lambda: up.said("applied the change", mark), "the edit applied", timeout=120)
    assert replicas(up) == {"0": 1, "1": 1}
    pid = status(up)["slots"]["a"]["expert_servers"]["0"][0]["pid"]
    assert len(status(up)["slots"]["a"]["servers"]) == 1, "one server holds both experts"
    fig = fault(run, "the only server of its experts killed",
                lambda: os.kill(pid, signal.SIGKILL),
                r"a: expert server 1/1 \(experts 0,1\) restarted", may_fail=True)
    assert fig.failed > 0, "its requests cannot be served while it is down"
    assert "expert 0 unavailable" in fig.error, fig.error
    assert fig.serving_again is not None


def test_e_autoglm_up_killed_and_started_again_reclaims_what_it_left(run: Run) -> None:
    old = run.up
    groups = set(old.groups)
    left: list[str] = []

    def kill() -> None:
        old.kill()
        left.extend(old.leftovers())
        run.up = Up.start(old.file, old.home, ports=old.ports)
        run.ups.append(run.up)

    fig = fault(run, "`autoglm up` SIGKILLed, started again", kill, r"^serving tiny",
                may_fail=True)
    new = run.up
    new.wait_serving()
    print(f"left by the killed run: {left}")
    assert any(x.startswith("/dev/shm/") for x in left), "a killed run leaves its regions"
    assert new.said(f"the previous `autoglm up` of tiny (pid {old.popen.pid}) did not stop; "
                    "reclaimed what it left")
    assert not [x for x in old.leftovers() if not x.startswith("port")], old.leftovers()
    assert not [f for g in groups for f in shm_group_regions(g)]
    assert new.groups and not new.groups & groups
    assert fig.serving_again is not None
