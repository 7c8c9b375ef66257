"""kubectl in one namespace of the test control plane, and resources made from the example."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from autoglm.spec import KIND
from autoglm.testing import eventually
from autoglm.testing.controlplane import ControlPlane
from autoglm.testing.operator import REPO_ROOT

TINY = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
CHILD_KINDS = "deployments,services,serviceaccounts,roles,rolebindings"


class Cluster:
    """kubectl in one namespace, as the admin."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp, self.ns = cp, namespace

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cp.kubectl("-n", self.ns, *args, input=input, check=check)

    def apply(self, obj: dict[str, Any], check: bool = True) -> Any:
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj), check=check)

    def get(self, what: str, name: str | None = None) -> Any:
        args = ["get", what, *([name] if name else []), "-o", "json"]
        return json.loads(self.kubectl(*args).stdout)

    def resource(self, name: str) -> dict[str, Any]:
        return dict(self.get("autoglmdeployments", name))

    def children(self, instance: str) -> list[dict[str, Any]]:
        items = self.get(CHILD_KINDS + ",podmonitors" if self.has_monitors() else CHILD_KINDS)
        return [o for o in items["items"]
                if o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == instance]

    def has_monitors(self) -> bool:
        return self.cp.kubectl("get", "crd", "podmonitors.monitoring.coreos.com",
                               check=False).returncode == 0

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        st = self.resource(name).get("status", {})
        return next((c for c in st.get("conditions", []) if c["type"] == type_), None)

    def wait_ready(self, name: str, timeout: float = 90) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            r = self.resource(name)
            gen = r["metadata"]["generation"]
            st = r.get("status", {})
            ok = st.get("phase") == "Ready" and st.get("observedGeneration") == gen
            return r if ok else None
        return dict(eventually(ready, f"{name} to be Ready", timeout))

    def serving_snapshot(self, instance: str) -> dict[tuple[str, str], Any]:
        """What a spec change must not touch: identity, generation and spec of children."""
        return {(o["kind"], o["metadata"]["name"]):
                (o["metadata"]["uid"], o["metadata"].get("generation"), o.get("spec"),
                 o.get("rules"), o.get("roleRef"))
                for o in self.children(instance)}

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.get("events")["items"]
        return [e for e in items if e["involvedObject"].get("name") == name
                and e["involvedObject"].get("kind") == KIND]


def tiny(name: str = "tiny", **spec_changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = copy.deepcopy(TINY)
    obj["metadata"]["name"] = name
    for path, value in spec_changes.items():
        node = obj["spec"]
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return obj
