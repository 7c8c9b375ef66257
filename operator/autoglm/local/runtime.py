"""``autoglm up FILE``: the AutoGLMDeployment of FILE served on this machine.

The same spec code (and error messages) as the operator, the same plan: real Triton servers
for the active slot's router and expert replicas, a real Prometheus scraping them, and the
gateway on a fixed port. The file is watched: a valid change is applied, an invalid one is
reported and changes nothing. Stopping removes every process and shared-memory region.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient
import yaml

from autoglm import plan as p
from autoglm import swap
from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.moe import PRESETS
from autoglm.repository import build, load_canary
from autoglm.spec import KIND, AutoGLMSpec, InvalidSpec, Slot, parse

Say = Callable[[str], None]


class LocalError(RuntimeError):
    """A file the runtime cannot serve; the message says why, naming the field."""


def read_resource(path: Path) -> tuple[str, AutoGLMSpec]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise LocalError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LocalError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise LocalError(f"{path}: expected a {KIND} (kind: {KIND})")
    name = (doc.get("metadata") or {}).get("name")
    if not name:
        raise LocalError(f"{path}: metadata.name is required")
    try:
        return str(name), parse(doc.get("spec") or {}, str(name))
    except InvalidSpec as e:
        raise LocalError(f"{path}: {e}") from None


def default_home() -> Path:
    return Path.home() / ".cache" / "autoglm"


@dataclasses.dataclass
class LocalRuntime:
    path: Path
    gateway_port: int = 8000
    grpc_port: int = 8001
    prometheus_port: int = 9090
    home: Path = dataclasses.field(default_factory=default_home)
    say: Say = print
    name: str = ""
    spec: AutoGLMSpec | None = None
    slots: dict[Slot, DataPlane] = dataclasses.field(default_factory=dict)
    state: swap.SwapState | None = None
    gateway: GatewayServer | None = None
    prometheus: PrometheusServer | None = None
    routing: Routing = dataclasses.field(default_factory=Routing)
    _mtime: float = 0.0
    _jobs: dict[str, Future[Any]] = dataclasses.field(default_factory=dict)
    _pool: ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="slot"))

    @property
    def workdir(self) -> Path:
        return self.home / "run" / self.name

    @property
    def repository(self) -> Path:
        return self.home / "models" / self.name

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up, or nothing left running (the file is checked before anything)."""
        self._mtime = self.path.stat().st_mtime
        self.name, spec = read_resource(self.path)
        self.spec = spec
        try:
            self._start(spec)
        except BaseException:
            self.stop()
            raise

    def _build(self, version: int) -> None:
        assert self.spec is not None
        m = self.spec.model
        cfg = dataclasses.replace(PRESETS["tiny"], num_experts=m.num_experts, top_k=m.top_k,
                                  layers=m.layers)
        built = build(self.repository, m.name, version, cfg)
        self.say(f"model {m.name} v{version}: "
                 f"{'built' if built.created else 'found'} in {self.repository}")

    def _start(self, spec: AutoGLMSpec) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        slot = p.plan(self.name, spec, p.RoutingState()).active_plan
        self._build(slot.version)
        self.prometheus = PrometheusServer(self.workdir, self.prometheus_port).start()
        self.say(f"prometheus on {self.prometheus.url}")
        plane = self._plane(slot.slot, slot.version)
        for w in slot.experts:
            assert w.expert is not None
            for r in range(w.replicas):
                s = plane.add_replica(w.expert)
                self.say(f"  {w.name} replica {r + 1}/{w.replicas} ready "
                         f"({s.startup_seconds:.1f} s)")
        router = plane.start_router()
        self.say(f"  {slot.router.name} ready ({router.startup_seconds:.1f} s)")
        self.gateway = GatewayServer(self.routing, self.gateway_port,
                                     grpc_port=self.grpc_port).start()
        self.routing.flip(Target(slot.slot, slot.version, f"http://{router.http_url}",
                                 router.grpc_url))
        self.state = swap.SwapState(slot.slot, slot.version)
        self._update_targets()
        self.write_status()
        self.say(f"serving {self.name} (model {spec.model.name} v{slot.version}, slot "
                 f"{slot.slot}) on http://127.0.0.1:{self.gateway_port} "
                 f"and gRPC 127.0.0.1:{self.grpc_port} "
                 f"in {time.monotonic() - t0:.1f} s")

    def _plane(self, slot: Slot, version: int) -> DataPlane:
        plane = DataPlane(self.repository, version, self.workdir / f"slot-{slot}")
        plane.workdir.mkdir(parents=True, exist_ok=True)
        self.slots[slot] = plane
        return plane

    def _update_targets(self) -> None:
        if self.prometheus is None:
            return
        servers = [(slot, s) for slot, plane in list(self.slots.items())
                   for s in plane.servers() if s.popen is not None]
        self.prometheus.set_targets({
            "router": [f"127.0.0.1:{s.metrics_port}" for _, s in servers if "router" in s.models],
            "expert": [f"127.0.0.1:{s.metrics_port}" for _, s in servers
                       if "router" not in s.models],
            "gateway": [f"127.0.0.1:{self.gateway_port}"],
        })

    # -- run -----------------------------------------------------------------------------

    def watch(self, stop: threading.Event, period: float = 0.25) -> None:
        """Apply changes of the file and drive the swap until ``stop`` is set."""
        while not stop.wait(period):
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                mtime = self._mtime
            if mtime != self._mtime:
                self._mtime = mtime
                self.reload()
            self.tick()

    def reload(self) -> None:
        try:
            name, spec = read_resource(self.path)
        except LocalError as err:
            self.say(f"not applied, still serving as before: {err}")
            return
        if name != self.name:
            self.say(f"not applied: metadata.name changed ({self.name} -> {name}); "
                     "restart `autoglm up` to serve another resource")
            return
        assert self.state is not None
        self.spec = spec
        if spec.model.version != self.state.active_version:
            self.say(f"spec.model.version {spec.model.version} requested (serving "
                     f"v{self.state.active_version})")
        plane = self.slots[self.state.active_slot]
        lo, hi = spec.experts.min_replicas, spec.experts.max_replicas
        for e, servers in plane.experts.items():  # the autoscaler will own these
            while len(servers) < lo:
                plane.add_replica(e)
                self.say(f"expert {e}: {len(servers)} replicas")
            while len(servers) > hi:
                plane.remove_replica(e)
                self.say(f"expert {e}: {len(servers)} replicas")
        self._update_targets()
        self.write_status()
        self.say("applied the change")

    # -- the swap ------------------------------------------------------------------------

    def _timing(self) -> swap.Timing:
        assert self.spec is not None
        r = self.spec.rollout
        return swap.Timing(ready_timeout=r.ready_timeout_seconds, canary=r.canary,
                           drain_timeout=r.drain_timeout_seconds,
                           keep_previous=r.keep_previous_seconds)

    def _observe(self) -> swap.Observation:
        assert self.state is not None and self.spec is not None
        st = self.state
        standby = st.standby_slot
        created = self._jobs.get(f"create:{standby}")
        ready, failure = False, None
        if created is not None and created.done():
            if created.exception() is not None:
                failure = str(created.exception())
            else:
                ready = True
                failure = self.slots[standby].failure() if standby in self.slots else None
        canary, detail = None, ""
        checked = self._jobs.get(f"canary:{standby}")
        if checked is not None and checked.done():
            canary, detail = (checked.result() if checked.exception() is None
                              else (False, str(checked.exception())))
        assert self.gateway is not None
        old = st.previous.slot if st.previous else None
        return swap.Observation(
            now=time.monotonic(), desired_version=self.spec.model.version,
            standby_ready=ready, standby_failure=failure, canary=canary, canary_detail=detail,
            old_inflight=self.gateway.gateway.inflight.get(old, 0) if old else 0)

    def tick(self) -> None:
        if self.state is None:
            return
        before = self.state
        self.state, actions = swap.step(before, self._observe(), self._timing())
        for action in actions:
            self._do(action)
        if actions or self.state.phase != before.phase:
            self._update_targets()
            self.write_status()

    def _do(self, action: swap.Action) -> None:
        if isinstance(action, swap.CreateSlot):
            assert self.state is not None
            counts = self.slots[self.state.active_slot].replica_counts()
            self._jobs.pop(f"canary:{action.slot}", None)
            self._jobs[f"create:{action.slot}"] = self._pool.submit(
                self._create, action.slot, action.version, counts)
        elif isinstance(action, swap.RunCanary):
            self._jobs[f"canary:{action.slot}"] = self._pool.submit(
                self._canary, action.slot, action.version)
        elif isinstance(action, swap.Flip):
            router = self.slots[action.slot].router
            assert router is not None
            self.routing.flip(Target(action.slot, action.version, f"http://{router.http_url}",
                                     router.grpc_url))
        elif isinstance(action, swap.DeleteSlot):
            self._jobs.pop(f"create:{action.slot}", None)
            self._jobs.pop(f"canary:{action.slot}", None)
            plane = self.slots.pop(action.slot, None)
            if plane is not None:
                plane.closed = True
                self._pool.submit(plane.stop)
        else:
            self.say(f"{'warning: ' if action.warning else ''}{action.reason}: "
                     f"{action.message}")

    def _create(self, slot: Slot, version: int, counts: list[int]) -> None:
        t0 = time.monotonic()
        self._build(version)
        self._plane(slot, version).start(counts)
        self.say(f"slot {slot}: version {version} ready in {time.monotonic() - t0:.1f} s")

    def _canary(self, slot: Slot, version: int) -> tuple[bool, str]:
        """The canary input through the slot's router must give the expected output."""
        ids, expected = load_canary(self.repository, version)
        router = self.slots[slot].router
        assert router is not None
        with httpclient.InferenceServerClient(router.http_url) as c:
            inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids)
            res = c.infer("router", [inp])
        got, served = res.as_numpy("LOGITS"), int(res.as_numpy("MODEL_VERSION")[0])
        err = float(np.max(np.abs(got - expected)))
        ok = served == version and bool(np.allclose(got, expected, rtol=1e-4, atol=1e-4))
        return ok, f"version {served} answered, max abs error {err:.3g}"

    # -- status and stop -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.spec is not None and self.state is not None
        st = self.state
        return {
            "name": self.name, "file": str(self.path), "pid": os.getpid(),
            "gateway": f"http://127.0.0.1:{self.gateway_port}",
            "grpc": f"127.0.0.1:{self.grpc_port}",
            "prometheus": self.prometheus.url if self.prometheus else None,
            "requested_version": self.spec.model.version,
            "phase": st.phase.value, "reason": st.reason,
            "active": {"slot": st.active_slot, "version": st.active_version},
            "slots": {slot: {
                "version": plane.version,
                "role": ("active" if slot == st.active_slot else
                         "warm" if st.previous and st.previous.slot == slot else "standby"),
                "router": plane.router.http_url if plane.router else None,
                "expert_replicas": {str(e): len(s) for e, s in plane.experts.items()},
            } for slot, plane in sorted(self.slots.items())},
        }

    def write_status(self) -> None:
        if self.state is not None:
            (self.workdir / "status.json").write_text(json.dumps(self.status(), indent=1))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        for plane in self.slots.values():
            plane.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        for plane in self.slots.values():
            plane.stop()
        self.slots.clear()
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.name:
            (self.workdir / "status.json").unlink(missing_ok=True)
