"""The typed spec: defaults, every rule, InvalidSpec naming the field (every error at once),
the spec read as the API server reads it, and the resource's own rules (its name)."""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm import plan
from autoglm import spec as s
from autoglm.k8s.crd import crd
from autoglm.spec import InvalidSpec, parse, quantity, validate_resource

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
    ("http repository", {"model": {"repository": "http://host/models"}},
     "spec.model.repository"),
    ("repository outside the volume", {"model": {"repository": "/data/m",
                                                 "volume": {"claimName": "pvc"}}},
     "spec.model.repository"),
    ("missing version", {"model": {"version": None}}, "spec.model.version"),
    ("managed flag by its other name", {"triton": {"extraArgs": ["--model-store=/x"]}},
     "spec.triton.extraArgs[0]"),
    ("managed flag, value apart", {"triton": {"extraArgs": ["--http-port", "9000"]}},
     "spec.triton.extraArgs[0]"),
    ("not a quantity", {"experts": {"resources": {"limits": {"cpu": "1mi"}}}},
     "spec.experts.resources.limits.cpu"),
    ("negative quantity", {"gateway": {"resources": {"requests": {"cpu": -1}}}},
     "spec.gateway.resources.requests.cpu"),
    ("a string is not a number", {"model": {"numExperts": "4"}}, "spec.model.numExperts"),
    ("a fraction is not an integer", {"router": {"replicas": 1.5}}, "spec.router.replicas"),
    ("stream interval 0", {"router": {"streamInterval": 0}}, "spec.router.streamInterval"),
    ("stream interval above 64", {"router": {"streamInterval": 65}},
     "spec.router.streamInterval"),
    ("a snake_case name is unknown", {"experts": {"min_replicas": 2}},
     "spec.experts.min_replicas"),
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
    # the longest child is <name>-b-experts-<numExperts - 1>: 63 characters at most
    for n in (1, 4, 10, 11, 100, 101, 256):
        spec = merge(tiny(), {"model": {"numExperts": n, "topK": 1},
                              "experts": {"replicaBudget": None, "perServer": None}})
        longest = max(len(plan.workload_name("x" * 10, slot, "expert", n - 1))
                      for slot in s.SLOTS) - 10
        fits = "x" * (s.CHILD_NAME_MAX - longest)
        assert len(plan.workload_name(fits, "b", "expert", n - 1)) == s.CHILD_NAME_MAX
        assert parse(spec, fits)
        with pytest.raises(InvalidSpec, match="too long") as err:
            parse(spec, fits + "x")
        assert err.value.field == "metadata.name"


@pytest.mark.parametrize("name", ["Tiny", "1tiny", "a.b", "tiny-", "-tiny", "ti_ny", ""])
def test_names_the_operator_cannot_give_its_services(name: str) -> None:
    with pytest.raises(InvalidSpec, match="DNS-1035") as err:
        parse(tiny(), name)
    assert err.value.field == "metadata.name"


def test_every_error_at_once() -> None:
    bad = merge(tiny(), {"model": {"topK": 0, "repository": "models"},
                         "experts": {"minReplicas": 5, "maxReplicas": 2},
                         "triton": {"extraArgs": ["--log-verbose=1", "--grpc-port=1"]},
                         "gateway": {"resources": {"requests": {"cpu": "2"},
                                                   "limits": {"cpu": "1500m"}}}})
    with pytest.raises(InvalidSpec) as err:
        parse(bad, "Tiny")
    assert [e.field for e in err.value.errors] == [
        "spec.model.repository", "spec.model.topK", "spec.triton.extraArgs[1]",
        "spec.experts.maxReplicas", "spec.gateway.resources.requests.cpu", "metadata.name"]
    assert err.value.field == "spec.model.repository"
    assert str(err.value).count("; ") == 5, "the message holds them all"


def test_read_as_the_api_server_reads_it() -> None:
    """A null is an absent field (so defaulted), also in a map; YAML's 2.0 is 2."""
    spec = merge(tiny(), {"experts": {"resources": {"requests": {"cpu": "1"},
                                                    "limits": {}}}})
    spec["triton"] = None
    spec["experts"]["resources"]["requests"]["memory"] = None
    spec["model"]["version"] = 2.0
    parsed = parse(spec, "tiny")
    assert parsed.triton.image == "autoglm/triton:0.1.0"
    assert parsed.experts.resources.requests == {"cpu": "1"}
    assert parsed.model.version == 2 and isinstance(parsed.model.version, int)
    # an unknown field is unknown even when null
    spec["router"] = {"extra": None}
    with pytest.raises(InvalidSpec) as err:
        parse(spec, "tiny")
    assert err.value.field == "spec.router.extra"


