"""One slot's Triton servers on this machine: a router and the expert servers of a
:class:`~autoglm.placement.Placement` (each holds the experts it was given in one
``experts`` model), wired by an endpoints file the router re-reads (the local counterpart
of a headless Service); the router asks each server what it holds. The placement can change
while serving, no server restarted (:meth:`DataPlane.reshape`: servers added start first,
the others load and drop experts live, servers no longer needed stop last), and a server
that died is restarted in place (:meth:`DataPlane.restart`: its ports again, as a pod's
Service keeps its address).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from autoglm.gateway.routing import Replica, Target
from autoglm.placement import Placement, place
from autoglm.plan import SERVER_EXPERTS_ENV, experts_model, format_server_experts
from autoglm.repository import read_meta, router_server_models
from autoglm.triton import TritonError, TritonServer


def control(server: TritonServer, **order: list[int]) -> list[int]:
    """A live-move order to an expert server (backends/experts.py ``CONTROL``; none: only
    ask); what it reports holding."""
    with httpclient.InferenceServerClient(server.http_url, network_timeout=10.0) as c:
        i = httpclient.InferInput("CONTROL", [1], "BYTES")
        i.set_data_from_numpy(np.array([json.dumps(order).encode()], dtype=np.object_))
        out = c.infer(experts_model(), [i],
                      outputs=[httpclient.InferRequestedOutput("HELD")])
        return [int(e) for e in out.as_numpy("HELD")]


@dataclass(eq=False)
class ExpertServer:
    held: frozenset[int]
    server: TritonServer


@dataclass
class DataPlane:
    repository: Path
    version: int
    workdir: Path
    capacity: int = 1  # experts per server
    resolve_seconds: float = 0.5
    expert_timeout_seconds: float = 5.0
    # More environment of the servers (autoglm.plan.workload_env: what the spec says the
    # version must be, and the instance kind), as the pods get it on Kubernetes.
    router_env: dict[str, str] = field(default_factory=dict)
    expert_env: dict[str, str] = field(default_factory=dict)
    shm_group: str = ""  # starts every server's shared-memory prefix (autoglm.triton)
    routers: list[TritonServer] = field(default_factory=list, init=False)  # first: primary
    closed: bool = field(default=False, init=False)  # stopped: starts nothing more
    expert_servers: list[ExpertServer] = field(default_factory=list, init=False)
    _started: int = field(default=0, init=False)  # servers started so far (log names)
    # held while a server is restarted or removed: one change of a server at a time
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def router(self) -> TritonServer | None:
        """The first router (the one the slot starts with; the canary's)."""
        return self.routers[0] if self.routers else None

    def target(self, slot: str, model: str = "") -> Target:
        """Where the gateway sends this slot's requests: every router replica."""
        replicas = tuple(Replica(f"http://{r.http_url}", r.grpc_url,
                                 r.metrics_url) for r in self.routers)
        first = replicas[0]
        return Target(slot, self.version, first.url, first.grpc_url, model, replicas)

    @property
    def num_experts(self) -> int:
        return int(read_meta(self.repository, self.version)["config"]["num_experts"])

    @property
    def endpoints_file(self) -> Path:
        return self.workdir / "endpoints.json"

    @property
    def placement(self) -> Placement:
        return Placement(tuple(x.held for x in self.expert_servers))

    @property
    def experts(self) -> dict[int, list[TritonServer]]:
        """Expert → the servers holding it, in server order."""
        out: dict[int, list[TritonServer]] = {e: [] for e in range(self.num_experts)}
        for x in list(self.expert_servers):
            for e in sorted(x.held):
                out.setdefault(e, []).append(x.server)
        return out

    def write_endpoints(self) -> None:
        """Atomically: the router re-reads the file while we write it."""
        view = [x.server.grpc_url for x in self.expert_servers if x.server.popen is not None]
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(view))
        os.replace(tmp, self.endpoints_file)

    def add_server(self, held: frozenset[int], grpc_port: int = 0) -> TritonServer:
        """A server holding ``held``, serving (in the endpoints file) once it is ready."""
        n = self._started
        self._started += 1
        server = TritonServer(self.repository, {experts_model(): self.version},
                              env={**self.expert_env,
                                   SERVER_EXPERTS_ENV: format_server_experts(held)},
                              log_path=self.workdir / f"experts-{n}.log",
                              grpc_port=grpc_port, shm_group=self.shm_group)
        server.start()
        self.expert_servers.append(ExpertServer(held, server))
        if self.closed:  # stopped while this server was starting
            server.stop()
            raise RuntimeError("slot stopped")
        self.write_endpoints()
        return server

    def start(self, layout: Placement | Sequence[int] | int = 1, routers: int = 1) -> DataPlane:
        """The expert servers of ``layout`` (a placement, or replicas per expert, or for
        every expert, placed at this plane's capacity), then ``routers`` router replicas."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(layout, int):
            layout = [layout] * self.num_experts
        target = layout if isinstance(layout, Placement) else \
            place(list(layout), min(self.capacity, len(layout)))
        try:
            for held in target.servers:
                self.add_server(held)
            for _ in range(routers):
                self.start_router()
        except BaseException:
            self.stop()
            raise
        return self
    def start_router(self) -> TritonServer:
        """One more router replica (the first: the slot's router), serving once started."""
        n = len(self.routers)
        router = TritonServer(
            self.repository, router_server_models(self.repository, self.version),
            env={**self.router_env,
                 "AUTOGLM_EXPERT_ENDPOINTS_FILE": str(self.endpoints_file),
                 "AUTOGLM_RESOLVE_SECONDS": str(self.resolve_seconds),
                 "AUTOGLM_EXPERT_TIMEOUT_SECONDS": str(self.expert_timeout_seconds)},
            log_path=self.workdir / ("router.log" if not n else f"router-{n + 1}.log"),
            shm_group=self.shm_group)
        router.start()
        self.routers.append(router)
        if self.closed:
            router.stop()
            raise RuntimeError("slot stopped")
        return router

    def stop_router(self, router: TritonServer) -> None:
        """A router replica the gateway no longer sends to, stopped (never the last)."""
        with self._lock:
            if router not in self.routers or len(self.routers) == 1:
                return
            self.routers.remove(router)
        router.stop()

    def move(self, expert: int, source: TritonServer, target: TritonServer,
             timeout: float = 60.0) -> bool:
        """Expert ``expert`` from ``source`` to ``target`` while both serve (no restart):
        ``target`` loads it and reports it, then ``source`` drops it (unreported at once,
        answered while the router still asks, then freed). False, nothing changed on
        ``source``, when ``target`` does not report it in time (it died, say): the move is
        abandoned and the old replica serves on."""
        src, dst = (next(x for x in self.expert_servers if x.server is s)
                    for s in (source, target))
        if expert not in src.held or expert in dst.held:
            raise ValueError(f"expert {expert}: not on server {source.grpc_url} or already "
                             f"on {target.grpc_url}")
        deadline = time.monotonic() + timeout
        try:
            control(target, load=[expert])
            while expert not in control(target):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"expert {expert} not loaded in {timeout:.0f} s")
                time.sleep(0.1)
        except (InferenceServerException, OSError, TimeoutError):
            return False
        dst.held = dst.held | {expert}
        with contextlib.suppress(InferenceServerException, OSError):  # gone: dropped anyway
            control(source, drop=[expert])
        src.held = src.held - {expert}
        return True

    def reshape(self, target: Placement, go_on: Callable[[], bool] = lambda: True,
                say: Callable[[str], None] = lambda _: None, timeout: float = 60.0) -> None:
        """Serve ``target`` with no server restarted: the servers it adds start holding
        their experts and serve first; the servers there load what they gain while they
        serve, and once it is reported, drop what they lose; the servers it no longer needs
        then leave the router's view and stop. A load not reported within ``timeout`` is
        given up, and no server drops or stops with the last copy of an expert. ``go_on``
        false (a swap began): start nothing more."""
        current = list(self.expert_servers)
        for s in range(len(current), len(target.servers)):
            if not go_on():
                return
            self.add_server(target.servers[s])
            say(f"expert server {s + 1} with experts {format_server_experts(target.servers[s])}"
                f" serving (started in {self.expert_servers[-1].server.startup_seconds:.1f} s)")
        kept = list(zip(current, target.servers, strict=False))
        loading = {id(x): sorted(held - x.held) for x, held in kept if held - x.held}
        for x, _ in kept:
            with contextlib.suppress(InferenceServerException, OSError):
                if loading.get(id(x)):
                    control(x.server, load=loading[id(x)])
        deadline = time.monotonic() + timeout
        while loading and time.monotonic() < deadline:
            time.sleep(0.1)
            for x, _ in kept:
                if id(x) in loading:
                    with contextlib.suppress(InferenceServerException, OSError):
                        got = set(control(x.server)) & set(loading[id(x)])
                        x.held = x.held | got
                        if got == set(loading[id(x)]):
                            del loading[id(x)]
        gone = current[len(target.servers):]
        for x, held in kept:  # each dropped copy served elsewhere now
            lose = [e for e in sorted(x.held - held)
                    if any(e in y.held for y in self.expert_servers if y is not x
                           and y not in gone)]
            with contextlib.suppress(InferenceServerException, OSError):
                if lose:
                    control(x.server, drop=lose)
                x.held = x.held - set(lose)
            if x.held != held:
                say(f"expert server {current.index(x) + 1} holds "
                    f"{format_server_experts(x.held)} (live)")
        stay = [x for x in self.expert_servers if x not in gone]
        gone = [x for x in gone if all(any(e in y.held for y in stay) for e in x.held)]
        with self._lock:
            self.expert_servers = [x for x in self.expert_servers if x not in gone]
            self.write_endpoints()
            if not gone:
                return
            time.sleep(2 * self.resolve_seconds)  # the router has stopped choosing them
            for x in gone:
                x.server.stop()
                say(f"expert server with experts {format_server_experts(x.held)} stopped")

    def dead(self) -> list[TritonServer]:
        """The servers that exited on their own (killed, crashed) and were not restarted
        yet; a server whose restart failed is one (its process is gone)."""
        return [s for s in self.servers() if s.popen is None or s.popen.poll() is not None]

    def role(self, server: TritonServer) -> str:
        """``router`` or ``expert server <s>/<n> (experts 0,1)``."""
        if server in self.routers:
            n = self.routers.index(server)
            return "router" if not n else f"router {n + 1}"
        for s, x in enumerate(self.expert_servers):
            if x.server is server:
                return (f"expert server {s + 1}/{len(self.expert_servers)} "
                        f"(experts {format_server_experts(x.held)})")
        return f"server of {', '.join(server.models)}"

    def restart(self, server: TritonServer) -> bool:
        """Start a server that died again: what is left of it reaped (its stubs, its shared
        memory), then the same models on the same ports, so that the router (an expert) or
        the gateway and Prometheus (the router) find it where it was; ports taken meanwhile:
        new ones (the endpoints file names them; the caller re-points the rest). An expert
        server stays in the endpoints file meanwhile: the router keeps what it last reported
        and its calls there fail fast and go to other replicas, as while it was dead; taken
        out and put back, a router refresh that read the file in between could drop it again
        after it serves. False: not restarted (the slot stopped, the server was removed, or
        it runs)."""
        with self._lock:
            if self.closed or server not in self.servers() or \
                    (server.popen is not None and server.popen.poll() is None):
                return False
            server.stop()  # SIGKILLs the stubs left in its process group; unlinks its regions
            try:
                server.start()
            except TritonError:
                if self.closed:
                    raise
                server.http_port = server.grpc_port = server.metrics_port = 0
                server.start()
            if self.closed:  # stopped meanwhile: it must not outlive the slot
                server.stop()
                return False
            if server not in self.routers:
                self.write_endpoints()  # the same address, or the new ports
            return True

    def failure(self) -> str | None:
        """A server that died on its own, if any."""
        for s in self.servers():
            if s.popen is not None and s.popen.poll() is not None:
                return f"a server of {s.models} exited with {s.popen.returncode}"
        return None

    def replica_counts(self) -> list[int]:
        return self.placement.replicas(self.num_experts)

    def servers(self) -> list[TritonServer]:
        return [*(x.server for x in self.expert_servers), *self.routers]

    def stop(self) -> None:
        self.closed = True
        with self._lock:  # a restart under way ends first (it sees ``closed``)
            for s in self.servers():
                s.stop()
