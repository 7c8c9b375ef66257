"""Check AutoGLM's PodMonitor against the real Prometheus Operator and a real Prometheus.

The test harness never runs the Prometheus Operator: autoglm.testing.monitoring.targets()
stands in for the Prometheus it would configure. This check holds that stand-in to the real
thing. On the test control plane (kwok nodes) it applies the operator's own CRDs, runs the
operator (.ci/prometheus-operator.sh builds it) as a host process, creates a Prometheus,
AutoGLM's PodMonitor and the pods of the tiny example's workloads (plus pods the monitor
must skip or must also scrape), then runs Prometheus with Kubernetes discovery on the
configuration the operator generated, and compares the targets it discovers with what
monitoring.targets() computes from the same PodMonitor and pods. Exit status 0 only if the
PodMonitor survives the CRD's schema unchanged and the targets are equal.

Not a pytest test (a cold build of the binaries takes minutes)::

    .venv/bin/python e2e/check_prometheus_operator.py

($AUTOGLM_K8S_ASSETS, as for the tests, stands in for running .ci/k8s-assets.sh.) kwok's
pod IPs are not routable, so every scrape fails; scrapes go to a proxy address on loopback
where nothing listens, so no packet leaves the machine (the check fails if one went
elsewhere).
"""

from __future__ import annotations

import base64
import collections
import copy
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

from autoglm import plan as p
from autoglm.k8s import builders
from autoglm.procs import free_port, spawn, terminate
from autoglm.spec import parse
from autoglm.testing import controlplane, eventually, monitoring
from autoglm.testing.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[1]
NS, INSTANCE, PROM = "demo", "tiny", "autoglm"
JOB = f"podMonitor/{NS}/{INSTANCE}/0"  # the operator's name for the PodMonitor's endpoint 0
NODE = "kwok-node-0"


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def operator_assets() -> Path:
    """The directory .ci/prometheus-operator.sh provides (bin/, crds/), building if needed."""
    out = subprocess.run(["bash", str(ROOT / ".ci/prometheus-operator.sh")],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1])


def no_proxy_env(**extra: str) -> dict[str, str]:
    """Our environment without proxy settings: the API server is on loopback, and nothing
    the operator or Prometheus does may be sent anywhere else."""
    return {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower()}, **extra}


