"""bench/placement: its EPLB (replicate_experts, balanced_packing) on hand-checked cases, the
pack-to-server matching, and that --quick runs and prints its three goal lines."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "placement"))
import bench_placement as bp

from autoglm.placement import Placement, moves


def test_replicate_gives_the_next_replica_to_the_highest_load_per_replica() -> None:
    # [6, 4, 1]: 6 > 4 (expert 0: 3 per replica), then 4 > 3 (expert 1)
    assert bp.replicate_experts([6.0, 4.0, 1.0], 5) == [2, 2, 1]
    # a tie (3 and 3) goes to the lowest index, as torch's max
    assert bp.replicate_experts([6.0, 3.0, 2.0], 5) == [3, 1, 1]
    assert bp.replicate_experts([1.0, 2.0], 2) == [1, 1]
    assert bp.replicate_experts([10.0, 1.0], 4, cap=2) == [2, 2]


def test_balanced_packing_heaviest_first_into_the_lightest_pack_with_room() -> None:
    # 5->0, 4->1, 3->1 (4 < 5), 2->0 (5 < 7), 1->0 (7 = 7: lowest), 1->1 (pack 0 full)
    assert bp.balanced_packing([5.0, 4.0, 3.0, 2.0, 1.0, 1.0], 2) == [0, 1, 1, 0, 0, 1]
    # the last 1 goes to the heavier pack 0: the lighter pack 1 has its 2 items
    assert bp.balanced_packing([10.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 0]
    pack = bp.balanced_packing([float(w) for w in range(12, 0, -1)], 3)
    assert [pack.count(p) for p in range(3)] == [4, 4, 4]


def test_balanced_packing_skips_a_pack_holding_the_same_expert() -> None:
    assert bp.balanced_packing([4.0, 1.0, 1.0, 1.0], 2, labels=[0, 1, 1, 2]) == [0, 1, 0, 1]
    placed = bp.eplb_place([2, 1, 1], [8.0, 1.0, 1.0], 2, 2)
    assert placed.replicas(3) == [2, 1, 1]


def test_packs_are_matched_to_servers_by_overlap() -> None:
    current = Placement((frozenset({0, 1}), frozenset({2, 3})))
    matched = bp.match(current, Placement((frozenset({2, 3}), frozenset({0, 4}))))
    assert matched == Placement((frozenset({0, 4}), frozenset({2, 3})))
    assert moves(current, matched) == 1


def test_quick_runs_and_prints_the_three_goal_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert bp.main(["--quick"]) == 0
    out = capsys.readouterr().out
    goals = re.findall(r"^(PASS|FAIL) (imbalance|moves|solve time):", out, re.MULTILINE)
    assert [g for _, g in goals] == ["imbalance", "moves", "solve time"]
    # the scenarios no policy can pass (the forced new replicas alone over) counted apart
    assert re.search(r"^(PASS|FAIL) moves: .* scenarios over: \d+ infeasible \(forced new "
                     r"replicas alone over\), \d+ not;", out, re.MULTILINE), out
