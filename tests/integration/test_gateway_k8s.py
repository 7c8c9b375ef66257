"""The gateway on the real control plane: it follows the resource's routing state, under the
least-privilege identity the operator gives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import yaml
from kubernetes import client
from tritonclient.utils import InferenceServerException

from autoglm import plan as p
from autoglm.k8s import builders
from autoglm.k8s.api import Api
from autoglm.procs import dying_with_parent, free_port
from autoglm.spec import API_VERSION, KIND, parse
from autoglm.testing import eventually, metric_value
from autoglm.testing.controlplane import ControlPlane
from autoglm.testing.operator import REPO_ROOT, install

pytestmark = pytest.mark.k8s


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gateway_follows_the_active_slot(control_plane: ControlPlane, api: client.ApiClient,
                                         namespace: str, tmp_path: Path) -> None:
    install(control_plane)
    rest = Api(api)
    doc = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    created = rest.create(doc)
    spec = parse(doc["spec"], "tiny")
    owner = builders.owner_reference("tiny", created["metadata"]["uid"])
    for obj in builders.gateway_objects("tiny", namespace, owner, spec)[:3]:  # SA, Role, RB
        rest.create(obj)

    def set_active(slot: str, version: int) -> None:
        rest.patch(API_VERSION, KIND, namespace, "tiny",
                   {"status": {"activeSlot": slot, "activeVersion": version}},
                   subresource="status")

    set_active("a", 1)
    token = control_plane.kubectl("create", "token", "tiny-gateway", "-n", namespace
                                  ).stdout.strip()
    kc = control_plane.write_kubeconfig(tmp_path / "gw.kubeconfig", token, "gateway")
    port, metrics, grpc_port = free_port(), free_port(), free_port()
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        **dying_with_parent([sys.executable, "-m", "autoglm.cli", "gateway", "--deployment=tiny",
                             f"--namespace={namespace}", f"--port={port}",
                             f"--metrics-port={metrics}", f"--grpc-port={grpc_port}",
                             "--host=127.0.0.1"]),
        env=dict(os.environ, KUBECONFIG=str(kc)), stdout=log, stderr=subprocess.STDOUT)
    try:
        def routing() -> dict[str, Any] | None:
            status, body = get(f"http://127.0.0.1:{port}/routing")
            return json.loads(body) if status == 200 else None

        service_a = f"http://tiny-a-router.{namespace}.svc:{p.TRITON_HTTP_PORT}"
        r = eventually(lambda: (x := routing()) and x["slot"] == "a" and x, "slot a")
        assert r == {"slot": "a", "version": 1, "url": service_a, "replicas": [service_a]}
        t0 = time.monotonic()
        set_active("b", 2)
        eventually(lambda: (routing() or {}).get("slot") == "b", "the flip to slot b",
                   interval=0.02)
        print(f"gateway followed the flip in {time.monotonic() - t0:.3f} s")
        assert (routing() or {})["version"] == 2
        # the router's name does not resolve here: a clear 502, after one retry
        status, body = get(f"http://127.0.0.1:{port}/v2/models/router")
        assert status == 502 and b"slot b unreachable" in body
        # the same over gRPC, to the router Service's gRPC port: UNAVAILABLE, one retry
        router_grpc = f"tiny-b-router.{namespace}.svc:{p.TRITON_GRPC_PORT}"
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as c, \
                pytest.raises(InferenceServerException) as e:
            c.is_model_ready("router")
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        assert f"slot b ({router_grpc}) unavailable, tried twice" in str(e.value.message())
        status, body = get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200
        text = body.decode()
        b2 = {"slot": "b", "version": "2"}
        assert metric_value(text, "autoglm_gateway_requests_total", {**b2, "code": "502"}) == 1
        assert metric_value(text, "autoglm_gateway_requests_total", {**b2, "code": "503"}) == 1
        assert metric_value(text, "autoglm_gateway_retries_total", {"slot": "b"}) == 2

        # The router pods, as the Service's EndpointSlice lists them: the gateway spreads
        # over the ready ones itself. One ready pod at a time, and no request: nothing may
        # be sent to these addresses, as no node here serves them (two ready pods would
        # have their load read).
        def endpoint(ip: str, ready: bool, terminating: bool = False) -> dict[str, Any]:
            return {"addresses": [ip], "conditions": {"ready": ready, "serving": ready,
                                                      "terminating": terminating}}

        rest.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "tiny-b-router-x", "namespace": namespace,
                                  "labels": {"kubernetes.io/service-name": "tiny-b-router"}},
                     "addressType": "IPv4",
                     "ports": [{"name": "http", "port": p.TRITON_HTTP_PORT}],
                     "endpoints": [endpoint("198.18.9.2", True),
                                   endpoint("198.18.9.3", False),
                                   endpoint("198.18.9.4", False, terminating=True)]})
        pod = [f"http://198.18.9.2:{p.TRITON_HTTP_PORT}"]
        eventually(lambda: (routing() or {}).get("replicas") == pod,
                   "the gateway to list the ready router pod")
        # that pod terminates (a router scaled down drains), another is ready
        rest.patch("discovery.k8s.io/v1", "EndpointSlice", namespace, "tiny-b-router-x",
                   {"endpoints": [endpoint("198.18.9.2", False, terminating=True),
                                  endpoint("198.18.9.3", True)]})
        eventually(lambda: (routing() or {}).get("replicas") ==
                   [f"http://198.18.9.3:{p.TRITON_HTTP_PORT}"],
                   "the terminating pod to get no more requests")
        # slot a's slices are not slot b's: the active slot's replicas stay
        rest.patch(API_VERSION, KIND, namespace, "tiny",
                   {"status": {"activeSlot": "b", "activeVersion": 3}}, subresource="status")
        eventually(lambda: (routing() or {}).get("version") == 3, "version 3")
        assert (routing() or {})["replicas"] == [f"http://198.18.9.3:{p.TRITON_HTTP_PORT}"]
        rest.delete("discovery.k8s.io/v1", "EndpointSlice", namespace, "tiny-b-router-x")
        eventually(lambda: (routing() or {}).get("replicas") ==
                   [f"http://tiny-b-router.{namespace}.svc:{p.TRITON_HTTP_PORT}"],
                   "back to the Service once no pod is listed")
        # its Role grants reading this resource only
        sa = f"system:serviceaccount:{namespace}:tiny-gateway"
        for verb, what, allowed in (("get", "autoglmdeployments/tiny", "yes"),
                                    ("get", "autoglmdeployments/other", "no"),
                                    ("patch", "autoglmdeployments/tiny", "no"),
                                    ("list", "secrets", "no")):
            out = control_plane.kubectl("auth", "can-i", "--as", sa, "-n", namespace, verb,
                                        what, check=False).stdout.strip()
            assert out == allowed, (verb, what)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.close()
