"""The desired serving topology: which slots serve which version, with which workloads.

Pure: a typed spec and the routing state kept in the resource's status go in, a
:class:`Topology` comes out; the Kubernetes and local adapters each turn it into their own
objects. The expert servers' placement comes from the routing state (the live servers): once
a slot exists the autoscaler owns it, so adapters never reset it; a new slot gets
``minReplicas`` of every expert placed on servers of ``experts_per_server``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from autoglm.placement import Placement, place, servers_needed
from autoglm.spec import SLOTS, AutoGLMSpec, Slot

Component = Literal["gateway", "router", "expert"]

TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
# The instance_group kind a server loads its model with, instead of the stored KIND_CPU
# (autoglm/triton.py): KIND_GPU puts the weights on the GPU Triton gives each instance.
INSTANCE_KIND_ENV = "AUTOGLM_INSTANCE_KIND"
# Tokens per streamed response of the router's ``generate`` (spec.router.streamInterval;
# backends/generate.py); unset: 1.
STREAM_INTERVAL_ENV = "AUTOGLM_STREAM_INTERVAL"

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
    shape the spec states (the servers refuse a version that disagrees), for experts with
    GPUs, GPU model instances, and for routers a stream interval other than 1. A pure
    function of ``spec.model``'s shape, ``spec.experts.gpus`` and
    ``spec.router.streamInterval``, so nothing else (rollout tuning, replicas) changes pod
    templates; a setting at its default adds nothing, so it changes no template either."""
    m = spec.model
    env = expectation_env(m.num_experts, m.top_k, m.layers)
    if component == "expert" and spec.experts.gpus > 0:
        env[INSTANCE_KIND_ENV] = "KIND_GPU"
    if component == "router" and spec.router.stream_interval != 1:
        env[STREAM_INTERVAL_ENV] = str(spec.router.stream_interval)
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
                  server: int | None = None) -> str:
    """``<name>-<slot>-router``; ``<name>-<slot>-experts`` (the slot's expert servers, their
    headless Service) and ``<name>-<slot>-experts-<s>`` (expert server ``s``) (DESIGN.md §4)."""
    base = f"{deployment}-{slot}-{'router' if component == 'router' else 'experts'}"
    return base if server is None else f"{base}-{server}"


@dataclass(frozen=True)
class Workload:
    """A group of Triton servers serving one Triton model: the router tier (``replicas``
    alike), or expert server ``server`` holding ``experts`` (one replica)."""

    name: str
    component: Literal["router", "expert"]
    slot: Slot
    version: int
    triton_model: str
    replicas: int
    server: int | None = None
    experts: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SlotPlan:
    slot: Slot
    version: int
    router: Workload
    servers: tuple[Workload, ...]
    fits: int | None = None  # SlotState.fits, kept in status

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return (self.router, *self.servers)

    @property
    def placement(self) -> Placement:
        return Placement(tuple(w.experts for w in self.servers))


@dataclass(frozen=True)
class SlotState:
    version: int
    servers: tuple[frozenset[int], ...] = ()  # what each expert server holds
    # how many of them (from the first) serve on; the rest retire (kept until the
    # autoscaler removes them, once their experts serve elsewhere)
    serving: int | None = None
    # experts a server holds at most, as the servers found it against their memory limit
    # (None: not known; see experts_per_server)
    fits: int | None = None


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


# Expert servers a cluster gets when spec.experts.perServer is unset: a handful, whatever
# the expert count (the operator cannot read the repository for the slices' size).
DEFAULT_SERVERS = 4


