"""What the spec says a version must be, checked by the servers when they load it.

The operator creates the workloads from ``spec.model.numExperts`` but cannot read the
repository, so a router or expert server refuses a version whose shape disagrees with the
spec (``AUTOGLM_EXPECT_*``, set from the spec on every server by
:func:`autoglm.plan.workload_env`): its load fails with a message naming both values, and
the version never becomes Ready.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from autoglm.models.config import ModelConfig
from autoglm.models.errors import CheckpointError
from autoglm.plan import EXPECTATIONS, MEMORY_LIMIT_ENV, ROOM_FOR, experts_that_fit

# environment variable → what the version has
FOUND: dict[str, Callable[[ModelConfig], int]] = {
    "AUTOGLM_EXPECT_NUM_EXPERTS": lambda c: c.num_experts,
    "AUTOGLM_EXPECT_TOP_K": lambda c: c.top_k,
    "AUTOGLM_EXPECT_LAYERS": lambda c: c.num_layers,
}
assert FOUND.keys() == EXPECTATIONS.keys()


def mismatches(cfg: ModelConfig, version: int, env: Mapping[str, str]) -> list[str]:
    out = []
    for var, (field, what) in EXPECTATIONS.items():
        want, found = env.get(var), FOUND[var](cfg)
        if want is not None and int(want) != found:
            out.append(f"version {version} has {found} {what} but {field} is {want}")
    return out


def check_expectations(cfg: ModelConfig, version: int,
                       env: Mapping[str, str] | None = None) -> None:
    problems = mismatches(cfg, version, os.environ if env is None else env)
    if problems:
        raise CheckpointError("; ".join(problems))


def _rss(pid: int | str) -> int:
    """Resident bytes of a process (0 if it cannot be read)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_limit(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(the server's memory limit, what it uses now: this stub and its tritonserver) in
    bytes, or None when it has no limit. The limit is ``MEMORY_LIMIT_ENV``, which the pod
    gets from its own ``limits.memory`` through the downward API."""
    raw = env.get(MEMORY_LIMIT_ENV)
    if not raw:
        return None
    return int(raw), _rss("self") + _rss(os.getppid())


def check_fits(held: int, slice_bytes: int, memory: tuple[int, int] | None) -> None:
    """Refuse, before loading, experts that would not fit the memory limit (the server
    would be OOM-killed mid-load, and nobody told why)."""
    if memory is None:
        return
    limit, used = memory
    fit = experts_that_fit(limit, used, slice_bytes)
    if held > fit:
        mib = 1 << 20
        raise CheckpointError(
            f"the {held} experts assigned to this server need {held * slice_bytes / mib:.0f} "
            f"MiB ({slice_bytes / mib:.1f} MiB each) but its memory limit of "
            f"{limit / mib:.0f} MiB, {used / mib:.0f} MiB in use, {ROOM_FOR}{fit}: "
            + (f"set spec.experts.perServer to at most {fit} or " if fit else "")
            + "raise spec.experts.resources.limits.memory")
