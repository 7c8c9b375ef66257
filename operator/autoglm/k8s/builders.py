"""Pure builders of every Kubernetes object an AutoGLMDeployment owns (DESIGN.md §4).

Each returns a plain manifest dict. An expert server is a Deployment of one replica whose pod
template names the experts it holds (``AUTOGLM_SERVER_EXPERTS``): a change of its experts
rolls it with a surge, the new pod ready before the old one goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm import plan as p
from autoglm import router_scale
from autoglm.spec import API_VERSION, GROUP, KIND, PLURAL, AutoGLMSpec, Resources, Slot

Manifest = dict[str, Any]

GATEWAY_PORT = 8000
GATEWAY_GRPC_PORT = p.TRITON_GRPC_PORT  # as on Triton, so clients change only the host
SHM_LIMIT = "1Gi"  # the Python backend moves tensors through /dev/shm
# Pod templates do not depend on spec.rollout: tuning the swap must not restart the pods
# that serve. A slow model load gets up to 30 min before the kubelet gives up; the swap's
# own readyTimeoutSeconds aborts a standby sooner.
STARTUP_CHECKS = 180
GRACE_SECONDS = 60


def labels(instance: str, component: p.Component, slot: Slot | None = None,
           server: int | None = None, version: int | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "autoglm",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "autoglm-operator",
    }
    if slot is not None:
        out["autoglm.io/slot"] = slot
    if server is not None:
        out["autoglm.io/server"] = str(server)
    if version is not None:
        out["autoglm.io/model-version"] = str(version)
    return out


def selector(instance: str, component: p.Component, slot: Slot | None = None,
             server: int | None = None) -> dict[str, str]:
    """Labels that select a workload's pods; never includes the version (it may change)."""
    out = {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}
    if slot is not None:
        out["autoglm.io/slot"] = slot
    if server is not None:
        out["autoglm.io/server"] = str(server)
    return out


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(name: str, namespace: str, owner: dict[str, Any],
          lbls: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": lbls, "ownerReferences": [owner]}


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


def _deployment(name: str, namespace: str, owner: dict[str, Any], lbls: dict[str, str],
                sel: dict[str, str], replicas: int, pod_spec: dict[str, Any]) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, owner, lbls),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": sel},
            # Surge, never dip: a changed pod template must not cost serving capacity.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": lbls}, "spec": pod_spec},
        },
    }


def _service(name: str, namespace: str, owner: dict[str, Any], lbls: dict[str, str],
             sel: dict[str, str], ports: list[dict[str, Any]], headless: bool = False,
             service_type: str = "ClusterIP") -> Manifest:
    spec: dict[str, Any] = {"selector": sel, "ports": ports, "type": service_type}
    if headless:
        # One DNS record per ready pod: the router balances across replicas itself.
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(name, namespace, owner, lbls), "spec": spec}


TRITON_PORTS = [
    {"name": "http", "containerPort": p.TRITON_HTTP_PORT, "protocol": "TCP"},
    {"name": "grpc", "containerPort": p.TRITON_GRPC_PORT, "protocol": "TCP"},
    {"name": "metrics", "containerPort": p.TRITON_METRICS_PORT, "protocol": "TCP"},
]
TRITON_SERVICE_PORTS = [{"name": x["name"], "port": x["containerPort"], "targetPort": x["name"],
                         "protocol": "TCP"} for x in TRITON_PORTS]


def experts_endpoint(instance: str, namespace: str, slot: Slot) -> str:
    """The headless-Service DNS name the router resolves for the slot's expert servers (one
    address per ready pod; each server tells the router what it holds)."""
    svc = p.workload_name(instance, slot, "expert")
    return f"dns:///{svc}.{namespace}.svc:{p.TRITON_GRPC_PORT}"


