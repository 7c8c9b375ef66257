"""Per-expert autoscaling in `autoglm up`: real Triton servers, the runtime's own Prometheus,
the policy of autoglm.autoscale acting on expert replicas.

One runtime for the module, the scenarios in order: (a) load shifted onto one expert adds
replicas to that expert and they serve; (b) with the load gone, replicas go down only after
the stabilization window; (c) Prometheus killed: replicas held, status says why, and the
runtime restarts it and recovers; (d) a version swap pauses scaling.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import yaml
from numpy.typing import NDArray

from autoglm.metrics import LOCAL_NAMESPACE
from autoglm.models.decoder import forward
from autoglm.repository import load_reference
from autoglm.testing import eventually, metric_value
from autoglm.testing.up import UpProcess as Up

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
HOT = 0
SEQ = 16
RATE = 10.0  # requests/s of one 1x16-token sequence
STABILIZATION = 20
TARGET = 200.0  # tokens/s per replica: the hot expert needs 2 replicas, the others 1
SCALED = 2  # the hot expert's replicas under the load


def config() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = "scaled"
    doc["spec"]["experts"].update(minReplicas=1, maxReplicas=3, replicaBudget=7)
    doc["spec"]["autoscaling"] = {
        "enabled": True, "prometheusUrl": "http://127.0.0.1:9090",  # locally: its own
        "signal": "tokens", "target": TARGET, "tolerance": 0.1, "intervalSeconds": 2,
        "scaleUpLimit": 2, "stabilizationSeconds": STABILIZATION}
    return dict(doc)


def hot_sequence(repository: Path, hot: int) -> tuple[NDArray[np.int64], list[int]]:
    """A sequence built token by token: at each position, of the ids the model's gates send
    to ``hot`` in the most layers (given the prefix chosen so far: attention makes a route
    depend on the context), the one that keeps the other experts level; and the routed
    tokens per expert of that sequence."""
    model = load_reference(repository, 1)
    r = model.router
    v = r.cfg.vocab_size
    prefix: list[int] = []
    routed: collections.Counter[int] = collections.Counter()
    for _ in range(SEQ):
        ids = torch.tensor([[*prefix, t] for t in range(v)])  # every id after the prefix
        picks: list[torch.Tensor] = []

        def keep_last(layer: int, idx: torch.Tensor) -> None:
            picks.append(idx.reshape(v, len(prefix) + 1, -1)[:, -1])  # noqa: B023

        forward(r, ids, model.local_fanout, on_route=keep_last)
        hits = sum((p == hot).any(-1).int() for p in picks)  # [V]
        top = int(hits.max())  # type: ignore[union-attr]
        candidates = [t for t in range(v) if int(hits[t]) == top]  # type: ignore[index]

        def spread(t: int) -> int:
            after = routed + collections.Counter(e for p in picks for e in p[t].tolist())  # noqa: B023
            return max(n for e, n in after.items() if e != hot)

        tok = min(candidates, key=spread)
        routed.update(e for p in picks for e in p[tok].tolist())
        prefix.append(tok)
    return (np.array([prefix], dtype=np.int64),
            [routed[e] for e in range(r.cfg.num_experts)])


class Load:
    """Open-loop load: ``RATE`` requests/s through the gateway (a late request is not made
    up), counting failures."""

    def __init__(self, port: int, ids: NDArray[np.int64]) -> None:
        self.port, self.ids = port, ids
        self.stop_event = threading.Event()
        self.sent = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(2)]

    def _run(self, k: int) -> None:
        period = len(self.threads) / RATE
        nxt = time.monotonic() + k * period / len(self.threads)
        with httpclient.InferenceServerClient(f"127.0.0.1:{self.port}") as c:
            while not self.stop_event.is_set():
                delay = nxt - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                nxt = max(nxt + period, time.monotonic())
                inp = httpclient.InferInput("INPUT_IDS", list(self.ids.shape), "INT64")
                inp.set_data_from_numpy(self.ids)
                try:
                    c.infer("router", [inp])
                    self.sent += 1
                except Exception as e:
                    self.failures.append(str(e))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


def status(up: Up) -> dict[str, Any]:
    return dict(json.loads((up.home / "run" / "scaled" / "status.json").read_text()))


def active(st: dict[str, Any]) -> dict[str, Any]:
    return dict(st["slots"][st["active"]["slot"]])


def served_tokens(metrics_url: str, expert: int = 0) -> float:
    """The tokens of ``expert`` a server computed (a server holds several experts)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    m = re.search(rf'^autoglm_expert_served_tokens_total\{{expert="{expert}"\}} (\S+)$', text,
                  re.M)
    return float(m.group(1)) if m else 0.0


