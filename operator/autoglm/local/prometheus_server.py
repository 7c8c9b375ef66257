"""A real Prometheus for the local runtime, scraping every server it is told about."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import yaml

from autoglm.procs import http_ok, spawn, terminate


def prometheus_binary() -> Path:
    """``$AUTOGLM_PROMETHEUS``, ``prometheus`` on PATH, or the copy .ci/prometheus.sh
    unpacked from Debian's package."""
    cache = Path(os.environ.get("AUTOGLM_CACHE", Path.home() / ".cache" / "autoglm"))
    for candidate in (os.environ.get("AUTOGLM_PROMETHEUS"), shutil.which("prometheus"),
                      str(cache / "prometheus" / "usr" / "bin" / "prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise FileNotFoundError("Prometheus not found: run `bash .ci/prometheus.sh` (make run and "
                            "make test do) or install Debian's `prometheus` package")


class PrometheusServer:
    def __init__(self, workdir: Path, port: int, scrape_interval: str = "1s",
                 host: str = "127.0.0.1", rule_files: Sequence[Path] = ()) -> None:
        self.workdir, self.port, self.interval, self.host = workdir, port, scrape_interval, host
        self.rule_files = list(rule_files)  # evaluated every scrape interval
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def targets_file(self) -> Path:
        return self.workdir / "prometheus-targets.json"

    def set_targets(self, groups: Sequence[tuple[Mapping[str, str], Sequence[str]]]) -> None:
        """Scrape targets, each group ``(labels, ["host:port", ...])`` (file-based
        discovery: re-read within a second). The labels are the metrics contract's target
        labels (deployment, component, slot, version)."""
        sd = [{"targets": list(targets), "labels": dict(labels)}
              for labels, targets in groups if targets]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sd))
        os.replace(tmp, self.targets_file)

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_targets([])
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            # honor_labels: a series' own labels win over the target's (Triton's ``version``
            # label is the model version, as the target's)
            "scrape_configs": [{"job_name": "autoglm", "honor_labels": True, "file_sd_configs": [
                {"files": [str(self.targets_file)], "refresh_interval": "1s"}]}],
            "rule_files": [str(f) for f in self.rule_files],
        }))
        self._log = (self.workdir / "prometheus.log").open("ab")
        self.popen = spawn(
            [str(binary), f"--config.file={config}",
             f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
             f"--web.listen-address={self.host}:{self.port}", "--log.level=warn"], self._log)
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.popen.returncode}; see "
                                   f"{self.workdir / 'prometheus.log'}")
            if http_ok(f"{self.url}/-/ready"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus not ready after {timeout:.0f}s")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def stop(self) -> None:
        if self.popen is not None:
            terminate(self.popen)
            self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None
