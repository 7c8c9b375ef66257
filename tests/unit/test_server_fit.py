"""An expert server refuses, before loading, experts that would not fit its memory limit,
saying what to change; the limit reaches its pod from ``limits.memory``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from autoglm import plan as p
from autoglm.backends.expect import check_fits, memory_limit
from autoglm.k8s import builders
from autoglm.models.errors import CheckpointError
from autoglm.spec import parse

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
