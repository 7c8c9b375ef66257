"""Spec fuzzing: generated AutoGLMDeployments, valid and invalid, through ``autoglm validate``
(its check, :func:`autoglm.spec.validate_resource`, and the command on a file of them all),
the operator's :func:`autoglm.spec.parse` and the real API server (a server-side dry run, as
``kubectl apply --dry-run=server`` sends them).

Nothing crashes; every refusal names a field; ``autoglm validate``, the operator and the API
server accept and refuse the same specs, except for the operator-only checks listed in
``OPERATOR_ONLY`` (none today: every rule is in the CRD).

The specs start valid and take 0-3 mutations: a field of the CRD's schema (walked from the
generated CRD, so new fields are fuzzed too) set to a value near its bounds, of the wrong
type, null, or any JSON; a field removed or an unknown one added; a cross-field rule broken;
an odd name. ``AUTOGLM_FUZZ_EXAMPLES`` sets how many (default 1000), e.g.
``AUTOGLM_FUZZ_EXAMPLES=20000 pytest tests/integration/test_spec_fuzz.py -s``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client

from autoglm import cli
from autoglm import spec as s
from autoglm.k8s.crd import crd
from autoglm.testing import eventually
from autoglm.testing.controlplane import ControlPlane
from autoglm.testing.operator import REPO_ROOT

pytestmark = [pytest.mark.k8s,
              # the kubernetes client's, once per request
              pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")]

EXAMPLES = int(os.environ.get("AUTOGLM_FUZZ_EXAMPLES", "1000"))


def _go_json_integer(f: float) -> bool:
    """The API server's test of a JSON number for an integer field (kube-openapi's
    swag.IsFloat64AJSONInteger): within a relative 1e-9 of an integer counts."""
    if not -(2.0**53) <= f <= 2.0**53:
        return False
    g = float(int(f)) if f >= 0 else 0.0  # Go's float64(uint64(f))
    if f == g or f == float(int(f)):
        return True
    diff = abs(f - g)
    if f == 0 or g == 0 or diff < 5e-324:
        return diff < 1e-9 * 5e-324
    return diff / min(abs(f) + abs(g), 1.7976931348623157e308) < 1e-9


def _value_at(doc: Any, field: str) -> Any:
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", field):
        if part.startswith("["):
            doc = doc[int(part[1:-1])] if isinstance(doc, list) else None
        else:
            doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


# What only the operator refuses (the API server accepts and stores it), by what validate
# reports and the value refused: a spec refused only for these may pass the API server.
OPERATOR_ONLY: dict[str, Callable[[s.FieldError, Any], bool]] = {
    # version: 1.0000000001 is an integer to the API server's type check, and is stored as
    # that float; CEL rules on the field refuse it, the operator refuses it everywhere.
    "a number within 1e-9 of an integer in an integer field":
        lambda e, v: e.message == "must be an integer" and isinstance(v, float)
        and _go_json_integer(v),
}
# The new admission rules, by what each refusal says: the fuzz must hit each, on both sides.
RULES = {
    "repository scheme": "must be an absolute path in the pod",
    "repository in the volume": "repository is a path outside volume.mountPath",
    "managed flag": "a flag the operator sets on every tritonserver",
    "request above limit": "exceeds limit",
    "GPU in resources": "set GPUs with spec.experts.gpus",
    # validate says a name is not an RFC 1123 subdomain once, where the API server adds that
    # it is no DNS-1035 label either
    "name a DNS-1035 label": "must be a DNS-1035 label|RFC 1123 subdomain",
    "name too long for the children": "too long: the longest child's name",
}
API_RULES = {**RULES, "request above limit": "requests must not exceed limits",
             "name a DNS-1035 label": "must be a DNS-1035 label"}
# The API server's note beside type errors; the errors themselves name their fields.
NOT_CHECKED = "some validation rules were not checked"

Json = Any
SPEC_SCHEMA: dict[str, Any] = (crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
                               ["properties"]["spec"])


# -- generation -----------------------------------------------------------------------------

def schema_paths(schema: dict[str, Any], path: tuple[str, ...] = ()
                 ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every field of the schema: "*" stands for a map's key, "[]" for a list's item."""
    out = [(path, schema)] if path else []
    for k, sub in schema.get("properties", {}).items():
        out += schema_paths(sub, (*path, k))
    if isinstance(schema.get("additionalProperties"), dict):
        out += schema_paths(schema["additionalProperties"], (*path, "*"))
    if isinstance(schema.get("items"), dict):
        out += schema_paths(schema["items"], (*path, "[]"))
    return out


