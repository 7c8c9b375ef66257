"""Counters summed in the model's process and handed to Triton by a timer.

Each ``pb_utils`` metric update is a blocking message from the Python-backend stub to the
Triton process; counted per call (per expert, per layer, per step) they were a large share
of a decode step. Here an update is a dict addition, and a daemon thread hands the sums over
every ``AUTOGLM_METRICS_FLUSH_SECONDS`` (0.5).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from typing import Any


class Counters:
    """``add(key, value)`` now, ``metrics[key].increment(sum)`` at the next flush."""

    def __init__(self, metrics: dict[Any, Any]) -> None:
        self.metrics = metrics  # key → pb_utils Metric (the caller keeps its families)
        self.period = float(os.environ.get("AUTOGLM_METRICS_FLUSH_SECONDS", "0.5"))
        self._sums: dict[Hashable, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def add(self, key: Hashable, value: float) -> None:
        with self._lock:
            self._sums[key] = self._sums.get(key, 0.0) + value

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, {}
        for key, value in sums.items():
            self.metrics[key].increment(value)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
