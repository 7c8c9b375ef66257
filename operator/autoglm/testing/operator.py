"""The operator as a real process, under the identity the manifests give it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from autoglm.procs import free_port, group_rss_bytes, http_ok, spawn, terminate
from autoglm.testing import eventually, metric_value
from autoglm.testing.controlplane import ControlPlane, ControlPlaneError

REPO_ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "autoglm-system"
SERVICE_ACCOUNT = "autoglm-operator"


def install(cp: ControlPlane) -> None:
    """``kubectl apply -k manifests/`` and wait for the CRD to be served."""
    cp.kubectl("apply", "-k", str(REPO_ROOT / "manifests"))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/autoglmdeployments.autoglm.io")


def service_account_kubeconfig(cp: ControlPlane, path: Path) -> Path:
    """A kubeconfig holding a token of the operator's own ServiceAccount."""
    token = cp.kubectl("create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE,
                       "--duration=2h").stdout.strip()
    return cp.write_kubeconfig(path, token, f"system:serviceaccount:{NAMESPACE}:"
                                            f"{SERVICE_ACCOUNT}")


class OperatorProcess:
    """``autoglm operator`` in a subprocess; logs go to ``log_path``."""

    def __init__(self, kubeconfig: Path, log_path: Path, resync_seconds: float = 3.0,
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.env = env or {}
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0

    def start(self, timeout: float = 60.0) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ, AUTOGLM_METRICS_PORT=str(self.metrics_port),
                   KUBECONFIG=str(self.kubeconfig),
                   AUTOGLM_RESYNC_SECONDS=str(self.resync_seconds),
                   AUTOGLM_DISCOVERY_SECONDS=str(self.resync_seconds),
                   PYTHONFAULTHANDLER="1", **self.env)  # a crash's stack in the log
        with self.log_path.open("ab") as log:
            self.popen = spawn([sys.executable, "-m", "autoglm.cli", "operator",
                                f"--liveness=http://127.0.0.1:{self.port}/healthz"], log, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ControlPlaneError(f"operator exited with {self.popen.returncode}:\n"
                                        f"{self.log_tail()}")
            if http_ok(f"http://127.0.0.1:{self.port}/healthz"):
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"operator not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.popen is not None:
            terminate(self.popen, sig, timeout)
            self.popen = None

    def kill(self) -> None:
        """As a crash would: SIGKILL, no cleanup."""
        self.stop(signal.SIGKILL)

    def reconciles(self, namespace: str, name: str, trigger: str) -> int:
        """How often this process has reconciled the resource for ``trigger`` (its
        ``autoglm_reconciles_total``; 0 before the first, or when it is not serving)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0
        return int(metric_value(text, "autoglm_reconciles_total",
                                {"namespace": namespace, "deployment": name,
                                 "trigger": trigger}) or 0)

    def wait_reconciled(self, namespace: str, name: str, triggers: tuple[str, ...],
                        timeout: float = 60) -> None:
        """Until this process has reconciled the resource once more for each of ``triggers``
        (e.g. "resync", its periodic full pass, and "tick", a swap's clock): evidence that
        each of those loops has looked at the resource as it is now and acted, or chose not
        to."""
        start = {t: self.reconciles(namespace, name, t) for t in triggers}

        def done() -> bool:
            now = {t: self.reconciles(namespace, name, t) for t in triggers}
            if all(now[t] > n for t, n in start.items()):
                return True
            raise AssertionError(f"reconciles by trigger: {now}, from {start}")

        eventually(done, f"the operator to reconcile {namespace}/{name} for "
                         f"{', '.join(triggers)}", timeout)

    def rss_bytes(self) -> int:
        return group_rss_bytes(self.popen.pid) if self.popen is not None else 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running_operator(cp: ControlPlane, workdir: Path, env: dict[str, str] | None = None,
                     ) -> Iterator[OperatorProcess]:
    """The manifests installed and the operator running as its ServiceAccount; its log's
    tail is printed when it stops (pytest shows it for a failed test)."""
    install(cp)
    op = OperatorProcess(service_account_kubeconfig(cp, workdir / "kubeconfig"),
                         workdir / "operator.log", env=env)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log_tail(80)}")
