"""bench/generate's guards: greedy tokens must match before timing; ratios pair rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "generate"))
import bench_generate as bg


def test_equal_greedy_tokens_pass() -> None:
    bg.check_greedy(0, [5, 6], [1, 2, 3], [1, 2, 3])


def test_different_greedy_tokens_stop_the_run_naming_prompt_and_position() -> None:
    with pytest.raises(SystemExit, match=r"prompt 1 \[5, 6\]: first difference at position 2"
                       ) as e:
        bg.check_greedy(1, [5, 6], [1, 2, 3, 4], [1, 2, 9, 4])
    assert isinstance(e.value.code, str)  # printed, exit status 1


def test_a_shorter_output_differs_where_it_ends() -> None:
    with pytest.raises(SystemExit, match="first difference at position 2"):
        bg.check_greedy(0, [5], [1, 2, 3], [1, 2])


def test_ratios_pair_the_same_round_when_a_baseline_round_failed() -> None:
    def run(tokens_per_s: int) -> bg.Run:
        return bg.Run(tokens=tokens_per_s, seconds=1.0, ttft=[], itl=[])

    base = {1: run(100)}  # the baseline's round 0 failed
    assert bg.ratios_by_round({0: run(50), 1: run(200)}, base) == [2.0]
    assert bg.ratios_by_round({0: run(50)}, base) == []
