"""The double-buffered swap on the real control plane, driven by the operator process.

kwok runs no containers, so the canary goes to real Triton routers on this machine: the
operator finds ``<namespace>/<name>-<slot>-router`` in the address file the tests write (as
an operator running outside a cluster would), and everything else is the cluster's: pods
that are scheduled or not (cordoned nodes), ready or never ready, crash-looping (the kwok
stages of the reserved versions), and the gateway's routing in the resource's status.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS
from autoglm.repository import build
from autoglm.testing import eventually
from autoglm.testing.cluster import Cluster, tiny
from autoglm.testing.controlplane import (
    CRASH_LOOP_MESSAGE,
    CRASH_LOOP_VERSION,
    NEVER_READY_VERSION,
    ControlPlane,
)
from autoglm.testing.operator import OperatorProcess, running_operator

pytestmark = [pytest.mark.k8s, pytest.mark.triton]
MODEL = replace(PRESETS["tiny"], num_experts=2, top_k=1)
BAD = 3  # expert 0 of version 3 carries version 1's weights: the canary must catch it
CLOSED = "http://127.0.0.1:9"  # nothing listens: "no canary answer yet"


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, str]]:
    """Real routers (with their experts) for the versions that get a canary."""
    repo = tmp_path_factory.mktemp("repo")
    for v in (1, 2, BAD):
        build(repo, "tiny-moe", v, MODEL)
    shutil.copy(repo / "expert_0" / "1" / "weights.safetensors", repo / "expert_0" / str(BAD) /
                "weights.safetensors")
    planes = {v: DataPlane(repo, v, tmp_path_factory.mktemp(f"plane-{v}")) for v in (2, BAD)}
    try:
        for plane in planes.values():
            plane.start(1)
        yield {v: f"http://{plane.router.http_url}" for v, plane in planes.items()
               if plane.router is not None}
    finally:
        for plane in planes.values():
            plane.stop()


@pytest.fixture(scope="module")
def addresses(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("addresses") / "services.json"
    path.write_text("{}")
    return path


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, addresses: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    env = {"AUTOGLM_SERVICE_ADDRESSES": str(addresses), "AUTOGLM_SWAP_TICK_SECONDS": "0.5"}
    with running_operator(control_plane, tmp_path_factory.mktemp("operator"), env) as op:
        yield op


class Swaps(Cluster):
    def __init__(self, cp: ControlPlane, namespace: str, addresses: Path) -> None:
        super().__init__(cp, namespace)
        self.addresses = addresses

    def route(self, service: str, url: str) -> None:
        """Where the operator reaches ``service`` (a slot's router) in this namespace."""
        known = json.loads(self.addresses.read_text())
        known[f"{self.ns}/{service}"] = url
        tmp = self.addresses.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(self.addresses)

    def swap(self, name: str) -> dict[str, Any]:
        return dict(self.resource(name).get("status", {}).get("swap") or {})

    def wait_swap(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        def at() -> dict[str, Any] | None:
            s = self.swap(name)
            return s if s.get("phase") == phase else None
        return dict(eventually(at, f"{name}: swap phase {phase}", timeout))

    def serving(self, name: str, version: int, slot: str, timeout: float = 60) -> None:
        def flipped() -> bool:
            st = self.resource(name).get("status", {})
            return bool(st.get("activeVersion") == version and st.get("activeSlot") == slot)
        eventually(flipped, f"{name} to serve version {version} from slot {slot}", timeout)

    def slot_objects(self, name: str, slot: str) -> dict[tuple[str, str], Any]:
        snap = self.serving_snapshot(name)
        return {k: v for k, v in snap.items() if k[1].startswith(f"{name}-{slot}-")}

    def reasons(self, name: str) -> list[tuple[str, str]]:
        events = sorted(self.events(name), key=lambda e: e.get("lastTimestamp") or "")
        return [(e["reason"], e["message"]) for e in events]

    def said(self, name: str, reason: str, text: str = "") -> bool:
        return any(r == reason and text in m for r, m in self.reasons(name))


@pytest.fixture
def cluster(control_plane: ControlPlane, operator: OperatorProcess, namespace: str,
            addresses: Path) -> Swaps:
    return Swaps(control_plane, namespace, addresses)


def model(version: int, **rollout: Any) -> dict[str, Any]:
    obj = tiny("m", model__numExperts=2, model__topK=1, experts__replicaBudget=4)
    obj["spec"]["model"]["version"] = version
    obj["spec"]["rollout"].update(rollout)
    return obj


def restart(op: OperatorProcess) -> None:
    op.kill()
    op.start()


def test_swap_resumes_after_a_restart_in_each_state_and_flips_back_warm(
        cluster: Swaps, operator: OperatorProcess, routers: dict[int, str]) -> None:
    cluster.apply(model(1, drainTimeoutSeconds=8, keepPreviousSeconds=25))
    cluster.wait_ready("m")
    slot_a = cluster.slot_objects("m", "a")
    cluster.route("m-b-router", CLOSED)
    nodes = cluster.cp.node_names
    for n in nodes:  # the standby's pods cannot be scheduled: the swap waits in Warming
        cluster.cp.kubectl("cordon", n)
    try:
        t0 = time.monotonic()
        cluster.apply(model(2, drainTimeoutSeconds=8, keepPreviousSeconds=25))
        warming = cluster.wait_swap("m", "Warming")
        assert warming["targetVersion"] == 2
        restart(operator)
        # its swap clock and its periodic resync have each looked at it
        operator.wait_reconciled(cluster.ns, "m", ("tick", "resync"))
        assert cluster.swap("m") == warming, "the restarted operator resumed the same state"
    finally:
        for n in nodes:
            cluster.cp.kubectl("uncordon", n)
    # ready now, but the standby router does not answer the canary yet: Verifying holds
    verifying = cluster.wait_swap("m", "Verifying")
    restart(operator)
    operator.wait_reconciled(cluster.ns, "m", ("tick", "resync"))
    assert cluster.swap("m")["phase"] == "Verifying"
    assert cluster.resource("m")["status"]["activeVersion"] == 1
    cluster.route("m-b-router", routers[2])
    cluster.serving("m", 2, "b")
    flip_seconds = time.monotonic() - t0
    draining = cluster.wait_swap("m", "Draining", timeout=5)
    restart(operator)
    idle = cluster.wait_swap("m", "Idle", timeout=30)
    assert draining["since"] > verifying["since"]
    assert idle["previous"]["slot"] == "a" and idle["previous"]["version"] == 1
    for reason in ("Staging", "CanaryPassed", "Flipped", "Drained"):
        assert cluster.said("m", reason), cluster.reasons("m")
    conds = {c["type"]: c for c in cluster.resource("m")["status"]["conditions"]}
    assert conds["Degraded"]["status"] == "False"
    assert cluster.slot_objects("m", "a") == slot_a, "the old slot was kept as it was"
    print(f"version change -> flip on the control plane (incl. restarts): {flip_seconds:.1f} s")

    # back to version 1 while slot a is warm: a flip, nothing created or reloaded
    t1 = time.monotonic()
    cluster.apply(model(1, drainTimeoutSeconds=8, keepPreviousSeconds=25))
    cluster.serving("m", 1, "a", timeout=20)
    print(f"flip back to the warm slot: {time.monotonic() - t1:.2f} s")
    assert cluster.said("m", "FlipBack")
    assert cluster.slot_objects("m", "a") == slot_a
    # the previous slot (b, version 2) is retired once keepPreviousSeconds have passed
    eventually(lambda: not cluster.slot_objects("m", "b"), "slot b to be retired", 90)
    assert cluster.said("m", "Retired", "slot b")
    assert cluster.resource("m")["status"]["swap"].get("previous") is None


def test_failed_rollouts_abort_and_leave_serving_untouched(
        cluster: Swaps, operator: OperatorProcess, routers: dict[int, str]) -> None:
    cluster.apply(model(1, readyTimeoutSeconds=10))
    cluster.wait_ready("m")
    serving = cluster.slot_objects("m", "a")
    cluster.route("m-b-router", routers[BAD])

    def aborted(version: int, why: str) -> None:
        cluster.apply(model(version, readyTimeoutSeconds=10))
        eventually(lambda: cluster.said("m", "RolloutFailed", why),
                   f"version {version} to fail: {why}", 60)
        st = cluster.resource("m")["status"]
        conds = {c["type"]: c for c in st["conditions"]}
        assert (conds["Degraded"]["status"], conds["Degraded"]["reason"]) == (
            "True", "RolloutFailed")
        assert why in conds["Degraded"]["message"]
        assert st["activeVersion"] == 1 and st["swap"]["failedVersion"] == version
        eventually(lambda: not cluster.slot_objects("m", "b"), "the standby removed")
        assert cluster.slot_objects("m", "a") == serving
        operator.wait_reconciled(cluster.ns, "m", ("resync",))  # and it is not tried again
        assert cluster.swap("m")["phase"] == "Idle"
        assert not cluster.slot_objects("m", "b")

    aborted(BAD, "canary mismatch")
    aborted(NEVER_READY_VERSION, "not ready within 10 s")
    # the crashed container's termination message (why its model did not load) in the reason
    aborted(CRASH_LOOP_VERSION, f"last exit code 1): {CRASH_LOOP_MESSAGE}")

    # a version changed mid-swap supersedes the one being staged, which is removed
    cluster.route("m-b-router", routers[2])
    cluster.apply(model(NEVER_READY_VERSION, readyTimeoutSeconds=60))
    cluster.wait_swap("m", "Warming")
    cluster.apply(model(2, readyTimeoutSeconds=60))
    cluster.serving("m", 2, "b")
    assert cluster.said("m", "RolloutFailed", "superseded by version 2")
    conds = {c["type"]: c for c in cluster.resource("m")["status"]["conditions"]}
    assert conds["Degraded"]["status"] == "False"
    assert cluster.slot_objects("m", "a") == serving, "kept warm for a rollback"
