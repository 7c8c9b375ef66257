"""The operator's ``Api`` against a real API server: kinds whose resource name is not
``kind.lower() + "s"``, cluster scope, and a CRD created after discovery ran."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from autoglm.k8s.api import Api
from autoglm.testing import eventually

pytestmark = pytest.mark.k8s

NET = "networking.k8s.io/v1"


def test_irregular_plurals(api: client.ApiClient, namespace: str) -> None:
    rest = Api(api)
    labels = {"app": "plurals"}
    policy: dict[str, Any] = {"apiVersion": NET, "kind": "NetworkPolicy",
              "metadata": {"name": "deny", "namespace": namespace, "labels": labels},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    ingress: dict[str, Any] = {"apiVersion": NET, "kind": "Ingress",
               "metadata": {"name": "web", "namespace": namespace, "labels": labels},
               "spec": {"defaultBackend": {"service": {"name": "web",
                                                       "port": {"number": 80}}}}}
    for m in (policy, ingress):
        uid = rest.create(m)["metadata"]["uid"]
        got = rest.get(NET, m["kind"], namespace, m["metadata"]["name"])
        assert got is not None and got["metadata"]["uid"] == uid
        assert [o["metadata"]["name"] for o in rest.list(NET, m["kind"], namespace, "app=plurals")
                ] == [m["metadata"]["name"]]
    # the old guess, kind.lower() + "s", names resources the server does not have
    for kind, plural in (("NetworkPolicy", "networkpolicies"), ("Ingress", "ingresses")):
        assert rest.resource(NET, kind).name == plural != f"{kind.lower()}s"
        with pytest.raises(ApiException) as err:
            rest.dynamic.request("GET", f"/apis/{NET}/namespaces/{namespace}/{kind.lower()}s")
        assert err.value.status == 404

    merged = rest.patch(NET, "NetworkPolicy", namespace, "deny",
                        {"spec": {"policyTypes": ["Ingress", "Egress"]}})
    assert merged["spec"]["policyTypes"] == ["Ingress", "Egress"]
    patched = rest.patch(NET, "Ingress", namespace, "web",
                         [{"op": "replace", "path": "/spec/defaultBackend/service/port/number",
                           "value": 8080}])
    assert patched["spec"]["defaultBackend"]["service"]["port"]["number"] == 8080
    lb = {"loadBalancer": {"ingress": [{"ip": "10.0.0.7"}]}}
    st = rest.patch(NET, "Ingress", namespace, "web", {"status": lb}, subresource="status")
    assert st["status"] == lb
    for m in (policy, ingress):
        assert rest.delete(NET, m["kind"], namespace, m["metadata"]["name"])
        assert rest.get(NET, m["kind"], namespace, m["metadata"]["name"]) is None
        assert not rest.delete(NET, m["kind"], namespace, m["metadata"]["name"])


def test_cluster_scope_and_a_crd_created_after_discovery(api: client.ApiClient,
                                                         namespace: str) -> None:
    rest = Api(api)
    assert namespace in {n["metadata"]["name"] for n in rest.list("v1", "Namespace", None)}
    group = f"late-{uuid.uuid4().hex[:6]}.autoglm.io"
    av = f"{group}/v1"
    # not served yet: reads as 404, as the PodMonitor of a cluster without Prometheus Operator
    assert rest.get(av, "Gadget", None, "g1") is None
    assert not rest.has_group_version(av)
    with pytest.raises(ApiException) as err:
        rest.list(av, "Gadget", None)
    assert err.value.status == 404

    crd: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgetry.{group}"},
        "spec": {"group": group, "scope": "Cluster",
                 "names": {"plural": "gadgetry", "singular": "gadget", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {
                                   "type": "object",
                                   "x-kubernetes-preserve-unknown-fields": True}}}]}}
    rest.create(crd)  # a cluster-scoped kind
    try:
        eventually(lambda: rest.has_group_version(av), f"{av} to be served")
        # the same Api, its discovery done before the CRD existed, finds the kind
        created = rest.create({"apiVersion": av, "kind": "Gadget", "metadata": {"name": "g1"},
                               "spec": {"size": 1}})
        assert rest.resource(av, "Gadget").name == "gadgetry"
        assert "namespace" not in created["metadata"]
        # a cluster-scoped kind ignores the namespace it is given
        got = rest.get(av, "Gadget", namespace, "g1")
        assert got is not None and got["metadata"]["uid"] == created["metadata"]["uid"]
        st = rest.patch(av, "Gadget", None, "g1", {"status": {"ok": True}},
                        subresource="status")
        assert st["status"] == {"ok": True}
        assert rest.delete(av, "Gadget", None, "g1")
    finally:
        rest.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None,
                    f"gadgetry.{group}")
