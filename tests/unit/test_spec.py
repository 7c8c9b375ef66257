"""The typed spec: defaults, every rule, and InvalidSpec naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm.spec import InvalidSpec, parse, quantity

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def tiny() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text())["spec"])


def test_example_parses_with_defaults() -> None:
    s = parse(tiny(), "tiny")
    assert s.model.num_experts == 4 and s.model.top_k == 2
    assert s.experts.replica_budget == 8
    assert s.autoscaling.tolerance == 0.1 and s.rollout.canary is True
    assert s.gateway.service_type == "ClusterIP"
    minimal = parse({"model": {"name": "m", "version": 1, "repository": "s3://b/m",
                               "numExperts": 2}},
                    "m")
    assert minimal.replica_budget == 2 * 4, "default budget: numExperts x maxReplicas"
    # only the built-in tiny builder needs topK and layers: an imported model has its own
    assert minimal.model.top_k is None and minimal.model.layers is None


def test_real_model_shapes_fit() -> None:
    """DeepSeek-V3: 256 routed experts, top-8, 61 layers (GLM-4.5: 160, top-8, 92)."""
    big = {"name": "m", "version": 1, "repository": "/models", "numExperts": 256}
    assert parse({"model": {**big, "topK": 8, "layers": 61}}, "ds").model.num_experts == 256
    assert parse({"model": {**big, "numExperts": 160, "topK": 8, "layers": 92}},
                 "glm").model.layers == 92
    with pytest.raises(InvalidSpec) as err:
        parse({"model": {**big, "numExperts": 257}}, "ds")
    assert err.value.field == "spec.model.numExperts"
    # the topK rule holds only when topK is given
    assert parse({"model": {**big, "numExperts": 1}}, "one").model.top_k is None


# (mutation, field the error must name)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("topK above numExperts", {"model": {"topK": 5}}, "spec.model.topK"),
    ("zero layers", {"model": {"layers": 0}}, "spec.model.layers"),
    ("min above max", {"experts": {"minReplicas": 4, "maxReplicas": 2, "replicaBudget": 16}},
     "spec.experts.maxReplicas"),
    ("budget below one each", {"experts": {"replicaBudget": 3}}, "spec.experts.replicaBudget"),
    ("autoscaling without Prometheus", {"autoscaling": {"prometheusUrl": None}},
     "spec.autoscaling.prometheusUrl"),
    ("zero experts", {"model": {"numExperts": 0}}, "spec.model.numExperts"),
    ("unknown field", {"experts": {"replicas": 3}}, "spec.experts.replicas"),
    ("bad signal", {"autoscaling": {"signal": "cpu"}}, "spec.autoscaling.signal"),
    ("request above limit", {"experts": {"resources": {"requests": {"memory": "2Gi"},
                                                       "limits": {"memory": "1Gi"}}}},
     "spec.experts.resources.requests.memory"),
    ("GPU in resources", {"experts": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
     "spec.experts.resources.limits.nvidia.com/gpu"),
    ("managed Triton flag", {"triton": {"extraArgs": ["--log-verbose=1", "--load-model=x"]}},
     "spec.triton.extraArgs[1]"),
    ("relative repository", {"model": {"repository": "models/tiny"}}, "spec.model.repository"),
    ("missing version", {"model": {"version": None}}, "spec.model.version"),
]


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(("case", "patch", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_name_the_field(case: str, patch: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse(merge(tiny(), patch), "tiny")
    assert err.value.field == field, err.value


def test_name_too_long_for_children() -> None:
    with pytest.raises(InvalidSpec) as err:
        parse(tiny(), "x" * 55)
    assert err.value.field == "metadata.name"


def test_quantities() -> None:
    assert quantity("1") == quantity("1000m")
    assert quantity("1Gi") == 1024**3
    assert quantity("1.5G") == 1_500_000_000
    with pytest.raises(ValueError):
        quantity("lots")