PATHS = schema_paths(SPEC_SCHEMA)
REQUIRED = [(p, r) for p, sch in [((), SPEC_SCHEMA), *PATHS] for r in sch.get("required", [])]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=6)
UNITS = ["", "m", "k", "M", "G", "Ki", "Mi", "Gi", "n", "u", "e3", "E", "Ti"]
quantities = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 5000), st.sampled_from(UNITS)),
    st.integers(0, 10**6), st.integers(2**63 - 2, 2**63 + 1), st.integers(-5, -1),
    st.floats(0, 10, allow_nan=False), st.from_regex(s.QUANTITY_PATTERN),
    st.sampled_from(["1mi", "1K", "1ki", "-1", "+1", "1e", "1e100", "1e-99", "0.1n", "0.2n",
                     ".5", "5.", "1.5Gi", "1E", "1E3", "", "lots", "1 Gi", "1Gi\n", "٣",
                     "1" * 65, "9" * 30 + "E", "0"]),
    st.text(max_size=6))
resource_keys = st.sampled_from(["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu",
                                 "hugepages-2Mi"]) | st.text(max_size=10)
extra_args = st.one_of(
    st.sampled_from([*s.MANAGED_TRITON_FLAGS, "--log-verbose=1", "--strict-readiness=true",
                     "--model-repository=/x", "--load-model=*", "--http-port=1", "8000",
                     "--model-repo=/x", "--grpc-port", "-v", ""]),
    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(s.MANAGED_TRITON_FLAGS),
              st.text(max_size=5)),
    st.text(max_size=16))
bad_names = st.sampled_from(["Tiny", "1tiny", "a.b", "-a", "a-", "a_b", "tiny.", "x" * 53,
                             "x" * 64, "x" * 254, "", " ", "tiny\n", "tïny", "a" * 50 + "-"])


def near(schema: dict[str, Any]) -> st.SearchStrategy[Json]:
    """Values for one field: near its bounds, its enum, its pattern, wrong types, null."""
    options: list[st.SearchStrategy[Json]] = [json_values, st.none()]
    t = schema.get("type")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if schema.get("x-kubernetes-int-or-string"):
        options += [quantities] * 4
    elif t in ("integer", "number"):
        edges = [b + d for b in (lo, hi) if b is not None for d in (-1, 0, 1)]
        if t == "number":
            edges += [b + d for b in (lo, hi) if b is not None for d in (-0.5, 0.5)]
        options += [st.sampled_from(edges or [0]),
                    st.integers(int(lo or 0) - 3, int(hi if hi is not None else 10**9) + 3),
                    st.floats(-1, (hi or 1000) + 1, allow_nan=False).map(lambda x: round(x, 1))]
        options += [st.sampled_from(edges or [0])] * 2
    elif t == "string":
        if "enum" in schema:
            options += [st.sampled_from(schema["enum"])] * 3
        if "pattern" in schema:
            options += [st.from_regex(schema["pattern"])] * 2
        lengths = [n for n in (schema.get("minLength"), schema.get("maxLength")) if n]
        options += [st.sampled_from([n + d for n in lengths for d in (-1, 0, 1)] or [0])
                    .map(lambda n: "/" + "a" * max(n - 1, 0)), st.text(max_size=20)]
    elif t == "boolean":
        options += [st.booleans()] * 2
    elif t == "object":
        options += [st.just({})]
    elif t == "array":
        options += [st.lists(st.text(max_size=5), max_size=3)]
    return st.one_of(options)


