"""Make the cluster hold the desired objects: list, compare, create or merge-patch, prune.

One list per kind (by the resource's labels) is the whole read: a pass over a converged
resource costs six requests, not one per object. Idempotent: an object that already holds
every desired field (values the API server filled in are ignored) is left alone, so a
second pass changes nothing. Tolerant: 404 and 409 mean someone else got there first.
The expert servers' placement is the autoscaler's: the desired servers are built from the
live ones (k8s/rollout.py), so reconciling never undoes a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.client.rest import ApiException

from autoglm.k8s.api import OWNED_KINDS, Api, Manifest
from autoglm.spec import quantity


class ObjectConflict(RuntimeError):
    """A desired object's name is taken by an object this resource does not own."""


@dataclass(frozen=True)
class Change:
    action: Literal["created", "updated", "deleted"]
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.action} {self.kind} {self.name}"


VERSION_LABEL = "autoglm.io/model-version"


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return quantity(a) == quantity(b)
    except ValueError:
        return False


def holds(live: Any, want: Any, path: tuple[str, ...] = ()) -> bool:
    """Whether ``live`` has every field of ``want`` (extra fields in ``live`` are defaults)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and holds(live[k], v, (*path, k)) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(live, list) and len(live) == len(want)
                and all(holds(a, b, path) for a, b in zip(live, want, strict=True)))
    if live == want:
        return True
    # The API server canonicalizes quantities ("1000m" reads back as "1").
    return "resources" in path and _same_quantity(live, want)


def owned_by(live: Manifest, uid: str) -> bool:
    return any(r.get("uid") == uid for r in live["metadata"].get("ownerReferences", []))


Key = tuple[str, str]  # (kind, name)


def selector(instance: str) -> str:
    """The label selector of every object (and pod) a resource owns."""
    return f"app.kubernetes.io/instance={instance},app.kubernetes.io/name=autoglm"


def named(observed: dict[Key, Manifest], kind: str) -> dict[str, Manifest]:
    """The observed objects of one kind, by name."""
    return {name: o for (k, name), o in observed.items() if k == kind}


def observe(api: Api, instance: str, namespace: str,
            kinds: tuple[tuple[str, str], ...] = OWNED_KINDS) -> dict[Key, Manifest]:
    """The objects labelled as this resource's, by kind and name (a kind whose CRD is not
    installed, e.g. PodMonitor, has none)."""
    out: dict[Key, Manifest] = {}
    for api_version, kind in kinds:
        try:
            items = api.list(api_version, kind, namespace, selector(instance))
        except ApiException as e:
            if e.status == 404:
                continue
            raise
        # A list's items carry no apiVersion/kind; restored so they compare with manifests.
        out.update({(kind, o["metadata"]["name"]): {**o, "apiVersion": api_version,
                                                     "kind": kind} for o in items})
    return out


def converge(api: Api, uid: str, desired: list[Manifest],
             observed: dict[Key, Manifest]) -> list[Change]:
    """Create or patch each desired object against ``observed``. An object missing there
    may still exist without our labels (edited, or someone else's): creation then meets a
    409 and the object is read to tell which."""
    changes: list[Change] = []
    for m in desired:
        meta = m["metadata"]
        key = (m["apiVersion"], m["kind"], meta["namespace"], meta["name"])
        live = observed.get((m["kind"], meta["name"]))
        if live is None:
            try:
                api.create(m)
                changes.append(Change("created", m["kind"], meta["name"]))
                continue
            except ApiException as e:
                if e.status != 409:
                    raise
                live = api.get(*key)
                if live is None:
                    raise
        if not owned_by(live, uid):
            raise ObjectConflict(f"{m['kind']} {meta['name']} exists and is not owned by this "
                                 "AutoGLMDeployment; rename or delete it")
        if not holds(live, m):
            api.patch(*key, m)
            changes.append(Change("updated", m["kind"], meta["name"]))
    return changes


def prune(api: Api, namespace: str, uid: str, desired: list[Manifest],
          observed: dict[Key, Manifest]) -> list[Change]:
    """Delete objects this resource owns that are no longer desired (e.g. fewer experts)."""
    keep = {(m["kind"], m["metadata"]["name"]) for m in desired}
    versions = {kind: v for v, kind in OWNED_KINDS}
    changes: list[Change] = []
    for (kind, name), obj in observed.items():
        if (kind, name) not in keep and owned_by(obj, uid) and api.delete(
                versions[kind], kind, namespace, name):
            changes.append(Change("deleted", kind, name))
    return changes
