"""Double-buffered swaps under load on the local runtime: not one request fails, and every
response comes from a version that was active while the request was in flight."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from autoglm.moe import PRESETS
from autoglm.repository import build
from autoglm.testing import eventually
from autoglm.testing.up import UpProcess as Run

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
FLIPPED = re.compile(r"Flipped: traffic now on slot (\w) \(version (\d+)\)")


@dataclass
class Result:
    sent: float
    done: float
    version: int | None  # None: failed
    error: str = ""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("home")
    file = home / "tiny.yaml"
    text = (ROOT / "examples" / "tiny.yaml").read_text()
    file.write_text(text.replace("keepPreviousSeconds: 300", "keepPreviousSeconds: 3600"))
    # version 3 is deliberately bad: expert 0 carries version 1's weights
    repo = home / "models" / "tiny"
    for v in (1, 2, 3):
        build(repo, "tiny-moe", v, PRESETS["tiny"])
    shutil.copy(repo / "expert_0" / "1" / "weights.pt", repo / "expert_0" / "3" / "weights.pt")
    r = Run.start(file, home)
    try:
        r.wait_serving()
        yield r
    finally:
        assert r.stop() == 0
        print("\n".join(r.text))


def traffic(port: int, stop: threading.Event, out: list[Result]) -> None:
    rng = np.random.default_rng(threading.get_ident() % 2**32)
    with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as c:  # one keep-alive conn
        while not stop.is_set():
            ids = rng.integers(0, 256, (1, 8)).astype(np.int64)
            inp = httpclient.InferInput("INPUT_IDS", [1, 8], "INT64")
            inp.set_data_from_numpy(ids)
            t0 = time.monotonic()
            try:
                v = int(c.infer("router", [inp]).as_numpy("MODEL_VERSION")[0])
                out.append(Result(t0, time.monotonic(), v))
            except Exception as e:
                out.append(Result(t0, time.monotonic(), None, str(e)))


def test_versions_flip_back_and_forth_under_load_without_a_failed_request(run: Run) -> None:
    results: list[Result] = []
    stop = threading.Event()
    clients = [threading.Thread(target=traffic, args=(run.port, stop, results))
               for _ in range(4)]
    for c in clients:
        c.start()
    text = run.file.read_text()

    to_flip: list[tuple[str, float]] = []  # (staged | warm, seconds from edit to flip)

    def ask(version: int, expect: str) -> None:
        nonlocal text
        before, backs, n = run.count(expect), run.count("FlipBack"), len(run.lines)
        text = re.sub(r"version: \d+", f"version: {version}", text, count=1)
        t_edit = time.monotonic()
        run.file.write_text(text)
        eventually(lambda: run.count(expect) > before, f"{expect!r} for version {version}",
                   timeout=180)
        if expect == "Flipped":
            t_flip = next(t for t, line in run.lines[n:] if "Flipped" in line)
            to_flip.append(("warm" if run.count("FlipBack") > backs else "staged",
                            t_flip - t_edit))
            eventually(lambda: run.count("Drained") >= run.count("Flipped"),
                       "the old slot to drain")

    try:
        time.sleep(3)  # steady state first
        steady_until = time.monotonic()
        for version in (2, 1, 2, 1):
            ask(version, "Flipped")
        ask(3, "RolloutFailed")
        for version in (2, 1, 2, 1, 2, 1):
            ask(version, "Flipped")
        # AUTOGLM_SWAP_REQUESTS=20000 keeps flipping until that many requests were served
        want = int(os.environ.get("AUTOGLM_SWAP_REQUESTS", "0"))
        version = 1
        while len(results) < want:
            version = 3 - version
            ask(version, "Flipped")
            time.sleep(1)
        time.sleep(2)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)

    flips = [(t, int(m.group(2))) for t, line in run.lines if (m := FLIPPED.search(line))]
    assert len(flips) >= 10
    failed = [r for r in results if r.version is None]
    assert not failed, f"{len(failed)} failed, e.g. {failed[0].error}"
    assert 3 not in {r.version for r in results}, "the bad version never took traffic"

    def active_at(t: float) -> int:
        return next((v for ft, v in reversed(flips) if ft <= t), 1)

    slack = 1.0  # the flip happens just before its log line reaches us
    for r in results:
        allowed = {active_at(r.sent)} | {v for ft, v in flips
                                         if r.sent <= ft <= r.done + slack}
        assert r.version in allowed, (r, allowed)

    lat = np.array([r.done - r.sent for r in results])
    near = np.array([any(abs(r.sent - ft) < 5 for ft, _ in flips) for r in results])
    steady = np.array([r.done < steady_until for r in results])
    print(f"\n{len(results)} requests, 0 failed, {len(flips)} flips + 1 aborted rollout; "
          f"p99 steady {np.percentile(lat[steady], 99) * 1e3:.1f} ms, "
          f"p99 within 5 s of a flip {np.percentile(lat[near], 99) * 1e3:.1f} ms, "
          f"p99 elsewhere {np.percentile(lat[~near], 99) * 1e3:.1f} ms")
    staged = [d for v, d in to_flip if v == "staged"]
    back = [d for v, d in to_flip if v == "warm"]
    print(f"version change -> flip: staged {np.mean(staged):.1f} s (n={len(staged)}), "
          f"back to the warm slot {np.mean(back) * 1e3:.0f} ms (n={len(back)}); "
          "canary pass -> flip: the same controller step")