def experts_per_server(spec: AutoGLMSpec, fits: int | None = None) -> int:
    """``spec.experts.perServer``, else the experts spread over ``DEFAULT_SERVERS``, or
    fewer when a server found that only ``fits`` experts fit its memory limit."""
    n = spec.model.num_experts
    if spec.experts.per_server is not None:
        return min(spec.experts.per_server, n)
    spread = -(-n // min(n, DEFAULT_SERVERS))
    return spread if fits is None else max(1, min(spread, fits))


# "1": an expert server runs a call as batched matmuls over its experts (default on a GPU
# only; on a CPU the padding costs more than the launches it saves).
GROUPED_ENV = "AUTOGLM_GROUPED_EXPERTS"
# An expert server's memory limit in bytes (the pod's limits.memory, by the downward API).
MEMORY_LIMIT_ENV = "AUTOGLM_MEMORY_LIMIT"


# How an expert server that refused its experts for memory says how many fit (its one-line
# termination message); the operator reads it back (fits_reported).
ROOM_FOR = "leaves room for "


def fits_reported(message: str) -> int | None:
    """The experts that fit, from an expert server's refusal (None: not such a message)."""
    m = re.search(re.escape(ROOM_FOR) + r"(\d+):", message)
    return int(m.group(1)) if m else None


def experts_that_fit(limit_bytes: int, used_bytes: int, slice_bytes: int) -> int:
    """How many expert slices fit a server's memory limit beside what it uses already, with
    a tenth of the limit kept free (allocator slack, request buffers)."""
    room = limit_bytes * 9 // 10 - used_bytes
    return max(0, room // max(slice_bytes, 1))


def initial_expert_replicas(spec: AutoGLMSpec) -> tuple[int, ...]:
    """minReplicas for every expert: the budget rule guarantees this fits."""
    return (spec.experts.min_replicas,) * spec.model.num_experts


def slot_placement(spec: AutoGLMSpec, servers: tuple[frozenset[int], ...],
                   fits: int | None = None) -> Placement:
    """The placement ``servers`` records, kept as it is while it still suits the spec (every
    expert held, within min/max replicas (the autoscaler's, when it runs) and
    ``perServer``); else the replicas it holds,
    bounded, placed again, what each server holds kept where it fits and never on fewer
    servers (removing servers is the autoscaler's, once their experts serve elsewhere)."""
    n, e = spec.model.num_experts, spec.experts
    capacity = experts_per_server(spec, fits)
    current = Placement(servers)
    replicas = current.replicas(n) if servers else list(initial_expert_replicas(spec))
    bounded = [min(max(r, e.min_replicas), e.max_replicas) for r in replicas]
    fits = all(h and max(h) < n for h in servers) and all(len(h) <= capacity for h in servers)
    # with autoscaling on, the autoscaler brings replicas within new bounds, live; an
    # expert with no server at all (a reconciliation cut short) is placed here
    autoscaled = spec.autoscaling.enabled and spec.autoscaling.prometheus_url is not None \
        and min(replicas, default=0) >= 1
    if servers and fits and (bounded == replicas or autoscaled):
        return current
    needed = servers_needed(bounded, capacity)
    return place(bounded, capacity, current=current if servers else None,
                 servers=max(needed, len(servers)) if fits else needed)


def slot_plan(name: str, spec: AutoGLMSpec, slot: Slot, version: int,
              servers: tuple[frozenset[int], ...], serving: int | None = None,
              fits: int | None = None) -> SlotPlan:
    n = len(servers) if serving is None else serving
    layout = Placement(slot_placement(spec, servers[:n], fits).servers + servers[n:])
    return SlotPlan(
        slot=slot,
        version=version,
        fits=fits,
        router=Workload(workload_name(name, slot, "router"), "router", slot, version,
                        router_model(), spec.router.replicas),
        servers=tuple(
            Workload(workload_name(name, slot, "expert", s), "expert", slot, version,
                     experts_model(), 1, server=s, experts=held)
            for s, held in enumerate(layout.servers)),
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
        slots: Mapping[Slot, SlotState] = {active: SlotState(spec.model.version)}
    else:
        active, slots = state.active_slot, state.slots
    order = [active, *(s for s in SLOTS if s != active and s in slots)]
    return Topology(active, tuple(slot_plan(name, spec, s, slots[s].version,
                                            slots[s].servers, slots[s].serving,
                                            slots[s].fits)
                                  for s in order))