def triton_pod_spec(instance: str, namespace: str, spec: AutoGLMSpec,
                    w: p.Workload) -> dict[str, Any]:
    t, m = spec.triton, spec.model
    # `autoglm triton-serve` runs tritonserver (explicit model control, ports 8000-8002) and
    # loads exactly this model at exactly this version (autoglm/triton.py).
    args = [f"--repository={m.repository}", f"--model={w.triton_model}",
            f"--version={w.version}", "--", *t.extra_args]
    env: list[dict[str, Any]] = [
        {"name": "AUTOGLM_MODEL_VERSION", "value": str(w.version)},
        {"name": "AUTOGLM_SLOT", "value": w.slot},
        # the spec's model shape (a version that disagrees fails to load) and GPU instances
        *({"name": k, "value": v} for k, v in sorted(p.workload_env(spec, w.component).items())),
    ]
    if w.component == "router":
        env.append({"name": "AUTOGLM_EXPERT_ENDPOINTS",
                    "value": experts_endpoint(instance, namespace, w.slot)})
        resources: Resources = t.resources
        gpus = 0
    else:
        resources, gpus = spec.experts.resources, spec.experts.gpus
        env.append({"name": p.SERVER_EXPERTS_ENV,
                    "value": p.format_server_experts(w.experts)})
        if "memory" in resources.limits:  # the server refuses experts that would not fit
            env.append({"name": p.MEMORY_LIMIT_ENV, "valueFrom": {"resourceFieldRef": {
                "containerName": "triton", "resource": "limits.memory"}}})
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"},
                                    {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_LIMIT}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if m.volume is not None:
        mounts.append({"name": "models", "mountPath": m.volume.mount_path, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {
            "claimName": m.volume.claim_name, "readOnly": True}})
    pod: dict[str, Any] = {
        "securityContext": POD_SECURITY,
        # In-flight requests finish before the server goes (the gateway drains first).
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "containers": [{
            "name": "triton",
            "image": t.image,
            "imagePullPolicy": t.image_pull_policy,
            "command": ["autoglm", "triton-serve"],
            "args": args,
            "env": env,
            "ports": TRITON_PORTS,
            "resources": resources.as_k8s(gpus),
            "securityContext": CONTAINER_SECURITY,
            "volumeMounts": mounts,
            # `autoglm triton-serve` writes why a load failed (one line) to
            # /dev/termination-log; anything else that ends it: the log's tail.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            # Ready means: this exact model version is loaded and READY in Triton.
            "readinessProbe": {
                "httpGet": {"path": f"/v2/models/{w.triton_model}/versions/{w.version}/ready",
                            "port": "http"},
                "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 3},
            "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"},
                             "periodSeconds": 10, "failureThreshold": STARTUP_CHECKS},
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"},
                              "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
        }],
        "volumes": volumes,
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            # a slot's expert servers spread as one group: a node's loss costs few of them
            "labelSelector": {"matchLabels": selector(instance, w.component, w.slot)},
        }],
    }
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    if w.component == "router":
        router_drain(pod, spec.router.drain_seconds)
    return pod


# A router pod's SIGTERM to its exit (tritonserver unloads and stops in about two seconds)
ROUTER_STOP_SECONDS = 15


def router_drain(pod: dict[str, Any], seconds: int) -> None:
    """A router pod that goes (scaled down, rolled, its slot retired) first finishes its
    generations: out of the endpoints, its preStop hook waits until none runs or waits, for
    at most ``seconds`` (k8s/drain.py), and the grace period covers the hook and the stop.
    0: no wait, the grace period of every server."""
    if not seconds:
        return
    pod["terminationGracePeriodSeconds"] = seconds + ROUTER_STOP_SECONDS
    pod["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": [
        "python", "-m", "autoglm.k8s.drain", f"--timeout={seconds}",
        f"--url=http://127.0.0.1:{p.TRITON_METRICS_PORT}/metrics"]}}}


def replicas_of(d: Manifest) -> int:
    return int((d.get("spec") or {}).get("replicas", 1))


def router_replicas(spec: AutoGLMSpec, topology: p.Topology, desired: list[Manifest],
                    deployments: Mapping[str, Manifest]) -> list[Manifest]:
    """``desired`` with the router Deployments' replicas the autoscaler's when it is on
    (k8s/router_scaling.py), so reconciling never undoes a decision: a router Deployment
    that exists keeps its own, within the bounds; a new one (a standby being staged)
    starts at the serving slot's, else at ``spec.router.replicas``, within the bounds."""
    if not spec.router.autoscaling.enabled:
        return desired
    policy = router_scale.policy_for(spec)
    serving = deployments.get(topology.active_plan.router.name)
    start = (router_scale.bounded(policy, replicas_of(serving)) if serving is not None
             else router_scale.initial_replicas(spec))
    routers = {plan.router.name for plan in topology.slots}
    out = []
    for m in desired:
        name = m["metadata"]["name"]
        if m["kind"] == "Deployment" and name in routers:
            live = deployments.get(name)
            n = router_scale.bounded(policy, replicas_of(live)) if live is not None else start
            m = {**m, "spec": {**m["spec"], "replicas": n}}
        out.append(m)
    return out


