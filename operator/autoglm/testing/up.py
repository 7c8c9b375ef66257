"""`autoglm up FILE` in a subprocess, as a user runs it, for e2e tests and the demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from autoglm.procs import dying_with_parent, free_port, processes_with
from autoglm.testing import eventually
from autoglm.triton import SHM_PREFIX, shm_group_marker, shm_group_regions


@dataclass
class UpProcess:
    popen: subprocess.Popen[str]
    file: Path
    home: Path
    port: int
    prometheus_port: int
    grpc_port: int
    # (monotonic time it arrived, line): what `autoglm up` printed
    lines: list[tuple[float, str]] = field(default_factory=list)
    # the shared-memory groups of its Triton servers (its instance.json, once it serves)
    groups: set[str] = field(default_factory=set)
    # reads ``lines`` until EOF; joined once the process has exited, so every line it
    # printed is in ``lines`` when stop() or kill() returns
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, file: Path, home: Path, echo: str | None = None,
              ports: tuple[int, int, int] | None = None) -> UpProcess:
        """Start on free ports, or ``ports`` (gateway, Prometheus, gRPC: e.g. those of a run
        that was killed); ``echo`` prefixes a copy of each line on our stdout."""
        port, pport, gport = ports or (free_port(), free_port(), free_port())
        popen = subprocess.Popen(
            **dying_with_parent([sys.executable, "-m", "autoglm.cli", "up", str(file),
                                 f"--port={port}", f"--grpc-port={gport}",
                                 f"--prometheus-port={pport}", f"--home={home}"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        up = cls(popen, file, home, port, pport, gport)

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                up.lines.append((time.monotonic(), line.rstrip()))
                if echo is not None:
                    print(f"{echo}{line}", end="", flush=True)

        up.reader = threading.Thread(target=read, daemon=True)
        up.reader.start()
        return up

    @property
    def text(self) -> list[str]:
        return [line for _, line in self.lines]

    def count(self, text: str, since: int = 0) -> int:
        return sum(text in line for _, line in self.lines[since:])

    def said(self, text: str, since: int = 0) -> bool:
        return self.count(text, since) > 0

    def wait_serving(self, timeout: float = 300) -> None:
        eventually(lambda: self.said("serving ") or self.popen.poll() is not None,
                   "autoglm up to serve", timeout=timeout)
        assert self.popen.poll() is None, "\n".join(self.text)
        for f in self.home.glob("run/*/instance.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.groups.add(str(json.loads(f.read_text())["shm_group"]))

    @property
    def ports(self) -> tuple[int, int, int]:
        """Gateway, Prometheus, gRPC: as :meth:`start` takes them."""
        return self.port, self.prometheus_port, self.grpc_port

    def kill(self) -> None:
        """SIGKILL `autoglm up` alone, as the OOM killer or a crash would: it cleans up
        nothing (its servers and Prometheus die with it; what they leave stays)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.wait(timeout=60)

    def wait(self, timeout: float) -> int:
        """Its exit status once it has exited by itself, with every line it printed."""
        code = self.popen.wait(timeout=timeout)
        self._drain()
        return code

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, as Ctrl-C does; the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
        return self.wait(timeout)

    def _drain(self) -> None:
        """Wait for the reader to reach EOF: the pipe closes when the last process holding
        it (`autoglm up` and whatever inherited its stdout) has gone."""
        if self.reader is not None:
            self.reader.join(timeout=30)
            assert not self.reader.is_alive(), "autoglm up's output never reached EOF"

    def leftovers(self) -> list[str]:
        """What a stopped run left behind: processes of its session or of its servers (a
        Python-backend stub outlives a killed tritonserver), shared-memory regions of its
        Triton servers (of its groups; any of ours when it never said which), listening
        ports (empty: a clean stop)."""
        pids = set(subprocess.run(["pgrep", "-s", str(self.popen.pid)], capture_output=True,
                                  text=True).stdout.split())
        pids |= {str(p) for p in processes_with([shm_group_marker(g) for g in self.groups])}
        out = [f"process {p}" for p in sorted(pids)]
        regions = ([f for g in sorted(self.groups) for f in shm_group_regions(g)]
                   if self.groups else sorted(Path("/dev/shm").glob(f"{SHM_PREFIX}*")))
        out += [f"/dev/shm/{f.name}" for f in regions]
        return out + [f"port {p}" for p in (self.port, self.grpc_port, self.prometheus_port)
                      if port_open(p)]

    @classmethod
    @contextlib.contextmanager
    def serving(cls, file: Path, home: Path) -> Iterator[UpProcess]:
        """Started and serving for the body; then stopped as Ctrl-C does, and checked to
        have exited 0 leaving nothing behind. Its output is printed (pytest shows it when
        a test fails)."""
        up = cls.start(file, home)
        try:
            up.wait_serving()
            yield up
        finally:
            code = up.stop()
            print("\n".join(up.text))
        assert code == 0, f"autoglm up exited {code}"
        assert up.said("stopped: no process")
        assert not up.leftovers(), up.leftovers()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