def set_path(node: dict[str, Any], path: tuple[str, ...], value: Json,
             draw: st.DrawFn) -> None:
    """Set ``path`` (making what is missing) to ``value``; a "*" key and a "[]" index are
    drawn."""
    *parents, leaf = path
    for i, part in enumerate(parents):
        if part == "*":
            part = draw(resource_keys)
        if path[i + 1] == "[]":  # a list of scalars: the value becomes one of its items
            items = node.get(part)
            items = items if isinstance(items, list) else []
            idx = draw(st.integers(0, len(items)))
            items[idx:idx + 1] = [value]
            node[part] = items
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[draw(resource_keys) if leaf == "*" else leaf] = value


def get_path(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    """Valid requests and limits (each request at most its limit)."""
    out: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for key in draw(st.lists(st.sampled_from(["cpu", "memory", "ephemeral-storage"]),
                             unique=True, max_size=3)):
        unit = draw(st.sampled_from(["", "m", "Mi", "Gi", "k"]))
        req = draw(st.integers(0, 4000))
        if draw(st.booleans()):
            out["requests"][key] = f"{req}{unit}" if unit else req
        if draw(st.booleans()):
            out["limits"][key] = f"{req + draw(st.integers(0, 4000))}{unit}"
    keep_empty: bool = draw(st.booleans())  # {} as well as absent
    return {k: v for k, v in out.items() if v or keep_empty}


@st.composite
def valid_specs(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    n = draw(st.sampled_from([1, 2, 4, 8, 10, 11, 100, 101, 256]) | st.integers(1, 256))
    repo = draw(st.sampled_from(["/models", "/models/tiny", "s3://bucket/m", "gs://b/p",
                                 "as://acct/c/m", "/"]))
    model: dict[str, Any] = {"name": draw(st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?",
                                                        fullmatch=True)),
                             "version": draw(st.integers(1, 10**9)),
                             "repository": repo, "numExperts": n}
    if draw(st.booleans()):
        model["topK"] = draw(st.integers(1, min(n, 16)))
    if draw(st.booleans()):
        model["layers"] = draw(st.integers(1, 256))
    if repo.startswith("/") and draw(st.integers(0, 4)) == 0:
        mount = draw(st.sampled_from(["/", "/models", "/models/"]))
        mount = mount if s._inside(repo, mount) else "/"
        model["volume"] = {"claimName": draw(st.sampled_from(["pvc", "models-0"])),
                           "mountPath": mount}
    spec: dict[str, Any] = {"model": model}
    if draw(st.booleans()):
        spec["triton"] = {"resources": draw(resources()),
                          "extraArgs": draw(st.lists(st.sampled_from(
                              ["--log-verbose=1", "--strict-readiness=true",
                               "--exit-on-error=true"]), max_size=2)),
                          "imagePullPolicy": draw(st.sampled_from(["Always", "Never"]))}
    if draw(st.booleans()):
        lo = draw(st.integers(1, 8))
        hi = draw(st.integers(lo, 64))
        spec["experts"] = {"minReplicas": lo, "maxReplicas": hi,
                           "gpus": draw(st.integers(0, 2)), "resources": draw(resources())}
        if draw(st.booleans()):
            spec["experts"]["replicaBudget"] = draw(st.integers(n * lo, max(n * lo, 4096)))
    if draw(st.booleans()):
        spec["autoscaling"] = {"prometheusUrl": "http://prometheus:9090",
                               "target": draw(st.floats(0.5, 1000, allow_nan=False)),
                               "tolerance": draw(st.sampled_from([0, 0.1, 1]))}
    if draw(st.booleans()):
        spec["router"] = {"replicas": draw(st.integers(1, 64))}
    if draw(st.booleans()):
        spec["gateway"] = {"port": draw(st.integers(1, 65535)), "resources": draw(resources()),
                           "serviceType": draw(st.sampled_from(["ClusterIP", "NodePort"]))}
    if draw(st.booleans()):
        spec["rollout"] = {"readyTimeoutSeconds": draw(st.integers(10, 86400)),
                           "canary": draw(st.booleans())}
    budget = s.NAME_BUDGET - len(str(n - 1))
    name = draw(st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
                | st.sampled_from(["tiny", "x" * budget, "y" * (budget - 1)]))
    return name, spec


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """A valid spec, then 0-3 mutations; returns the name, the spec and what was done."""
    name, spec = draw(valid_specs())
    done: list[str] = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 2, 3]))):
        how = draw(st.sampled_from(["field"] * 4 + ["remove", "unknown", "name"] + ["rule"] * 4))
        if how == "field":
            path, sch = draw(st.sampled_from(PATHS))
            value = draw(near(sch))
            set_path(spec, path, value, draw)
            done.append(f"{'.'.join(path)}={value!r:.40}")
        elif how == "remove":
            parent, key = draw(st.sampled_from(REQUIRED))
            node = get_path(spec, parent)
            if isinstance(node, dict):
                node.pop(key, None)
            done.append(f"remove {'.'.join((*parent, key))}")
        elif how == "unknown":
            path, sch = draw(st.sampled_from([((), SPEC_SCHEMA), *[
                (p, x) for p, x in PATHS if x.get("type") == "object" and "properties" in x]]))
            node = get_path(spec, path)
            if isinstance(node, dict):
                key = draw(st.sampled_from(["replicas", "min_replicas", "NumExperts", "extra"])
                           | st.text(min_size=1, max_size=8))
                node.setdefault(key, draw(json_values))
            done.append(f"unknown in {'.'.join(path)}")
        elif how == "rule":
            done.append(draw(st.sampled_from(BREAK))(spec, name, draw))
        else:
            n = get_path(spec, ("model", "numExperts"))
            budget = s.NAME_BUDGET - len(str(n - 1)) if isinstance(n, int) else 50
            name = draw(bad_names | st.sampled_from(["z" * budget, "z" * (budget + 1)])
                        | st.text(max_size=12))
            done.append(f"name={name!r:.30}")
    return name, spec, done


