"""The CustomResourceDefinition, generated from the typed spec (``autoglm crd``).

Pydantic's JSON schema is turned into a Kubernetes *structural* schema: references inlined,
optionals unwrapped, titles dropped, constants as one-value enums, factory defaults written
out (so the API server fills them in), and each class's :class:`~autoglm.spec.Rule` added
as a CEL validation (the resource's own rules, which see metadata.name, at the root).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter

from autoglm import spec as s


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    branches = node.get("anyOf")
    if branches and {"type": "null"} in branches:  # Optional[X]: X, not nullable
        rest = [b for b in branches if b != {"type": "null"}]
        node = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **node}
        return _resolve(node, defs)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "title" or (k == "additionalProperties" and v is False):
            continue
        if k == "default" and v is None:
            continue
        if k == "const":  # a one-value Literal: OpenAPI 3.0 has no const
            out["enum"] = [v]
            continue
        if k in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(v, bool):
            # JSON Schema 2020-12 → OpenAPI 3.0: a bound plus a boolean flag
            out["minimum" if k == "exclusiveMinimum" else "maximum"] = v
            out[k] = True
            continue
        out[k] = v if k in ("default", "enum") else _resolve(v, defs)
    return out


def _model_of(annotation: Any) -> type[s._Object] | None:
    if isinstance(annotation, type) and issubclass(annotation, s._Object):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found:
                return found
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        return _model_of(args[1])
    return None


def _decorate(schema: dict[str, Any], cls: type[BaseModel]) -> dict[str, Any]:
    for name, field in cls.model_fields.items():
        prop = schema["properties"][field.alias or name]
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            prop["default"] = TypeAdapter[Any](field.annotation or Any).dump_python(
                value, mode="json", by_alias=True, exclude_none=True)
        sub = _model_of(field.annotation)
        if sub is not None:
            target = prop.get("additionalProperties", prop)
            if "items" in prop:
                target = prop["items"]
            _decorate(target, sub)
    rules = getattr(cls, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = _validations(rules)
    return schema


def _validations(rules: tuple[s.Rule, ...]) -> list[dict[str, str]]:
    return [{"rule": r.cel, "message": r.message, "fieldPath": f".{r.field}"} for r in rules]


def openapi_schema(cls: type[BaseModel]) -> dict[str, Any]:
    raw = cls.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    return _decorate(_resolve(raw, defs), cls)


def _status_schema() -> dict[str, Any]:
    schema = openapi_schema(s.AutoGLMStatus)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Version", "type": "integer", "jsonPath": ".spec.model.version",
     "description": "The version asked for"},
    {"name": "Serving", "type": "integer", "jsonPath": ".status.activeVersion",
     "description": "The version taking traffic"},
    {"name": "Slot", "type": "string", "jsonPath": ".status.activeSlot"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Swap", "type": "string", "jsonPath": ".status.swap.phase",
     "description": "Phase of the version swap"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready",
     "description": "Ready workloads of the serving slot"},
    {"name": "Routers", "type": "string", "jsonPath": ".status.routers",
     "description": "Ready / wanted router pods of the serving slot"},
    {"name": "Servers", "type": "integer", "jsonPath": ".status.expertServers",
     "description": "Expert servers of the serving slot"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "priority": 1,
     "jsonPath": '.status.conditions[?(@.type=="Ready")].message'},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}",
                     "labels": {"app.kubernetes.io/name": "autoglm"}},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {"kind": s.KIND, "plural": s.PLURAL, "singular": s.SINGULAR,
                      "shortNames": list(s.SHORT_NAMES), "categories": ["autoglm"]},
            "versions": [{
                "name": s.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A sparse Mixture-of-Experts model served on Triton, "
                                   "expert servers that each hold several experts, "
                                   "autoscaled per expert.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        # name declared: the resource's rules report at metadata.name
                        "metadata": {"type": "object",
                                     "properties": {"name": {"type": "string"}}},
                        "spec": openapi_schema(s.AutoGLMSpec),
                        "status": _status_schema(),
                    },
                    "x-kubernetes-validations": _validations(s.RESOURCE_RULES),
                }},
            }],
        },
    }
