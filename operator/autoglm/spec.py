"""The AutoGLMDeployment resource: one typed model of its spec and status.

Every rule lives here once. Bounds, enums, patterns and defaults become the CRD's OpenAPI
schema, and each :class:`Rule` (a cross-field rule of an object, or of the whole resource)
and :class:`Check` (a rule on one value) is both a CEL ``x-kubernetes-validations`` rule,
enforced by the API server, and the same predicate in Python, enforced by :func:`parse` (the
operator, the local runtime) and :func:`validate_resource` (``autoglm validate``): both
refuse the same specs, naming the field, with the same message.

Python reads a spec as the API server does: a null is an absent field, a string is never a
number, and YAML's ``4.0`` is the integer 4 (kubectl sends it so). Nothing is left that only
the operator can judge; ``InvalidSpec`` still reports a spec stored before a rule existed,
and a number the API server's type check takes for an integer though it is not one
(``version: 1.0000000001``: within 1e-9 of one), which it stores as it came.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_UP, Decimal, InvalidOperation, localcontext
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

GROUP = "autoglm.io"
VERSION = "v1alpha1"
KIND = "AutoGLMDeployment"
PLURAL = "autoglmdeployments"
SINGULAR = "autoglmdeployment"
SHORT_NAMES = ("autoglm", "agd")
API_VERSION = f"{GROUP}/{VERSION}"

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")

INT64_MAX = 2**63 - 1
# The largest integer a JSON number holds exactly: a bound the API server compares exactly
# (it reads a schema's maximum as a float64 and converts it to int64).
JSON_INT_MAX = 2**53 - 1
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Flags the operator sets on every tritonserver (autoglm/triton.py); extraArgs may not change
# them. --model-store is tritonserver's other name for --model-repository.
MANAGED_TRITON_FLAGS = ("--model-repository", "--model-store", "--model-control-mode",
                        "--load-model", "--http-port", "--grpc-port", "--metrics-port",
                        "--allow-http", "--allow-grpc", "--allow-metrics",
                        "--backend-directory")
# The longest name the operator gives a child is an expert server's Deployment,
# "<name>-b-experts-<s>"; it is kept a DNS-1035 label of at most 63 characters for servers
# up to numExperts - 1 (the Services, "<name>-b-experts" and "<name>-b-router", are shorter).
# The resource's own name names the gateway Service: a DNS-1035 label too.
CHILD_NAME_MAX = 63
LONGEST_CHILD_INFIX = "-b-experts-"
NAME_BUDGET = CHILD_NAME_MAX - len(LONGEST_CHILD_INFIX)  # for the name and the last index
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# What the API server requires of every custom resource's name (NameIsDNSSubdomain).
DNS1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS1123_SUBDOMAIN_MAX = 253


# -- rules ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, the same predicate in Python.

    ``field`` is where the API server reports it (``fieldPath``, relative to the object the
    rule is on); ``explain``, if given, names the exact fields in Python's report (a map's
    key, say), which the API server can only report as the map.
    """

    field: str  # the field the message is about, from the rule's object
    cel: str
    message: str
    check: Callable[[Any], bool]
    explain: Callable[[Any], list[tuple[str, str]]] | None = None

    def failures(self, obj: Any) -> list[tuple[str, str]]:
        """(field, message) of each failure; none when the rule holds."""
        if self.check(obj):
            return []
        return (self.explain(obj) if self.explain else []) or [(self.field, self.message)]


@dataclass(frozen=True)
class Check:
    """A rule on one value (a string, a list's item), for ``Annotated``: CEL on the value's
    own schema (``self`` is the value), the same predicate in Python, reported at the value."""

    cel: str
    message: str
    check: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def after(value: Any) -> Any:
            if not self.check(value):
                raise PydanticCustomError("rule", self.message)
            return value

        return core_schema.no_info_after_validator_function(after, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = dict(handler(schema))
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []),
                                           {"rule": self.cel, "message": self.message}]
        return out


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with a resource, at ``field`` (e.g. ``spec.model.topK``)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# -- quantities -----------------------------------------------------------------------------

