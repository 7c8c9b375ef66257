"""Topology planning, manifest builders, the CRD and the idempotence of convergence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autoglm import plan as p
from autoglm.k8s import builders, status
from autoglm.k8s.converge import holds
from autoglm.k8s.crd import crd
from autoglm.spec import AutoGLMStatus, parse
from autoglm.swap import Phase, SwapState

ROOT = Path(__file__).resolve().parents[2]


def spec(**changes: Any) -> Any:
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    return parse({**doc, **changes}, "tiny")


def test_plan_starts_in_slot_a_and_keeps_the_serving_version() -> None:
    s = spec()
    topo = p.plan("tiny", s, p.RoutingState())
    assert topo.active == "a" and topo.active_plan.version == 1
    # the tiny example: 4 experts, perServer 2
    assert [w.name for w in topo.active_plan.servers] == ["tiny-a-experts-0", "tiny-a-experts-1"]
    assert [sorted(w.experts) for w in topo.active_plan.servers] == [[0, 2], [1, 3]]
    assert all(w.replicas == 1 for w in topo.active_plan.servers)
    # the live servers of slot b serve version 1, scaled; spec asks for version 2
    bumped = s.model_copy(update={"model": s.model.model_copy(update={"version": 2})})
    scaled = tuple(map(frozenset, ({0, 1}, {2, 3}, {0, 2}, {0})))
    topo = p.plan("tiny", bumped, p.RoutingState("b", {"b": p.SlotState(1, scaled)}))
    assert topo.active == "b" and topo.active_plan.version == 1
    assert topo.active_plan.placement.servers == scaled, "the live placement is kept"
    # one replica too many (maxReplicas 3): the autoscaler's to remove, live, when it runs
    over = (*scaled, frozenset({0, 1}))
    kept = p.plan("tiny", s, p.RoutingState("a", {"a": p.SlotState(1, over)})).active_plan
    assert kept.placement.servers == over
    # but an expert on no server (a reconciliation cut short) is placed, autoscaler or not
    partial = p.plan("tiny", s, p.RoutingState("a", {"a": p.SlotState(
        1, (frozenset({0, 2}),))})).active_plan
    assert partial.placement.replicas(4) == [1, 1, 1, 1]
    # with no autoscaler: placed again, what each server holds kept
    fixed = s.model_copy(update={"autoscaling": s.autoscaling.model_copy(
        update={"enabled": False})})
    placed = p.plan("tiny", fixed, p.RoutingState("a", {"a": p.SlotState(1, over)})).active_plan
    assert placed.placement.replicas(4) == [3, 2, 2, 1]
    assert len(placed.servers) == 5, "never fewer servers: removing them is the autoscaler's"
    assert all(len(h) <= 2 for h in placed.placement.servers)
    # a retiring tail is kept as it is
    kept = p.plan("tiny", s, p.RoutingState("a", {"a": p.SlotState(1, over, 4)})).active_plan
    assert kept.placement.servers == over


def test_default_placement_on_a_cluster_is_a_handful_of_servers() -> None:
    for n, servers in ((1, 1), (4, 4), (8, 4), (160, 4), (256, 4)):
        s = parse({"model": {"name": "m", "version": 1, "repository": "/m", "numExperts": n}},
                  "x")
        plan = p.plan("x", s, p.RoutingState()).active_plan
        assert len(plan.servers) == servers and plan.placement.replicas(n) == [1] * n


def test_objects_are_wired_as_designed() -> None:
    s = spec()
    objs = builders.desired_objects("tiny", "ns", "uid-1", s,
                                    p.plan("tiny", s, p.RoutingState()), monitors=False)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Deployment", "tiny") in names and ("Service", "tiny") in names
    assert ("Deployment", "tiny-a-router") in names
    assert {n for k, n in names if n.startswith("tiny-a-experts")} == {
        "tiny-a-experts", "tiny-a-experts-0", "tiny-a-experts-1"}
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    for o in objs:
        assert o["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "tiny"
    svc = by[("Service", "tiny-a-experts")]  # every expert server of the slot
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": "tiny",
                                       "app.kubernetes.io/component": "expert",
                                       "autoglm.io/slot": "a"}
    dep = by[("Deployment", "tiny-a-experts-1")]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"][:3] == ["--repository=/models", "--model=experts", "--version=1"]
    assert {"name": "AUTOGLM_SERVER_EXPERTS", "value": "1,3"} in c["env"]
    assert dep["spec"]["template"]["metadata"]["labels"]["autoglm.io/server"] == "1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/experts/versions/1/ready"
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}
    assert dep["spec"]["template"]["metadata"]["labels"]["autoglm.io/model-version"] == "1"
    router = by[("Deployment", "tiny-a-router")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in router["env"]}
    assert env["AUTOGLM_EXPERT_ENDPOINTS"] == "dns:///tiny-a-experts.ns.svc:8001"
    gateway = by[("Deployment", "tiny")]["spec"]["template"]["spec"]["containers"][0]
    assert "--grpc-port=8001" in gateway["args"]
    assert {"name": "grpc", "containerPort": 8001, "protocol": "TCP"} in gateway["ports"]
    assert [(x["name"], x["port"], x["targetPort"]) for x in by[("Service", "tiny")]["spec"][
        "ports"]] == [("http", 8000, "http"), ("grpc", 8001, "grpc")]
    role = by[("Role", "tiny-gateway")]
    assert role["rules"][0]["resourceNames"] == ["tiny"]
    assert role["rules"][0]["verbs"] == ["get", "list", "watch"]
    with_monitors = builders.desired_objects("tiny", "ns", "u", s,
                                             p.plan("tiny", s, p.RoutingState()), True)
    assert any(o["kind"] == "PodMonitor" for o in with_monitors)


def test_gpu_experts_request_and_tolerate_gpus() -> None:
    s = spec()
    s = s.model_copy(update={"experts": s.experts.model_copy(update={"gpus": 2})})
    slot = p.plan("tiny", s, p.RoutingState()).active_plan
    pod = builders.triton_pod_spec("tiny", "ns", s, slot.servers[0])
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # and load their model as GPU instances; the router (no GPUs in the spec) stays on CPU
    assert env_of(pod)["AUTOGLM_INSTANCE_KIND"] == "KIND_GPU"
    assert "AUTOGLM_INSTANCE_KIND" not in env_of(
        builders.triton_pod_spec("tiny", "ns", s, slot.router))
    cpu = spec()
    assert "AUTOGLM_INSTANCE_KIND" not in env_of(
        builders.triton_pod_spec("tiny", "ns", cpu, p.plan("tiny", cpu, p.RoutingState())
                                 .active_plan.servers[0]))


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def test_servers_get_the_model_shape_the_spec_states() -> None:
    """Every router and expert server refuses a version that disagrees with the spec: the
    spec's numExperts (always), topK and layers (when given) are in their environment."""
    s = spec()
    slot = p.plan("tiny", s, p.RoutingState()).active_plan
    for w in slot.workloads:
        pod = builders.triton_pod_spec("tiny", "ns", s, w)
        env = env_of(pod)
        assert (env["AUTOGLM_EXPECT_NUM_EXPERTS"], env["AUTOGLM_EXPECT_TOP_K"],
                env["AUTOGLM_EXPECT_LAYERS"]) == ("4", "2", "2"), w.name
        # why a load failed reaches the container's termination message
        assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    imported = parse({**doc, "model": {k: v for k, v in doc["model"].items()
                                       if k not in ("topK", "layers")}}, "tiny")
    env = env_of(builders.triton_pod_spec(
        "tiny", "ns", imported, p.plan("tiny", imported, p.RoutingState()).active_plan.router))
    assert env["AUTOGLM_EXPECT_NUM_EXPERTS"] == "4"
    assert "AUTOGLM_EXPECT_TOP_K" not in env and "AUTOGLM_EXPECT_LAYERS" not in env


