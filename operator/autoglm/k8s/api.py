"""A small dict-in, dict-out wrapper over the Kubernetes REST API.

Builders produce plain manifests; this reads, creates, patches and deletes them by
``apiVersion``/``kind`` through the official client's :class:`DynamicClient`, so one code
path serves every kind we own. Discovery, not a guess, gives each kind's resource name and
scope (``NetworkPolicy`` is ``networkpolicies``, ``Ingress`` is ``ingresses``).

Discovery costs requests, so each :class:`Api` keeps one ``DynamicClient`` and the
resources it found. A kind it does not know yet (a CRD created after start, such as ours or
the Prometheus Operator's ``PodMonitor``) makes the discoverer refresh and look once more;
a kind still not served reads as a 404 :class:`ApiException`, as a request for it would.
The wrapper is synchronous and thread-safe: kopf runs the handlers that call it in threads.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.discovery import LazyDiscoverer
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from kubernetes.dynamic.resource import Resource

Manifest = dict[str, Any]

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


class _MemoryDiscoverer(LazyDiscoverer):  # type: ignore[misc]
    """The lazy discoverer (one request per group version, when first used), kept in memory
    only: by default it shares a file in ``/tmp`` named after the server's address, which
    every process (and every test control plane on a reused port) would read and write."""

    NO_FILE = "/nonexistent/autoglm-discovery.json"  # never exists, never written

    def __init__(self, dynamic: Any, cache_file: str | None) -> None:
        super().__init__(dynamic, self.NO_FILE)

    def _write_cache(self) -> None:
        pass


class _Dynamic(DynamicClient):  # type: ignore[misc]
    """A ``DynamicClient`` whose every request, discovery's included, has a timeout."""

    def __init__(self, api_client: client.ApiClient, timeout: float) -> None:
        self.timeout = timeout  # set first: the discoverer makes requests while constructed
        super().__init__(api_client, discoverer=_MemoryDiscoverer)

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        params.setdefault("_request_timeout", self.timeout)
        try:
            return super().request(method, path, body, **params)
        except ApiException as e:
            # The dynamic client reads responses raw: keep the body text, as ApiException's is.
            if isinstance(e.body, bytes):
                e.body = e.body.decode("utf-8", "replace")
            raise


def _plain(_dynamic: Any, data: Any) -> Any:
    """The response as parsed JSON (the dynamic client would wrap it in ResourceInstance)."""
    return data


def _not_served(api_version: str, kind: str) -> ApiException:
    e = ApiException(status=404, reason="Not Found")
    e.body = json.dumps({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": f"the server does not serve {kind} in {api_version}"})
    return e


class Api:
    def __init__(self, api_client: client.ApiClient, timeout: float = 30.0) -> None:
        self.client = api_client
        self.timeout = timeout
        self._dynamic: _Dynamic | None = None
        self._resources: dict[tuple[str, str], Resource] = {}
        self._lock = threading.Lock()

    @property
    def dynamic(self) -> DynamicClient:
        """This client's ``DynamicClient`` (made on first use: it reads the API groups)."""
        if self._dynamic is None:
            with self._lock:
                if self._dynamic is None:
                    self._dynamic = _Dynamic(self.client, self.timeout)
        return self._dynamic

    def resource(self, api_version: str, kind: str, refresh: bool = False) -> Resource:
        """The discovered resource of a kind (its name, scope, subresources). Raises a 404
        :class:`ApiException` when the server does not serve it. ``refresh``: discover anew
        (a CRD changed since, e.g. it gained a subresource)."""
        key = (api_version, kind)
        found = None if refresh else self._resources.get(key)
        if found is None:
            dynamic = self.dynamic
            with self._lock:  # the discoverer's cache is not thread-safe
                found = None if refresh else self._resources.get(key)
                if found is None:
                    if refresh:
                        dynamic.resources.invalidate_cache()
                    prefix = "apis" if "/" in api_version else "api"
                    try:
                        # On a miss the discoverer re-reads the API groups and searches again.
                        found = dynamic.resources.get(prefix=prefix, api_version=api_version,
                                                      kind=kind)
                    except ResourceNotFoundError:
                        raise _not_served(api_version, kind) from None
                    self._resources[key] = found
        return found

    def _request(self, method: str, resource: Resource, namespace: str | None,
                 name: str | None = None, body: Any = None, **params: Any) -> Any:
        return self.dynamic.request(method, resource.path(name=name, namespace=namespace),
                                    body=body, serializer=_plain, **params)

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> Manifest | None:
        try:
            return dict(self._request("GET", self.resource(api_version, kind), namespace,
                                      name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str = "") -> list[Manifest]:
        out = self._request("GET", self.resource(api_version, kind), namespace,
                            label_selector=label_selector or None)
        return list(out.get("items", []))

    def create(self, manifest: Manifest) -> Manifest:
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        return dict(self._request("POST", resource, manifest["metadata"].get("namespace"),
                                  body=manifest))

    def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
              body: Any, subresource: str | None = None) -> Manifest:
        """A JSON merge patch (RFC 7386) of a dict body, a JSON patch (RFC 6902) of a list."""
        resource = self.resource(api_version, kind)
        if subresource is not None:
            if subresource not in resource.subresources:
                resource = self.resource(api_version, kind, refresh=True)
                if subresource not in resource.subresources:
                    raise _not_served(api_version, f"{kind}/{subresource}")
            resource = resource.subresources[subresource]
        kind_of_patch = "json-patch" if isinstance(body, list) else "merge-patch"
        return dict(self._request("PATCH", resource, namespace, name, body=body,
                                  content_type=f"application/{kind_of_patch}+json"))

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
               propagation: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        try:
            self._request("DELETE", self.resource(api_version, kind), namespace, name,
                          body={"propagationPolicy": propagation})
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def has_group_version(self, api_version: str) -> bool:
        """Whether the API server serves ``api_version`` (e.g. a CRD's group) at all: one
        request, asked anew each time (the discoverer's cache would answer from the past)."""
        root = "/apis" if "/" in api_version else "/api"
        try:
            self.dynamic.request("GET", f"{root}/{api_version}", serializer=_plain)
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
