"""Test and benchmark support: a real control plane, and waiting on conditions."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 60.0,
               interval: float = 0.2) -> T:
    """Poll ``probe`` until it returns something truthy; return it, or fail naming ``what``.

    Exceptions count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def metric_value(exposition: str, name: str, labels: Mapping[str, str]) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in a Prometheus text
    exposition, or None (label order in the text does not matter)."""
    from prometheus_client.parser import text_string_to_metric_families

    return next((s.value for f in text_string_to_metric_families(exposition)
                 for s in f.samples if s.name == name and s.labels == dict(labels)), None)