def test_a_stream_interval_reaches_the_router_pods() -> None:
    s = spec(router={"replicas": 1, "streamInterval": 8})
    slot = p.plan("tiny", s, p.RoutingState()).active_plan
    assert env_of(builders.triton_pod_spec("tiny", "ns", s, slot.router))[
        p.STREAM_INTERVAL_ENV] == "8"
    assert p.STREAM_INTERVAL_ENV not in env_of(
        builders.triton_pod_spec("tiny", "ns", s, slot.servers[0]))
    assert p.STREAM_INTERVAL_ENV not in env_of(
        builders.triton_pod_spec("tiny", "ns", spec(), slot.router)), "1: nothing set"


def test_pod_templates_follow_only_the_model_shape() -> None:
    """The expectations are a pure function of the spec's model fields: the same spec gives
    the same templates; a changed shape changes them (the pods must be replaced)."""
    topo = p.plan("tiny", spec(), p.RoutingState())
    assert (builders.desired_objects("tiny", "ns", "uid", spec(), topo, False)
            == builders.desired_objects("tiny", "ns", "uid", spec(), topo, False))
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    other = spec(model={**doc["model"], "layers": 3})
    assert (builders.desired_objects("tiny", "ns", "uid", spec(), topo, False)
            != builders.desired_objects("tiny", "ns", "uid", other, topo, False))


