"""``autoglm up FILE``: the AutoGLMDeployment of FILE served on this machine.

The same spec code (and error messages) as the operator, the same plan: real Triton servers
for the active slot's router and expert replicas, a real Prometheus scraping them, and the
gateway on a fixed port. The file is watched: a valid change is applied, an invalid one is
reported and changes nothing. Stopping removes every process and shared-memory region.

With ``spec.autoscaling.enabled``, every ``intervalSeconds`` the runtime asks its own
Prometheus (``prometheusUrl`` is for clusters) for each expert's routed tokens/s, lets
:func:`autoglm.autoscale.decide` choose the replicas, and adds or removes expert replicas of
the active slot in a background job (one at a time; never during a swap: the standby copies
the active slot's counts when it is created). A Prometheus that exits is restarted, and so is
a Triton server of the active (or the warm) slot that dies: on its own ports, so the router
and the gateway find it where it was.

One ``autoglm up`` per resource and home: ``run/<name>/instance.json`` says which (its pid)
and names what it starts (the shared-memory group of its Triton servers). An ``autoglm up``
that was killed (SIGKILL, a crash) cannot clean up; the next one started on the same home
finds its file and removes what it left: processes (Python-backend stubs outlive a killed
tritonserver), shared-memory regions in ``/dev/shm``, and so the ports they held.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from autoglm import autoscale, canary, router_scale, swap
from autoglm import plan as p
from autoglm.gateway.app import GatewayServer, Routing
from autoglm.k8s.drain import busy
from autoglm.local.dataplane import DataPlane
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.metrics import LOCAL_NAMESPACE, ControlMetrics
from autoglm.models.tiny import PRESETS
from autoglm.placement import (
    MOVES_PER_REBALANCE,
    Placement,
    place,
    rebalance,
    server_loads,
)
from autoglm.placement import (
    imbalance as placement_imbalance,
)
from autoglm.procs import kill_all, process_start, processes_with, running
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.repository import WEIGHTS, build, read_meta
from autoglm.spec import KIND, AutoGLMSpec, InvalidSpec, Slot, parse
from autoglm.triton import TritonError, TritonServer, shm_group_marker, shm_group_regions

Say = Callable[[str], None]
SCRAPE_SECONDS = 1.0  # our Prometheus' scrape interval


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
    spec = doc.get("spec") or {}
    try:
        return str(name), parse(shape_from_repository(spec), str(name))
    except InvalidSpec as e:
        model = spec.get("model") if isinstance(spec, dict) else None
        hint = (f" (nor does {model['repository']} hold version {model.get('version')} to "
                "take it from)" if isinstance(model, dict) and "numExperts" not in model
                and str(model.get("repository", "")).startswith("/") else "")
        raise LocalError(f"{path}: {e}{hint}") from None


def shape_from_repository(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec.model.numExperts``, when the file leaves it out, from the version it names in
    ``spec.model.repository``, when that is a directory here that holds the version (an
    imported model): the runtime can read what the operator cannot. (``topK`` and ``layers``
    are optional; left out, the servers check nothing of them.) Anything else is left to the
    spec's own validation, which names what is missing."""
    model = spec.get("model")
    if not isinstance(model, dict) or "numExperts" in model:
        return spec
    repository, version = model.get("repository"), model.get("version")
    if not isinstance(repository, str) or type(version) is not int:
        return spec
    given = Path(repository)
    if not (given.is_absolute() and (given / p.router_model() / str(version) / "moe.json")
            .is_file()):
        return spec
    try:
        n = read_meta(given, version).get("config", {}).get("num_experts")
    except (OSError, ValueError, AttributeError):
        return spec
    return {**spec, "model": {**model, "numExperts": n}} if type(n) is int else spec


@dataclasses.dataclass
class RouterScaling:
    """What the router autoscaler last saw and decided."""

    state: autoscale.State | None = None  # None: no decision yet
    metrics_ok: bool | None = None
    reason: str = ""


def default_home() -> Path:
    return Path.home() / ".cache" / "autoglm"