def workload_objects(instance: str, namespace: str, owner: dict[str, Any],
                     spec: AutoGLMSpec, w: p.Workload) -> list[Manifest]:
    """The Deployment of a router tier or an expert server, and the router tier's Service."""
    lbls = labels(instance, w.component, w.slot, w.server, w.version)
    sel = selector(instance, w.component, w.slot, w.server)
    dep = _deployment(w.name, namespace, owner, lbls, sel, w.replicas,
                      triton_pod_spec(instance, namespace, spec, w))
    if w.component == "expert":
        return [dep]
    return [dep, _service(w.name, namespace, owner, lbls, sel, TRITON_SERVICE_PORTS)]


def experts_service(instance: str, namespace: str, owner: dict[str, Any], slot: Slot,
                    version: int) -> Manifest:
    """One headless Service for every expert server of a slot: one DNS record per ready
    pod, and the router asks each what it holds."""
    return _service(p.workload_name(instance, slot, "expert"), namespace, owner,
                    labels(instance, "expert", slot, version=version),
                    selector(instance, "expert", slot), TRITON_SERVICE_PORTS, headless=True)


def gateway_objects(instance: str, namespace: str, owner: dict[str, Any],
                    spec: AutoGLMSpec) -> list[Manifest]:
    """The stable entry point, and the identity it watches the routing state with."""
    g = spec.gateway
    lbls = labels(instance, "gateway")
    sel = selector(instance, "gateway")
    sa = f"{instance}-gateway"
    pod = {
        "serviceAccountName": sa,
        "securityContext": POD_SECURITY,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "containers": [{
            "name": "gateway",
            "image": g.image,
            "command": ["autoglm", "gateway"],
            "args": [f"--deployment={instance}", f"--namespace={namespace}",
                     f"--port={GATEWAY_PORT}", f"--grpc-port={GATEWAY_GRPC_PORT}",
                     f"--metrics-port={p.TRITON_METRICS_PORT}"],
            # "metrics" as on Triton pods, so one PodMonitor endpoint scrapes them all
            "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
                      {"name": "grpc", "containerPort": GATEWAY_GRPC_PORT, "protocol": "TCP"},
                      {"name": "metrics", "containerPort": p.TRITON_METRICS_PORT,
                       "protocol": "TCP"}],
            "resources": g.resources.as_k8s(),
            "securityContext": CONTAINER_SECURITY,
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"},
                               "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"},
                              "periodSeconds": 10, "failureThreshold": 6},
        }],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": _meta(sa, namespace, owner, lbls)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(sa, namespace, owner, lbls),
         "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [instance],
                    "verbs": ["get", "list", "watch"]},
                   # the router pods behind each slot's Service: the gateway spreads over them
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(sa, namespace, owner, lbls),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]},
        _deployment(instance, namespace, owner, lbls, sel, g.replicas, pod),
        _service(instance, namespace, owner, lbls, sel,
                 [{"name": "http", "port": g.port, "targetPort": "http", "protocol": "TCP"},
                  {"name": "grpc", "port": GATEWAY_GRPC_PORT, "targetPort": "grpc",
                   "protocol": "TCP"}],
                 service_type=g.service_type),
    ]


def monitor_objects(instance: str, namespace: str, owner: dict[str, Any]) -> list[Manifest]:
    """A PodMonitor scraping every Triton and gateway pod (Prometheus Operator); short
    interval because autoscaling reacts to these metrics. The pod labels become the series
    labels the queries use (autoglm/prometheus.py), the same as ``autoglm up`` sets."""
    relabel = [{"sourceLabels": [f"__meta_kubernetes_pod_label_{src}"], "targetLabel": dst,
                "action": "replace"}
               for src, dst in (("app_kubernetes_io_instance", "deployment"),
                                ("app_kubernetes_io_component", "component"),
                                ("autoglm_io_slot", "slot"),
                                ("autoglm_io_model_version", "version"))]
    return [{
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(instance, namespace, owner, labels(instance, "gateway")),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": instance,
                                         "app.kubernetes.io/name": "autoglm"}},
            # honorLabels: a series' own labels win over the pod's, as with `autoglm up`
            # (Triton's ``version`` label stays ``version``, not ``exported_version``)
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "5s",
                                     "honorLabels": True, "relabelings": relabel}],
        },
    }]


def desired_objects(instance: str, namespace: str, uid: str, spec: AutoGLMSpec,
                    topology: p.Topology, monitors: bool) -> list[Manifest]:
    """Everything the resource should own, in creation order (experts before routers)."""
    owner = owner_reference(instance, uid)
    out = gateway_objects(instance, namespace, owner, spec)
    for slot in topology.slots:
        out.append(experts_service(instance, namespace, owner, slot.slot, slot.version))
        for w in (*slot.servers, slot.router):
            out.extend(workload_objects(instance, namespace, owner, spec, w))
    if monitors:
        out.extend(monitor_objects(instance, namespace, owner))
    return out
