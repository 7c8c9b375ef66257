"""Smoke tests of the real control plane the operator tests stand on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from autoglm.k8s.api import Api
from autoglm.testing import eventually
from autoglm.testing.controlplane import (
    BEHAVIOUR_LABEL,
    CRASH_LOOP,
    CRASH_LOOP_MESSAGE,
    CRASH_LOOP_VERSION,
    NEVER_READY_VERSION,
    VERSION_LABEL,
    ControlPlane,
)

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "smoke.autoglm.io", "v1", "widgets"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": VERSION,
            "served": True,
            "storage": True,
            "subresources": {
                "status": {},
                "scale": {"specReplicasPath": ".spec.replicas",
                          "statusReplicasPath": ".status.replicas"},
            },
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["min", "max"],
                        "x-kubernetes-validations": [
                            {"rule": "self.min <= self.max",
                             "message": "min must not exceed max"},
                        ],
                        "properties": {
                            "replicas": {"type": "integer", "default": 1},
                            "min": {"type": "integer", "minimum": 0},
                            "max": {"type": "integer", "minimum": 0},
                            "color": {"type": "string", "enum": ["red", "blue"]},
                        },
                    },
                    "status": {
                        "type": "object",
                        "properties": {"replicas": {"type": "integer"},
                                       "phase": {"type": "string"}},
                    },
                },
            }},
        }],
    },
}


def widget(name: str, lo: int = 1, hi: int = 3) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"min": lo, "max": hi, "color": "red"}}


@pytest.fixture(scope="module")
def widgets(api: client.ApiClient) -> client.CustomObjectsApi:
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(WIDGET_CRD)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True"
                   for c in crd.status.conditions or [])

    eventually(established, "the Widget CRD to be Established")
    return client.CustomObjectsApi(api)


def test_cel_rule_rejects_with_its_message(widgets: client.CustomObjectsApi,
                                           namespace: str) -> None:
    with pytest.raises(ApiException) as err:
        widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                widget("bad", lo=5, hi=2))
    assert err.value.status == 422
    assert "min must not exceed max" in err.value.body
    # the OpenAPI schema is enforced too
    bad_enum = widget("bad-enum")
    bad_enum["spec"]["color"] = "green"
    with pytest.raises(ApiException) as err:
        widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad_enum)
    assert err.value.status == 422 and "Unsupported value" in err.value.body


def test_custom_object_create_patch_status_scale_watch(widgets: client.CustomObjectsApi,
                                                       api: client.ApiClient,
                                                       namespace: str) -> None:
    rest = Api(api)  # the operator's own REST wrapper: merge and JSON patches, subresources
    av = f"{GROUP}/{VERSION}"
    created = widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                      widget("w1"))
    assert created["spec"]["replicas"] == 1, "schema default applied"
    rv = created["metadata"]["resourceVersion"]

    events: list[tuple[str, dict[str, Any]]] = []
    w = watch.Watch()

    def consume() -> None:
        for ev in w.stream(widgets.list_namespaced_custom_object, GROUP, VERSION, namespace,
                           PLURAL, resource_version=rv, timeout_seconds=30):
            events.append((ev["type"], ev["object"]))
            if len(events) >= 4:
                w.stop()

    t = threading.Thread(target=consume, daemon=True)
    t.start()

    # merge patch (a dict body)
    merged = rest.patch(av, "Widget", namespace, "w1", {"spec": {"max": 7}})
    assert merged["spec"] == {"min": 1, "max": 7, "color": "red", "replicas": 1}
    # JSON patch (a list body), with a test op that must hold
    patched = rest.patch(
        av, "Widget", namespace, "w1",
        [{"op": "test", "path": "/spec/max", "value": 7},
         {"op": "replace", "path": "/spec/color", "value": "blue"}])
    assert patched["spec"]["color"] == "blue"
    # a JSON patch whose test fails changes nothing
    with pytest.raises(ApiException) as err:
        rest.patch(
            av, "Widget", namespace, "w1",
            [{"op": "test", "path": "/spec/max", "value": 99},
             {"op": "replace", "path": "/spec/color", "value": "red"}])
    assert err.value.status == 422
    # status subresource: spec in the body is ignored, status is written
    st = rest.patch(av, "Widget", namespace, "w1",
                    {"spec": {"max": 100}, "status": {"phase": "Ready", "replicas": 1}},
                    subresource="status")
    assert st["status"]["phase"] == "Ready" and st["spec"]["max"] == 7
    # and the main resource ignores status
    rest.patch(av, "Widget", namespace, "w1", {"status": {"phase": "Lost"}})
    # scale subresource
    scale = widgets.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "w1", {"spec": {"replicas": 3}})
    assert scale["spec"]["replicas"] == 3
    obj = widgets.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
    assert obj["spec"]["replicas"] == 3 and obj["status"]["phase"] == "Ready"

    t.join(timeout=30)
    assert [e[0] for e in events[:4]] == ["MODIFIED"] * 4
    assert events[0][1]["spec"]["max"] == 7
    assert events[1][1]["spec"]["color"] == "blue"
    assert events[2][1]["status"]["phase"] == "Ready"
    assert events[3][1]["spec"]["replicas"] == 3


def test_deployment_gets_ready_kwok_pods_and_endpoints(api: client.ApiClient,
                                                       control_plane: ControlPlane,
                                                       namespace: str) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "web", "image": "example.invalid/web:1",
                    "ports": [{"containerPort": 8000, "name": "http"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi",
                                               "nvidia.com/gpu": "1"},
                                  "limits": {"nvidia.com/gpu": "1"}},
                }]},
            },
        },
    })
    core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"clusterIP": "None", "selector": labels,
                 "ports": [{"port": 8000, "targetPort": "http", "name": "http"}]},
    })

    def available() -> bool:
        d = apps.read_namespaced_deployment("web", namespace)
        return bool(d.status.available_replicas == 3)

    eventually(available, "Deployment web to have 3 available replicas")
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    for p in pods:
        assert p.status.phase == "Running"
        assert p.spec.node_name in control_plane.node_names
        assert any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)
        assert p.status.pod_ip

    def endpoints() -> set[str]:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web").items
        return {a for s in slices for e in (s.endpoints or [])
                if e.conditions.ready for a in e.addresses}

    want = {p.status.pod_ip for p in pods}
    eventually(lambda: endpoints() == want, "the EndpointSlice to list the 3 ready pods")


def test_deleting_owner_garbage_collects_children(widgets: client.CustomObjectsApi,
                                                  api: client.ApiClient,
                                                  namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                    widget("owner"))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    for i in range(2):
        core.create_namespaced_config_map(namespace, {
            "metadata": {"name": f"child-{i}", "ownerReferences": [ref]}, "data": {"i": str(i)}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "orphan"}})
    widgets.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "owner")

    def children_gone() -> bool:
        names = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
        return not names & {"child-0", "child-1"}

    eventually(children_gone, "the garbage collector to delete the owned ConfigMaps")
    core.read_namespaced_config_map("orphan", namespace)  # unowned objects stay


def test_service_account_rbac_is_enforced(api: client.ApiClient, control_plane: ControlPlane,
                                          namespace: str, tmp_path: Any) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}})
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}).status.token
    kc = control_plane.write_kubeconfig(tmp_path / "reader.kubeconfig", token, "reader")
    sa_api = config.new_client_from_config(config_file=str(kc))
    try:
        sa_core = client.CoreV1Api(sa_api)
        # allowed by the Role
        names = [c.metadata.name for c in sa_core.list_namespaced_config_map(namespace).items]
        assert "visible" in names
        # denied: a verb and a resource the Role does not grant, and another namespace
        calls: list[Callable[[], object]] = [
            lambda: sa_core.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}}),
            lambda: sa_core.list_namespaced_secret(namespace),
            lambda: sa_core.list_namespaced_config_map("default"),
        ]
        for call in calls:
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403
            assert f"system:serviceaccount:{namespace}:reader" in err.value.body
    finally:
        sa_api.close()


def small_deployment(name: str, labels: dict[str, str], replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, **labels}},
                "spec": {"containers": [
                    {"name": "server", "image": "example.invalid/server:1"},
                    {"name": "sidecar", "image": "example.invalid/sidecar:1"},
                ]},
            },
        },
    }


def delete_and_wait(api: client.ApiClient, namespace: str, name: str) -> None:
    """Deleting works for failing pods too: the Deployment and its pods go away."""
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.delete_namespaced_deployment(name, namespace, propagation_policy="Foreground")

    def gone() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        return not pods and not apps.list_namespaced_deployment(
            namespace, field_selector=f"metadata.name={name}").items

    eventually(gone, f"Deployment {name} and its pods to be deleted")


def running_pods(core: client.CoreV1Api, namespace: str, name: str,
                 n: int) -> list[client.V1Pod] | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
    running = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
    return running if len(running) == n else None


def pod_ready(p: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def test_never_ready_version_runs_but_never_becomes_ready(api: client.ApiClient,
                                                          namespace: str) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    name = "never"
    apps.create_namespaced_deployment(
        namespace, small_deployment(name, {VERSION_LABEL: str(NEVER_READY_VERSION)}))
    eventually(lambda: running_pods(core, namespace, name, 2),
               "2 Running pods of the never-ready Deployment")
    # an ordinary Deployment created after it becomes available meanwhile: kwok is not stuck
    apps.create_namespaced_deployment(namespace, small_deployment("ok", {VERSION_LABEL: "12"}))
    eventually(lambda: apps.read_namespaced_deployment("ok", namespace).status
               .available_replicas == 2, "the ordinary Deployment to become available")
    # and the never-ready one stays that way: sample for a while (kwok acts within ~1 s)
    for _ in range(10):  # 10 samples, 0.5 s apart
        d = apps.read_namespaced_deployment(name, namespace)
        assert not d.status.ready_replicas and not d.status.available_replicas
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        assert len(pods) == 2
        for p in pods:
            assert p.status.phase == "Running" and not pod_ready(p)
            assert [(c.name, c.ready, c.started, bool(c.state.running))
                    for c in p.status.container_statuses] == [
                ("server", False, True, True), ("sidecar", False, True, True)]
        time.sleep(0.5)
    delete_and_wait(api, namespace, name)
    delete_and_wait(api, namespace, "ok")


def test_crash_loop_version_and_label_crash_loop(api: client.ApiClient,
                                                 namespace: str) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment(
        namespace, small_deployment("crash", {VERSION_LABEL: str(CRASH_LOOP_VERSION)}))
    # the label selects the behaviour whatever the version
    apps.create_namespaced_deployment(
        namespace, small_deployment("crash-label", {BEHAVIOUR_LABEL: CRASH_LOOP,
                                                    VERSION_LABEL: "3"}, replicas=1))

    def restarted(name: str, n: int, at_least: int) -> list[client.V1Pod] | None:
        pods = running_pods(core, namespace, name, n)
        if not pods or not all(c.restart_count >= at_least
                               for p in pods for c in p.status.container_statuses):
            return None
        return pods

    first = eventually(lambda: restarted("crash", 2, 1), "crash-looping pods")
    for p in first + eventually(lambda: restarted("crash-label", 1, 1), "a crash-looping pod"):
        assert not pod_ready(p)
        for c in p.status.container_statuses:
            assert not c.ready
            assert c.state.waiting.reason == "CrashLoopBackOff"
            assert c.last_state.terminated.exit_code == 1
            # as `autoglm triton-serve` leaves why its model did not load
            assert c.last_state.terminated.message == CRASH_LOOP_MESSAGE
    # the loop goes on: restartCount grows
    before = {(p.metadata.name, c.name): c.restart_count
              for p in first for c in p.status.container_statuses}

    def grown() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="app=crash").items
        return all(c.restart_count > before[(p.metadata.name, c.name)]
                   for p in pods for c in p.status.container_statuses)

    eventually(grown, "restartCount to grow")
    d = apps.read_namespaced_deployment("crash", namespace)
    assert not d.status.ready_replicas and not d.status.available_replicas
    events = core.list_namespaced_event(namespace).items
    assert any(e.reason == "BackOff" and e.type == "Warning" for e in events)
    delete_and_wait(api, namespace, "crash")
    delete_and_wait(api, namespace, "crash-label")
