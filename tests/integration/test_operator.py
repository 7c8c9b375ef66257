"""The operator on the real control plane, running as its own ServiceAccount with the RBAC
of manifests/: provisioning, status, invalid specs, convergence, deletion, restarts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from autoglm.plan import SERVER_EXPERTS_ENV, parse_server_experts
from autoglm.spec import GROUP, PLURAL
from autoglm.testing import eventually
from autoglm.testing.cluster import Cluster, tiny
from autoglm.testing.controlplane import (
    CRASH_LOOP_MESSAGE,
    CRASH_LOOP_VERSION,
    DOES_NOT_FIT_VERSION,
    ControlPlane,
)
from autoglm.testing.monitoring import PODMONITOR_CRD
from autoglm.testing.operator import REPO_ROOT, OperatorProcess, running_operator

pytestmark = pytest.mark.k8s



@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, tmp_path_factory.mktemp("operator")) as op:
        yield op


@pytest.fixture
def cluster(control_plane: ControlPlane, operator: OperatorProcess,
            namespace: str) -> Cluster:
    return Cluster(control_plane, namespace)


EXPECTED = {
    ("Deployment", "tiny"), ("Service", "tiny"), ("ServiceAccount", "tiny-gateway"),
    ("Role", "tiny-gateway"), ("RoleBinding", "tiny-gateway"),
    ("Deployment", "tiny-a-router"), ("Service", "tiny-a-router"),
    ("Service", "tiny-a-experts"),  # the slot's expert servers: perServer 2, 2 servers
    ("Deployment", "tiny-a-experts-0"), ("Deployment", "tiny-a-experts-1"),
}


def test_manifests_and_crd_apply_cleanly(control_plane: ControlPlane,
                                         operator: OperatorProcess) -> None:
    again = control_plane.kubectl("apply", "-k", str(REPO_ROOT / "manifests"),
                                  "--dry-run=server")
    assert "customresourcedefinition.apiextensions.k8s.io/autoglmdeployments.autoglm.io" in (
        again.stdout)
    crd = json.loads(control_plane.kubectl("get", "crd", "autoglmdeployments.autoglm.io",
                                           "-o", "json").stdout)
    assert crd["spec"]["names"]["shortNames"] == ["autoglm", "agd"]
    # the operator runs as its ServiceAccount: it may not do what the ClusterRole omits
    sa = "system:serviceaccount:autoglm-system:autoglm-operator"
    can = control_plane.kubectl("auth", "can-i", "--as", sa, "delete", "secrets", "-A",
                                check=False)
    assert can.stdout.strip() == "no"
    can = control_plane.kubectl("auth", "can-i", "--as", sa, "patch", "deployments", "-A",
                                check=False)
    assert can.stdout.strip() == "yes"


def test_tiny_example_is_provisioned_wired_and_ready(cluster: Cluster,
                                                     control_plane: ControlPlane) -> None:
    cluster.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "tiny.yaml"))
    r = cluster.wait_ready("tiny")
    st = r["status"]
    assert st["activeSlot"] == "a" and st["activeVersion"] == 1 and st["ready"] == "4/4"
    assert st["slots"]["a"]["expertReplicas"] == [1, 1, 1, 1] and st["expertServers"] == 2
    assert [(x["name"], x["experts"], x["ready"]) for x in st["slots"]["a"]["servers"]] == [
        ("tiny-a-experts-0", [0, 2], True), ("tiny-a-experts-1", [1, 3], True)]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["status"] == "False"
    assert all(c["observedGeneration"] == r["metadata"]["generation"] for c in conds.values())

    kids = cluster.children("tiny")
    assert {(o["kind"], o["metadata"]["name"]) for o in kids} == EXPECTED
    for o in kids:
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["uid"] == r["metadata"]["uid"] and ref["controller"] is True
    # pods of every workload run Ready on kwok nodes, selected by the Services
    pods = cluster.get("pods", None)["items"]
    assert len(pods) == 4
    assert all(any(c["type"] == "Ready" and c["status"] == "True"
                   for c in p["status"]["conditions"]) for p in pods)
    servers = [p for p in pods if p["metadata"]["labels"].get("autoglm.io/server")]
    assert sorted(p["metadata"]["labels"]["autoglm.io/server"] for p in servers) == ["0", "1"]
    assert all(p["metadata"]["labels"]["autoglm.io/model-version"] == "1" for p in servers)

    def expert_endpoints() -> set[str]:
        slices = cluster.get("endpointslices")["items"]
        return {a for s in slices
                if s["metadata"]["labels"].get("kubernetes.io/service-name") == "tiny-a-experts"
                for e in s.get("endpoints") or [] for a in e["addresses"]}

    eventually(lambda: expert_endpoints() == {p["status"]["podIP"] for p in servers},
               "the experts headless Service to list every expert server's pod")
    # printer columns
    out = cluster.kubectl("get", "autoglm", "tiny").stdout
    header, row = out.splitlines()
    assert header.split() == ["NAME", "MODEL", "VERSION", "SERVING", "SLOT", "PHASE", "SWAP",
                              "READY", "ROUTERS", "SERVERS", "AGE"]
    assert row.split()[:10] == ["tiny", "tiny-moe", "1", "1", "a", "Ready", "Idle", "4/4",
                                "1/1", "2"]
    reasons = {e["reason"] for e in cluster.events("tiny")}
    assert "Created" in reasons

    # a pass over converged children changes none (nor says it did): a spec change that
    # touches no object is observed only after such a pass
    before = cluster.serving_snapshot("tiny")
    tuned = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
    tuned["spec"]["rollout"]["drainTimeoutSeconds"] = 45
    cluster.apply(tuned)
    generation = cluster.resource("tiny")["metadata"]["generation"]
    eventually(lambda: cluster.resource("tiny")["status"].get("observedGeneration")
               == generation, "the tuned spec observed")
    assert cluster.serving_snapshot("tiny") == before
    assert not [e["message"] for e in cluster.events("tiny")
                if e["reason"] in ("Updated", "Deleted")]


INVALID_BY_API: list[tuple[str, dict[str, Any]]] = [
    ("model.topK must not exceed model.numExperts", {"model__topK": 8}),
    ("maxReplicas must be at least minReplicas",
     {"experts__minReplicas": 3, "experts__maxReplicas": 2}),
    ("experts.replicaBudget must hold minReplicas for every expert",
     {"experts__replicaBudget": 3}),
    ("spec.model.numExperts", {"model__numExperts": 0}),
    ("spec.autoscaling.signal", {"autoscaling__signal": "cpu"}),
    ("spec.model.version", {"model__version": 0}),
    ("unknown field \"spec.experts.replicas\"", {"experts__replicas": 2}),
    # once reported by the operator as InvalidSpec, now refused at once (CEL rules)
    ('spec.experts.resources.requests: Invalid value: "object": requests must not exceed '
     "limits",
     {"experts__resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}),
    ('spec.experts.resources.limits: Invalid value: "object": nvidia.com/gpu: set GPUs with',
     {"experts__resources": {"limits": {"nvidia.com/gpu": 1}}}),
    ('spec.triton.extraArgs[0]: Invalid value: "string": a flag the operator sets',
     {"triton__extraArgs": ["--model-repository=/elsewhere"]}),
    ('spec.model.repository: Invalid value: "string": must be an absolute path',
     {"model__repository": "models/relative"}),
    ('spec.model.repository: Invalid value: "string": must be an absolute path',
     {"model__repository": "http://host/models"}),
]
INVALID_NAMES: list[tuple[str, str]] = [
    ('metadata.name: Invalid value: "object": too long', "x" * 53),
    ('metadata.name: Invalid value: "object": must be a DNS-1035 label', "1tiny"),
    ("metadata.name: Invalid value: \"Tiny\": a lowercase RFC 1123 subdomain", "Tiny"),
]
# A spec stored before its rule was in the CRD (an upgrade): only the operator sees it.
STORED_BEFORE_THE_RULE = (
    "spec.model.repository", {"model__repository": "models/relative"},
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/model/properties/"
    "repository/x-kubernetes-validations")


def test_invalid_specs_are_refused_or_reported_and_serving_is_untouched(
        cluster: Cluster, control_plane: ControlPlane) -> None:
    cluster.apply(tiny())
    cluster.wait_ready("tiny")
    before = cluster.serving_snapshot("tiny")
    assert len(before) == len(EXPECTED)

    for message, change in INVALID_BY_API:
        out = cluster.apply(tiny(**change), check=False)
        assert out.returncode != 0, change
        assert message in out.stderr, (message, out.stderr)
    for message, name in INVALID_NAMES:
        out = cluster.apply(tiny(name), check=False)
        assert out.returncode != 0 and message in out.stderr, (message, out.stderr)

    # the operator reports what the API server could not refuse: a spec stored before the
    # CRD had its rule (an upgrade)
    field, change, rule = STORED_BEFORE_THE_RULE
    crd = f"crd/{PLURAL}.{GROUP}"
    control_plane.kubectl("patch", crd, "--type=json",
                          "-p", json.dumps([{"op": "remove", "path": rule}]))
    try:
        eventually(lambda: cluster.apply(tiny(**change), check=False).returncode == 0,
                   "the spec applied under the CRD without the rule")
    finally:  # as installed (manifests/ labels the CRD)
        control_plane.kubectl("apply", "-k", str(REPO_ROOT / "manifests"))

    def reported() -> bool:
        c = cluster.condition("tiny", "Ready")
        return bool(c and c["reason"] == "InvalidSpec" and c["message"].startswith(field))

    eventually(reported, f"Ready=False/InvalidSpec naming {field}")
    r = cluster.resource("tiny")
    assert r["status"]["phase"] == "Invalid"
    assert r["status"]["activeVersion"] == 1, "what serves is still reported"
    warnings = [e for e in cluster.events("tiny")
                if e["type"] == "Warning" and e["reason"] == "InvalidSpec"]
    assert any(field in e["message"] for e in warnings)
    assert cluster.serving_snapshot("tiny") == before, f"{field} disturbed serving"

    cluster.apply(tiny())
    cluster.wait_ready("tiny")
    assert cluster.serving_snapshot("tiny") == before


def test_non_version_changes_converge_and_leave_the_placement_alone(
        cluster: Cluster) -> None:
    cluster.apply(tiny(experts__perServer=3))
    cluster.wait_ready("tiny")
    # the autoscaler's decision (expert 0 gets a replica on server 1), which
    # reconciliation must not undo
    cluster.kubectl("set", "env", "deployment/tiny-a-experts-1", "AUTOGLM_SERVER_EXPERTS=0,1,3")
    cluster.apply(tiny(experts__perServer=3, router__replicas=2,
                       triton__extraArgs=["--log-verbose=1"],
                       triton__resources={"requests": {"cpu": "750m", "memory": "1Gi"}}))
    r = cluster.wait_ready("tiny")
    assert r["status"]["ready"] == "4/4"
    router = cluster.get("deployment", "tiny-a-router")
    c = router["spec"]["template"]["spec"]["containers"][0]
    assert router["spec"]["replicas"] == 2
    assert c["args"][-1] == "--log-verbose=1"
    assert c["resources"] == {"requests": {"cpu": "750m", "memory": "1Gi"}}
    assert router["status"]["availableReplicas"] == 2
    server = cluster.get("deployment", "tiny-a-experts-1")["spec"]["template"]["spec"]
    assert {"name": "AUTOGLM_SERVER_EXPERTS", "value": "0,1,3"} in server["containers"][0]["env"]
    assert r["status"]["slots"]["a"]["expertReplicas"] == [2, 1, 1, 1]

    # a version change starts a swap in the other slot; the serving slot is not touched
    before = cluster.serving_snapshot("tiny")
    cluster.apply(tiny(experts__perServer=3, router__replicas=2,
                       triton__extraArgs=["--log-verbose=1"],
                       triton__resources={"requests": {"cpu": "750m", "memory": "1Gi"}},
                       model__version=2))
    eventually(lambda: (cluster.condition("tiny", "Progressing") or {}).get("reason")
               in ("Warming", "Verifying"), "the swap to stage version 2")
    # The swap state is persisted before the standby objects are created (restart safety),
    # so the standby router may appear a moment after the condition.
    eventually(lambda: ("Deployment", "tiny-b-router") in cluster.serving_snapshot("tiny"),
               "the standby router Deployment")
    assert cluster.resource("tiny")["status"]["activeVersion"] == 1
    after = cluster.serving_snapshot("tiny")
    assert {k: after[k] for k in before} == before

    # drift is repaired: a deleted child comes back
    cluster.kubectl("delete", "service", "tiny-a-experts")
    eventually(lambda: cluster.kubectl("get", "service", "tiny-a-experts",
                                       check=False).returncode == 0,
               "the deleted Service to be recreated", timeout=60)


def test_deleting_the_resource_removes_every_child(cluster: Cluster) -> None:
    cluster.apply(tiny())
    cluster.wait_ready("tiny")
    assert cluster.children("tiny")
    cluster.kubectl("delete", "autoglm", "tiny", "--wait=true", "--timeout=60s")
    eventually(lambda: not cluster.children("tiny"), "every child to be garbage-collected")
    eventually(lambda: not cluster.get("pods")["items"], "every pod to go")


def test_operator_killed_mid_reconcile_converges_without_duplicates(
        cluster: Cluster, operator: OperatorProcess) -> None:
    experts = 64
    # a server per expert: many children to interrupt
    big = tiny("big", model__numExperts=experts, experts__replicaBudget=2 * experts,
               experts__perServer=1)
    operator.kill()
    try:
        cluster.apply(big)
        operator.start()
        eventually(lambda: len(cluster.children("big")) >= 3, "the first children")
        operator.kill()
        partial = len(cluster.children("big"))
    finally:
        operator.start()
    total = 5 + 2 + 1 + experts  # gateway, router, the experts' Service, their servers
    assert 0 < partial < total, "the kill must interrupt a reconciliation"
    r = cluster.wait_ready("big", timeout=180)
    assert r["status"]["ready"] == f"{experts + 2}/{experts + 2}"
    kids = cluster.children("big")
    names = [(o["kind"], o["metadata"]["name"]) for o in kids]
    assert len(names) == len(set(names)) == total
    assert all(len(o["metadata"]["ownerReferences"]) == 1 for o in kids)
    pods = [p for p in cluster.get("pods")["items"]
            if p["metadata"]["labels"].get("app.kubernetes.io/instance") == "big"]
    assert len(pods) == experts + 2, "one pod per workload: no duplicate ReplicaSets"
    sets = cluster.get("replicasets")["items"]
    assert len([s for s in sets if s["metadata"]["name"].startswith("big-")]) == experts + 2


# The servers a model gets without spec.experts.perServer (plan.DEFAULT_SERVERS), stated
# here on purpose: a change of the default, or one Deployment per expert, fails below.
DEFAULT_EXPERT_SERVERS = 4
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's limit on an object's annotations, all


def test_a_serving_server_that_crash_loops_says_why_in_status(cluster: Cluster) -> None:
    """A serving workload whose pods crash-loop (e.g. an expert server whose experts do not
    fit its memory limit) is named in the Degraded condition with its container's
    termination message, not only as 'waiting'."""
    cluster.apply(tiny("crashy", model__version=CRASH_LOOP_VERSION))

    def degraded() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in
                 cluster.resource("crashy").get("status", {}).get("conditions", [])}
        d = conds.get("Degraded")
        return d if d and d["status"] == "True" and "crashy-a-experts-1" in d["message"] \
            else None

    eventually(degraded, "the crash loop in status", 90)
    d = degraded()
    assert d is not None and d["reason"] == "WorkloadFailing"
    assert "container triton CrashLoopBackOff" in d["message"]
    assert CRASH_LOOP_MESSAGE in d["message"], d["message"]
    assert "crashy-a-router: pod crashy-a-router-" in d["message"]


def test_expert_servers_with_no_room_for_their_experts_get_fewer_each(
        cluster: Cluster) -> None:
    """perServer unset: 8 experts spread 2 a server; each server refuses them, its memory
    limit having room for one (as an expert server says it, here simulated by kwok). The
    operator reads that back, keeps it in status and places one expert a server: all Ready,
    with the reason in an Event."""
    moe = tiny("tight", model__version=DOES_NOT_FIT_VERSION, model__numExperts=8)
    del moe["spec"]["experts"]["perServer"]
    cluster.apply(moe)
    r = cluster.wait_ready("tight", timeout=120)
    slot = r["status"]["slots"]["a"]
    assert (slot["fitsPerServer"], slot["fitsMemoryLimit"]) == (1, "1Gi"), slot
    assert [x["experts"] for x in slot["servers"]] == [[e] for e in range(8)]
    assert r["status"]["expertServers"] == 8
    assert any(e["reason"] == "ExpertsDoNotFit" and e["type"] == "Warning"
               and "room for 1 experts within limits.memory 1Gi: placing at most 1 on each "
               "server" in e["message"] for e in cluster.events("tight"))
    held = sorted(tuple(parse_server_experts(e["value"])) for d in
                  cluster.get("deployments")["items"]
                  if d["metadata"]["name"].startswith("tight-a-experts-")
                  for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
                  if e["name"] == SERVER_EXPERTS_ENV)
    assert held == [(e,) for e in range(8)], "the 2-expert servers replaced"


def _annotations_bytes(obj: dict[str, Any]) -> int:
    return sum(len(k) + len(v) for k, v in (obj["metadata"].get("annotations") or {}).items())


@pytest.mark.parametrize(("experts", "per_server"), [(160, 40), (256, 64)])
def test_many_experts_without_per_server_share_a_handful_of_servers(
        cluster: Cluster, experts: int, per_server: int) -> None:
    """numExperts 160 / 256 and no perServer: every expert once, on 4 servers (not a
    Deployment per expert), and what the objects and the status say of 256 experts fits."""
    name = f"moe{experts}"
    moe = tiny(name, model__numExperts=experts, model__topK=8,
               experts__replicaBudget=experts,
               # a decision every interval, from a Prometheus that refuses at once: the
               # per-expert status is written and the replicas held
               autoscaling__intervalSeconds=1, autoscaling__prometheusUrl="http://127.0.0.1:1")
    del moe["spec"]["experts"]["perServer"]
    cluster.apply(moe)
    r = cluster.wait_ready(name, timeout=120)
    assert "perServer" not in r["spec"]["experts"]

    # the Deployments: the gateway, the router and 4 expert servers, nothing else
    servers = [f"{name}-a-experts-{s}" for s in range(DEFAULT_EXPERT_SERVERS)]
    deployments = {d["metadata"]["name"]: d for d in cluster.get("deployments")["items"]}
    assert set(deployments) == {name, f"{name}-a-router", *servers}
    held: list[list[int]] = []
    for s, server in enumerate(servers):
        d = deployments[server]
        assert d["spec"]["replicas"] == 1
        assert d["spec"]["template"]["metadata"]["labels"]["autoglm.io/server"] == str(s)
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value", "") for e in c["env"]}
        assert env["AUTOGLM_EXPECT_NUM_EXPERTS"] == str(experts)
        held.append(parse_server_experts(env[SERVER_EXPERTS_ENV]))
        assert len(held[s]) == per_server, (server, held[s])
        assert _annotations_bytes(d) < MAX_ANNOTATIONS_BYTES
    every = sorted(e for h in held for e in h)
    assert every == list(range(experts)), "each expert on exactly one server"

    # the status says the same
    st = r["status"]
    assert st["ready"] == "6/6" and st["expertServers"] == DEFAULT_EXPERT_SERVERS
    assert list(st["slots"]) == ["a"]
    assert st["slots"]["a"]["expertReplicas"] == [1] * experts
    assert [(x["name"], x["experts"], x["ready"], x.get("retiring", False))
            for x in st["slots"]["a"]["servers"]] == [
        (server, held[s], True, False) for s, server in enumerate(servers)]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["status"] == "False", conds["Degraded"]
    pods = [p for p in cluster.get("pods")["items"]
            if p["metadata"]["labels"].get("app.kubernetes.io/instance") == name]
    assert len(pods) == 2 + DEFAULT_EXPERT_SERVERS

    # the autoscaler's per-expert status: a status patch listing all of them, accepted
    def per_expert() -> list[dict[str, Any]] | None:
        # a decision made once every server is ready (one made before counts them starting)
        scaling = cluster.resource(name).get("status", {}).get("autoscaling") or {}
        rows: list[dict[str, Any]] = scaling.get("experts", [])
        return rows if len(rows) == experts and all(x["readyReplicas"] == 1 for x in rows) \
            else None

    rows = eventually(per_expert, f"the autoscaler's status of {experts} experts")
    assert [(x["expert"], x["replicas"], x["readyReplicas"], x["desired"]) for x in rows] == [
        (e, 1, 1, 1) for e in range(experts)]
    r = cluster.resource(name)
    assert r["status"]["autoscaling"]["metricsAvailable"] is False
    assert r["status"]["slots"]["a"]["expertReplicas"] == [1] * experts
    assert _annotations_bytes(r) < MAX_ANNOTATIONS_BYTES
    # holding replicas moved no expert
    after = {d["metadata"]["name"]: d for d in cluster.get("deployments")["items"]}
    assert set(after) == set(deployments)
    for s, server in enumerate(servers):
        (c,) = after[server]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value", "") for e in c["env"]}
        assert parse_server_experts(env[SERVER_EXPERTS_ENV]) == held[s]

    # kubectl get: the SERVERS column
    header, row = cluster.kubectl("get", "autoglm", name).stdout.splitlines()
    columns = dict(zip(header.split(), row.split(), strict=False))
    assert columns["SERVERS"] == str(DEFAULT_EXPERT_SERVERS) and columns["READY"] == "6/6"
    # nothing refused on the way (an object or a status patch too large would say so)
    assert {e["reason"] for e in cluster.events(name) if e["type"] == "Warning"} <= {
        "MetricsUnavailable"}


def test_pod_monitor_only_where_the_prometheus_operator_is(cluster: Cluster,
                                                           control_plane: ControlPlane) -> None:
    """Runs last in this module: it installs the Prometheus Operator's PodMonitor CRD."""
    cluster.apply(tiny())
    cluster.wait_ready("tiny")
    assert not any(o["kind"] == "PodMonitor" for o in cluster.children("tiny"))
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(PODMONITOR_CRD))
    try:
        def monitor() -> dict[str, Any] | None:
            out = cluster.kubectl("get", "podmonitor", "tiny", "-o", "json", check=False)
            return json.loads(out.stdout) if out.returncode == 0 else None

        pm = eventually(monitor, "the PodMonitor, after the CRD appeared", timeout=60)
        assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "tiny"
        assert pm["metadata"]["ownerReferences"][0]["kind"] == "AutoGLMDeployment"
    finally:
        control_plane.kubectl("delete", "-f", "-", input=json.dumps(PODMONITOR_CRD))