def control_metric(up: Up, name: str, **labels: str) -> float | None:
    """A control-loop series from the gateway's registry, by its labels (``local``
    namespace and the ``scaled`` deployment added)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{up.port}/metrics", timeout=5).read()
    return metric_value(text.decode(), name,
                        {"namespace": LOCAL_NAMESPACE, "deployment": "scaled", **labels})


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("home")
    file = home / "scaled.yaml"
    file.write_text(yaml.safe_dump(config()))
    with Up.serving(file, home) as u:
        yield u


@pytest.fixture(scope="module")
def hot(up: Up) -> NDArray[np.int64]:
    ids, routed = hot_sequence(up.home / "models" / "scaled", HOT)
    others = [n for e, n in enumerate(routed) if e != HOT]
    print(f"\nhot sequence {ids.tolist()}: routed tokens per expert {routed}")
    # at RATE the hot expert needs SCALED replicas, every other one 1 (with margins)
    assert (SCALED - 1) * TARGET * 1.3 < routed[HOT] * RATE < SCALED * TARGET * 0.9
    assert max(others) * RATE < TARGET * 0.8
    return ids


def test_a_load_on_one_expert_adds_replicas_that_serve(up: Up, hot: NDArray[np.int64]) -> None:
    eventually(lambda: up.said("autoscaler: metrics available"), "the first decision",
               timeout=60)
    before = active(status(up))["expert_replicas"]
    assert set(before.values()) == {1}
    mark = len(up.lines)
    with Load(up.port, hot) as load:
        t0 = time.monotonic()

        def new_replica_serving() -> tuple[float, str] | None:
            servers = active(status(up))["expert_servers"][str(HOT)]
            if len(servers) < 2:
                return None
            url = servers[1]["metrics"]
            return (time.monotonic(), url) if served_tokens(url, HOT) > 0 else None

        t_serving, url = eventually(new_replica_serving, "a new replica of the hot expert to "
                                    "serve", timeout=90, interval=0.1)
        print(f"\nload shift -> new replica of expert {HOT} serving: "
              f"{t_serving - t0:.1f} s ({url})")
        decided = next(t for t, line in up.lines[mark:]
                       if line.startswith(f"autoscaler: expert {HOT}: 1 ->"))
        print(f"load shift -> scale-up decision: {decided - t0:.1f} s")
        # every replica of the hot expert takes traffic (least-outstanding balancing)
        eventually(lambda: len(active(status(up))["expert_servers"][str(HOT)]) == SCALED,
                   "the hot expert's replicas", timeout=60)
        servers = active(status(up))["expert_servers"][str(HOT)]
        first = [served_tokens(s["metrics"], HOT) for s in servers]
        eventually(lambda: all(served_tokens(s["metrics"], HOT) > f
                               for s, f in zip(servers, first, strict=True)),
                   "every replica of the hot expert to serve", timeout=30)
        st = status(up)
        auto = st["autoscaling"]
        assert auto["metrics_available"] is True
        assert auto["experts"][str(HOT)]["replicas"] == SCALED
        assert auto["experts"][str(HOT)]["load"] > TARGET
        assert auto["imbalance"] >= 0
        others = [auto["experts"][e]["replicas"] for e in ("1", "2", "3")]
        assert others == [1, 1, 1], f"the cold experts stay at one replica: {others}"
        assert load.failures == [], load.failures[:3]
    # the control-loop metrics, through the gateway's registry
    assert control_metric(up, "autoglm_autoscaler_replicas", expert=str(HOT)) == SCALED
    ups = control_metric(up, "autoglm_autoscaler_decisions_total", expert=str(HOT),
                         direction="up")
    assert ups is not None and ups >= 1
    assert control_metric(up, "autoglm_swap_phase", phase="Idle") == 1


def test_b_without_load_replicas_go_down_after_the_window(up: Up) -> None:
    t_stop = time.monotonic()  # the load of (a) ended
    assert active(status(up))["expert_replicas"][str(HOT)] == SCALED

    def down() -> float | None:
        return next((t for t, line in up.lines
                     if t > t_stop and line.startswith(f"autoscaler: expert {HOT}: {SCALED} ->")),
                    None)

    t_down = eventually(down, "the scale-down decision", timeout=STABILIZATION + 60)
    print(f"\nload removed -> scale-down decision: {t_down - t_stop:.1f} s "
          f"(stabilization {STABILIZATION} s)")
    assert t_down - t_stop >= STABILIZATION, "scaled down inside the stabilization window"
    eventually(lambda: active(status(up))["expert_replicas"] == {str(e): 1 for e in range(4)},
               "every expert back to one replica", timeout=60)


def test_c_prometheus_killed_holds_replicas_then_recovers(up: Up) -> None:
    eventually(lambda: status(up)["autoscaling"]["metrics_available"], "metrics", timeout=30)
    before = active(status(up))["expert_replicas"]
    pid = status(up)["prometheus_pid"]
    mark = len(up.lines)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: up.said("prometheus exited with -9; restarting it", mark),
               "the runtime to notice", timeout=30)
    held = eventually(lambda: (a := status(up)["autoscaling"])["metrics_available"] is False
                      and a, "status to say metrics are unavailable", timeout=30)
    print(f"\nwhile Prometheus was down: {held['reason']}")
    assert held["reason"]
    assert up.said("autoscaler: metrics unavailable: ", mark)
    assert up.said("; holding replicas", mark)
    eventually(lambda: up.said("autoscaler: metrics available again", mark),
               "the autoscaler to recover", timeout=90)
    assert up.said("prometheus restarted on", mark)
    assert status(up)["prometheus_pid"] != pid
    assert status(up)["autoscaling"]["metrics_available"] is True
    assert active(status(up))["expert_replicas"] == before, "replicas held"
    assert not any(line.startswith("autoscaler: expert ") for line in up.text[mark:])


def test_d_a_swap_pauses_scaling_and_is_counted(up: Up) -> None:
    """A version roll: no scaling while the swap is under way, the standby gets the active
    slot's replica counts, the swap's phase, events and version are exported."""
    mark = len(up.lines)
    counts = active(status(up))["expert_replicas"]
    up.file.write_text(up.file.read_text().replace("version: 1", "version: 2"))
    eventually(lambda: up.said("autoscaler: paused while the swap is", mark),
               "scaling to pause", timeout=60)
    eventually(lambda: up.said("autoscaler: resumed", mark) and status(up)["active"]["version"]
               == 2, "the swap to finish and scaling to resume", timeout=180)
    paused = next(i for i, line in enumerate(up.text) if i >= mark
                  and line.startswith("autoscaler: paused"))
    resumed = next(i for i, line in enumerate(up.text) if i >= mark
                   and line.startswith("autoscaler: resumed"))
    assert not any(line.startswith("autoscaler: expert ") for line in up.text[paused:resumed])
    assert active(status(up))["expert_replicas"] == counts
    assert control_metric(up, "autoglm_swap_events_total", reason="Staging") == 1
    assert control_metric(up, "autoglm_swap_events_total", reason="Flipped") == 1
    assert control_metric(up, "autoglm_active_version") == 2
    # the new slot's router is scraped under its own labels: metrics come back
    eventually(lambda: status(up)["autoscaling"]["metrics_available"],
               "metrics of the new slot", timeout=60)


def test_status_command_shows_the_autoscaler(up: Up) -> None:
    out = subprocess.run([sys.executable, "-m", "autoglm.cli", "status", f"--home={up.home}"],
                         capture_output=True, text=True, check=True).stdout
    print(f"\n{out}")
    assert "autoscaling: metrics available; load imbalance" in out
    assert re.search(r"expert 0: 1 replica\(s\), desired 1, load \S+ tokens/s", out), out
