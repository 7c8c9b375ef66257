"""`autoglm up` end to end: real Triton servers, a real Prometheus, the gateway."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from autoglm.repository import load_reference
from autoglm.testing import eventually
from autoglm.testing.up import UpProcess as Up
from autoglm.testing.up import port_open

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("home")
    file = home / "tiny.yaml"
    shutil.copy(ROOT / "examples" / "tiny.yaml", file)
    with Up.serving(file, home) as u:  # and a clean stop: exit 0, nothing left
        assert u.said("serving tiny")
        yield u


def test_thousand_requests_through_the_gateway(up: Up) -> None:
    # the tiny example packs its 4 experts on 2 servers (perServer: 2)
    assert up.said("4 experts on 2 expert server(s) of up to 2 experts")
    assert up.said("expert server 1/2 (experts 0,2) ready")
    ref = load_reference(up.home / "models" / "tiny", 1)
    rng = np.random.default_rng(0)
    work = [rng.integers(0, ref.cfg.vocab_size, (int(rng.integers(1, 3)),
                                                 int(rng.integers(1, 9)))).astype(np.int64)
            for _ in range(1000)]
    failures: list[str] = []
    results: dict[int, tuple[np.ndarray, int]] = {}  # type: ignore[type-arg]

    def client(k: int) -> None:
        with httpclient.InferenceServerClient(f"127.0.0.1:{up.port}") as c:  # keep-alive
            for i in range(k, len(work), 4):
                inp = httpclient.InferInput("INPUT_IDS", list(work[i].shape), "INT64")
                inp.set_data_from_numpy(work[i])
                try:
                    r = c.infer("router", [inp])
                    results[i] = (r.as_numpy("LOGITS"), int(r.as_numpy("MODEL_VERSION")[0]))
                except Exception as e:
                    failures.append(f"{i}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and len(results) == 1000
    for i, ids in enumerate(work):
        logits, version = results[i]
        assert version == 1
        np.testing.assert_allclose(logits, ref(torch.from_numpy(ids)).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_plain_json_infer_through_the_gateway(up: Up) -> None:
    """What the README shows with curl: KServe v2 JSON, no client library."""
    body = json.dumps({"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [1, 4],
                                   "data": [1, 2, 3, 4]}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{up.port}/v2/models/router/infer",
                                 data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    assert out["MODEL_VERSION"]["data"] == [1]
    assert out["LOGITS"]["shape"] == [1, 4, 256]


def test_grpc_client_through_the_gateway(up: Up) -> None:
    """Stock tritonclient.grpc on the gateway's gRPC port: the same answer as over HTTP."""
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{up.grpc_port}") as c:
        assert c.is_server_ready() and c.is_model_ready("router")
        inp = grpcclient.InferInput("INPUT_IDS", [1, 4], "INT64")
        inp.set_data_from_numpy(ids)
        via_grpc = c.infer("router", [inp])
    with httpclient.InferenceServerClient(f"127.0.0.1:{up.port}") as h:
        hinp = httpclient.InferInput("INPUT_IDS", [1, 4], "INT64")
        hinp.set_data_from_numpy(ids)
        via_http = h.infer("router", [hinp])
    assert via_grpc.as_numpy("MODEL_VERSION")[0] == 1
    np.testing.assert_array_equal(via_grpc.as_numpy("LOGITS"), via_http.as_numpy("LOGITS"))


def test_prometheus_scrapes_router_experts_and_gateway(up: Up) -> None:
    def up_targets() -> list[dict[str, object]] | None:
        q = urllib.parse.urlencode({"query": 'up{job="autoglm"} == 1'})
        with urllib.request.urlopen(
                f"http://127.0.0.1:{up.prometheus_port}/api/v1/query?{q}") as r:
            res = json.loads(r.read())["data"]["result"]
        # router, 2 expert servers of 2 experts (more once the autoscaler adds replicas),
        # gateway
        kinds = collections.Counter(str(t["metric"]["component"]) for t in res)
        return res if kinds["router"] == 1 and kinds["expert"] >= 2 and kinds["gateway"] == 1 \
            else None

    eventually(up_targets, "Prometheus to scrape every target", timeout=30)
    q = urllib.parse.urlencode({"query": "sum(autoglm_gateway_requests_total)"})
    with urllib.request.urlopen(f"http://127.0.0.1:{up.prometheus_port}/api/v1/query?{q}") as r:
        assert json.loads(r.read())["data"]["result"], "gateway metrics scraped"


def test_status_shows_slots_versions_replicas(up: Up) -> None:
    out = subprocess.run([sys.executable, "-m", "autoglm.cli", "status", f"--home={up.home}"],
                         capture_output=True, text=True, check=True).stdout
    assert "serving v1 from slot a (spec asks v1); swap Idle" in out
    assert f"(gRPC 127.0.0.1:{up.grpc_port})" in out
    assert re.search(r"expert 3: \d replica\(s\)", out), out  # the autoscaler decides
    assert re.search(r"expert server 1: experts 0,2 \(gRPC 127\.0\.0\.1:\d+\)", out), out


def test_invalid_change_is_reported_and_changes_nothing(up: Up) -> None:
    good = up.file.read_text()
    up.file.write_text(good.replace("topK: 2", "topK: 9"))
    eventually(lambda: up.said("not applied, still serving as before")
               and up.said("spec.model.topK"), "the invalid change to be reported")
    with httpclient.InferenceServerClient(f"127.0.0.1:{up.port}") as c:
        inp = httpclient.InferInput("INPUT_IDS", [1, 3], "INT64")
        inp.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
        assert c.infer("router", [inp]).as_numpy("MODEL_VERSION")[0] == 1
    up.file.write_text(good)
    eventually(lambda: up.said("applied the change"), "the good file to be applied")


@pytest.mark.parametrize(("content", "message"), [
    ("kind: AutoGLMDeployment\nmetadata: {name: x\nspec: [", "not valid YAML"),
    ((ROOT / "examples" / "tiny.yaml").read_text().replace("topK: 2", "topK: 7"),
     "spec.model.topK: model.topK must not exceed model.numExperts"),
])
def test_bad_files_give_a_clear_error_and_start_nothing(tmp_path: Path, content: str,
                                                        message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    u = Up.start(bad, tmp_path / "home")
    assert u.wait(timeout=60) == 2
    assert u.said(message), u.text
    assert not (tmp_path / "home" / "run").exists(), "nothing was started"
    assert not port_open(u.port)
