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
from pathlib import Path
from typing import Any

import yaml

from autoglm import plan as p
from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.moe import PRESETS
from autoglm.repository import build
from autoglm.spec import KIND, AutoGLMSpec, InvalidSpec, parse

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
    prometheus_port: int = 9090
    home: Path = dataclasses.field(default_factory=default_home)
    say: Say = print
    name: str = ""
    spec: AutoGLMSpec | None = None
    plane: DataPlane | None = None
    gateway: GatewayServer | None = None
    prometheus: PrometheusServer | None = None
    routing: Routing = dataclasses.field(default_factory=Routing)
    _mtime: float = 0.0

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

    def _start(self, spec: AutoGLMSpec) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        topology = p.plan(self.name, spec, p.RoutingState())
        slot = topology.active_plan
        cfg = dataclasses.replace(PRESETS["tiny"], num_experts=spec.model.num_experts,
                                  top_k=spec.model.top_k, layers=spec.model.layers)
        built = build(self.repository, spec.model.name, slot.version, cfg)
        self.say(f"model {spec.model.name} v{slot.version}: "
                 f"{'built' if built.created else 'found'} in {self.repository}")
        self.prometheus = PrometheusServer(self.workdir, self.prometheus_port).start()
        self.say(f"prometheus on {self.prometheus.url}")
        self.plane = DataPlane(self.repository, slot.version, self.workdir / f"slot-{slot.slot}")
        self.plane.workdir.mkdir(parents=True, exist_ok=True)
        for w in slot.experts:
            assert w.expert is not None
            for r in range(w.replicas):
                s = self.plane.add_replica(w.expert)
                self.say(f"  {w.name} replica {r + 1}/{w.replicas} ready "
                         f"({s.startup_seconds:.1f} s)")
        self.plane.start_router()
        assert self.plane.router is not None
        self.say(f"  {slot.router.name} ready ({self.plane.router.startup_seconds:.1f} s)")
        self.gateway = GatewayServer(self.routing, self.gateway_port).start()
        self.routing.flip(Target(slot.slot, slot.version, f"http://{self.plane.router.http_url}"))
        self._update_targets()
        self.write_status()
        self.say(f"serving {self.name} (model {spec.model.name} v{slot.version}, slot "
                 f"{slot.slot}) on http://127.0.0.1:{self.gateway_port} "
                 f"in {time.monotonic() - t0:.1f} s")

    def _update_targets(self) -> None:
        assert self.prometheus is not None and self.plane is not None
        router = self.plane.router
        self.prometheus.set_targets({
            "router": [f"127.0.0.1:{router.metrics_port}"] if router else [],
            "expert": [f"127.0.0.1:{s.metrics_port}"
                       for ss in self.plane.experts.values() for s in ss],
            "gateway": [f"127.0.0.1:{self.gateway_port}"],
        })

    # -- run -----------------------------------------------------------------------------

    def watch(self, stop: threading.Event, period: float = 1.0) -> None:
        """Apply changes of the file until ``stop`` is set."""
        while not stop.wait(period):
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                self._mtime = mtime
                self.reload()

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
        assert self.plane is not None and self.spec is not None
        if spec.model.version != self.plane.version:
            self.say(f"spec.model.version {spec.model.version} requested; serving "
                     f"v{self.plane.version} until the double-buffered swap is available")
        # expert replicas within the new bounds (the autoscaler will own them)
        for e, servers in self.plane.experts.items():
            lo, hi = spec.experts.min_replicas, spec.experts.max_replicas
            while len(servers) < lo:
                self.plane.add_replica(e)
                self.say(f"expert {e}: {len(servers)} replicas")
            while len(servers) > hi:
                self.plane.remove_replica(e)
                self.say(f"expert {e}: {len(servers)} replicas")
        self.spec = spec
        self._update_targets()
        self.write_status()
        self.say("applied the change")

    def status(self) -> dict[str, Any]:
        assert self.plane is not None and self.spec is not None
        target = self.routing.active
        return {
            "name": self.name, "file": str(self.path), "pid": os.getpid(),
            "gateway": f"http://127.0.0.1:{self.gateway_port}",
            "prometheus": self.prometheus.url if self.prometheus else None,
            "requested_version": self.spec.model.version,
            "active": {"slot": target.slot, "version": target.version} if target else None,
            "slots": {target.slot if target else "a": {
                "version": self.plane.version,
                "router": self.plane.router.http_url if self.plane.router else None,
                "expert_replicas": {str(e): len(s) for e, s in self.plane.experts.items()},
            }},
        }

    def write_status(self) -> None:
        (self.workdir / "status.json").write_text(json.dumps(self.status(), indent=1))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.plane is not None:
            self.plane.stop()
            self.plane = None
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.name:
            (self.workdir / "status.json").unlink(missing_ok=True)

