"""The desired serving topology: which slots serve which version, with which workloads.

Pure: a typed spec and the routing state kept in the resource's status go in, a
:class:`Topology` comes out; the Kubernetes and local adapters each turn it into their own
objects. Expert replica counts here are only the *initial* counts: once a workload exists
the autoscaler owns them, so adapters never reset them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from autoglm.spec import SLOTS, AutoGLMSpec, Slot

Component = Literal["gateway", "router", "expert"]

TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
# The instance_group kind a server loads its model with, instead of the stored KIND_CPU
# (autoglm/triton.py): KIND_GPU puts the weights on the GPU Triton gives each instance.
INSTANCE_KIND_ENV = "AUTOGLM_INSTANCE_KIND"

# The model shape the spec states, which a server must find in the version it loads:
# environment variable → (spec field, what the version has). The operator cannot read the
# repository, so it sets these on every server (workload_env) and the servers refuse a
# version that disagrees (backends/expect.py): its load fails naming both values.
EXPECTATIONS: dict[str, tuple[str, str]] = {
    "AUTOGLM_EXPECT_NUM_EXPERTS": ("spec.model.numExperts", "routed experts"),
    "AUTOGLM_EXPECT_TOP_K": ("spec.model.topK", "experts per token"),
    "AUTOGLM_EXPECT_LAYERS": ("spec.model.layers", "layers"),
}


def expectation_env(num_experts: int, top_k: int | None, layers: int | None) -> dict[str, str]:
    """The environment that makes servers check a spec's model shape."""
    env = {"AUTOGLM_EXPECT_NUM_EXPERTS": str(num_experts)}
    if top_k is not None:
        env["AUTOGLM_EXPECT_TOP_K"] = str(top_k)
    if layers is not None:
        env["AUTOGLM_EXPECT_LAYERS"] = str(layers)
    return env


def workload_env(spec: AutoGLMSpec, component: Literal["router", "expert"]) -> dict[str, str]:
    """What every router or expert server of ``spec`` gets in its environment: the model
    shape the spec states (the servers refuse a version that disagrees) and, for experts with
    GPUs, GPU model instances. A pure function of ``spec.model``'s shape and
    ``spec.experts.gpus``, so nothing else (rollout tuning, replicas) changes pod templates."""
    m = spec.model
    env = expectation_env(m.num_experts, m.top_k, m.layers)
    if component == "expert" and spec.experts.gpus > 0:
        env[INSTANCE_KIND_ENV] = "KIND_GPU"
    return env


def router_model() -> str:
    return "router"


def generate_model() -> str:
    """Text generation, beside ``router`` in every router server."""
    return "generate"


def experts_model() -> str:
    """What every expert server loads: the experts it was given (``SERVER_EXPERTS_ENV``)."""
    return "experts"


def expert_folder(i: int) -> str:
    """Where the repository stores routed expert *i* of every MoE layer (its weights only:
    servers load them through ``experts``)."""
    return f"expert_{i}"


# The experts a server holds, e.g. "0,5,9"; unset: every expert of the version.
SERVER_EXPERTS_ENV = "AUTOGLM_SERVER_EXPERTS"


def format_server_experts(experts: Iterable[int]) -> str:
    return ",".join(str(e) for e in sorted(experts))


def parse_server_experts(value: str) -> list[int]:
    """The inverse of :func:`format_server_experts` (ValueError: why not)."""
    try:
        held = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError("expected expert indices separated by commas") from None
    if not held or min(held) < 0 or len(set(held)) != len(held):
        raise ValueError("expected one or more distinct expert indices >= 0")
    return sorted(held)


def workload_name(deployment: str, slot: Slot, component: Component,
                  expert: int | None = None) -> str:
    """``<name>-<slot>-router`` or ``<name>-<slot>-expert-<i>`` (DESIGN.md §4)."""
    base = f"{deployment}-{slot}-{component}"
    return base if expert is None else f"{base}-{expert}"


@dataclass(frozen=True)
class Workload:
    """One independently scaled group of Triton servers serving one Triton model."""

    name: str
    component: Literal["router", "expert"]
    slot: Slot
    version: int
    triton_model: str
    replicas: int
    expert: int | None = None


@dataclass(frozen=True)
class SlotPlan:
    slot: Slot
    version: int
    router: Workload
    experts: tuple[Workload, ...]

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return (self.router, *self.experts)


@dataclass(frozen=True)
class SlotState:
    version: int
    expert_replicas: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoutingState:
    """What is serving, as recorded in the resource's status."""

    active_slot: Slot | None = None
    slots: Mapping[Slot, SlotState] = field(default_factory=dict)


@dataclass(frozen=True)
class Topology:
    active: Slot
    slots: tuple[SlotPlan, ...]

    @property
    def active_plan(self) -> SlotPlan:
        return next(p for p in self.slots if p.slot == self.active)


def initial_expert_replicas(spec: AutoGLMSpec) -> tuple[int, ...]:
    """minReplicas for every expert: the budget rule guarantees this fits."""
    return (spec.experts.min_replicas,) * spec.model.num_experts


def slot_plan(name: str, spec: AutoGLMSpec, slot: Slot, version: int,
              expert_replicas: tuple[int, ...]) -> SlotPlan:
    n = spec.model.num_experts
    replicas = expert_replicas if len(expert_replicas) == n else initial_expert_replicas(spec)
    lo, hi = spec.experts.min_replicas, spec.experts.max_replicas
    return SlotPlan(
        slot=slot,
        version=version,
        router=Workload(workload_name(name, slot, "router"), "router", slot, version,
                        router_model(), spec.router.replicas),
        experts=tuple(
            Workload(workload_name(name, slot, "expert", i), "expert", slot, version,
                     experts_model(), min(max(replicas[i], lo), hi), expert=i)
            for i in range(n)
        ),
    )


def plan(name: str, spec: AutoGLMSpec, state: RoutingState) -> Topology:
    """The slots to keep: the active one, and any other the routing state holds (a standby
    being staged, or the previous slot kept warm). A new deployment serves
    ``spec.model.version`` in slot ``a``.

    An existing one keeps serving the version its active slot holds: moving to another
    version is the swap state machine's decision, never a side effect of reconciling.
    """
    if state.active_slot is None or state.active_slot not in state.slots:
        active: Slot = SLOTS[0]
        slots: Mapping[Slot, SlotState] = {
            active: SlotState(spec.model.version, initial_expert_replicas(spec))}
    else:
        active, slots = state.active_slot, state.slots
    order = [active, *(s for s in SLOTS if s != active and s in slots)]
    return Topology(active, tuple(slot_plan(name, spec, s, slots[s].version,
                                            slots[s].expert_replicas) for s in order))
