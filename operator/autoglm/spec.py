"""The AutoGLMDeployment resource: one typed model of its spec and status.

Every rule lives here once. Bounds, enums and defaults become the CRD's OpenAPI schema, and
each cross-field :class:`Rule` is both a CEL ``x-kubernetes-validations`` rule (enforced by the
API server) and a Python check (enforced by :func:`parse`, which the local runtime also
uses), so both refuse the same specs with the same message. What only Python can judge
(quantities, URIs, flags) is checked in :func:`parse` and reported as ``InvalidSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "autoglm.io"
VERSION = "v1alpha1"
KIND = "AutoGLMDeployment"
PLURAL = "autoglmdeployments"
SINGULAR = "autoglmdeployment"
SHORT_NAMES = ("autoglm", "agd")
API_VERSION = f"{GROUP}/{VERSION}"

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")

# Kubernetes resource quantities: "500m", "2Gi", 4.
_QUANTITY_RE = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkKMGTPE]i?)?$"
Quantity = Annotated[
    str | int,
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": _QUANTITY_RE, "x-kubernetes-int-or-string": True}),
]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Flags the operator sets on every tritonserver; extraArgs may not change them.
MANAGED_TRITON_FLAGS = ("--model-repository", "--model-control-mode", "--load-model",
                        "--http-port", "--grpc-port", "--metrics-port")
REPOSITORY_SCHEMES = ("s3://", "gs://", "as://", "/")


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, the same predicate in Python."""

    field: str  # the field the message is about, from the rule's object
    cel: str
    message: str
    check: Callable[[Any], bool]