# Kubernetes resource quantities as a Pod takes them: "500m", "2Gi", "1.5", "1e3", 4; never
# negative. Exponents are kept short, so that every quantity the pattern admits is one the
# API server's quantity() parses.
QUANTITY_PATTERN = (r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
                    r"([eE][+-]?[0-9]{1,2}|[numkMGTPE]|[KMGTPE]i)?$")
QUANTITY_MAX_LENGTH = 64
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
            "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_NANO = Decimal("1e-9")


def quantity(q: str | int) -> Decimal:
    """A Kubernetes quantity as a number (binary and decimal suffixes), rounded up to a
    whole nano as the API server rounds it. Not ``kubernetes.utils.parse_quantity``: the
    pure core imports no kubernetes (importing it loads the whole API client), and that one
    accepts what the API server refuses ("1K", "inf"), keeps 28 digits and does not round."""
    s = str(q)
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                     r"([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?", s)
    if not m:
        raise ValueError(f"not a quantity: {s!r}")
    suffix = m.group(2) or ""
    with localcontext() as ctx:
        ctx.prec = 200  # exact for every quantity of at most QUANTITY_MAX_LENGTH characters
        try:
            base = Decimal(m.group(1))
            if re.fullmatch(r"[eE][+-]?[0-9]+", suffix):
                value = base.scaleb(int(suffix[1:]))
            elif suffix in _BINARY:
                value = base * Decimal(2 ** _BINARY[suffix])
            else:
                value = base.scaleb(_DECIMAL[suffix])
            return value if value == value.to_integral_value() else value.quantize(
                _NANO, rounding=ROUND_UP)
        except (InvalidOperation, ArithmeticError) as e:
            raise ValueError(f"not a quantity: {s!r}") from e


def _quantity_value(v: Any) -> str | int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise PydanticCustomError("quantity", "must be an integer or a quantity string")
    if isinstance(v, int):
        if not 0 <= v <= INT64_MAX:
            raise PydanticCustomError("quantity", "must be at least 0 (and fit in 64 bits)")
        return v
    if len(v) > QUANTITY_MAX_LENGTH:
        raise PydanticCustomError("quantity", f"may not be more than {QUANTITY_MAX_LENGTH} "
                                              "characters")
    if not re.fullmatch(QUANTITY_PATTERN[1:-1], v):
        raise PydanticCustomError("quantity", "not a quantity (such as 500m, 2Gi or 4)")
    return v


Quantity = Annotated[
    str | int,
    PlainValidator(_quantity_value),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}],
                    "x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
                    "maxLength": QUANTITY_MAX_LENGTH, "minimum": 0}),
]
RESOURCE_NAMES_MAX = 16  # resource names in requests (or limits): bounds the CEL rules' cost


def _q(x: str) -> str:
    return f"quantity(string({x}))"


def _request_above_limit(res: Resources) -> list[tuple[str, str]]:
    return [(f"requests.{k}", f"request {res.requests[k]} exceeds limit {lim}")
            for k, lim in res.limits.items()
            if k in res.requests and quantity(res.requests[k]) > quantity(lim)]


# -- spec -----------------------------------------------------------------------------------

def _as_the_api_server_reads(data: Any, fields: set[str], maps: set[str]) -> Any:
    """A null field is an absent one (the API server drops it, then defaults the field), and
    so is a null in a map; an integral number is an integer (kubectl sends YAML's 4.0 as 4).
    A null unknown field is still unknown."""
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        if v is None and k in fields:
            continue
        if k in maps and isinstance(v, dict):
            v = {mk: mv for mk, mv in v.items() if mv is not None}
        out[k] = int(v) if isinstance(v, float) and v.is_integer() and abs(v) <= INT64_MAX else v
    return out


