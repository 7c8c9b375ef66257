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

from autoglm.models.config import ModelConfig
from autoglm.models.errors import CheckpointError
from autoglm.plan import EXPECTATIONS

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