@dataclasses.dataclass
class Scaling:
    """What the autoscaler last saw and decided (for status and the metrics)."""

    state: autoscale.State = dataclasses.field(default_factory=autoscale.State)
    next_at: float = 0.0  # monotonic
    job: Future[None] | None = None
    metrics_ok: bool | None = None  # None: no decision yet
    ever_ok: bool = False
    reason: str = ""
    desired: tuple[int, ...] = ()
    load: tuple[float | None, ...] = ()
    imbalance: float = 0.0
    paused: bool = False  # said that a swap pauses scaling
    moves: int = 0  # live moves made by rebalances so far
    abandoned: int = 0  # and given up (the old replica kept serving)
    last_rebalance: str = ""
    last_rebalance_at: float = 0.0  # time.monotonic() of the last rebalance that acted


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
    metrics: ControlMetrics | None = None
    scaling: Scaling = dataclasses.field(default_factory=Scaling)
    router_scaling: RouterScaling = dataclasses.field(default_factory=lambda: RouterScaling())
    _prom: Prometheus | None = None  # the client of our Prometheus
    _restart: Future[None] | None = None  # Prometheus being restarted
    _restarted_at: float = 0.0
    shm_group: str = ""  # of this run's Triton servers; "": not claimed (another one runs)
    _healing: dict[int, tuple[Future[bool], float]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _mtime: float = 0.0
    _jobs: dict[str, Future[Any]] = dataclasses.field(default_factory=dict)
    _pool: ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="slot"))

    @property
    def workdir(self) -> Path:
        return self.home / "run" / self.name

    @property
    def instance_file(self) -> Path:
        return self.workdir / "instance.json"

    @property
    def repository(self) -> Path:
        """Where the built-in tiny model is built (a version spec.model.repository lacks)."""
        return self.home / "models" / self.name

    @property
    def key(self) -> tuple[str, str]:
        """The control metrics' (namespace, deployment)."""
        return LOCAL_NAMESPACE, self.name

    @property
    def selector(self) -> dict[str, str]:
        """The labels every series of this deployment carries."""
        return {"namespace": LOCAL_NAMESPACE, "deployment": self.name}

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up, or nothing left running (the file is checked before anything)."""
        self._mtime = self.path.stat().st_mtime
        self.name, spec = read_resource(self.path)
        self.spec = spec
        self._claim()
        try:
            self._start(spec)
        except BaseException as e:
            self.stop()
            if isinstance(e, TritonError):  # e.g. a version the spec disagrees with
                raise LocalError(f"{self.path}: {e.summary} (server logs in {self.workdir})"
                                 ) from None
            raise

    def _claim(self) -> None:
        """This home's run of the resource, ours: refused while another `autoglm up` serves
        it; what one that was killed left is removed first."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            old = json.loads(self.instance_file.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and isinstance(old.get("pid"), int):
            if running(old["pid"], old.get("started")):
                raise LocalError(f"{self.name} is already served from {self.home} by "
                                 f"`autoglm up` (pid {old['pid']}): stop it first, or give "
                                 "another --home")
            self._reclaim(old)
        self.shm_group = uuid.uuid4().hex[:12]
        me = {"pid": os.getpid(), "started": process_start(os.getpid()),
              "shm_group": self.shm_group, "gateway_port": self.gateway_port,
              "grpc_port": self.grpc_port, "prometheus_port": self.prometheus_port}
        tmp = self.instance_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, self.instance_file)

    def _reclaim(self, old: dict[str, Any]) -> None:
        """What a killed `autoglm up` of this resource and home left: its processes (found by
        their command lines: its servers' shared-memory group, its Prometheus' data
        directory; nothing of another run has either), then its shared-memory regions."""
        group = str(old.get("shm_group") or "")
        markers = [f"--storage.tsdb.path={self.workdir / 'prometheus-data'}"]
        if group:
            markers.append(shm_group_marker(group))
        pids = processes_with(markers)
        left = kill_all(pids)
        regions = shm_group_regions(group)
        size = 0
        for f in regions:
            try:
                size += f.stat().st_size
                f.unlink()
            except OSError:
                pass
        (self.workdir / "status.json").unlink(missing_ok=True)
        what = (f"{len(pids)} process{'es' if len(pids) != 1 else ''}, {len(regions)} "
                f"shared-memory region{'s' if len(regions) != 1 else ''} "
                f"({size / 2**20:.1f} MiB)") if pids or regions else "nothing"
        self.say(f"the previous `autoglm up` of {self.name} (pid {old['pid']}) did not stop; "
                 f"reclaimed what it left: {what}"
                 + (f"; still running: {', '.join(map(str, left))}" if left else ""))

    def _model(self, version: int) -> Path:
        """The repository serving ``version``: spec.model.repository as it is when it is a
        directory here that holds the version (an imported model), else ours with the
        built-in tiny model built in it, in the spec's shape (the tiny defaults for what the
        spec leaves out)."""
        assert self.spec is not None
        m = self.spec.model
        given = Path(m.repository)
        marker = given / p.router_model() / str(version) / "moe.json"
        if given.is_absolute() and marker.is_file():
            meta = read_meta(given, version)
            cfg = meta.get("config", {})
            self.say(f"model {meta.get('name', m.name)} v{version}: "
                     f"{meta.get('architecture', '?')}, {cfg.get('num_experts', '?')} routed "
                     f"experts, served from {given}")
            return given
        tiny = PRESETS["tiny"]
        top_k = m.top_k or min(tiny.top_k, m.num_experts)
        cfg = dataclasses.replace(tiny, num_experts=m.num_experts, top_k=top_k,
                                  layers=m.layers or tiny.layers)
        built = build(self.repository, m.name, version, cfg)
        self.say(f"model {m.name} v{version}: "
                 f"{'built' if built.created else 'found'} in {self.repository}")
        return self.repository

    def _start(self, spec: AutoGLMSpec) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        slot = p.plan(self.name, spec, p.RoutingState()).active_plan
        repository = self._model(slot.version)
        self.prometheus = PrometheusServer(self.workdir, self.prometheus_port,
                                           f"{SCRAPE_SECONDS:g}s").start()
        self.say(f"prometheus on {self.prometheus.url}")
        # The gateway's ports are taken before any Triton server picks free ports of its
        # own; until the slot is up it answers 503 "no active slot".
        self.gateway = GatewayServer(self.routing, self.gateway_port,
                                     grpc_port=self.grpc_port).start()
        plane = self._plane(slot.slot, slot.version, repository)
        target = place(p.initial_expert_replicas(spec), plane.capacity)
        self.say(f"  {spec.model.num_experts} experts on {len(target.servers)} expert server(s) "
                 f"of up to {plane.capacity} experts")
        for s, held in enumerate(target.servers):
            server = plane.add_server(held)
            self.say(f"  expert server {s + 1}/{len(target.servers)} (experts "
                     f"{p.format_server_experts(held)}) ready ({server.startup_seconds:.1f} s)")
        for n in range(router_scale.initial_replicas(spec)):
            router = plane.start_router()
            self.say(f"  {slot.router.name}{f' replica {n + 1}' if n else ''} ready "
                     f"({router.startup_seconds:.1f} s)")
        self.routing.flip(plane.target(slot.slot, spec.model.name))
        self.state = swap.SwapState(slot.slot, slot.version)
        self.metrics = ControlMetrics(self.gateway.gateway.registry)
        self.metrics.swap(self.key, self.state.phase.value, slot.version)
        self.metrics.replicas_now(self.key, plane.replica_counts())
        self._update_targets()
        self.write_status()
        self.say(f"serving {self.name} (model {spec.model.name} v{slot.version}, slot "
                 f"{slot.slot}) on http://127.0.0.1:{self.gateway_port} "
                 f"and gRPC 127.0.0.1:{self.grpc_port} "
                 f"in {time.monotonic() - t0:.1f} s")

    def _plane(self, slot: Slot, version: int, repository: Path) -> DataPlane:
        """The slot's servers, with the environment the spec gives them (as the pods get
        it): they refuse a version whose shape disagrees with the spec."""
        assert self.spec is not None
        plane = DataPlane(repository, version, self.workdir / f"slot-{slot}",
                          capacity=experts_per_server(self.spec, repository, version),
                          router_env=p.workload_env(self.spec, "router"),
                          expert_env=p.workload_env(self.spec, "expert"),
                          shm_group=self.shm_group)
        plane.workdir.mkdir(parents=True, exist_ok=True)
        self.slots[slot] = plane
        return plane

    def _update_targets(self) -> None:
        """The metrics contract's target labels: deployment, component, and for Triton
        servers slot and version (the queries select the active slot's by them)."""
        if self.prometheus is None:
            return
        base = dict(self.selector)
        groups: list[tuple[dict[str, str], list[str]]] = [
            ({**base, "component": "gateway"}, [f"127.0.0.1:{self.gateway_port}"])]
        for slot, plane in list(self.slots.items()):
            labels = {**base, "slot": slot, "version": str(plane.version)}
            live = [s for s in plane.servers() if s.popen is not None]
            for component in ("router", "expert"):
                groups.append(({**labels, "component": component},
                               [f"127.0.0.1:{s.metrics_port}" for s in live
                                if ("router" in s.models) == (component == "router")]))
        with self._lock:
            self.prometheus.set_targets(groups)

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
        if self.scaling.job is not None:  # one actor on the replicas at a time
            self.scaling.job.result()
        plane = self.slots[self.state.active_slot]
        lo, hi = spec.experts.min_replicas, spec.experts.max_replicas
        current = plane.replica_counts()  # the autoscaler owns them within the bounds
        desired = [min(max(c, lo), hi) for c in current]
        if desired != current:
            for e, (c, d) in enumerate(zip(current, desired, strict=True)):
                if c != d:
                    self.say(f"expert {e}: {c} -> {d} replicas")
            self._apply(plane, current, tuple(desired))
        self._replicas_changed(plane)
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
            error = created.exception()
            if error is not None:  # one line: a server's log tail is in its log file
                failure = error.summary if isinstance(error, TritonError) else str(error)
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
            if self.metrics is not None:
                self.metrics.swap(self.key, self.state.phase.value, self.state.active_version)
            self._update_targets()
            self.write_status()
        self._watch_prometheus()
        self._heal()
        self._autoscale()

    def _do(self, action: swap.Action) -> None:
        if isinstance(action, swap.CreateSlot):
            assert self.state is not None
            # the standby gets the active slot's placement, as it is now
            layout = self.slots[self.state.active_slot].placement
            self._jobs.pop(f"canary:{action.slot}", None)
            self._jobs[f"create:{action.slot}"] = self._pool.submit(
                self._create, action.slot, action.version, layout)
        elif isinstance(action, swap.RunCanary):
            self._jobs[f"canary:{action.slot}"] = self._pool.submit(
                self._canary, action.slot, action.version)
        elif isinstance(action, swap.Flip):
            assert self.spec is not None
            self.routing.flip(self.slots[action.slot].target(action.slot,
                                                             self.spec.model.name))
        elif isinstance(action, swap.DeleteSlot):
            self._jobs.pop(f"create:{action.slot}", None)
            self._jobs.pop(f"canary:{action.slot}", None)
            plane = self.slots.pop(action.slot, None)
            if plane is not None:
                plane.closed = True
                self._pool.submit(plane.stop)
        else:
            if self.metrics is not None:
                self.metrics.swap_event(self.key, action.reason)
            self.say(f"{'warning: ' if action.warning else ''}{action.reason}: "
                     f"{action.message}")

    def _create(self, slot: Slot, version: int, layout: Placement) -> None:
        t0 = time.monotonic()
        active = self.slots.get(self.state.active_slot) if self.state else None
        routers = len(active.routers) if active is not None and active.routers else 1
        # as many routers as serve now: the flip moves the same traffic
        self._plane(slot, version, self._model(version)).start(layout, routers)
        self.say(f"slot {slot}: version {version} ready in {time.monotonic() - t0:.1f} s")

    def _canary(self, slot: Slot, version: int) -> tuple[bool, str]:
        """The version's canary through the slot's router (the operator's check): its
        stored input's logits, and its stored prompt's greedy tokens."""
        router = self.slots[slot].router
        assert router is not None
        ok, detail = canary.check(f"http://{router.http_url}", version, timeout=30)
        if ok is None:  # no answer: on this machine that is a failure, not a wait
            return False, detail
        return ok, detail

    # -- autoscaling -----------------------------------------------------------------------

    def _watch_prometheus(self) -> None:
        """Our Prometheus exited: say so and start it again (at most every 5 s, so one that
        cannot start does not spin); the autoscaler holds replicas meanwhile."""
        prom = self.prometheus
        if prom is None or prom.popen is None or prom.popen.poll() is None:
            return
        if (self._restart is not None and not self._restart.done()) or \
                time.monotonic() - self._restarted_at < 5.0:
            return
        self._restarted_at = time.monotonic()
        self.say(f"prometheus exited with {prom.popen.returncode}; restarting it")
        sc = self.scaling
        if self.spec is not None and self.spec.autoscaling.enabled and sc.metrics_ok:
            # Unavailable from now, not from the next round: a restart faster than the
            # interval must still hold replicas and say so until a round succeeds again.
            sc.metrics_ok = False
            sc.reason = f"prometheus exited with {prom.popen.returncode}"
            self.say(f"autoscaler: metrics unavailable: {sc.reason}; holding replicas")
            self.write_status()
        self._restart = self._pool.submit(self._restart_prometheus, prom)

    # -- servers that die ----------------------------------------------------------------

    def _heal(self) -> None:
        """A Triton server of the active slot (or of the warm one, between swaps) that died
        is started again in the background; one whose restart failed, again 5 s later. A
        standby's servers are the swap's (a crash there fails the rollout)."""
        assert self.state is not None
        st = self.state
        slots = [st.active_slot]
        if st.phase == swap.Phase.IDLE and st.previous is not None:
            slots.append(st.previous.slot)
        for slot in slots:
            plane = self.slots.get(slot)
            if plane is None or plane.closed:
                continue
            for server in plane.dead():
                job, at = self._healing.get(id(server), (None, 0.0))
                if job is not None and (not job.done() or time.monotonic() - at < 5.0):
                    continue
                code = server.popen.returncode if server.popen is not None else None
                self.say(f"{slot}: {plane.role(server)} "
                         + (f"exited with {code}" if code is not None else "not running")
                         + "; restarting it")
                self._healing[id(server)] = (
                    self._pool.submit(self._restart_server, slot, plane, server),
                    time.monotonic())
        for key in [k for k, (job, _) in self._healing.items() if job.done()]:
            if time.monotonic() - self._healing[key][1] > 60:
                del self._healing[key]

    def _restart_server(self, slot: Slot, plane: DataPlane, server: TritonServer) -> bool:
        before = (server.http_url, server.grpc_url, server.metrics_port)
        try:
            if not plane.restart(server):
                return False
        except (TritonError, OSError) as e:
            summary = e.summary if isinstance(e, TritonError) else str(e)
            if not plane.closed:
                self.say(f"{slot}: {plane.role(server)} did not restart: {summary}")
            return False
        moved = before != (server.http_url, server.grpc_url, server.metrics_port)
        if server in plane.routers and moved and \
                self.state is not None and self.state.active_slot == slot:
            assert self.spec is not None
            self.routing.flip(plane.target(slot, self.spec.model.name))
        self.say(f"{slot}: {plane.role(server)} restarted "
                 f"{'on new ports' if moved else 'on its ports'}, gRPC {server.grpc_url} "
                 f"({server.startup_seconds:.1f} s)")
        self._update_targets()
        self.write_status()
        return True

    def _restart_prometheus(self, prom: PrometheusServer) -> None:
        try:
            prom.stop()
            prom.start()
        except (RuntimeError, OSError) as e:
            self.say(f"prometheus did not restart: {e}")
            return
        self.say(f"prometheus restarted on {prom.url} (pid {prom.pid})")
        self.write_status()

    def _autoscale(self) -> None:
        """Every interval, one scaling round in the background, never two at once, and none
        while a swap is under way."""
        assert self.spec is not None and self.state is not None
        sc = self.scaling
        now = time.monotonic()
        if now < sc.next_at or (sc.job is not None and not sc.job.done()):
            return
        sc.next_at = now + self.spec.autoscaling.interval_seconds
        said = self.spec.autoscaling.enabled or self.spec.router.autoscaling.enabled
        if self.state.phase != swap.Phase.IDLE:
            if not sc.paused:
                sc.paused = True
                if said:
                    self.say(f"autoscaler: paused while the swap is {self.state.phase.value}")
            return
        if sc.paused:
            sc.paused = False
            if said:
                self.say("autoscaler: resumed")
        sc.job = self._pool.submit(self._scale_round, self.state.active_slot)

    def _scale_round(self, slot: Slot) -> None:
        assert self.spec is not None
        try:
            if self.spec.router.autoscaling.enabled:
                self._scale_routers(slot)
            elif (plane := self.slots.get(slot)) is not None and plane.routers:
                self._set_routers(plane, slot, self.spec.router.replicas)  # edited by hand
            if self.spec.autoscaling.enabled:
                self._scale(slot)
        except Exception as e:  # one failed round must not end the autoscaler
            plane = self.slots.get(slot)
            if plane is not None and not plane.closed:  # else: stopping, or swapped away
                self.say(f"autoscaler: scaling round failed: {type(e).__name__}: {e}")

    def _scale(self, slot: Slot) -> None:
        assert self.spec is not None and self.prometheus is not None
        spec, sc, plane = self.spec, self.scaling, self.slots.get(slot)
        if plane is None or plane.closed:
            return
        if self._prom is None:
            self._prom = Prometheus(self.prometheus.url,
                                    timeout=min(5.0, spec.autoscaling.interval_seconds))
        current = plane.replica_counts()
        sample, error = None, ""
        try:
            sample = self._prom.expert_sample(self.selector, slot, len(current),
                                              autoscale.rate_window(spec, SCRAPE_SECONDS))
        except MetricsError as e:
            error = str(e)
        # every replica counted here serves (replicas are added ready, one job at a time)
        sc.state, d = autoscale.decide(sc.state, current, sample, time.time(),
                                       autoscale.policy_for(spec))
        reason = error or d.reason.removesuffix(": holding replicas")
        if d.metrics_ok and sc.metrics_ok is not True:
            self.say("autoscaler: metrics available" + (" again" if sc.ever_ok else ""))
            sc.ever_ok = True
        elif not d.metrics_ok and sc.metrics_ok is not False:
            # the first scrapes come a few seconds after start (Prometheus' discovery)
            self.say(f"autoscaler: {'metrics unavailable' if sc.ever_ok else 'waiting for metrics'}"
                     f": {reason}; holding replicas")
        load = sample.tokens_per_s if sample is not None else (None,) * len(current)
        sc.metrics_ok, sc.reason, sc.desired, sc.load = d.metrics_ok, reason, d.desired, load
        if d.metrics_ok:
            sc.imbalance = autoscale.imbalance([x or 0.0 for x in load], current)
        if self.metrics is not None:
            self.metrics.decision(self.key, current, d.desired, load, sc.imbalance,
                                  d.metrics_ok)
        for change in d.changes:
            self.say(f"autoscaler: {change}")
        moves, abandoned = sc.moves, sc.abandoned
        if d.changes:
            self._apply(plane, current, d.desired)
        elif d.metrics_ok and self.state is not None and self.state.phase == swap.Phase.IDLE \
                and time.monotonic() - sc.last_rebalance_at >= autoscale.rebalance_interval(
                    spec, SCRAPE_SECONDS):
            self._rebalance(plane, current, load)
        if self.metrics is not None:
            per_server = server_loads(plane.placement, plane.replica_counts(), load) \
                if d.metrics_ok and plane.expert_servers else None
            self.metrics.placement(
                self.key, placement_imbalance(per_server) if per_server else None,
                sc.moves - moves, sc.abandoned - abandoned)
        self.write_status()

    def _scale_routers(self, slot: Slot) -> None:
        """The active slot's router replicas follow their KV cache, waiting sequences and
        TTFT (``spec.router.autoscaling``). One added serves at once (the gateway reads the
        plane's routers); one removed first leaves the gateway's target, then finishes what
        it runs (at most ``spec.router.drainSeconds``) and stops."""
        assert self.spec is not None and self.prometheus is not None
        spec, rs, plane = self.spec, self.router_scaling, self.slots.get(slot)
        if plane is None or plane.closed or not plane.routers:
            return
        if self._prom is None:
            self._prom = Prometheus(self.prometheus.url,
                                    timeout=min(5.0, spec.autoscaling.interval_seconds))
        policy, now = router_scale.policy_for(spec), time.time()
        a, current = spec.router.autoscaling, len(plane.routers)
        sample, error = None, ""
        try:
            sample = self._prom.router_sample(
                self.selector, slot, autoscale.rate_window(spec, SCRAPE_SECONDS),
                waiting=a.waiting_per_replica is not None, ttft=a.ttft_p90_seconds is not None)
        except MetricsError as e:
            error = str(e)
        if rs.state is None:
            rs.state = autoscale.State(history=((now, (current,)),))
        rs.state, d = router_scale.decide(policy, sample, current, rs.state, now)
        reason = f"{error}: holding {d.replicas} router replicas" if error else d.reason
        if reason != rs.reason:
            self.say(f"router autoscaler: {reason}")
        rs.reason, rs.metrics_ok = reason, d.metrics_ok
        self._set_routers(plane, slot, d.replicas)
        self.write_status()

    def _set_routers(self, plane: DataPlane, slot: Slot, replicas: int) -> None:
        """``replicas`` router replicas on the slot, added or drained one at a time."""
        assert self.spec is not None
        spec = self.spec
        if len(plane.routers) != replicas and self._idle(plane):
            self.say(f"routers: {len(plane.routers)} -> {replicas} replicas")
        while len(plane.routers) < replicas and self._idle(plane):
            router = plane.start_router()
            self._routers_changed(plane, slot)
            self.say(f"routers: replica {len(plane.routers)} serving "
                     f"(started in {router.startup_seconds:.1f} s)")
        while len(plane.routers) > max(replicas, 1) and self._idle(plane):
            leaving = plane.routers[-1]
            plane.routers.remove(leaving)  # out of the gateway's target first
            self._routers_changed(plane, slot)
            drained = self._drain_router(leaving, spec.router.drain_seconds)
            leaving.stop()
            self.say(f"routers: replica {len(plane.routers) + 1} stopped "
                     + ("(drained)" if drained else
                        f"(still busy after {spec.router.drain_seconds} s)"))
            self._update_targets()

    def _idle(self, plane: DataPlane) -> bool:
        return not plane.closed and self.state is not None \
            and self.state.phase == swap.Phase.IDLE

    def _routers_changed(self, plane: DataPlane, slot: Slot) -> None:
        assert self.spec is not None
        if self.state is not None and self.state.active_slot == slot:
            self.routing.flip(plane.target(slot, self.spec.model.name))
        self._update_targets()

    def _drain_router(self, router: TritonServer, seconds: float) -> bool:
        """Wait until the router runs nothing and no gateway call is left on it (bounded)."""
        replica = f"http://{router.http_url}"
        balancer = self.gateway.gateway.hub.balancer if self.gateway else None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            inflight = 0 if balancer is None else sum(
                n for r, n in list(balancer.inflight.items()) if r.url == replica)
            if not inflight and busy(router.metrics_url) == 0:
                return True
            time.sleep(0.2)
        return False

    def _rebalance(self, plane: DataPlane, current: list[int],
                   load: Sequence[float | None]) -> None:
        """Same replicas, servers uneven: a few experts move live between the servers (each
        loaded where it goes before it leaves where it was), when that gains enough."""
        rb = rebalance(current, plane.capacity, load, plane.placement,
                       servers=len(plane.expert_servers), max_moves=MOVES_PER_REBALANCE)
        if not rb.acted:
            return
        servers = [x.server for x in plane.expert_servers]
        done = [m for m in rb.moves if m.source is not None and m.target is not None
                and plane.move(m.expert, servers[m.source], servers[m.target])]
        self.scaling.moves += len(done)
        self.scaling.last_rebalance_at = time.monotonic()
        self.scaling.abandoned += len(rb.moves) - len(done)
        self.scaling.last_rebalance = (
            f"imbalance {rb.imbalance_before:.2f} -> {rb.imbalance_after:.2f}, "
            + ", ".join(f"expert {m.expert} server {m.source}->{m.target}" for m in done))
        self.say(f"rebalance: {self.scaling.last_rebalance}"
                 + (f" ({len(rb.moves) - len(done)} abandoned)"
                    if len(done) < len(rb.moves) else ""))
        self._replicas_changed(plane)

    def _apply(self, plane: DataPlane, current: list[int], desired: tuple[int, ...]) -> None:
        """The replicas placed (what each server holds stays where it can; the load
        balances the rest) live: servers added start first, the others load and drop
        experts while serving, servers no longer needed stop last. A swap that begins
        meanwhile stops what is left."""
        def go_on() -> bool:
            return not plane.closed and self.state is not None \
                and self.state.phase == swap.Phase.IDLE

        load = self.scaling.load if len(self.scaling.load) == len(desired) else ()
        target = place(list(desired), plane.capacity, load, current=plane.placement)
        self.say(f"autoscaler: {len(target.servers)} expert server(s): "
                 + "; ".join(p.format_server_experts(h) for h in target.servers))
        plane.reshape(target, go_on, lambda m: self.say(f"autoscaler: {m}"))
        self._replicas_changed(plane)

    def _replicas_changed(self, plane: DataPlane) -> None:
        self._update_targets()
        if self.metrics is not None:
            self.metrics.replicas_now(self.key, plane.replica_counts())
        self.write_status()

    # -- status and stop -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.spec is not None and self.state is not None
        st = self.state
        return {
            "name": self.name, "file": str(self.path), "pid": os.getpid(),
            "gateway": f"http://127.0.0.1:{self.gateway_port}",
            "grpc": f"127.0.0.1:{self.grpc_port}",
            "prometheus": self.prometheus.url if self.prometheus else None,
            "prometheus_pid": self.prometheus.pid if self.prometheus else None,
            "requested_version": self.spec.model.version,
            "phase": st.phase.value, "reason": st.reason,
            "active": {"slot": st.active_slot, "version": st.active_version},
            "slots": {slot: {
                "version": plane.version,
                "repository": str(plane.repository),
                "role": ("active" if slot == st.active_slot else
                         "warm" if st.previous and st.previous.slot == slot else "standby"),
                "router": plane.router.http_url if plane.router else None,
                "router_pid": _pid(plane.router),
                "routers": [{"http": r.http_url, "grpc": r.grpc_url, "metrics": r.metrics_url,
                             "pid": _pid(r)}
                            for r in list(plane.routers)],
                "expert_replicas": {str(e): len(s) for e, s in plane.experts.items()},
                "experts_per_server": plane.capacity,
                # the servers, and what each holds
                "servers": [{"experts": sorted(x.held), "grpc": x.server.grpc_url,
                             "metrics": x.server.metrics_url, "pid": _pid(x.server)}
                            for x in list(plane.expert_servers)],
                # expert → the servers holding it (one server serves several experts)
                "expert_servers": {str(e): [{"grpc": x.grpc_url, "metrics": x.metrics_url,
                                             "pid": _pid(x)} for x in list(s)]
                                   for e, s in plane.experts.items()},
            } for slot, plane in sorted(dict(self.slots).items())},
            "autoscaling": self._autoscaling_status(),
            "router_autoscaling": {
                "enabled": self.spec.router.autoscaling.enabled,
                "replicas": len(self.slots[st.active_slot].routers)
                if st.active_slot in self.slots else None,
                "metrics_available": self.router_scaling.metrics_ok,
                "reason": self.router_scaling.reason},
        }

    def _autoscaling_status(self) -> dict[str, Any]:
        assert self.spec is not None and self.state is not None
        a, sc = self.spec.autoscaling, self.scaling
        plane = self.slots.get(self.state.active_slot)
        current = plane.replica_counts() if plane is not None else []
        return {
            "enabled": a.enabled, "interval_seconds": a.interval_seconds,
            "target_tokens_per_second": a.target,
            "metrics_available": sc.metrics_ok, "reason": sc.reason,
            "imbalance": sc.imbalance, "paused": sc.paused,
            "moves": sc.moves, "last_rebalance": sc.last_rebalance,
            "experts": {str(e): {
                "replicas": c,
                "desired": sc.desired[e] if e < len(sc.desired) else c,
                "load": sc.load[e] if e < len(sc.load) else None,
            } for e, c in enumerate(current)},
        }

    def write_status(self) -> None:
        """Atomically (readers never see half a file); from the swap and scaling threads."""
        if self.state is None:
            return
        text = json.dumps(self.status(), indent=1)
        with self._lock:
            tmp = self.workdir / "status.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.workdir / "status.json")

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
        if self._prom is not None:
            self._prom.close()
            self._prom = None
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.shm_group:  # ours (not another run's, which refused us)
            (self.workdir / "status.json").unlink(missing_ok=True)
            self.instance_file.unlink(missing_ok=True)
            self.shm_group = ""


def _pid(server: TritonServer | None) -> int | None:
    return server.popen.pid if server is not None and server.popen is not None else None


def experts_per_server(spec: AutoGLMSpec, repository: Path, version: int) -> int:
    """``spec.experts.perServer``, or what suits this machine: the experts spread over as
    many servers as there are cores (2 to 4: a server is a process, ~300 MiB before any
    weight), as long as a server's slices fit in a quarter of the memory available."""
    e = spec.model.num_experts
    if spec.experts.per_server is not None:
        return spec.experts.per_server
    servers = min(4, max(2, os.cpu_count() or 2))
    per = -(-e // servers)
    try:
        slice_bytes = (repository / p.expert_folder(0) / str(version) / WEIGHTS).stat().st_size
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        per = min(per, max(1, available // 4 // max(slice_bytes, 1)))
    except (OSError, ValueError):
        pass
    return max(1, min(per, e))
