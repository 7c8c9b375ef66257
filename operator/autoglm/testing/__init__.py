"""Test and benchmark support: a real control plane, and waiting on conditions."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, TypeVar

T = TypeVar("T")
# The one way to skip the node and image tests (e.g. a machine without root), and only
# outside CI: said in the skip reason, which pytest prints (-ra).
SKIP_NODE = "AUTOGLM_SKIP_NODE_TESTS"


def unavailable(part: str, why: str) -> NoReturn:
    """A part the node or image tests need cannot run here: they fail with the reason, or
    skip when the user opted out with ``AUTOGLM_SKIP_NODE_TESTS=1`` (never under CI)."""
    import pytest

    if os.environ.get(SKIP_NODE) == "1" and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"{part} unavailable: {why} (skipped: {SKIP_NODE}=1)")
    pytest.fail(f"{part} unavailable: {why} (to skip these tests outside CI: "
                f"{SKIP_NODE}=1)", pytrace=False)


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
