"""bench/operator: how fast the operator provisions, and what it costs in memory.

On the real control plane (kwok pods), with the operator running as its ServiceAccount:
for 1 and for 100 AutoGLMDeployments (examples/tiny.yaml), the time from `kubectl apply` to
every child object created, and to every resource Ready; and the operator's RSS.

Baseline, measured in the same run: `kubectl apply` of exactly the same child objects,
pre-rendered by the builders (no operator), until their Deployments are available. The
ratio operator/baseline is the operator's overhead over the API work it cannot avoid.

    make bench      (or: AUTOGLM_K8S_ASSETS=... .venv/bin/python bench/operator/bench_operator.py)
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config

from autoglm import plan as p
from autoglm.k8s import builders
from autoglm.k8s.api import Api
from autoglm.spec import API_VERSION, KIND, parse
from autoglm.testing.controlplane import ControlPlane, provision_assets
from autoglm.testing.operator import (
    REPO_ROOT,
    OperatorProcess,
    install,
    service_account_kubeconfig,
)

TINY = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
CAPACITY = {"cpu": "1000", "memory": "4Ti", "pods": "1000", "nvidia.com/gpu": "8"}
CHILDREN_PER_RESOURCE = 15  # 6 Deployments, 6 Services, SA, Role, RoleBinding


def resources(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        r = copy.deepcopy(TINY)
        r["metadata"]["name"] = f"m{i}"
        out.append(r)
    return out


def rendered_children(namespace: str, n: int) -> list[dict[str, Any]]:
    objs = []
    for r in resources(n):
        name = r["metadata"]["name"]
        spec = parse(r["spec"], name)
        for o in builders.desired_objects(name, namespace, "none", spec,
                                          p.plan(name, spec, p.RoutingState()), False):
            del o["metadata"]["ownerReferences"]
            objs.append(o)
    return objs


def wait(what: str, probe: Any, timeout: float = 900) -> float:
    """Poll twice a second: often enough to resolve seconds, light on the 2 shared cores."""
    t0 = time.monotonic()
    while not probe():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)
    return time.monotonic()


def available(api: Api, ns: str, want: int) -> bool:
    ds = api.list("apps/v1", "Deployment", ns)
    return len(ds) == want and all(
        d.get("status", {}).get("availableReplicas", 0) >= d["spec"]["replicas"] for d in ds)


def baseline(cp: ControlPlane, api: Api, n: int) -> tuple[float, float]:
    """The same children applied directly: (created, available) seconds."""
    ns = f"base-{n}"
    cp.kubectl("create", "namespace", ns)
    docs = {"apiVersion": "v1", "kind": "List", "items": rendered_children(ns, n)}
    t0 = time.monotonic()
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(docs))
    t_created = time.monotonic()
    t_ready = wait("baseline Deployments", lambda: available(api, ns, 6 * n))
    return t_created - t0, t_ready - t0


def with_operator(cp: ControlPlane, api: Api, n: int) -> tuple[float, float]:
    """n AutoGLMDeployments applied: (children created, all Ready) seconds."""
    ns = f"op-{n}"
    cp.kubectl("create", "namespace", ns)
    docs = {"apiVersion": "v1", "kind": "List", "items": resources(n)}

    def created() -> bool:
        return (len(api.list("apps/v1", "Deployment", ns)) == 6 * n
                and len(api.list("v1", "Service", ns)) == 6 * n)

    def ready() -> bool:
        items = api.list(API_VERSION, KIND, ns)
        return [i.get("status", {}).get("phase") for i in items].count("Ready") == n

    t0 = time.monotonic()
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(docs))
    t_created = wait("children", created)
    t_ready = wait("Ready", ready)
    return t_created - t0, t_ready - t0


def main() -> int:
    # SIGTERM (a timeout) unwinds through `finally`, stopping what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows: list[tuple[int, tuple[float, float], tuple[float, float], int]] = []
    with ControlPlane(provision_assets(), nodes=4, node_capacity=CAPACITY) as cp, \
            tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        print(f"control plane up in {cp.startup_seconds:.1f} s", flush=True)
        install(cp)
        api = Api(config.new_client_from_config(config_file=str(cp.kubeconfig)))
        op = OperatorProcess(service_account_kubeconfig(cp, Path(tmp) / "kc"),
                             Path(tmp) / "op.log", resync_seconds=60)
        op.start()
        try:
            for n in (1, 100):
                base = baseline(cp, api, n)
                ours = with_operator(cp, api, n)
                time.sleep(2)
                rows.append((n, ours, base, op.rss_bytes()))
                print(f"done: {n}", flush=True)
        finally:
            op.stop()
        mem = cp.memory_rss()

    print()
    print(f"{'':16} {'children created':>18} {'(baseline)':>11} {'ratio':>6}   "
          f"{'all Ready':>10} {'(baseline)':>11} {'ratio':>6}   {'operator RSS':>12}")
    for n, (created, ready), (b_created, b_ready), rss in rows:
        print(f"{n:>3} resource(s)  {created:>16.2f} s {b_created:>9.2f} s "
              f"{created / b_created:>6.2f}   {ready:>8.2f} s {b_ready:>9.2f} s "
              f"{ready / b_ready:>6.2f}   {rss / 2**20:>9.0f} MiB")
    print("\ncontrol plane RSS at the end: " + ", ".join(
        f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items())
        + f"; total {sum(mem.values()) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
