"""`autoglm up FILE` in a subprocess, as a user runs it, for e2e tests and the demo."""

from __future__ import annotations

import contextlib
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

from autoglm.procs import die_with_parent, free_port
from autoglm.testing import eventually
from autoglm.triton import SHM_PREFIX


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

    @classmethod
    def start(cls, file: Path, home: Path, echo: str | None = None) -> UpProcess:
        """Start on free ports; ``echo`` prefixes a copy of each line on our stdout."""
        port, pport, gport = free_port(), free_port(), free_port()
        popen = subprocess.Popen(
            [sys.executable, "-m", "autoglm.cli", "up", str(file), f"--port={port}",
             f"--grpc-port={gport}", f"--prometheus-port={pport}", f"--home={home}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=die_with_parent)
        up = cls(popen, file, home, port, pport, gport)

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                up.lines.append((time.monotonic(), line.rstrip()))
                if echo is not None:
                    print(f"{echo}{line}", end="", flush=True)

        threading.Thread(target=read, daemon=True).start()
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

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, as Ctrl-C does; the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def leftovers(self) -> list[str]:
        """What a stopped run left behind: processes of its session, shared-memory regions
        of its Triton servers, listening ports (empty: a clean stop)."""
        out = [f"process {p}" for p in subprocess.run(
            ["pgrep", "-s", str(self.popen.pid)], capture_output=True, text=True,
        ).stdout.split()]
        out += [f"/dev/shm/{f.name}" for f in Path("/dev/shm").glob(f"{SHM_PREFIX}*")]
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
