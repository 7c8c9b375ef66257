"""Running real Triton servers: the ``tritonserver`` of the nvidia-pytriton wheel, CPU,
Python backend, each server loading exactly the models and versions it is told.

Facts this relies on (DESIGN.md §7): the Python 3.11 stub goes in a backend folder of our
own; the virtualenv's ``bin`` first on PATH makes the stub use the virtualenv's packages;
``--disable-auto-complete-config`` halves start-up; a short ``--exit-timeout-secs`` keeps a
keep-alive client from delaying shutdown. Each server gets its own shared-memory prefix so
that stopping it can remove exactly its ``/dev/shm`` regions.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from autoglm.procs import free_port, group_rss_bytes, http_ok, spawn, terminate
from autoglm.repository import pinned_config

SHM_PREFIX = "triton_python_backend_shm_region_autoglm_"


class TritonError(RuntimeError):
    pass


def tritonserver_binary() -> Path:
    """``$AUTOGLM_TRITONSERVER`` (e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's
    image), else the binary in the nvidia-pytriton wheel."""
    given = os.environ.get("AUTOGLM_TRITONSERVER")
    return Path(given) if given else triton_root() / "bin" / "tritonserver"


def triton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise TritonError("nvidia-pytriton is not installed: it provides tritonserver "
                          "(pip install -e '.[dev]' or make test)") from e
    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory() -> Path:
    """``$AUTOGLM_TRITON_BACKENDS``, else a backends folder made from the wheel's, whose
    Python backend uses this interpreter's stub."""
    given = os.environ.get("AUTOGLM_TRITON_BACKENDS")
    if given:
        return Path(given)
    root = triton_root()
    cache = Path(os.environ.get("AUTOGLM_CACHE", Path.home() / ".cache" / "autoglm"))
    ver = sys.version_info
    target = cache / "triton-backends" / f"py{ver.major}{ver.minor}-{root.stat().st_mtime_ns}"
    python = target / "python"
    if not (python / "triton_python_backend_stub").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        (tmp / "python").mkdir(parents=True, exist_ok=True)
        src = root / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / name, tmp / "python" / name)
        stub = root / "python_backend_stubs" / f"{ver.major}.{ver.minor}" / \
            "triton_python_backend_stub"
        if not stub.exists():
            raise TritonError(f"no Python backend stub for Python {ver.major}.{ver.minor}")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        if target.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    return target


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    # The stub, copied out of the wheel, finds libcudart & co. no longer by its RPATH; and
    # its libpython must be this interpreter's (Debian's 3.11.2 would load otherwise).
    libs = [str(sysconfig.get_config_var("LIBDIR") or ""), env.get("LD_LIBRARY_PATH", "")]
    if "AUTOGLM_TRITONSERVER" not in env:
        libs.insert(0, str(triton_root().parents[1] / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env.update(extra or {})
    return env


@dataclass
class TritonServer:
    """One tritonserver process serving ``models`` (name → version) from ``repository``."""

    repository: Path
    models: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None  # None: to our stdout
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    extra_args: list[str] = field(default_factory=list)
    load_timeout: float = 120.0  # a stub that cannot start makes a load hang, not fail
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    _shm: str = field(default="", init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 120.0) -> TritonServer:
        t0 = time.monotonic()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self._shm = f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}_"
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory()}",
            "--model-control-mode=explicit",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
            # 2 is the shortest timeout that still exits cleanly (measured)
            "--disable-auto-complete-config", "--exit-timeout-secs=2",
            f"--backend-config=python,shm-region-prefix-name={self._shm}",
            *self.extra_args,
        ]
        # no log file: tritonserver writes to our stdout (a pod's log)
        self._log = self.log_path.open("ab") if self.log_path else None
        self.popen = spawn(cmd, self._log, server_env(self.env))
        try:
            deadline = time.monotonic() + timeout
            self._wait("/v2/health/live", deadline)
            for model, version in self.models.items():
                self.load(model, version)
            for model, version in self.models.items():
                self._wait(f"/v2/models/{model}/versions/{version}/ready", deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def load(self, model: str, version: int) -> None:
        """Load ``model`` at exactly ``version`` (its pinned configuration as override)."""
        config = json.dumps(pinned_config(self.repository, model, version))
        body = json.dumps({"parameters": {"config": config}}).encode()
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/load", data=body,
            method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.load_timeout):
                pass
        except urllib.error.HTTPError as e:
            raise TritonError(f"loading {model} v{version}: {e.read().decode(errors='replace')}"
                              f"\n{self.log_tail()}") from None

    def _wait(self, path: str, deadline: float) -> None:
        url = f"http://{self.http_url}{path}"
        while True:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise TritonError(f"tritonserver exited with {self.popen.returncode}:\n"
                                  f"{self.log_tail()}")
            if http_ok(url, timeout=2):
                return
            if time.monotonic() > deadline:
                raise TritonError(f"timed out waiting for {url}\n{self.log_tail()}")
            time.sleep(0.1)

    def unload_all(self) -> None:
        """Unload every model: a later SIGTERM then exits at once and cleanly."""
        for model in self.models:
            req = urllib.request.Request(
                f"http://{self.http_url}/v2/repository/models/{model}/unload", data=b"{}",
                method="POST", headers={"Content-Type": "application/json"})
            with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=5):
                pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and sig == signal.SIGTERM and self.popen.poll() is None:
            self.unload_all()
        if self.popen is not None:
            terminate(self.popen, sig)  # the Python backend's stubs are in its group too
            self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for f in self.shm_regions():
            with contextlib.suppress(OSError):
                os.unlink(f)

    def shm_regions(self) -> list[str]:
        """This server's Python-backend shared-memory regions in /dev/shm."""
        return glob.glob(f"/dev/shm/{self._shm}*") if self._shm else []

    def kill(self) -> None:
        """As a crash would."""
        self.stop(signal.SIGKILL)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its Python-backend stub processes."""
        return group_rss_bytes(self.popen.pid) if self.popen is not None else 0

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def serve(repository: Path, model: str, version: int, extra_args: list[str]) -> int:
    """A pod's main process: tritonserver on 8000/8001/8002 serving exactly ``model`` at
    ``version``; SIGTERM unloads and stops it. Returns tritonserver's exit status."""
    from autoglm.plan import TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT

    server = TritonServer(repository, {model: version}, http_port=TRITON_HTTP_PORT,
                          grpc_port=TRITON_GRPC_PORT, metrics_port=TRITON_METRICS_PORT,
                          extra_args=extra_args, log_path=None)
    stopping = False

    def on_term(*_: object) -> None:
        # Only signal here: the main thread below waits for the exit and cleans up.
        nonlocal stopping
        stopping = True
        if server.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.popen.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        server.start(timeout=float(os.environ.get("AUTOGLM_LOAD_TIMEOUT_SECONDS", "600")))
        code = server.popen.wait() if server.popen is not None else 0
    finally:
        server.stop()  # the Python backend's stubs and /dev/shm regions
    return 0 if stopping else code
