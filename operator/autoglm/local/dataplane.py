"""One slot's Triton servers on this machine: a router and servers per expert replica,
wired by an endpoints file the router re-reads (the local counterpart of a headless
Service). Replicas can be added and removed while serving, and a server that died is
restarted in place (:meth:`DataPlane.restart`: its ports again, as a pod's Service keeps its
address).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autoglm.plan import expert_model
from autoglm.repository import read_meta, router_server_models
from autoglm.triton import TritonError, TritonServer


@dataclass
class DataPlane:
    repository: Path
    version: int
    workdir: Path
    resolve_seconds: float = 0.5
    expert_timeout_seconds: float = 5.0
    # More environment of the servers (autoglm.plan.workload_env: what the spec says the
    # version must be, and the instance kind), as the pods get it on Kubernetes.
    router_env: dict[str, str] = field(default_factory=dict)
    expert_env: dict[str, str] = field(default_factory=dict)
    shm_group: str = ""  # starts every server's shared-memory prefix (autoglm.triton)
    router: TritonServer | None = field(default=None, init=False)
    closed: bool = field(default=False, init=False)  # stopped: starts nothing more
    experts: dict[int, list[TritonServer]] = field(default_factory=dict, init=False)
    # held while a server is restarted or removed: one change of a server at a time
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def num_experts(self) -> int:
        return int(read_meta(self.repository, self.version)["config"]["num_experts"])

    @property
    def endpoints_file(self) -> Path:
        return self.workdir / "endpoints.json"

    def write_endpoints(self) -> None:
        """Atomically: the router re-reads the file while we write it."""
        view = {str(e): [s.grpc_url for s in servers if s.popen is not None]
                for e, servers in self.experts.items()}
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(view))
        os.replace(tmp, self.endpoints_file)

    def add_replica(self, expert: int, grpc_port: int = 0) -> TritonServer:
        n = len(self.experts.get(expert, []))
        server = TritonServer(self.repository, {expert_model(expert): self.version},
                              env=dict(self.expert_env),
                              log_path=self.workdir / f"expert-{expert}-{n}.log",
                              grpc_port=grpc_port, shm_group=self.shm_group)
        server.start()
        self.experts.setdefault(expert, []).append(server)
        if self.closed:  # stopped while this replica was starting
            server.stop()
            raise RuntimeError("slot stopped")
        self.write_endpoints()
        return server

    def start(self, replicas: int | Sequence[int] = 1) -> DataPlane:
        """Expert servers (``replicas`` each, or per expert: an expert the counts do not
        cover gets one), then the router."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        counts = ([replicas] * self.num_experts if isinstance(replicas, int)
                  else list(replicas))
        try:
            for e in range(self.num_experts):
                for _ in range(counts[e] if e < len(counts) else 1):
                    self.add_replica(e)
            self.start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def start_router(self) -> TritonServer:
        self.router = TritonServer(
            self.repository, router_server_models(self.repository, self.version),
            env={**self.router_env,
                 "AUTOGLM_EXPERT_ENDPOINTS_FILE": str(self.endpoints_file),
                 "AUTOGLM_RESOLVE_SECONDS": str(self.resolve_seconds),
                 "AUTOGLM_EXPERT_TIMEOUT_SECONDS": str(self.expert_timeout_seconds)},
            log_path=self.workdir / "router.log", shm_group=self.shm_group)
        self.router.start()
        if self.closed:
            self.router.stop()
            raise RuntimeError("slot stopped")
        return self.router

    def remove_replica(self, expert: int) -> None:
        """Take the newest replica out of the router's view first, then stop it."""
        servers = self.experts.get(expert, [])
        if len(servers) <= 1:
            return
        with self._lock:
            victim = servers.pop()
            self.write_endpoints()
            time.sleep(2 * self.resolve_seconds)  # the router has stopped choosing it
            victim.stop()

    def dead(self) -> list[TritonServer]:
        """The servers that exited on their own (killed, crashed) and were not restarted
        yet; a server whose restart failed is one (its process is gone)."""
        return [s for s in self.servers() if s.popen is None or s.popen.poll() is not None]

    def role(self, server: TritonServer) -> str:
        """``router`` or ``expert <e> replica <i>/<n>``."""
        if server is self.router:
            return "router"
        for e, servers in self.experts.items():
            if server in servers:
                return f"expert {e} replica {servers.index(server) + 1}/{len(servers)}"
        return f"server of {', '.join(server.models)}"

    def restart(self, server: TritonServer) -> bool:
        """Start a server that died again: what is left of it reaped (its stubs, its shared
        memory), then the same models on the same ports, so that the router (an expert) or
        the gateway and Prometheus (the router) find it where it was; ports taken meanwhile:
        new ones (the endpoints file names them; the caller re-points the rest). Out of the
        endpoints file until it serves. False: not restarted (the slot stopped, the replica
        was removed, or it runs)."""
        with self._lock:
            if self.closed or server not in self.servers() or \
                    (server.popen is not None and server.popen.poll() is None):
                return False
            server.stop()  # SIGKILLs the stubs left in its process group; unlinks its regions
            if server is not self.router:
                self.write_endpoints()
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
            if server is not self.router:
                self.write_endpoints()
            return True

    def failure(self) -> str | None:
        """A server that died on its own, if any."""
        for s in self.servers():
            if s.popen is not None and s.popen.poll() is not None:
                return f"a server of {s.models} exited with {s.popen.returncode}"
        return None

    def replica_counts(self) -> list[int]:
        return [len(self.experts.get(e, [])) for e in range(self.num_experts)]

    def servers(self) -> list[TritonServer]:
        return [*(s for ss in self.experts.values() for s in ss),
                *([self.router] if self.router else [])]

    def stop(self) -> None:
        self.closed = True
        with self._lock:  # a restart under way ends first (it sees ``closed``)
            for s in self.servers():
                s.stop()
