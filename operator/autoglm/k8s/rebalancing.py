"""Live moves on Kubernetes: the expert servers' pods are told, over Triton's HTTP API, to
load and drop experts while they serve (``CONTROL``, backends/experts.py), so a rebalance
restarts no pod. :func:`autoglm.placement.progress` decides each order from what every pod
reports; this module only asks and sends.

The placement a server serves after moves is kept on its Deployment as the
``status.LIVE_EXPERTS`` annotation (its pod template, what a restarted pod boots with, stays
as it was: changing it would restart the pod); a pod that restarts is told again to load
what moved in. The moves under way live in ``status.autoscaling.rebalance``, so an operator
restart resumes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autoglm import plan as p
from autoglm.k8s import builders
from autoglm.k8s.rollout import ADDRESSES_ENV
from autoglm.placement import Move, Order
from autoglm.spec import MoveStatus, Slot

Manifest = dict[str, Any]
PROBE_TIMEOUT = 3.0


def pod_addresses(name: str, namespace: str, slot: Slot, servers: int,
                  pods: Sequence[Manifest]) -> list[list[str]]:
    """Per expert server of the slot, the HTTP address of each of its running pods (in
    the cluster: pod IP and Triton's port; an operator outside it reads them, by Deployment,
    from the ``ADDRESSES_ENV`` file)."""
    known: dict[str, Any] = {}
    path = os.environ.get(ADDRESSES_ENV)
    if path:
        try:
            known = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            known = {}
    out: list[list[str]] = []
    for s in range(servers):
        deployment = p.workload_name(name, slot, "expert", s)
        given = known.get(f"{namespace}/{deployment}")
        if given is not None:
            out.append([given] if isinstance(given, str) else [str(a) for a in given])
            continue
        sel = builders.selector(name, "expert", slot, s).items()
        out.append(sorted(
            f"http://{pod['status']['podIP']}:{p.TRITON_HTTP_PORT}" for pod in pods
            if sel <= pod["metadata"].get("labels", {}).items()
            and not pod["metadata"].get("deletionTimestamp")
            and pod.get("status", {}).get("phase") == "Running"
            and pod.get("status", {}).get("podIP")))
    return out


def control(url: str, order: Order | None = None,
            timeout: float = PROBE_TIMEOUT) -> tuple[frozenset[int] | None, str]:
    """Send an expert server ``order`` (None: only ask); what it then reports holding, or
    None and why (no answer, or the server refused: e.g. the expert does not fit)."""
    body = json.dumps({
        "inputs": [{"name": "CONTROL", "shape": [1], "datatype": "BYTES",
                    "data": [json.dumps(order or {})]}],
        "outputs": [{"name": "HELD"}]}).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/v2/models/{p.experts_model()}/infer",
                                 data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
        held = next(o["data"] for o in answer.get("outputs", []) if o["name"] == "HELD")
        return frozenset(int(e) for e in held), ""
    except urllib.error.HTTPError as e:
        why = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # Triton's {"error": ...}
            why = str(json.loads(why).get("error", why))
        return None, f"{url} refused: {why[:300]}"
    except (OSError, ValueError, KeyError, StopIteration) as e:
        return None, f"{url}: {e}"


def reports(addresses: Sequence[Sequence[str]]) -> list[list[frozenset[int] | None]]:
    """What every pod reports holding (None: it did not answer), asked all at once."""
    flat = [a for server in addresses for a in server]
    if not flat:
        return [[] for _ in addresses]
    with ThreadPoolExecutor(min(len(flat), 16)) as pool:
        answers = iter(pool.map(lambda a: control(a)[0], flat))
    return [[next(answers) for _ in server] for server in addresses]


def send(addresses: Sequence[Sequence[str]], orders: Mapping[tuple[int, int], Order],
         ) -> list[str]:
    """Send each pod its order; why the ones that failed did."""
    failed = []
    for (s, i), order in sorted(orders.items()):
        if s < len(addresses) and i < len(addresses[s]):
            held, why = control(addresses[s][i], order)
            if held is None:
                failed.append(why)
    return failed


def to_moves(moves: Sequence[MoveStatus]) -> tuple[Move, ...]:
    return tuple(Move(m.expert, m.source, m.target) for m in moves)


def from_moves(moves: Sequence[Move]) -> list[MoveStatus]:
    return [MoveStatus(expert=m.expert, source=m.source, target=m.target) for m in moves]


def describe(moves: Sequence[Move]) -> str:
    return ", ".join(
        f"expert {m.expert} " + (f"server {m.source}->{m.target}" if None not in (
            m.source, m.target) else f"new replica on server {m.target}" if m.source is None
            else f"replica off server {m.source}") for m in moves)
