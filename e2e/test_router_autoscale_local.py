"""Router replicas autoscaled in `autoglm up` (``spec.router.autoscaling``): real Triton
routers and expert servers, the runtime's own Prometheus, the stock OpenAI client streaming.

Under streaming load the routers' KV cache use is over its target: a second router replica
starts, joins the gateway's target and serves within seconds. With the load gone, after the
stabilization window, it leaves the target, drains and stops. Not one request fails and
not one stream breaks; the KV cache in use is back to none.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from autoglm.testing import eventually, metric_value
from autoglm.testing.up import UpProcess as Up

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
TOKENS = 48  # per stream
STREAMS = 6
STABILIZATION = 8


def config() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = "routers"
    # experts stay as they are; routers follow their KV cache: 6 streams of ~50 tokens in
    # 16k tokens of KV cache are ~2%, over a 1% target
    doc["spec"]["autoscaling"] = {"enabled": False, "prometheusUrl": "http://127.0.0.1:9090",
                                  "intervalSeconds": 2}
    doc["spec"]["router"] = {"replicas": 1, "drainSeconds": 30, "autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 2, "kvCacheUtilization": 0.01,
        "stabilizationSeconds": STABILIZATION}}
    return dict(doc)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("home")
    file = home / "routers.yaml"
    file.write_text(yaml.safe_dump(config()))
    with Up.serving(file, home) as u:
        yield u


def status(up: Up) -> dict[str, Any]:
    return dict(json.loads((up.home / "run" / "routers" / "status.json").read_text()))


def routers(up: Up) -> list[str]:
    st = status(up)
    return [f"http://{r['http']}" for r in st["slots"][st["active"]["slot"]]["routers"]]


def scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


class Streams:
    """``STREAMS`` clients, each streaming completions one after another until stopped;
    every stream must end with its ``TOKENS`` tokens and ``length``."""

    def __init__(self, port: int) -> None:
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key="unused", max_retries=0)
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(STREAMS)]

    def _run(self, k: int) -> None:
        while not self.stop.is_set():
            try:
                chunks = list(self.client.completions.create(
                    model="tiny-moe", prompt=f"Story {k}:", max_tokens=TOKENS,
                    temperature=0, stream=True, extra_body={"ignore_eos": True}))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices
                          and c.choices[0].finish_reason]
                if finish != ["length"]:
                    self.failures.append(f"stream {k} ended {finish}")
                self.done += 1
            except Exception as e:  # a failed request or a broken stream
                self.failures.append(f"stream {k}: {type(e).__name__}: {e}")

    def __enter__(self) -> Streams:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_routers_scale_up_under_streams_and_back_down_without_a_failure(up: Up) -> None:
    first = routers(up)
    assert len(first) == 1
    gateway = f"http://127.0.0.1:{up.port}/metrics"

    slot = status(up)["active"]["slot"]

    def sent(replica: str) -> float:
        return metric_value(scrape(gateway), "autoglm_gateway_replica_requests_total",
                            {"slot": slot, "replica": replica}) or 0.0

    with Streams(up.port) as load:
        two = eventually(lambda: r if len(r := routers(up)) == 2 else None,
                         "a second router replica", timeout=180)
        t0 = time.monotonic()
        new = next(r for r in two if r not in first)
        eventually(lambda: sent(new) > 0, "the new replica to get requests", timeout=30,
                   interval=0.1)
        print(f"\nthe new router replica got its first request {time.monotonic() - t0:.2f} s "
              "after it was listed")
        before = load.done
        eventually(lambda: load.done >= before + 2 * STREAMS, "streams on both replicas",
                   timeout=120)
        assert sent(first[0]) > 0 and sent(new) > 0
        assert not load.failures, load.failures
    served = load.done
    one = eventually(lambda: r if len(r := routers(up)) == 1 else None,
                     "back to one router replica", timeout=120)
    assert one == first  # the replica added is the one that left (out of the target first)
    eventually(lambda: up.said("routers: replica 2 stopped"), "the replica to stop",
               timeout=60)
    assert up.said("routers: replica 2 stopped (drained)"), up.text[-20:]
    assert not load.failures, load.failures
    st = status(up)
    metrics = st["slots"][st["active"]["slot"]]["routers"][0]["metrics"]
    used = metric_value(scrape(metrics), "autoglm_kv_cache_used_tokens",
                        {"version": str(st["active"]["version"])})
    assert used == 0, used
    print(f"{served} streams of {TOKENS} tokens, 0 failed; routers 1 -> 2 -> 1")

