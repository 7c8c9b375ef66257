"""A router pod's preStop hook: wait until its generations end.

Run in the router container (``python -m autoglm.k8s.drain --timeout=S --url=...``; the
router pod template names it, k8s/builders.py). A terminating pod leaves its Service's
endpoints (and the gateway's list of replicas) while the hook runs, and its container is
sent SIGTERM only once the hook returns, within ``terminationGracePeriodSeconds``. The hook
gives requests sent before that a moment to arrive (``--settle``), then reads the router's
own metrics (Triton's, on the pod) until no sequence runs or waits for the KV cache, twice
in a row, for at most ``--timeout`` seconds in all. A router whose metrics do not answer
several times in a row has nothing left to finish.

Only the standard library and the gateway's metrics reader: it starts in a fraction of a
second.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence

SETTLE_SECONDS = 3.0  # for requests routed to the pod before it left the endpoints
POLL_SECONDS = 0.5
FAILURES = 3  # unanswered reads in a row: the server is gone


def busy(url: str, timeout: float = 2.0) -> float | None:
    """Sequences running or waiting on the router whose metrics are at ``url``; None when
    they do not answer."""
    from autoglm.gateway.balance import engine_load

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            load = engine_load(r.read().decode())
    except (OSError, ValueError):
        return None
    return None if load is None else float(load.busy)


def wait_drained(url: str, timeout: float, settle: float = SETTLE_SECONDS,
                 poll: float = POLL_SECONDS, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str]:
    """Whether the router went idle within ``timeout`` seconds, and what was seen."""
    deadline = clock() + timeout
    sleep(max(0.0, min(settle, timeout)))
    idle = failed = 0
    last: float | None = None
    while True:
        n = busy(url)
        failed = failed + 1 if n is None else 0
        idle = idle + 1 if n == 0 else 0
        last = n if n is not None else last
        if idle >= 2:
            return True, "no generation running or waiting"
        if failed >= FAILURES:
            return True, f"metrics at {url} do not answer: nothing left to finish"
        if clock() + poll > deadline:
            left = "some" if last is None else f"{last:g}"
            return False, f"{left} generations still running or waiting after {timeout:g} s"
        sleep(poll)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoglm.k8s.drain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, required=True,
                        help="seconds to wait at most (within the pod's grace period)")
    parser.add_argument("--url", required=True, help="the router's metrics")
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS)
    args = parser.parse_args(argv)
    drained, what = wait_drained(args.url, args.timeout, args.settle)
    # a failed hook's output is in the pod's FailedPreStopHook event; it never fails here
    print(f"drain: {what}", file=sys.stdout if drained else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
