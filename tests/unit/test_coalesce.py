"""The Coalescer folds a burst of calls for one key into one more run."""

from __future__ import annotations

import threading

import pytest

from autoglm.k8s.coalesce import Coalescer


def test_calls_during_a_run_fold_into_one_more_run() -> None:
    c = Coalescer()
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow() -> None:
        runs.append("slow")
        started.set()
        release.wait(10)

    t = threading.Thread(target=c, args=("uid-1", slow))
    t.start()
    assert started.wait(10)
    # five changes while it runs: none runs now, one more run follows
    assert [c("uid-1", lambda: runs.append("burst")) for _ in range(5)] == [False] * 5
    # another key is not held up
    assert c("uid-2", lambda: runs.append("other")) is True
    release.set()
    t.join(10)
    assert runs == ["slow", "other", "slow"]  # the run after the burst is the running one's
    assert c("uid-1", lambda: runs.append("later")) is True  # idle again: runs at once
    assert runs[-1] == "later"


def test_a_failing_run_frees_the_key() -> None:
    c = Coalescer()

    def boom() -> None:
        raise RuntimeError("API down")

    with pytest.raises(RuntimeError):
        c("uid", boom)
    ran: list[int] = []
    assert c("uid", lambda: ran.append(1)) is True and ran == [1]
