"""An expert server refuses, before loading, experts that would not fit its memory limit,
saying what to change; the limit reaches its pod from ``limits.memory``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm import plan as p
from autoglm.backends.expect import check_fits, memory_limit
from autoglm.k8s import builders, rollout
from autoglm.models.errors import CheckpointError
from autoglm.spec import AutoGLMStatus, SlotStatus, parse

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def test_experts_that_fit_keep_a_tenth_free() -> None:
    assert p.experts_that_fit(1000 * MiB, 300 * MiB, 100 * MiB) == 6  # 900 - 300 = 600
    assert p.experts_that_fit(1000 * MiB, 950 * MiB, 1) == 0
    assert p.experts_that_fit(1000 * MiB, 0, 0) > 0


def test_a_placement_that_does_not_fit_is_refused_with_what_to_change() -> None:
    check_fits(6, 100 * MiB, (1000 * MiB, 300 * MiB))  # fits exactly
    check_fits(1000, 100 * MiB, None)  # no limit: nothing to check
    with pytest.raises(CheckpointError) as err:
        check_fits(7, 100 * MiB, (1000 * MiB, 300 * MiB))
    assert str(err.value) == (
        "the 7 experts assigned to this server need 700 MiB (100.0 MiB each) but its memory "
        "limit of 1000 MiB, 300 MiB in use, leaves room for 6: set spec.experts.perServer "
        "to at most 6 or raise spec.experts.resources.limits.memory")
    with pytest.raises(CheckpointError, match=r"room for 0: raise spec\.experts\.resources"):
        check_fits(1, 100 * MiB, (300 * MiB, 300 * MiB))


def test_the_limit_is_the_pods_and_usage_is_this_process_and_its_parent() -> None:
    assert memory_limit({}) is None
    limit, used = memory_limit({p.MEMORY_LIMIT_ENV: str(2048 * MiB)}) or (0, 0)
    assert limit == 2048 * MiB
    own = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert used > own, "the parent's resident memory counts too"


def test_expert_pods_get_their_memory_limit_by_the_downward_api() -> None:
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    for limits, has in (({"memory": "1Gi"}, True), ({}, False)):
        doc["experts"]["resources"] = {"requests": {"cpu": "250m"}, "limits": limits}
        s = parse(doc, "tiny")
        slot = p.plan("tiny", s, p.RoutingState()).active_plan
        for w in slot.workloads:
            env = {e["name"]: e for e in
                   builders.triton_pod_spec("tiny", "ns", s, w)["containers"][0]["env"]}
            want = has and w.component == "expert"
            assert (p.MEMORY_LIMIT_ENV in env) == want, w.name
            if want:
                assert env[p.MEMORY_LIMIT_ENV]["valueFrom"] == {"resourceFieldRef": {
                    "containerName": "triton", "resource": "limits.memory"}}


REFUSAL = ("experts v1: the 8 experts assigned to this server need 96 MiB (12.0 MiB each) "
           "but its memory limit of 700 MiB, 601 MiB in use, leaves room for 2: set "
           "spec.experts.perServer to at most 2 or raise spec.experts.resources.limits.memory")


def expert_pod(slot: str, message: str) -> dict[str, Any]:
    return {"metadata": {"labels": {"app.kubernetes.io/component": "expert",
                                    "autoglm.io/slot": slot}},
            "status": {"containerStatuses": [{"name": "triton", "lastState": {
                "terminated": {"exitCode": 1, "message": message}}}]}}


def test_what_fits_a_server_is_read_back_from_its_refusal() -> None:
    with pytest.raises(CheckpointError) as err:
        check_fits(8, 12 * MiB, (700 * MiB, 601 * MiB))
    assert p.fits_reported(str(err.value)) == 2
    assert p.fits_reported("expert_0 v2: version 2 has 8 routed experts") is None


def test_servers_that_report_less_room_get_fewer_experts_each() -> None:
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"]
    doc["model"]["numExperts"] = 16
    del doc["experts"]["perServer"]
    doc["experts"]["replicaBudget"] = 48
    s = parse(doc, "tiny")  # limits.memory 1Gi
    assert p.experts_per_server(s) == 4 and p.experts_per_server(s, 2) == 2
    assert p.experts_per_server(s, 0) == 1, "a server holds one expert at least"
    assert p.experts_per_server(s, 9) == 4, "never more than the spread"
    spread = p.slot_placement(s, ())
    assert [len(h) for h in spread.servers] == [4, 4, 4, 4]
    refitted = p.slot_placement(s, spread.servers, fits=2)
    assert [len(h) for h in refitted.servers] == [2] * 8
    assert sorted(e for h in refitted.servers for e in h) == list(range(16))

    st = AutoGLMStatus()
    assert rollout.fits_per_server(s, st, "a", [expert_pod("a", REFUSAL)]) == 2
    assert rollout.fits_per_server(s, st, "a", [expert_pod("b", REFUSAL)]) is None
    assert rollout.fits_per_server(s, st, "a", [expert_pod("a", "other")]) is None
    kept = AutoGLMStatus(slots={"a": SlotStatus(version=1, fits_per_server=3,
                                                fits_memory_limit="1Gi")})
    assert rollout.fits_per_server(s, kept, "a", []) == 3, "kept in status"
    assert rollout.fits_per_server(s, kept, "a", [expert_pod("a", REFUSAL)]) == 2
    doc["experts"]["resources"]["limits"]["memory"] = "4Gi"
    assert rollout.fits_per_server(parse(doc, "tiny"), kept, "a", []) is None, \
        "found under another limit: afresh"
    doc["experts"]["perServer"] = 4
    assert rollout.fits_per_server(parse(doc, "tiny"), kept, "a",
                                   [expert_pod("a", REFUSAL)]) is None, "perServer wins"
