"""Running real Triton servers: the ``tritonserver`` of the nvidia-pytriton wheel, CPU,
Python backend, each server loading exactly the models and versions it is told.

Facts this relies on (DESIGN.md §7): the Python 3.11 stub goes in a backend folder of our
own; the virtualenv's ``bin`` first on PATH makes the stub use the virtualenv's packages;
``--disable-auto-complete-config`` halves start-up; a short ``--exit-timeout-secs`` keeps a
keep-alive client from delaying shutdown. Each server gets its own shared-memory prefix so
that stopping it can remove exactly its ``/dev/shm`` regions; a ``shm_group`` (one per
``autoglm up``) starts the prefixes of every server of a group, so that what a killed group
left can be found and removed (:func:`shm_group_regions`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
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
from typing import IO, Any

from autoglm.plan import INSTANCE_KIND_ENV
from autoglm.procs import free_port, group_rss_bytes, http_ok, spawn, terminate
from autoglm.repository import pinned_config

SHM_PREFIX = "triton_python_backend_shm_region_autoglm_"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
TERMINATION_LOG = Path("/dev/termination-log")


def shm_prefix(group: str = "") -> str:
    """A new server's shared-memory prefix: ``<SHM_PREFIX><12 hex>_``, or in a group
    ``<SHM_PREFIX><group>-<8 hex>_`` (a group of hex digits: no ungrouped prefix starts with
    a group's)."""
    own = uuid.uuid4().hex
    return f"{SHM_PREFIX}{group}-{own[:8]}_" if group else f"{SHM_PREFIX}{own[:12]}_"


def shm_group_marker(group: str) -> str:
    """What the shared-memory regions of a group's servers start with, and what the command
    lines of its servers and their Python-backend stubs contain."""
    return f"{SHM_PREFIX}{group}-"


def shm_group_regions(group: str) -> list[Path]:
    """The ``/dev/shm`` regions of every server of ``group``."""
    return sorted(Path("/dev/shm").glob(f"{shm_group_marker(group)}*")) if group else []


class TritonError(RuntimeError):
    """A server that did not start or a model that did not load. ``summary`` says why in one
    line (e.g. ``expert_0 v2: version 2 has 3 routed experts but spec.model.numExperts is
    4``); the message adds the server's log tail."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or one_line(message)


def one_line(text: str, limit: int = 400) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[:limit - 3] + "..."


def load_error(body: str) -> str:
    """Triton's answer to a failed load, in one line: the model's own error (a Python
    backend's exception message without its class name when it is ours, e.g. a
    CheckpointError), else Triton's message, without the Python traceback."""
    try:
        msg = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        msg = body
    msg = msg.split("\n\nAt:", 1)[0]  # the Python backend appends the traceback
    # "load failed for model 'x': version 2 is at UNAVAILABLE state: Internal: <error>"
    # (or "... state: Invalid argument: <error>")
    m = re.search(r"state: [A-Za-z][A-Za-z ]*?: (.*)", msg, re.S)
    if m:
        msg = m.group(1)
    msg = re.sub(r"^(CheckpointError|UnsupportedConfig): ", "", msg.strip())
    return " ".join(msg.split()).rstrip(";").strip() or "load failed"


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
    shm_group: str = ""  # starts the server's shared-memory prefix ("": none)
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
        self._shm = shm_prefix(self.shm_group)
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

    @property
    def instance_kind(self) -> str | None:
        """``AUTOGLM_INSTANCE_KIND`` of the server's environment (ours, then ``env``):
        the instance_group kind models load with; None keeps the stored one."""
        kind = {**os.environ, **self.env}.get(INSTANCE_KIND_ENV) or None
        if kind is not None and kind not in INSTANCE_KINDS:
            raise TritonError(f"{INSTANCE_KIND_ENV}={kind}: expected one of "
                              f"{', '.join(INSTANCE_KINDS)}")
        return kind

    def load_config(self, model: str, version: int) -> dict[str, Any]:
        """The configuration ``model`` loads with: version ``version``'s pinned one, its
        instance groups of :attr:`instance_kind` when that is set."""
        try:
            config = pinned_config(self.repository, model, version)
        except OSError:
            raise TritonError(f"{model} v{version}: not in the model repository "
                              f"{self.repository}") from None
        return with_instance_kind(config, self.instance_kind)

    def load(self, model: str, version: int) -> None:
        """Load ``model`` at exactly ``version`` (its pinned configuration as override)."""
        config = json.dumps(self.load_config(model, version))
        body = json.dumps({"parameters": {"config": config}}).encode()
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/load", data=body,
            method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.load_timeout):
                pass
        except urllib.error.HTTPError as e:
            answer = e.read().decode(errors="replace")
            raise TritonError(f"loading {model} v{version}: {answer}\n{self.log_tail()}",
                              f"{model} v{version}: {load_error(answer)}") from None

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


def with_instance_kind(config: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """``config`` with every instance group of ``kind`` (None: unchanged)."""
    if kind is None:
        return config
    groups = config.get("instance_group") or [{"count": 1}]
    return {**config, "instance_group": [{**g, "kind": kind} for g in groups]}


def write_termination_message(message: str, path: Path = TERMINATION_LOG) -> bool:
    """Why the container ends, where Kubernetes reads it (the container's
    ``lastState.terminated.message``): only a file the kubelet provides is written."""
    if not (path.is_file() or path.is_char_device()) or not os.access(path, os.W_OK):
        return False
    try:
        with path.open("w") as f:
            f.write(message + "\n")
    except OSError:
        return False
    return True


def serve(repository: Path, model: str, version: int, extra_args: list[str],
          termination_log: Path = TERMINATION_LOG) -> int:
    """A pod's main process: tritonserver on 8000/8001/8002 serving exactly ``model`` at
    ``version``; SIGTERM unloads and stops it. Returns tritonserver's exit status. A server
    that does not come up (the version failed to load: a spec that disagrees with it, a
    broken checkpoint) says why in one line on stderr and in ``termination_log``, and
    returns 1."""
    from autoglm.plan import TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT, router_model
    from autoglm.repository import router_server_models

    models = router_server_models(repository, version) if model == router_model() \
        else {model: version}
    server = TritonServer(repository, models, http_port=TRITON_HTTP_PORT,
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
        try:
            server.start(timeout=float(os.environ.get("AUTOGLM_LOAD_TIMEOUT_SECONDS", "600")))
        except TritonError as e:
            if stopping:
                return 0
            print(e, file=sys.stderr, flush=True)  # the whole story, for the pod's log
            print(f"error: {e.summary}", file=sys.stderr, flush=True)
            write_termination_message(e.summary, termination_log)
            return 1
        code = server.popen.wait() if server.popen is not None else 0
    finally:
        server.stop()  # the Python backend's stubs and /dev/shm regions
    return 0 if stopping else code