def test_holds_ignores_server_defaults_and_canonical_quantities() -> None:
    want = {"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "1000m"}}}]}}
    live: dict[str, Any] = {"spec": {"containers": [{"name": "a", "imagePullPolicy": "IfNotPresent",
                                     "resources": {"requests": {"cpu": "1"}}}]},
            "status": {}}
    assert holds(live, want)
    live["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "2"
    assert not holds(live, want)
    assert not holds({"spec": {"containers": []}}, want)


def test_status_conditions() -> None:
    s = spec()
    topo = p.plan("tiny", s, p.RoutingState())
    names = ["tiny", *(w.name for w in topo.active_plan.workloads)]

    def dep(name: str, ready: int) -> dict[str, Any]:
        return {"metadata": {"name": name, "generation": 1},
                "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                           "availableReplicas": ready}}

    some = {n: dep(n, 0 if n.endswith("experts-1") else 1) for n in names}
    st = status.observed_status(AutoGLMStatus(), 1, topo, some, "tiny", 1, None, "t0")
    assert st.phase == "Progressing" and st.ready == "3/4" and st.expert_servers == 2
    ready = {c.type: c for c in st.conditions}["Ready"]
    assert ready.status == "False" and "tiny-a-experts-1" in ready.message
    servers = st.slots["a"].servers
    assert [(x.name, x.experts, x.ready) for x in servers] == [
        ("tiny-a-experts-0", [0, 2], True), ("tiny-a-experts-1", [1, 3], False)]
    assert st.slots["a"].expert_replicas == [1, 1, 1, 1]
    st2 = status.observed_status(st, 1, topo, {n: dep(n, 1) for n in names}, "tiny", 1, None,
                                 "t1")
    conds = {c.type: c for c in st2.conditions}
    assert st2.phase == "Ready" and st2.ready == "4/4" and st2.active_slot == "a"
    assert conds["Ready"].status == "True" and conds["Ready"].last_transition_time == "t1"
    assert conds["Degraded"].last_transition_time == "t0", "unchanged status keeps its time"
    assert all(c.observed_generation == 1 for c in st2.conditions)
    st3 = status.observed_status(st2, 2, topo, {n: dep(n, 1) for n in names}, "tiny", 2, None,
                                 "t2")
    assert {c.type: c for c in st3.conditions}["Progressing"].reason == "Converged"
    warming = SwapState("a", 1, Phase.WARMING, 5.0, target_version=2)
    st4 = status.observed_status(st3, 2, topo, {n: dep(n, 1) for n in names}, "tiny", 2, None,
                                 "t3", warming)
    progressing = {c.type: c for c in st4.conditions}["Progressing"]
    assert (progressing.status, progressing.reason) == ("True", "Warming")
    assert "slot b (version 2)" in progressing.message and st4.phase == "Ready"
    failed = SwapState("a", 1, failed_version=2, reason="canary mismatch: max abs error 0.2")
    st5 = status.observed_status(st4, 2, topo, {n: dep(n, 1) for n in names}, "tiny", 2, None,
                                 "t4", failed)
    degraded = {c.type: c for c in st5.conditions}["Degraded"]
    assert (degraded.status, degraded.reason) == ("True", "RolloutFailed")
    assert "canary mismatch" in degraded.message and "version 1 keeps serving" in degraded.message
    assert st5.phase == "Degraded" and st5.active_version == 1
    invalid = status.invalid_status(st3, 3, "spec.model.topK: bad", "t3")
    assert invalid.phase == "Invalid" and invalid.active_version == 1 and invalid.slots


def test_crd_file_is_generated_from_the_spec() -> None:
    on_disk = yaml.safe_load((ROOT / "crds/autoglmdeployments.autoglm.io.yaml").read_text())
    assert on_disk == crd(), "run `make crd` after changing operator/autoglm/spec.py"
    schema = on_disk["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert "!has(self.model.topK) || self.model.topK <= self.model.numExperts" in rules
    model = schema["properties"]["model"]
    assert model["properties"]["numExperts"]["maximum"] == 256
    assert model["required"] == ["name", "version", "repository", "numExperts"]
    assert "default" not in model["properties"]["topK"]
    assert schema["properties"]["experts"]["default"]["minReplicas"] == 1

    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        return {k for v in node for k in keys(v)} if isinstance(node, list) else set()
    # JSON Schema keywords a structural (OpenAPI 3.0) schema refuses
    assert not keys(on_disk) & {"const", "$ref", "$defs", "prefixItems", "examples"}


def test_rollout_settings_do_not_touch_pod_templates() -> None:
    """Tuning the swap must never restart the pods that serve."""
    a, b = spec(), spec(rollout={"readyTimeoutSeconds": 30, "drainTimeoutSeconds": 5,
                                 "keepPreviousSeconds": 1, "canary": False})
    topo = p.plan("tiny", a, p.RoutingState())
    assert (builders.desired_objects("tiny", "ns", "uid", a, topo, True)
            == builders.desired_objects("tiny", "ns", "uid", b, topo, True))


def test_the_operator_pod_monitor_selects_the_operator_and_its_metrics_port() -> None:
    monitor = yaml.safe_load((ROOT / "manifests/monitoring/operator-podmonitor.yaml")
                             .read_text())
    deployment = yaml.safe_load((ROOT / "manifests/operator.yaml").read_text())
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
