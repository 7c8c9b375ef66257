"""``Api`` finds resources by discovery (names, scope, subresources), not by guessing plurals.

A fake API server stands behind ``ApiClient.call_api``: it serves discovery documents and
records every request, so the paths, content types and the cost of discovery are checked
without a control plane (tests/integration/test_api_k8s.py does it against a real one).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from autoglm.k8s.api import Api, error_reason

CORE: dict[str, Any] = {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
    {"name": "services", "singularName": "service", "namespaced": True, "kind": "Service",
     "verbs": ["create", "delete", "get", "list", "patch"]},
    {"name": "namespaces", "singularName": "namespace", "namespaced": False,
     "kind": "Namespace", "verbs": ["create", "delete", "get", "list", "patch"]},
]}
NETWORKING: dict[str, Any] = {
    "kind": "APIResourceList", "groupVersion": "networking.k8s.io/v1", "resources": [
    {"name": "networkpolicies", "singularName": "networkpolicy", "namespaced": True,
     "kind": "NetworkPolicy", "verbs": ["create", "delete", "get", "list", "patch"]},
    {"name": "ingresses", "singularName": "ingress", "namespaced": True, "kind": "Ingress",
     "verbs": ["create", "delete", "get", "list", "patch"]},
    {"name": "ingresses/status", "singularName": "", "namespaced": True, "kind": "Ingress",
     "verbs": ["get", "patch", "update"]},
]}
MONITORING: dict[str, Any] = {"kind": "APIResourceList", "groupVersion": "monitoring.coreos.com/v1",
              "resources": [{"name": "podmonitors", "singularName": "podmonitor",
                             "namespaced": True, "kind": "PodMonitor",
                             "verbs": ["create", "delete", "get", "list", "patch"]}]}


PLURALS = {r["name"] for doc in (CORE, NETWORKING, MONITORING) for r in doc["resources"]}


def group(name: str) -> dict[str, Any]:
    gv = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [gv], "preferredVersion": gv}


class Response:
    def __init__(self, status: int, doc: Any) -> None:
        self.status, self.reason = status, "OK" if status < 300 else "Not Found"
        self.data = json.dumps(doc).encode()

    def getheaders(self) -> dict[str, str]:
        return {}


class FakeServer(client.ApiClient):  # type: ignore[misc]
    """Serves discovery for the groups in ``groups``, echoes other requests, 404s unknowns."""

    def __init__(self) -> None:
        super().__init__(client.Configuration(host="https://fake.invalid:6443"))
        self.groups = {"networking.k8s.io": NETWORKING}
        self.objects: dict[str, Any] = {  # served to GET and PATCH
            f"/apis/networking.k8s.io/v1/namespaces/ns/ingresses/web{sub}": {"kind": "Ingress"}
            for sub in ("", "/status")}
        self.objects["/api/v1/namespaces/ns"] = {"kind": "Namespace"}
        self.calls: list[tuple[str, str, str | None, Any]] = []

    def call_api(self, path: str, method: str, path_params: Any = None,
                 query_params: Any = None, header_params: Any = None, body: Any = None,
                 **kw: Any) -> Response:
        self.calls.append((method, path, (header_params or {}).get("Content-Type"), body))
        assert kw["_request_timeout"] == 7.0 and kw["_preload_content"] is False
        if path == "/version":
            return Response(200, {"gitVersion": "v1.34.0"})
        if path == "/apis":
            return Response(200, {"kind": "APIGroupList",
                                  "groups": [group(g) for g in self.groups]})
        if path == "/api/v1":
            return Response(200, CORE)
        for g, doc in self.groups.items():
            if path == f"/apis/{g}/v1":
                return Response(200, doc)
        if path in self.objects:
            return Response(200, self.objects[path])
        if method == "GET" and path.rsplit("/", 1)[-1] in PLURALS:
            return Response(200, {"items": []})
        if method == "POST":
            return Response(200, body)
        raise ApiException(http_resp=Response(404, {"kind": "Status", "code": 404,
                                                    "message": f"{path} not found"}))

    def requests(self) -> list[tuple[str, str]]:
        """The requests made since the last look, less discovery's."""
        out = [(m, p) for m, p, _, _ in self.calls]
        self.calls.clear()
        return out


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def test_plurals_and_scope_come_from_discovery(server: FakeServer) -> None:
    api = Api(server, timeout=7.0)
    assert api.list("networking.k8s.io/v1", "NetworkPolicy", "ns", "a=b") == []
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny", "namespace": "ns"}, "spec": {}}
    assert api.create(policy) == policy
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "web", "namespace": "ns"}}
    api.create(ingress)
    # a cluster-scoped kind ignores the namespace it is given
    api.patch("v1", "Namespace", "ns", "ns", {"metadata": {"labels": {"a": "b"}}})
    assert server.requests() == [
        ("GET", "/version"), ("GET", "/apis"), ("GET", "/apis/networking.k8s.io/v1"),
        ("GET", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"),  # not ...icys
        ("POST", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"),
        ("POST", "/apis/networking.k8s.io/v1/namespaces/ns/ingresses"),  # not ingresss
        ("GET", "/api/v1"),
        ("PATCH", "/api/v1/namespaces/ns"),
    ]
    # discovered once: later calls cost one request each
    api.create(policy)
    api.list("v1", "Service", None)
    assert server.requests() == [
        ("POST", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"),
        ("GET", "/api/v1/services")]


def test_patch_types_and_subresources(server: FakeServer) -> None:
    api = Api(server, timeout=7.0)
    api.patch("networking.k8s.io/v1", "Ingress", "ns", "web", {"spec": {}})
    api.patch("networking.k8s.io/v1", "Ingress", "ns", "web",
              [{"op": "replace", "path": "/spec", "value": {}}])
    api.patch("networking.k8s.io/v1", "Ingress", "ns", "web", {"status": {}},
              subresource="status")
    patches = [(p, ct) for m, p, ct, _ in server.calls if m == "PATCH"]
    assert patches == [
        ("/apis/networking.k8s.io/v1/namespaces/ns/ingresses/web",
         "application/merge-patch+json"),
        ("/apis/networking.k8s.io/v1/namespaces/ns/ingresses/web",
         "application/json-patch+json"),
        ("/apis/networking.k8s.io/v1/namespaces/ns/ingresses/web/status",
         "application/merge-patch+json")]
    server.calls.clear()
    with pytest.raises(ApiException) as err:  # a subresource the kind does not have
        api.patch("networking.k8s.io/v1", "NetworkPolicy", "ns", "deny", {},
                  subresource="scale")
    assert err.value.status == 404
    # it was looked for anew (a CRD may have gained it), then refused without a request
    assert [p for _, p in server.requests()] == [
        "/version", "/apis", "/apis/networking.k8s.io/v1"]


def test_missing_kinds_read_as_404_and_a_later_crd_is_found(server: FakeServer) -> None:
    api = Api(server, timeout=7.0)
    with pytest.raises(ApiException) as err:
        api.list("monitoring.coreos.com/v1", "PodMonitor", "ns", "a=b")
    assert err.value.status == 404 and "PodMonitor" in error_reason(err.value)
    assert api.get("monitoring.coreos.com/v1", "PodMonitor", "ns", "m") is None
    assert not api.delete("monitoring.coreos.com/v1", "PodMonitor", "ns", "m")
    assert not api.has_group_version("monitoring.coreos.com/v1")
    server.requests()
    # the Prometheus Operator is installed later: found on the next call
    server.groups["monitoring.coreos.com"] = MONITORING
    assert api.has_group_version("monitoring.coreos.com/v1")
    server.objects["/apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors/m"] = {"a": 1}
    assert api.get("monitoring.coreos.com/v1", "PodMonitor", "ns", "m") == {"a": 1}
    assert server.requests() == [
        ("GET", "/apis/monitoring.coreos.com/v1"),
        # the miss refreshes discovery once, then the object is read
        ("GET", "/version"), ("GET", "/apis"), ("GET", "/apis/monitoring.coreos.com/v1"),
        ("GET", "/apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors/m")]


def test_errors_keep_the_server_message_as_text(server: FakeServer) -> None:
    api = Api(server, timeout=7.0)
    assert api.get("networking.k8s.io/v1", "Ingress", "ns", "gone") is None
    assert not api.delete("networking.k8s.io/v1", "Ingress", "ns", "gone")
    with pytest.raises(ApiException) as err:
        api.patch("networking.k8s.io/v1", "Ingress", "ns", "gone", {"spec": {}})
    assert isinstance(err.value.body, str) and err.value.status == 404
    assert error_reason(err.value) == \
        "/apis/networking.k8s.io/v1/namespaces/ns/ingresses/gone not found"