def test_the_crd_carries_every_rule() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert [r["rule"] for r in schema["x-kubernetes-validations"]] == [
        r.cel for r in s.RESOURCE_RULES]
    assert schema["properties"]["metadata"]["properties"]["name"] == {"type": "string"}
    spec = schema["properties"]["spec"]["properties"]
    assert "x-kubernetes-validations" in spec["model"]["properties"]["repository"]
    assert "x-kubernetes-validations" in spec["triton"]["properties"]["extraArgs"]["items"]
    assert [r["fieldPath"] for r in spec["experts"]["properties"]["resources"][
        "x-kubernetes-validations"]] == [".requests", ".requests", ".limits"]


def test_validate_resource_checks_the_whole_document() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert validate_resource(doc) == []
    assert [str(e) for e in validate_resource({**doc, "apiVersion": "autoglm.io/v1",
                                               "specs": {}})] == [
        "specs: unknown field", "apiVersion: must be autoglm.io/v1alpha1, not "
                                "'autoglm.io/v1'"]
    named = validate_resource({**doc, "metadata": {"name": "Tiny"}})
    assert [e.field for e in named] == ["metadata.name"] and "RFC 1123" in named[0].message
    assert [str(e) for e in validate_resource({**doc, "metadata": {}})] == [
        "metadata.name: required (name or generateName)"]
    assert validate_resource({**doc, "metadata": {"generateName": "tiny-"}}) == []
    assert [e.field for e in validate_resource({**doc, "metadata": {"generateName": "x" * 60}})
            ] == ["metadata.name"], "the generated name is too long for the children"
    assert [str(e) for e in validate_resource({**doc, "spec": None})] == ["spec: required"]
    assert [str(e) for e in validate_resource({**doc, "spec": [1]})] == [
        "spec: must be an object"]


def test_quantities() -> None:
    assert quantity("1") == quantity("1000m")
    assert quantity("1Gi") == 1024**3
    assert quantity("1.5G") == 1_500_000_000
    assert quantity("1Ei") == 2**60 and quantity("1E") == 10**18 and quantity("1E3") == 1000
    assert quantity("+.5") == quantity("500m") == quantity("5e-1")
    # rounded up to a whole nano, as the API server does: 0.1n and 0.2n are both 1n
    assert quantity("0.1n") == quantity("0.2n") == quantity("1n")
    for bad in ("lots", "1mi", "1K", "", "1e"):
        with pytest.raises(ValueError):
            quantity(bad)
    # the schema's pattern admits only what the API server's quantity() parses
    pattern = s.QUANTITY_PATTERN
    for ok in ("1", "500m", "2Gi", "1.5", ".5", "5.", "1e3", "1E-2", "+1", "1E", "1Ei"):
        assert re.fullmatch(pattern[1:-1], ok), ok
    for bad in ("-1", "1mi", "1K", "1ki", "1e100", "1 Gi", "1Gi\n", "٣"):
        assert not re.fullmatch(pattern[1:-1], bad), bad


def test_quantity_is_the_clients_parse_quantity_made_strict() -> None:
    """``quantity()`` agrees with ``kubernetes.utils.parse_quantity`` where both accept a
    value. It does not call it: the pure core imports no kubernetes (test_core_imports), and
    parse_quantity is laxer than the API server and neither rounds nor keeps every digit."""
    from kubernetes.utils import parse_quantity
    for q in ("1", "1000m", "1Gi", "1.5G", "1Ei", "1E", "1E3", "+.5", "5e-1", "100u", "0.5Mi",
              "123456789012345678901234567890"):
        assert quantity(q) == parse_quantity(q), q
    assert quantity("0.1n") == Decimal("1e-9") != parse_quantity("0.1n")  # rounded up
    assert quantity("12345678901234567890Pi") == 12345678901234567890 * 2**50 \
        != parse_quantity("12345678901234567890Pi")  # 28 significant digits there
    for lax in ("1K", "1_000", " 1", "inf", "NaN"):  # refused by the API server
        parse_quantity(lax)
        with pytest.raises(ValueError):
            quantity(lax)