class _Object(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        fields = {f.alias or n for n, f in cls.model_fields.items()}
        maps = {f.alias or n for n, f in cls.model_fields.items()
                if typing.get_origin(f.annotation) is dict}
        return _as_the_api_server_reads(data, fields, maps)

    @model_validator(mode="after")
    def _rules(self) -> _Object:
        failures = [f for rule in type(self).rules for f in rule.failures(self)]
        if failures:
            raise PydanticCustomError("rules", "{summary}", {
                "summary": "; ".join(f"{f}: {m}" for f, m in failures),
                "failures": tuple(failures)})
        return self


class Resources(_Object):
    """Container resources, as in a Pod spec."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("requests",
             "!has(self.requests) || !has(self.limits) || self.limits.all(k, "
             "!(k in self.requests) || "
             f"!isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || "
             f"{_q('self.requests[k]')}.compareTo({_q('self.limits[k]')}) <= 0)",
             "requests must not exceed limits",
             lambda r: not _request_above_limit(r), _request_above_limit),
        Rule("requests", "!has(self.requests) || !('nvidia.com/gpu' in self.requests)",
             "nvidia.com/gpu: set GPUs with spec.experts.gpus",
             lambda r: "nvidia.com/gpu" not in r.requests,
             lambda r: [("requests.nvidia.com/gpu", "set GPUs with spec.experts.gpus")]),
        Rule("limits", "!has(self.limits) || !('nvidia.com/gpu' in self.limits)",
             "nvidia.com/gpu: set GPUs with spec.experts.gpus",
             lambda r: "nvidia.com/gpu" not in r.limits,
             lambda r: [("limits.nvidia.com/gpu", "set GPUs with spec.experts.gpus")]),
    )
    requests: dict[str, Quantity] = Field(default_factory=dict,
                                          max_length=RESOURCE_NAMES_MAX)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=RESOURCE_NAMES_MAX)

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
    mount_path: str = Field("/models", pattern=r"^/", max_length=1024)


def _inside(repository: str, mount_path: str) -> bool:
    return (repository + "/").startswith(mount_path if mount_path.endswith("/")
                                         else mount_path + "/")


Repository = Annotated[str, Check(
    "self.matches('^(/|(s3|gs|as)://[^/])')",
    "must be an absolute path in the pod (see volume), or an s3://, gs:// or as:// location",
    lambda r: re.match(r"(/|(s3|gs|as)://[^/])", r) is not None)]


class ModelSpec(_Object):
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("repository",
             "!has(self.volume) || !has(self.repository) || !self.repository.startsWith('/') "
             "|| (self.repository + '/').startsWith(self.volume.mountPath.endsWith('/') ? "
             "self.volume.mountPath : self.volume.mountPath + '/')",
             "repository is a path outside volume.mountPath",
             lambda m: m.volume is None or not m.repository.startswith("/")
             or _inside(m.repository, m.volume.mount_path)),
    )
    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL,
                      description="Model name, for labels and metrics.")
    version: int = Field(ge=1, le=JSON_INT_MAX,
                         description="Model version to serve (Triton version folder).")
    repository: Repository = Field(min_length=1, max_length=1024,
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


_MANAGED_CEL = ", ".join(f"'{f}'" for f in MANAGED_TRITON_FLAGS)
TritonArg = Annotated[str, Field(max_length=1024), Check(
    f"!(self.split('=')[0] in [{_MANAGED_CEL}])",
    "a flag the operator sets on every tritonserver (" + ", ".join(MANAGED_TRITON_FLAGS)
    + "): extraArgs may not change it",
    lambda a: a.split("=", 1)[0] not in MANAGED_TRITON_FLAGS)]


class TritonSpec(_Object):
    image: str = Field("autoglm/triton:0.1.0", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "1", "memory": "2Gi"}),
        description="Resources of router containers (experts have their own).")
    extra_args: list[TritonArg] = Field(default_factory=list, max_length=64,
                                        description="More tritonserver flags.")


class RouterAutoscalingSpec(_Object):
    # (the description is RouterSpec.autoscaling's)
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("maxReplicas", "self.minReplicas <= self.maxReplicas",
             "maxReplicas must be at least minReplicas",
             lambda s: s.min_replicas <= s.max_replicas),
    )
    enabled: bool = Field(False, description="Off by default; on, spec.router.replicas is "
                                             "only the initial count.")
    min_replicas: int = Field(1, ge=1, le=64)
    max_replicas: int = Field(4, ge=1, le=64, description="Most router replicas: the budget.")
    kv_cache_utilization: float = Field(
        0.7, gt=0, le=1,
        description="Target fraction of the routers' KV cache in use (autoglm_kv_cache_used"
                    "_tokens / autoglm_kv_cache_capacity_tokens over the slot's routers).")
    waiting_per_replica: float | None = Field(
        None, gt=0, le=100000,
        description="Target sequences waiting for KV cache per router replica "
                    "(autoglm_generate_waiting); unset: not a target.")
    ttft_p90_seconds: float | None = Field(
        None, gt=0, le=3600,
        description="Target 90th percentile of the time to first token over the metrics' "
                    "rate window (autoglm_time_to_first_token_seconds); unset: not a target.")
    stabilization_seconds: int = Field(
        300, ge=0, le=86400,
        description="Scale-down stabilization window: replicas go down only as far as every "
                    "recommendation of the window agrees.")
    scale_up_limit: int = Field(2, ge=1, le=64,
                                description="Most router replicas added per interval.")


class RouterSpec(_Object):
    replicas: int = Field(
        1, ge=1, le=64,
        description="Router replicas; with autoscaling enabled, the initial count (within "
                    "its minReplicas and maxReplicas): the autoscaler owns them after.")
    stream_interval: int = Field(
        1, ge=1, le=64,
        description="Tokens per streamed response: the first token is always sent at once; "
                    "larger values cut per-token costs at the price of burstier streams.")
    drain_seconds: int = Field(
        120, ge=0, le=3600,
        description="A router pod that goes (scaled down, rolled, retired) first finishes its "
                    "running and waiting generations, for at most this long.")
    autoscaling: RouterAutoscalingSpec = Field(
        default_factory=RouterAutoscalingSpec,
        description="Router replicas follow the routers' load, read from the Prometheus at "
                    "autoscaling.prometheusUrl every autoscaling.intervalSeconds: each target "
                    "given recommends ceil(replicas * observed / target) (as HPA, with "
                    "autoscaling.tolerance), the highest wins; missing metrics hold them.")


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
    per_server: int | None = Field(
        None, ge=1, le=4096,
        description="Experts one expert server holds (1: a server per expert replica); "
                    "default: derived from the machine under `autoglm up`.")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per expert server.")
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
        description="If the routers' calls carrying an expert's rows take longer than this "
                    "on average (its servers' queue and compute), it gets at least one more "
                    "replica whatever its token rate; unset: no guard.")
    tolerance: float = Field(0.1, ge=0, le=1)
    interval_seconds: int = Field(15, ge=1, le=3600)
    scale_up_limit: int = Field(2, ge=1, le=64,
                                description="Most replicas added to an expert per interval.")
    stabilization_seconds: int = Field(300, ge=0, le=86400,
                                       description="Scale-down stabilization window.")
    rebalance_interval_seconds: int | None = Field(
        None, ge=1, le=86400,
        description="Least time between two live rebalances of the expert servers (a "
                    "noisy load would move experts back and forth); unset: the metrics' "
                    "rate window (six scrapes, at least 10 s and two intervals).")


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
        Rule("experts.perServer",
             "!has(self.experts.perServer) || self.experts.perServer <= self.model.numExperts",
             "experts.perServer must not exceed model.numExperts",
             lambda s: s.experts.per_server is None
             or s.experts.per_server <= s.model.num_experts),
        Rule("router.autoscaling.enabled",
             "!self.router.autoscaling.enabled || has(self.autoscaling.prometheusUrl)",
             "router autoscaling reads the routers' load from Prometheus: set "
             "autoscaling.prometheusUrl",
             lambda s: not s.router.autoscaling.enabled
             or s.autoscaling.prometheus_url is not None),
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
    model_config = ConfigDict(extra="ignore", strict=False)


class Condition(_StatusObject):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


class ServerStatus(_StatusObject):
    name: str = Field(description="The expert server's Deployment.")
    experts: list[int] = Field(description="The experts it holds.")
    ready: bool = False
    retiring: bool = Field(False, description="Being removed once the others serve its "
                                              "experts.")


class SlotStatus(_StatusObject):
    version: int
    ready: bool = False
    expert_replicas: list[int] = Field(default_factory=list,
                                       description="Replicas per expert, by expert index.")
    servers: list[ServerStatus] = Field(default_factory=list,
                                        description="The expert servers and what each holds.")
    fits_per_server: int | None = Field(
        None, description="Experts one expert server holds at most, as a server found "
                          "against its memory limit (fitsMemoryLimit); with "
                          "experts.perServer unset the placement keeps to it.")
    fits_memory_limit: str | None = Field(
        None, description="The experts.resources.limits.memory fitsPerServer was found "
                          "under; another limit starts afresh.")


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


class MoveStatus(_StatusObject):
    expert: int
    source: int | None = Field(None, description="The server it leaves (index in the slot; "
                                                 "unset: a new replica).")
    target: int | None = Field(None, description="The server it loads on, live, before it "
                                                 "leaves (unset: a replica removed).")


class RebalanceStatus(_StatusObject):
    """Live moves under way (a rebalance, or the autoscaler's new and removed replicas on
    the servers there are): kept here so that an operator restart resumes them."""

    slot: Slot
    since: str = Field(description="When it began (RFC 3339); moves not done in time are "
                                   "given up, the old replica serving on.")
    moves: list[MoveStatus] = Field(default_factory=list, description="Moves not yet done.")
    imbalance_before: float
    imbalance_after: float


class AutoscalingStatus(_StatusObject):
    metrics_available: bool
    reason: str = ""
    imbalance: float | None = Field(
        None, description="(max - mean) / mean of the load per replica across experts.")
    server_imbalance: float | None = Field(
        None, description="(max - mean) / mean of the load per expert server: what live "
                          "moves even out.")
    balancedness: float | None = Field(None, description="DeepSeek's mean / max of the load "
                                                         "per expert server.")
    last_decision: str | None = Field(None, description="RFC 3339.")
    experts: list[ExpertStatus] = Field(default_factory=list)
    rebalance: RebalanceStatus | None = None
    last_rebalance: str | None = Field(None, description="What the last rebalance did.")
    last_rebalance_time: str | None = Field(
        None, description="When it ended (RFC 3339): the next waits a rate window, until the "
                          "load it reads is all measured after it.")
    moves: int = Field(0, description="Live moves done so far.")
    moves_abandoned: int = Field(0, description="Live moves given up (the old replica kept "
                                                "serving).")


class RouterStatus(_StatusObject):
    """The router autoscaler's last decision, for the serving slot's router Deployment."""

    slot: Slot
    replicas: int = Field(description="Router replicas when it decided.")
    ready_replicas: int = 0
    desired_replicas: int = Field(description="What it decided (the Deployment's replicas "
                                              "from then on).")
    metrics_available: bool
    reason: str = ""
    kv_cache_utilization: float | None = Field(
        None, description="KV cache used / capacity over the slot's router pods.")
    waiting_per_replica: float | None = Field(None, description="Sequences waiting per pod.")
    ttft_p90_seconds: float | None = Field(None, description="Time to first token, p90.")
    last_decision: str | None = Field(None, description="RFC 3339.")
    last_scale_time: str | None = Field(None, description="When it last changed the "
                                                          "replicas (RFC 3339).")


class AutoGLMStatus(_StatusObject):
    observed_generation: int | None = None
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"] | None = None
    active_slot: Slot | None = None
    active_version: int | None = None
    ready: str | None = Field(None, description="Ready workloads / workloads, e.g. 5/5.")
    expert_servers: int | None = Field(None, description="Expert servers of the serving "
                                                         "slot.")
    routers: str | None = Field(None, description="Ready / wanted router pods of the "
                                                  "serving slot, e.g. 2/2.")
    slots: dict[str, SlotStatus] = Field(default_factory=dict)
    swap: SwapStatus | None = None
    autoscaling: AutoscalingStatus | None = None
    router: RouterStatus | None = Field(None, description="Router autoscaling "
                                                          "(spec.router.autoscaling).")
    conditions: list[Condition] = Field(default_factory=list)


# -- the resource --------------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceView:
    """What the resource-level rules see: the name, and ``spec.model.numExperts`` if it is an
    integer (even out of bounds: the API server evaluates rules beside bound errors)."""

    name: str
    num_experts: int | None


RESOURCE_RULES: tuple[Rule, ...] = (
    Rule("metadata.name",
         "self.metadata.name.matches('" + DNS1035_LABEL + "')",
         "must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
         "letter): the operator names Services after it",
         lambda r: re.fullmatch(DNS1035_LABEL[1:-1], r.name) is not None),
    Rule("metadata.name",
         "!has(self.spec) || !has(self.spec.model) || !has(self.spec.model.numExperts) || "
         "size(self.metadata.name) + size(string(self.spec.model.numExperts - 1)) <= "
         f"{NAME_BUDGET}",
         f"too long: the longest child's name, <name>{LONGEST_CHILD_INFIX}<numExperts - 1>, "
         f"must fit in {CHILD_NAME_MAX} characters",
         lambda r: r.num_experts is None
         or len(r.name) + len(str(r.num_experts - 1)) <= NAME_BUDGET),
)
"""Rules on the whole resource: CEL at the CRD's root (it sees ``metadata.name``)."""


class InvalidSpec(ValueError):
    """A spec the operator refuses; ``field`` names where (e.g. ``spec.model.topK``), and
    ``errors`` holds every error found (the first is ``field``'s)."""

    def __init__(self, field: str, message: str,
                 errors: Sequence[FieldError] = ()) -> None:
        self.errors = tuple(errors) or (FieldError(field, message),)
        super().__init__("; ".join(map(str, self.errors)))
        self.field = field
        self.message = message


def _plain(value: Any) -> Any:
    """A plain dict for a Mapping view (kopf hands the spec out as one; what it holds is
    plain already)."""
    return dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value


def _path(prefix: str, loc: Sequence[int | str]) -> str:
    return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


_MESSAGES = {"missing": "required", "extra_forbidden": "unknown field",
             "model_type": "must be an object", "dict_type": "must be an object",
             "list_type": "must be a list", "string_type": "must be a string",
             "int_type": "must be an integer", "bool_type": "must be a boolean",
             "float_type": "must be a number"}


def _errors(e: ValidationError, prefix: str) -> list[FieldError]:
    out: list[FieldError] = []
    for err in e.errors():
        at = _path(prefix, err["loc"])
        if err["type"] == "rules":
            out += [FieldError(f"{at}.{f}", m) for f, m in err["ctx"]["failures"]]
        else:
            out.append(FieldError(at, _MESSAGES.get(err["type"], err["msg"])))
    return out


def resource_errors(name: str, spec: Any) -> list[FieldError]:
    """The resource-level rules on ``name`` and the raw ``spec``."""
    model = spec.get("model") if isinstance(spec, Mapping) else None
    n = model.get("numExperts") if isinstance(model, Mapping) else None
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    view = ResourceView(name, n if isinstance(n, int) and not isinstance(n, bool) else None)
    return [FieldError(f, m) for rule in RESOURCE_RULES for f, m in rule.failures(view)]


def check(spec: Any, name: str) -> tuple[AutoGLMSpec | None, list[FieldError]]:
    """The typed spec of resource ``name`` (None if invalid) and every error found."""
    spec = _plain(spec)
    errors: list[FieldError] = []
    parsed: AutoGLMSpec | None = None
    if not isinstance(spec, dict):
        errors.append(FieldError("spec", "must be an object"))
    else:
        try:
            parsed = AutoGLMSpec.model_validate(spec, by_alias=True, by_name=False)
        except ValidationError as e:
            errors += _errors(e, "spec")
    errors += resource_errors(name, spec)
    return (None if errors else parsed), errors


def parse(spec: Mapping[str, Any], name: str) -> AutoGLMSpec:
    """The typed spec of resource ``name``, or :class:`InvalidSpec` naming the field."""
    parsed, errors = check(spec, name)
    if errors or parsed is None:
        first = errors[0] if errors else FieldError("spec", "invalid")
        raise InvalidSpec(first.field, first.message, errors)
    return parsed


_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_OBJECT_META = {"name", "generateName", "namespace", "selfLink", "uid", "resourceVersion",
                "generation", "creationTimestamp", "deletionTimestamp",
                "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences",
                "finalizers", "managedFields"}
GENERATED_SUFFIX = 5  # random characters the API server appends to metadata.generateName


def _name_errors(meta: Any) -> tuple[str | None, list[FieldError]]:
    if meta is None:
        return None, [FieldError("metadata.name", "required (name or generateName)")]
    if not isinstance(meta, Mapping):
        return None, [FieldError("metadata", "must be an object")]
    errors = [FieldError(f"metadata.{k}", "unknown field") for k in meta
              if k not in _OBJECT_META]
    name, generate = meta.get("name"), meta.get("generateName")
    if name is None or name == "":
        if isinstance(generate, str) and generate:
            # the API server appends 5 characters, cutting the prefix to fit 63
            name = generate[:CHILD_NAME_MAX - GENERATED_SUFFIX] + "x" * GENERATED_SUFFIX
        else:
            return None, [*errors, FieldError("metadata.name",
                                              "required (name or generateName)")]
    if not isinstance(name, str):
        return None, [*errors, FieldError("metadata.name", "must be a string")]
    if len(name) > DNS1123_SUBDOMAIN_MAX or not re.fullmatch(DNS1123_SUBDOMAIN, name):
        # as the API server says it of any custom resource's name
        errors.append(FieldError(
            "metadata.name", f"{name!r}: a lowercase RFC 1123 subdomain must consist of lower "
            "case alphanumeric characters, '-' or '.', and must start and end with an "
            f"alphanumeric character (at most {DNS1123_SUBDOMAIN_MAX} characters)"))
    return name, errors


def validate_resource(doc: Mapping[str, Any]) -> list[FieldError]:
    """Every error the API server (and then the operator) would find in one AutoGLMDeployment
    document, as ``kubectl apply`` sends it: none when it is valid."""
    errors = [FieldError(str(k), "unknown field") for k in doc if k not in _TOP_LEVEL]
    if doc.get("apiVersion") != API_VERSION:
        errors.append(FieldError("apiVersion", f"must be {API_VERSION}, not "
                                               f"{doc.get('apiVersion')!r}"))
    if doc.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND}, not {doc.get('kind')!r}"))
    name, name_errors = _name_errors(doc.get("metadata"))
    errors += name_errors
    spec = doc.get("spec")
    if spec is None:
        return [*errors, FieldError("spec", "required")]
    if name is None:  # no name to check the rules on: check the spec alone
        _, spec_errors = check(spec, "x")
        return errors + [e for e in spec_errors if not e.field.startswith("metadata.")]
    _, spec_errors = check(spec, name)
    if any(e.field == "metadata.name" for e in name_errors):  # said once is enough
        spec_errors = [e for e in spec_errors if e.message != RESOURCE_RULES[0].message]
    return errors + spec_errors


def parse_status(status: Mapping[str, Any] | None) -> AutoGLMStatus:
    """The typed status; unknown or damaged fields are dropped rather than fatal."""
    try:
        return AutoGLMStatus.model_validate(status or {})
    except ValidationError:
        return AutoGLMStatus()
