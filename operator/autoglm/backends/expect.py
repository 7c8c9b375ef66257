"""What the spec says a version must be, checked by the servers when they load it.

The operator creates one Deployment per expert from ``spec.model.numExperts`` but cannot read
the repository, so a router or expert server refuses a version whose shape disagrees with
the spec (``AUTOGLM_EXPECT_*``, set from the spec on every server): its load fails with a
message naming both values, and the version never becomes Ready.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from autoglm.models.config import ModelConfig
from autoglm.models.errors import CheckpointError

# environment variable → (spec field, what the version has)
EXPECTATIONS: dict[str, tuple[str, str, Callable[[ModelConfig], int]]] = {
    "AUTOGLM_EXPECT_NUM_EXPERTS": ("spec.model.numExperts", "routed experts",
                                   lambda c: c.num_experts),
    "AUTOGLM_EXPECT_TOP_K": ("spec.model.topK", "experts per token", lambda c: c.top_k),
    "AUTOGLM_EXPECT_LAYERS": ("spec.model.layers", "layers", lambda c: c.num_layers),
}


def expectation_env(num_experts: int, top_k: int | None, layers: int | None) -> dict[str, str]:
    """The environment that makes servers check a spec's model shape."""
    env = {"AUTOGLM_EXPECT_NUM_EXPERTS": str(num_experts)}
    if top_k is not None:
        env["AUTOGLM_EXPECT_TOP_K"] = str(top_k)
    if layers is not None:
        env["AUTOGLM_EXPECT_LAYERS"] = str(layers)
    return env


def mismatches(cfg: ModelConfig, version: int, env: Mapping[str, str]) -> list[str]:
    out = []
    for var, (field, what, value) in EXPECTATIONS.items():
        want = env.get(var)
        if want is not None and int(want) != value(cfg):
            out.append(f"version {version} has {value(cfg)} {what} but {field} is {want}")
    return out


def check_expectations(cfg: ModelConfig, version: int,
                       env: Mapping[str, str] | None = None) -> None:
    problems = mismatches(cfg, version, os.environ if env is None else env)
    if problems:
        raise CheckpointError("; ".join(problems))
