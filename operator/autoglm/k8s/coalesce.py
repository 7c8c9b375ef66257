"""Fold bursts of work for one key into as few runs as keep the result current."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Coalescer:
    """Runs ``fn`` for a key at most once at a time. Calls that arrive while it runs fold
    into one more run after it, so the last call is always followed by a complete run.
    That run is the running call's ``fn``: calls with one key must mean the same work.

    A resource's child Deployments change in bursts (six of them, each through several
    status updates while pods come up); without this, each change re-reads the resource
    and its Deployments and holds one of the operator's few workers.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._again: dict[str, bool] = {}  # key -> a call came in during the current run

    def __call__(self, key: str, fn: Callable[[], object]) -> bool:
        """Run ``fn`` (returns True), or leave it to the run under way (returns False)."""
        with self._guard:
            if key in self._again:
                self._again[key] = True
                return False
            self._again[key] = False
        try:
            while True:
                fn()
                with self._guard:
                    if not self._again[key]:
                        del self._again[key]
                        return True
                    self._again[key] = False
        except BaseException:
            with self._guard:
                self._again.pop(key, None)
            raise