def _model(spec: dict[str, Any]) -> dict[str, Any]:
    m = spec.setdefault("model", {})
    if not isinstance(m, dict):
        m = spec["model"] = {}
    return m


def _obj(spec: dict[str, Any], key: str) -> dict[str, Any]:
    o = spec.get(key)
    if not isinstance(o, dict):
        o = spec[key] = {}
    return o


def b_top_k(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    m = _model(spec)
    m["topK"] = draw(st.integers(2, 16))
    m["numExperts"] = draw(st.integers(1, m["topK"]))
    return "topK vs numExperts"


def b_replicas(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    e = _obj(spec, "experts")
    e["minReplicas"] = draw(st.integers(2, 64))
    e["maxReplicas"] = draw(st.integers(1, e["minReplicas"]))
    return "min vs max replicas"


def b_budget(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    e = _obj(spec, "experts")
    n = _model(spec).setdefault("numExperts", 4)
    lo = e.setdefault("minReplicas", 1)
    if isinstance(n, int) and isinstance(lo, int):
        e["replicaBudget"] = draw(st.integers(max(n * lo - 2, 1), n * lo + 1))
    return "replicaBudget"


def b_autoscaling(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    spec["autoscaling"] = draw(st.sampled_from([{}, {"enabled": True}, {"enabled": False},
                                                {"target": 10}]))
    return "autoscaling without prometheusUrl"


def b_repository(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    _model(spec)["repository"] = draw(st.sampled_from(
        ["models/tiny", "http://x/m", "https://x/m", "s3://", "s3:///b", "S3://b", "file:///m",
         "./m", "~/m", "gs://b", "as://a/c", "//m", " /m", "\n/m"]) | st.text(max_size=10))
    return "repository"


def b_volume(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    m = _model(spec)
    m["repository"] = draw(st.sampled_from(["/models", "/models/x", "/modelsx", "/data",
                                            "/", "s3://b/m"]))
    m["volume"] = {"claimName": "pvc",
                   "mountPath": draw(st.sampled_from(["/models", "/models/", "/", "/data",
                                                      "/models//", "/models/x"]))}
    return "volume"


def b_flags(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    _obj(spec, "triton")["extraArgs"] = draw(st.lists(extra_args, min_size=1, max_size=4))
    return "extraArgs"


def b_resources(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    where = draw(st.sampled_from(["triton", "experts", "gateway"]))
    key = draw(resource_keys)
    if draw(st.booleans()):  # comparable: the same kind of number, in any units
        amounts = st.integers(0, 3000) | st.sampled_from(["0.5", "1.5", ".1", "1e3", "1E-2"])
        units = st.sampled_from(["", "m", "k", "Ki", "M", "Mi", "G", "Gi", "n", "u"])
        req, lim = (f"{draw(amounts)}{draw(units)}" for _ in range(2))
    else:
        req, lim = draw(quantities), draw(quantities)
    _obj(spec, where)["resources"] = {"requests": {key: req}, "limits": {key: lim}}
    return f"{where}.resources"


def b_gpus(spec: dict[str, Any], name: str, draw: st.DrawFn) -> str:
    where = draw(st.sampled_from(["triton", "experts", "gateway"]))
    part = draw(st.sampled_from(["requests", "limits"]))
    res = _obj(_obj(spec, where), "resources")
    _obj(res, part)["nvidia.com/gpu"] = draw(st.sampled_from([1, "1", 0, "2"]))
    return f"{where}.resources.{part} GPU"


BREAK: list[Callable[[dict[str, Any], str, st.DrawFn], str]] = [
    b_top_k, b_replicas, b_budget, b_autoscaling, b_repository, b_volume, b_flags, b_resources,
    b_resources, b_gpus]


def as_kubectl_sends(value: Json) -> Json:
    """kubectl turns YAML into JSON through Go floats: an integral number is written as an
    integer (YAML's 4.0 arrives as 4)."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


# -- checking -------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    spec: dict[str, Any]
    done: list[str]
    local: list[s.FieldError] = field(default_factory=list)
    parsed: bool = False
    api_ok: bool | None = None
    api_fields: list[str] = field(default_factory=list)
    api_message: str = ""

    @property
    def doc(self) -> dict[str, Any]:
        return {"apiVersion": s.API_VERSION, "kind": s.KIND, "metadata": {"name": self.name},
                "spec": self.spec}

    def describe(self) -> str:
        return (f"mutations {self.done}\n  doc {json.dumps(self.doc)[:1500]}\n"
                f"  validate: {[str(e) for e in self.local]}\n"
                f"  API server: {'accepted' if self.api_ok else self.api_message[:1500]}")


FIELD_ROOTS = ("spec", "metadata", "apiVersion", "kind")


def check_locally(name: str, spec: dict[str, Any], done: list[str]) -> Case:
    case = Case(name, copy.deepcopy(spec), done)
    case.local = s.validate_resource(case.doc)  # a crash fails the test, naming the example
    for e in case.local:
        assert e.field.startswith(FIELD_ROOTS) and e.message, (str(e), case.describe())
    try:
        s.parse(copy.deepcopy(spec), name)
        case.parsed = True
    except s.InvalidSpec as e:
        assert e.field.startswith(("spec", "metadata.name")), (str(e), case.describe())
    # the operator refuses exactly what validate refuses (name syntax aside: parse's rules
    # on the name imply the API server's)
    assert case.parsed == (not case.local), case.describe()
    return case


def dry_run(co: client.CustomObjectsApi, namespace: str, case: Case) -> None:
    body = as_kubectl_sends(case.doc)
    try:
        co.create_namespaced_custom_object(s.GROUP, s.VERSION, namespace, s.PLURAL, body,
                                           dry_run="All", field_validation="Strict")
        case.api_ok = True
    except client.ApiException as e:
        case.api_ok = False
        data = json.loads(e.body) if e.body and e.body.startswith("{") else {}
        msg = str(data.get("message") or e.body)
        causes = (data.get("details") or {}).get("causes") or []
        case.api_fields = [c["field"] for c in causes
                           if c.get("field") and c["field"] != "<nil>"]
        case.api_fields += re.findall(r'(?:unknown|duplicate) field "([^"]+)"', msg)
        case.api_message = f"{e.status}: {msg}"
        # a cause without a field is the note beside type errors, or an anyOf's summary
        # quoting the field ("spec.x" must validate at least one schema)
        for c in causes:
            if not c.get("field") or c["field"] == "<nil>":
                assert NOT_CHECKED in c.get("message", "") or re.search(
                    r'"(spec|metadata)\.', c.get("message", "")), case.describe()


def operator_only(case: Case) -> bool:
    """Refused by validate only for what OPERATOR_ONLY lists (and accepted by the API)."""
    return bool(case.local) and bool(case.api_ok) and all(
        any(ok(e, _value_at(case.doc, e.field)) for ok in OPERATOR_ONLY.values())
        for e in case.local)


@pytest.fixture(scope="module")
def crd_installed(control_plane: ControlPlane) -> None:
    """The CRD as shipped (crds/), served."""
    control_plane.kubectl("apply", "-k", str(REPO_ROOT / "crds"))
    eventually(lambda: control_plane.kubectl("get", s.PLURAL, "-A", check=False).returncode
               == 0, "the AutoGLMDeployment API to be served")


def test_fuzzed_specs_validate_parse_and_admission_agree(
        api: client.ApiClient, namespace: str, crd_installed: None, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    cases: list[Case] = []

    seen: set[str] = set()

    # Hypothesis repeats itself now and then: distinct specs are kept, up to EXAMPLES
    @settings(max_examples=EXAMPLES + EXAMPLES // 5, derandomize=True, deadline=None,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def collect(example: tuple[str, dict[str, Any], list[str]]) -> None:
        case = check_locally(*example)
        key = json.dumps(case.doc, sort_keys=True)
        if len(cases) < EXAMPLES and key not in seen:
            seen.add(key)
            cases.append(case)

    collect()
    t_local = time.monotonic() - t0
    assert len(cases) == EXAMPLES, f"only {len(cases)} distinct specs"

    co = client.CustomObjectsApi(api)
    t1 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: dry_run(co, namespace, c), cases))
    t_api = time.monotonic() - t1

    # `autoglm validate` itself, on one file holding every document
    import yaml

    f = tmp_path / "fuzzed.yaml"
    f.write_text(yaml.safe_dump_all([c.doc for c in cases]))
    capsys.readouterr()
    rc = cli.main(["validate", str(f)])
    out = capsys.readouterr().out
    flagged = {int(m) for m in re.findall(rf"^{re.escape(str(f))}: document (\d+): ", out,
                                          re.M)}
    assert flagged == {i + 1 for i, c in enumerate(cases) if c.local}, out[-2000:]
    assert rc == int(any(c.local for c in cases))

    unnamed = [c for c in cases if c.api_ok is False and not c.api_fields]
    assert not unnamed, "refused without naming a field:\n" + "\n".join(
        c.describe() for c in unnamed[:5])
    exempt = [c for c in cases if c.api_ok != (not c.local) and operator_only(c)]
    disagree = [c for c in cases if c.api_ok != (not c.local) and not operator_only(c)]
    assert not disagree, f"{len(disagree)} disagreements, e.g.:\n" + "\n".join(
        c.describe() for c in disagree[:5])

    local_hits = Counter(rule for c in cases for rule, text in RULES.items()
                         if any(re.search(text, e.message) for e in c.local))
    api_hits = Counter(rule for c in cases if not c.api_ok
                       for rule, text in API_RULES.items() if re.search(text, c.api_message))
    missed = [r for r in RULES if not local_hits[r] or not api_hits[r]]
    assert not missed, f"no generated spec broke {missed}"

    refused_api = sum(1 for c in cases if c.api_ok is False)
    refused_local = sum(1 for c in cases if c.local)
    with capsys.disabled():
        print(f"\nspec fuzz: {len(cases)} distinct specs: API server refused "
              f"{refused_api}, autoglm validate refused {refused_local}, parse refused "
              f"{sum(1 for c in cases if not c.parsed)}; disagreements 0 ({len(exempt)} "
              f"operator-only), crashes 0; "
              f"generation+validate+parse {t_local:.1f} s, dry runs {t_api:.1f} s")
        print("  rules hit (validate / API server): " + ", ".join(
            f"{r} {local_hits[r]}/{api_hits[r]}" for r in RULES))