def without_owner(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` without ownerReferences: no AutoGLMDeployment exists here, and the garbage
    collector deletes what an absent owner owns."""
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("ownerReferences", None)
    return obj


def json_diff(built: Any, read: Any, path: str) -> list[str]:
    """Where ``read`` differs from ``built``, one line per field."""
    if isinstance(built, dict) and isinstance(read, dict):
        out: list[str] = []
        for k in sorted(built.keys() | read.keys()):
            if k not in read:
                out.append(f"{path}.{k}: pruned (built {built[k]!r})")
            elif k not in built:
                out.append(f"{path}.{k}: added {read[k]!r}")
            else:
                out += json_diff(built[k], read[k], f"{path}.{k}")
        return out
    if isinstance(built, list) and isinstance(read, list) and len(built) == len(read):
        return [line for i, (b, r) in enumerate(zip(built, read, strict=True))
                for line in json_diff(b, r, f"{path}[{i}]")]
    return [] if built == read else [f"{path}: built {built!r}, read back {read!r}"]


def pod(name: str, labels: dict[str, str], spec: dict[str, Any],
        node: str | None = NODE) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {**({"nodeName": node} if node else {}), **spec}}


def workloads() -> list[dict[str, Any]]:
    """The tiny example's objects as the AutoGLM operator creates them (its pods then come
    from the Deployments), and pods around them that test the monitor's edges."""
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    spec = parse(doc, INSTANCE)
    objs = [without_owner(o) for o in builders.desired_objects(
        INSTANCE, NS, "uid", spec, p.plan(INSTANCE, spec, p.RoutingState()), monitors=False)]
    expert = builders.labels(INSTANCE, "expert", slot="a", server=0, version=1)
    triton = {"name": "triton", "image": "x", "ports": builders.TRITON_PORTS}
    # an init container's named port is a target too
    fetch = {"name": "fetch", "image": "x",
             "ports": [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]}
    job_labels = builders.labels(INSTANCE, "expert", slot="b", server=1, version=1)
    return [
        *objs,
        pod(f"{INSTANCE}-a-experts-0-init", expert,
            {"initContainers": [fetch], "containers": [triton]}),
        # Running, never Ready: still scraped
        pod(f"{INSTANCE}-a-experts-0-unready",
            {**expert, controlplane.VERSION_LABEL: str(controlplane.NEVER_READY_VERSION)},
            {"containers": [triton]}),
        # another instance's pod: not selected
        pod("other-a-experts-0-x", builders.labels("other", "expert", slot="a", server=0),
            {"containers": [triton]}),
        # unschedulable, so Pending without an IP: no target
        pod(f"{INSTANCE}-a-experts-0-pending", expert, {
            "nodeSelector": {"autoglm.io/no-such-node": "x"}, "containers": [triton]}, None),
        # kwok completes a Job's pod: Succeeded, dropped
        {"apiVersion": "batch/v1", "kind": "Job",
         "metadata": {"name": f"{INSTANCE}-done", "namespace": NS},
         "spec": {"backoffLimit": 0, "template": {
             "metadata": {"labels": job_labels},
             "spec": {"restartPolicy": "Never", "containers": [triton]}}}},
    ]


def generated_config(cp: ControlPlane) -> str | None:
    """The operator's Prometheus configuration, once it holds the PodMonitor's job."""
    r = cp.kubectl("-n", NS, "get", "secret", f"prometheus-{PROM}", "-o", "json", check=False)
    if r.returncode != 0:
        return None
    gz = json.loads(r.stdout).get("data", {}).get("prometheus.yaml.gz")
    cfg = gzip.decompress(base64.b64decode(gz)).decode() if gz else ""
    return cfg if f"job_name: {JOB}" in cfg else None


def equivalent_config(cfg: str, kubeconfig: Path, proxy_port: int) -> dict[str, Any]:
    """What the operator's Prometheus pod would run, for a Prometheus outside the cluster:
    the placeholders its config-reloader substitutes (SHARD, POD_NAME from the downward
    API), a kubeconfig where the pod would use its ServiceAccount, and scrapes sent to a
    loopback proxy address nothing answers on."""
    c: dict[str, Any] = yaml.safe_load(
        cfg.replace("$(SHARD)", "0").replace("$(POD_NAME)", f"prometheus-{PROM}-0"))
    for job in c.get("scrape_configs", []):
        for sd in job.get("kubernetes_sd_configs", []):
            sd["kubeconfig_file"] = str(kubeconfig)
        job["proxy_url"] = f"http://127.0.0.1:{proxy_port}"
    return c


def prometheus_targets(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/v1/targets?state=any", timeout=2) as r:
            data: dict[str, Any] = json.load(r)["data"]
            return data
    except OSError:
        return {}


def as_seen_by_prometheus(active: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each target's labels (the public ones) and the address it scrapes."""
    return [{**{k: v for k, v in t["labels"].items() if not k.startswith("__")},
             "__address__": urlsplit(t["scrapeUrl"]).netloc} for t in active]


def as_computed(pm: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, str]]:
    """monitoring.targets(), in the same form; ``instance`` is the address, as Prometheus
    sets it when no relabeling did (the harness's file discovery gets the same)."""
    return [{**lb, "instance": addr, "__address__": addr}
            for lb, (addr,) in monitoring.targets(pm, pods)]


def compare(seen: list[dict[str, str]], computed: list[dict[str, str]]) -> list[str]:
    """The differences, paired by address where both have one."""
    def key(d: dict[str, str]) -> str:
        return json.dumps(d, sort_keys=True)

    extra = collections.Counter(map(key, seen)) - collections.Counter(map(key, computed))
    missing = collections.Counter(map(key, computed)) - collections.Counter(map(key, seen))
    by_addr = {json.loads(k)["__address__"]: json.loads(k) for k in missing}
    out = []
    for k in sorted(extra.elements()):
        t = json.loads(k)
        other = by_addr.pop(t["__address__"], None)
        if other is None:
            out.append(f"only in Prometheus: {k}")
            continue
        out.append(f"{t['__address__']}: " + ", ".join(
            f"{n}={t.get(n)!r} (Prometheus) vs {other.get(n)!r} (monitoring.targets)"
            for n in sorted(t.keys() | other.keys()) if t.get(n) != other.get(n)))
    out += [f"only in monitoring.targets(): {key(d)}" for d in by_addr.values()]
    return out


def tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def main() -> int:
    log("assets: .ci/k8s-assets.sh and .ci/prometheus-operator.sh (cold: builds, minutes)")
    k8s_bin = controlplane.provision_assets()
    assets = operator_assets()
    op_bin, prom_bin = assets / "bin/operator", assets / "bin/prometheus"
    versions = {}
    for b in (op_bin, prom_bin):
        r = subprocess.run([str(b), "--version"], capture_output=True, text=True, check=True)
        versions[b.name] = (r.stdout or r.stderr).splitlines()[0]
    log("operator:", versions["operator"])
    log("prometheus:", versions["prometheus"])

    work = Path(tempfile.mkdtemp(prefix="autoglm-promop-"))
    # Bound but not listening: connections to it are refused, and nothing else can take the
    # port while the check runs, so a scrape can reach nothing.
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    cp = ControlPlane(k8s_bin, nodes=1)
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    ok = False
    try:
        cp.start()
        log(f"control plane up in {cp.startup_seconds:.1f}s at {cp.server}")

        # Server-side: some CRDs exceed the 256 KiB last-applied annotation.
        cp.kubectl("apply", "--server-side", "-f", str(assets / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        cp.kubectl("create", "namespace", NS)
        # bare pods are refused until the namespace's default ServiceAccount exists
        eventually(lambda: cp.kubectl("-n", NS, "get", "serviceaccount", "default",
                                      check=False).returncode == 0,
                   "the default ServiceAccount", 90)
        cp.kubectl("-n", NS, "create", "serviceaccount", "prometheus")

        def pods() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = json.loads(
                cp.kubectl("-n", NS, "get", "pods", "-o", "json").stdout)["items"]
            return items

        (built,) = (without_owner(o) for o in builders.monitor_objects(
            INSTANCE, NS, builders.owner_reference(INSTANCE, "uid")))
        cp.kubectl("apply", "-f", "-", input=json.dumps(built))
        read = json.loads(cp.kubectl("-n", NS, "get", "podmonitor", INSTANCE, "-o",
                                     "json").stdout)
        pruned = json_diff(built["spec"], read["spec"], "spec") + json_diff(
            built["metadata"]["labels"], read["metadata"].get("labels", {}), "metadata.labels")

        cp.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": workloads()}))

        env = no_proxy_env(KUBECONFIG=str(cp.kubeconfig))  # the operator has no flag for it
        op_log = (work / "operator.log").open("wb")
        t_op = time.monotonic()
        procs.append((spawn([str(op_bin), f"--web.listen-address=127.0.0.1:{free_port()}",
                             f"--namespaces={NS}"], op_log, env), op_log))
        cp.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
            "metadata": {"name": PROM, "namespace": NS},
            "spec": {"serviceAccountName": "prometheus", "replicas": 1,
                     "podMonitorSelector": {}, "podMonitorNamespaceSelector": {}}}))

        def config() -> str | None:
            if procs[0][0].poll() is not None:
                raise RuntimeError(f"the operator exited:\n{tail(work / 'operator.log')}")
            return generated_config(cp)

        cfg = eventually(config, f"the operator's configuration with job {JOB}", 90)
        to_config = time.monotonic() - t_op
        log(f"operator: Secret prometheus-{PROM} holds job {JOB} after {to_config:.1f}s")
        (gen_job,) = (j for j in yaml.safe_load(cfg)["scrape_configs"] if j["job_name"] == JOB)

        # Everything settled before Prometheus looks, so both sides see the same pods.
        cp.kubectl("-n", NS, "wait", "--for=condition=Available", "--timeout=90s",
                   "deployment", "--all")
        cp.kubectl("-n", NS, "wait", "--for=condition=Complete", "--timeout=90s",
                   f"job/{INSTANCE}-done")
        cp.kubectl("-n", NS, "wait", "--for=condition=PodScheduled=False", "--timeout=60s",
                   f"pod/{INSTANCE}-a-experts-0-pending")
        eventually(lambda: all(pd["status"].get("phase") != "Pending"
                               for pd in pods() if pd["spec"].get("nodeName")),
                   "kwok to start the bare pods", 90)

        conf = work / "prometheus.yaml"
        conf.write_text(yaml.safe_dump(
            equivalent_config(cfg, cp.kubeconfig, proxy.getsockname()[1]), sort_keys=False))
        subprocess.run([str(assets / "bin/promtool"), "check", "config", str(conf)],
                       check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        prom_log = (work / "prometheus.log").open("wb")
        procs.append((spawn([str(prom_bin), f"--config.file={conf}",
                             f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], prom_log,
                            no_proxy_env()), prom_log))

        live_pm = json.loads(cp.kubectl("-n", NS, "get", "podmonitor", INSTANCE, "-o",
                                        "json").stdout)

        def snapshot() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, str]],
                                list[dict[str, str]]]:
            """(Prometheus' targets, the pods, the targets as Prometheus and as
            monitoring.targets() see them)."""
            if procs[1][0].poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{tail(work / 'prometheus.log')}")
            t, now = prometheus_targets(port), pods()
            return (t, now, as_seen_by_prometheus(t.get("activeTargets", [])),
                    as_computed(live_pm, now))

        def agree() -> bool:  # discovery refreshes every few seconds: poll until it settles
            _, _, seen, computed = snapshot()
            return bool(seen) and not compare(seen, computed)

        try:
            eventually(agree, "Prometheus' targets to equal monitoring.targets()", 60)
        except AssertionError as e:
            log(e)
        targets, pod_list, seen, computed = snapshot()
        diffs = compare(seen, computed)
        dropped = targets.get("droppedTargets", [])
        discovered = {t["discoveredLabels"].get("__meta_kubernetes_pod_name") for t in dropped}

        # Every scrape must have gone to the dead proxy: proof that none left the machine.
        proxy_addr = f"127.0.0.1:{proxy.getsockname()[1]}"

        def scraped() -> bool:
            return all(t["health"] != "unknown"
                       for t in prometheus_targets(port).get("activeTargets", []))

        try:
            eventually(scraped, "a first scrape of every target", 30)
        except AssertionError as e:
            log(e)
        scrapes = prometheus_targets(port).get("activeTargets", [])
        errors = {t.get("lastError", "") for t in scrapes}
        proxied = bool(scrapes) and all(
            "proxyconnect" in e and proxy_addr in e for e in errors)

        print("\n== report")
        print(f"operator:        {versions['operator']}")
        print(f"prometheus:      {versions['prometheus']}")
        print(f"time to config:  {to_config:.1f}s (operator start to the job in the Secret)")
        print(f"generated job:   {JOB}, honor_labels={gen_job.get('honor_labels')}")
        print("PodMonitor read back:", "OK (equal to what was built)" if not pruned
              else "MISMATCH\n  " + "\n  ".join(pruned))
        print(f"targets:         {len(seen)} active in Prometheus ({len(dropped)} dropped), "
              f"{len(computed)} from monitoring.targets()")
        for d in sorted(computed, key=lambda d: d["__address__"]):
            print(f"  {d['__address__']:<22} {d['pod']}/{d['container']}")
        print("pods without a target:")
        targeted = {d["pod"] for d in computed}
        for pd in pod_list:
            name, st = pd["metadata"]["name"], pd["status"]
            if name not in targeted:
                print(f"  {name:<40} {st.get('phase')}, {st.get('podIP') or 'no IP'}, "
                      + ("discovered and dropped" if name in discovered else "not discovered"))
        print("scrapes:        ", "all refused by the loopback proxy" if proxied
              else "NOT ALL THROUGH THE PROXY: " + "; ".join(sorted(errors))[:500])
        print("targets:        ", "OK (equal)" if not diffs
              else "MISMATCH\n  " + "\n  ".join(diffs))
        ok = not pruned and not diffs and proxied
        print("RESULT:", "OK" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        for proc, fh in reversed(procs):
            terminate(proc, timeout=10)
            fh.close()
        if not ok:
            for name in ("operator.log", "prometheus.log"):
                if (work / name).exists():
                    print(f"--- {name} (tail)\n{tail(work / name)}", file=sys.stderr)
        cp.stop()
        proxy.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
