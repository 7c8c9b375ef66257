"""A small dict-in, dict-out wrapper over the Kubernetes REST API.

Builders produce plain manifests; this reads, creates, merge-patches and deletes them by
``apiVersion``/``kind`` through the official client's authenticated transport, so one code
path serves every kind we own.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

Manifest = dict[str, Any]

PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodMonitor": "podmonitors",
    "AutoGLMDeployment": "autoglmdeployments",
    "Event": "events",
    "Pod": "pods",
}
# Kinds an AutoGLMDeployment owns, listed by label when pruning.
OWNED_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ServiceAccount"),
               ("rbac.authorization.k8s.io/v1", "Role"),
               ("rbac.authorization.k8s.io/v1", "RoleBinding"),
               ("monitoring.coreos.com/v1", "PodMonitor"))


def load_client() -> client.ApiClient:
    """In-cluster credentials in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
          subresource: str | None = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    sub = f"/{subresource}" if subresource else ""
    plural = PLURALS.get(kind) or f"{kind.lower()}s"
    return f"{root}{ns}/{plural}{tail}{sub}"


class Api:
    def __init__(self, api_client: client.ApiClient, timeout: float = 30.0) -> None:
        self.client = api_client
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, query: list[Any] | None = None,
              content_type: str = "application/json") -> Any:
        return self.client.call_api(
            path, method, query_params=query or [], body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            response_type="object", auth_settings=["BearerToken"],
            _return_http_data_only=True, _request_timeout=self.timeout)

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> Manifest | None:
        try:
            return dict(self._call("GET", _path(api_version, kind, namespace, name)))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str = "") -> list[Manifest]:
        query = [("labelSelector", label_selector)] if label_selector else []
        out = self._call("GET", _path(api_version, kind, namespace), query=query)
        return list(out.get("items", []))

    def create(self, manifest: Manifest) -> Manifest:
        meta = manifest["metadata"]
        return dict(self._call("POST", _path(manifest["apiVersion"], manifest["kind"],
                                             meta.get("namespace")), body=manifest))

    def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
              body: Any, subresource: str | None = None) -> Manifest:
        """A JSON merge patch (RFC 7386) of a dict body, a JSON patch (RFC 6902) of a list."""
        kind_of_patch = "json-patch" if isinstance(body, list) else "merge-patch"
        return dict(self._call("PATCH", _path(api_version, kind, namespace, name, subresource),
                               body=body, content_type=f"application/{kind_of_patch}+json"))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
               propagation: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        try:
            self._call("DELETE", _path(api_version, kind, namespace, name),
                       body={"propagationPolicy": propagation})
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def has_group_version(self, api_version: str) -> bool:
        """Whether the API server serves ``api_version`` (e.g. a CRD's group) at all."""
        try:
            self._call("GET", f"/apis/{api_version}")
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise


def error_reason(e: ApiException) -> str:
    """The API server's own message of a failed call, for conditions and Events."""
    try:
        return str(json.loads(e.body).get("message") or e.reason)
    except (TypeError, ValueError):
        return str(e.reason)
