"""Helpers for the processes AutoGLM starts (Triton servers, Prometheus, test control planes).

Each runs in a session of its own (so its whole process group can be signalled) and dies
with the process that started it, so a killed parent leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

# bound at import: a child between fork and exec must not import or dlopen anything
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_SETPRIV = shutil.which("setpriv")


def die_with_parent() -> None:
    """In the child before exec: be killed if the process that started us dies, so a killed
    test run leaves no control plane behind (Linux prctl PR_SET_PDEATHSIG)."""
    _PRCTL(1, signal.SIGKILL)


def dying_with_parent(cmd: Sequence[str]) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that run ``cmd`` in a session of its own, killed if
    the process that started it dies. util-linux's ``setpriv`` sets the signal, so no Python
    runs in the forked child: with other threads in the parent (gRPC's) that crashed it
    now and then (SIGSEGV before exec). Without ``setpriv``, a ``preexec_fn`` does."""
    if _SETPRIV:
        return {"args": [_SETPRIV, "--pdeathsig", "KILL", "--", *cmd],
                "start_new_session": True}
    return {"args": list(cmd), "start_new_session": True, "preexec_fn": die_with_parent}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: Sequence[str], log: IO[bytes] | None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, output to ``log`` (None: our stdout)."""
    return subprocess.Popen(**dying_with_parent(cmd), env=dict(env) if env is not None
                            else None, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def terminate(popen: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
              timeout: float = 15.0) -> None:
    """Signal the process group, wait, and SIGKILL the group if it lingers or leaves
    children behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait(timeout=10)


def group_rss_bytes(pid: int) -> int:
    """Resident memory of a process group we started (the process and its children)."""
    out = subprocess.run(["ps", "-o", "rss=", "-g", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return sum(int(x) for x in out.split()) * 1024


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether GET ``url`` answers 200 (any failure: no)."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=timeout) as r:
        return bool(r.status == 200)
    return False


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat): with the pid,
    it names one process, as a pid alone does not once reused. None: no such process, or a
    zombie (it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on: comm may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def running(pid: int, started: int | None) -> bool:
    """Whether the process that was ``pid`` started at ``started`` still runs."""
    return started is not None and process_start(pid) == started


def processes_with(markers: Sequence[str]) -> list[int]:
    """Our user's live processes (not this one) whose command line contains one of
    ``markers``."""
    out, uid = [], os.getuid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if d.stat().st_uid != uid:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in markers) and process_start(int(d.name)) is not None:
            out.append(int(d.name))
    return sorted(out)


def kill_all(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL each of ``pids`` and wait until they are gone; those that are not."""
    starts = {pid: process_start(pid) for pid in pids}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (left := [p for p, s in starts.items() if running(p, s)]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return left