class _Object(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid", frozen=True)
    rules: ClassVar[tuple[Rule, ...]] = ()


class Resources(_Object):
    """Container resources, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    def as_k8s(self, gpus: int = 0) -> dict[str, dict[str, str]]:
        out = {k: {n: str(q) for n, q in v.items()}
               for k, v in (("requests", self.requests), ("limits", self.limits)) if v}
        if gpus:
            out.setdefault("requests", {})["nvidia.com/gpu"] = str(gpus)
            out.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
        return out


class ModelVolume(_Object):
    """A PersistentVolumeClaim holding the model repository, mounted read-only."""

    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_LABEL)
    mount_path: str = Field("/models", pattern=r"^/")


class ModelSpec(_Object):
    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL,
                      description="Model name, for labels and metrics.")
    version: int = Field(ge=1, description="Model version to serve (Triton version folder).")
    repository: str = Field(min_length=1, max_length=1024,
                            description="Triton model repository: a path in the pod "
                                        "(see volume), s3://, gs:// or as://.")
    volume: ModelVolume | None = None
    num_experts: int = Field(
        ge=1, le=256,
        description="Routed experts per MoE layer: one expert Deployment each. Servers refuse "
                    "a version with another number.")
    top_k: int | None = Field(
        None, ge=1, le=16,
        description="Experts each token is routed to. Only the built-in tiny builder needs "
                    "it; when given, servers refuse a version that disagrees.")
    layers: int | None = Field(
        None, ge=1, le=256,
        description="Decoder layers (num_hidden_layers). Only the built-in tiny builder needs "
                    "it; when given, servers refuse a version that disagrees.")


class TritonSpec(_Object):
    image: str = Field("autoglm/triton:0.1.0", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "1", "memory": "2Gi"}),
        description="Resources of router containers (experts have their own).")
    extra_args: list[str] = Field(default_factory=list, max_length=64,
                                  description="More tritonserver flags.")


class RouterSpec(_Object):
    replicas: int = Field(1, ge=1, le=64)


class ExpertsSpec(_Object):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("maxReplicas", "self.minReplicas <= self.maxReplicas",
             "maxReplicas must be at least minReplicas",
             lambda s: s.min_replicas <= s.max_replicas),
    )
    min_replicas: int = Field(1, ge=1, le=64,
                              description="Replicas per expert never go below this (never 0).")
    max_replicas: int = Field(4, ge=1, le=64)
    replica_budget: int | None = Field(
        None, ge=1, le=4096,
        description="Most expert replicas in all, shared by load; default numExperts * max.")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per expert replica.")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "1", "memory": "2Gi"}))


class AutoscalingSpec(_Object):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("prometheusUrl", "!self.enabled || has(self.prometheusUrl)",
             "prometheusUrl is required when autoscaling is enabled",
             lambda s: not s.enabled or s.prometheus_url is not None),
    )
    enabled: bool = True
    prometheus_url: str | None = Field(None, pattern=r"^https?://", max_length=1024)
    signal: Literal["tokens"] = Field(
        "tokens", description="What replicas follow: the tokens/s the gate routes to each "
                              "expert (the leading signal).")
    target: float = Field(200.0, gt=0, description="Routed tokens/s one replica should serve.")
    queue_guard_milliseconds: int | None = Field(
        None, ge=1, le=600000,
        description="If an expert's mean Triton queue time exceeds this, it gets at least one "
                    "more replica whatever its token rate; unset: no guard.")
    tolerance: float = Field(0.1, ge=0, le=1)
    interval_seconds: int = Field(15, ge=1, le=3600)
    scale_up_limit: int = Field(2, ge=1, le=64,
                                description="Most replicas added to an expert per interval.")
    stabilization_seconds: int = Field(300, ge=0, le=86400,
                                       description="Scale-down stabilization window.")


class RolloutSpec(_Object):
    ready_timeout_seconds: int = Field(600, ge=10, le=86400)
    canary: bool = True
    drain_timeout_seconds: int = Field(60, ge=0, le=3600)
    keep_previous_seconds: int = Field(600, ge=0, le=604800,
                                       description="Keep the old slot warm for rollback.")


class GatewaySpec(_Object):
    image: str = Field("autoglm/operator:0.1.0", min_length=1)
    replicas: int = Field(1, ge=1, le=64)
    port: int = Field(8000, ge=1, le=65535)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "250m", "memory": "256Mi"}))


class AutoGLMSpec(_Object):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("model.topK", "!has(self.model.topK) || self.model.topK <= self.model.numExperts",
             "model.topK must not exceed model.numExperts",
             lambda s: s.model.top_k is None or s.model.top_k <= s.model.num_experts),
        Rule("experts.replicaBudget",
             "!has(self.experts.replicaBudget) || "
             "self.experts.replicaBudget >= self.model.numExperts * self.experts.minReplicas",
             "experts.replicaBudget must hold minReplicas for every expert",
             lambda s: s.experts.replica_budget is None
             or s.experts.replica_budget >= s.model.num_experts * s.experts.min_replicas),
    )
    model: ModelSpec
    triton: TritonSpec = Field(default_factory=TritonSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
    autoscaling: AutoscalingSpec = Field(
        default_factory=lambda: AutoscalingSpec(enabled=False),
        description="Off when absent; a block turns it on, with its prometheusUrl.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @property
    def replica_budget(self) -> int:
        e = self.experts
        return e.replica_budget or self.model.num_experts * e.max_replicas


# -- status ---------------------------------------------------------------------------------

class _StatusObject(_Object):
    # Status is ours to write but others may add to it; never fail on what we don't know.
    model_config = ConfigDict(extra="ignore")


class Condition(_StatusObject):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


class SlotStatus(_StatusObject):
    version: int
    ready: bool = False
    expert_replicas: list[int] = Field(default_factory=list,
                                       description="Replicas per expert, by expert index.")


class WarmSlotStatus(_StatusObject):
    slot: Slot
    version: int
    until: str = Field(description="When the warm slot is retired (RFC 3339).")


class SwapStatus(_StatusObject):
    """The double-buffered swap's state (swap.SwapState): kept here so a restarted operator
    resumes exactly where it was."""

    phase: Literal["Idle", "Staging", "Warming", "Verifying", "Flipping", "Draining",
                   "Aborting"] = "Idle"
    since: str | None = Field(None, description="When the phase began (RFC 3339).")
    target_version: int | None = Field(None, description="The version being staged.")
    previous: WarmSlotStatus | None = Field(
        None, description="The slot that served before, kept warm for a rollback.")
    failed_version: int | None = Field(
        None, description="The last version that failed; not retried until another is "
                          "asked for.")
    reason: str = ""


class ExpertStatus(_StatusObject):
    expert: int
    replicas: int
    ready_replicas: int = 0
    desired: int
    load: float | None = Field(None, description="Tokens/s the gate routes to it.")


class AutoscalingStatus(_StatusObject):
    metrics_available: bool
    reason: str = ""
    imbalance: float | None = Field(
        None, description="(max - mean) / mean of the load per replica across experts.")
    last_decision: str | None = Field(None, description="RFC 3339.")
    experts: list[ExpertStatus] = Field(default_factory=list)


class AutoGLMStatus(_StatusObject):
    observed_generation: int | None = None
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"] | None = None
    active_slot: Slot | None = None
    active_version: int | None = None
    ready: str | None = Field(None, description="Ready workloads / workloads, e.g. 5/5.")
    slots: dict[str, SlotStatus] = Field(default_factory=dict)
    swap: SwapStatus | None = None
    autoscaling: AutoscalingStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)


# -- parsing --------------------------------------------------------------------------------

class InvalidSpec(ValueError):
    """A spec the operator refuses; ``field`` names where (e.g. ``spec.model.topK``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_rules(obj: _Object, path: str) -> None:
    for rule in type(obj).rules:
        if not rule.check(obj):
            raise InvalidSpec(f"{path}.{rule.field}", rule.message)
    for name, info in type(obj).model_fields.items():
        child = getattr(obj, name)
        if isinstance(child, _Object):
            _check_rules(child, f"{path}.{info.alias or name}")


def quantity(q: str | int) -> Decimal:
    """A Kubernetes quantity as a number (binary and decimal suffixes)."""
    s = str(q)
    m = re.fullmatch(r"([+-]?[\d.]+(?:[eE][+-]?\d+)?)([numkKMGTPE]i?)?", s)
    if not m:
        raise ValueError(f"not a quantity: {s!r}")
    try:
        base = Decimal(m.group(1))
    except InvalidOperation as e:
        raise ValueError(f"not a quantity: {s!r}") from e
    suffix = m.group(2) or ""
    dec = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
    binary = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
    if suffix in binary:
        return base * Decimal(2 ** binary[suffix])
    if suffix in dec:
        return base.scaleb(dec[suffix])
    raise ValueError(f"not a quantity: {s!r}")


def _check_resources(res: Resources, path: str) -> None:
    for part in ("requests", "limits"):
        for name, q in getattr(res, part).items():
            try:
                quantity(q)
            except ValueError:
                raise InvalidSpec(f"{path}.{part}.{name}", f"{q!r} is not a quantity") from None
            if name == "nvidia.com/gpu":
                raise InvalidSpec(f"{path}.{part}.{name}", "set GPUs with spec.experts.gpus")
    for name, limit in res.limits.items():
        req = res.requests.get(name)
        if req is not None and quantity(req) > quantity(limit):
            raise InvalidSpec(f"{path}.requests.{name}",
                              f"request {req} exceeds limit {limit}")


def _semantic_checks(spec: AutoGLMSpec, name: str) -> None:
    longest = f"{name}-b-expert-{spec.model.num_experts - 1}"
    if len(longest) > 63:
        raise InvalidSpec("metadata.name", f"too long: child {longest!r} would exceed 63 "
                                           "characters; use a shorter name")
    if not spec.model.repository.startswith(REPOSITORY_SCHEMES):
        raise InvalidSpec("spec.model.repository",
                          f"{spec.model.repository!r} must be an absolute path, s3://, gs:// "
                          "or as:// location")
    vol = spec.model.volume
    if spec.model.repository.startswith("/") and vol is not None and not (
            spec.model.repository + "/").startswith(vol.mount_path.rstrip("/") + "/"):
        raise InvalidSpec("spec.model.repository",
                          f"path is outside the volume mounted at {vol.mount_path}")
    for i, arg in enumerate(spec.triton.extra_args):
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_TRITON_FLAGS:
            raise InvalidSpec(f"spec.triton.extraArgs[{i}]",
                              f"{flag} is set by the operator and cannot be overridden")
    for path, res in (("spec.triton.resources", spec.triton.resources),
                      ("spec.experts.resources", spec.experts.resources),
                      ("spec.gateway.resources", spec.gateway.resources)):
        _check_resources(res, path)


def parse(spec: Mapping[str, Any], name: str) -> AutoGLMSpec:
    """The typed spec of resource ``name``, or :class:`InvalidSpec` naming the field."""
    try:
        parsed = AutoGLMSpec.model_validate(spec)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise InvalidSpec(f"spec{loc}", err["msg"]) from None
    _check_rules(parsed, "spec")
    _semantic_checks(parsed, name)
    return parsed


def parse_status(status: Mapping[str, Any] | None) -> AutoGLMStatus:
    """The typed status; unknown or damaged fields are dropped rather than fatal."""
    try:
        return AutoGLMStatus.model_validate(status or {})
    except ValidationError:
        return AutoGLMStatus()
