"""Which repository `autoglm up` serves a version from (no server started): the spec's
repository as it is when it holds the version, else the tiny model built in its own home."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoglm.local import runtime as rt
from autoglm.models.tiny import PRESETS, TinySpec
from autoglm.spec import parse


def local(tmp_path: Path, **model: Any) -> tuple[rt.LocalRuntime, list[str]]:
    said: list[str] = []
    r = rt.LocalRuntime(tmp_path / "x.yaml", home=tmp_path / "home", say=said.append,
                        name="x")
    r.spec = parse({"model": {"name": "tiny-moe", "version": 1, "numExperts": 4, **model}},
                   "x")
    return r, said


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str, int, TinySpec]]:
    calls: list[tuple[Path, str, int, TinySpec]] = []

    def build(repository: Path, name: str, version: int, spec: TinySpec) -> Any:
        calls.append((repository, name, version, spec))
        return type("Built", (), {"created": True})()

    monkeypatch.setattr(rt, "build", build)
    return calls


def test_a_repository_holding_the_version_is_served_as_it_is(
        tmp_path: Path, builds: list[Any]) -> None:
    repo = tmp_path / "imported"
    (repo / "router" / "1").mkdir(parents=True)
    (repo / "router" / "1" / "moe.json").write_text(json.dumps({
        "name": "qwen", "version": 1, "layout": 3, "architecture": "Qwen3MoeForCausalLM",
        "config": {"num_experts": 8}}))
    r, said = local(tmp_path, repository=str(repo))
    assert r._model(1) == repo and builds == []
    assert said == [f"model qwen v1: Qwen3MoeForCausalLM, 8 routed experts, served from {repo}"]
    # a version it does not hold: the tiny model, built in our own home
    assert r._model(2) == tmp_path / "home" / "models" / "x"
    assert [(b[0], b[1], b[2]) for b in builds] == [(r.repository, "tiny-moe", 2)]


def test_the_tiny_builder_takes_what_the_spec_leaves_out_from_the_preset(
        tmp_path: Path, builds: list[Any]) -> None:
    r, _ = local(tmp_path, repository="/models-not-here")
    r._model(1)
    tiny = PRESETS["tiny"]
    assert builds[-1][3] == TinySpec(num_experts=4, top_k=tiny.top_k, layers=tiny.layers)
    r, _ = local(tmp_path, repository="/models-not-here", numExperts=6, topK=3, layers=1)
    r._model(1)
    assert (builds[-1][3].num_experts, builds[-1][3].top_k, builds[-1][3].layers) == (6, 3, 1)
    r, _ = local(tmp_path, repository="s3://bucket/m", numExperts=1)  # top-2 of 1 cannot be
    r._model(1)
    assert (builds[-1][3].num_experts, builds[-1][3].top_k) == (1, 1)


def test_num_experts_left_out_comes_from_the_version_in_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "imported"
    (repo / "router" / "3").mkdir(parents=True)
    (repo / "router" / "3" / "moe.json").write_text(json.dumps({
        "name": "glm", "version": 3, "config": {"num_experts": 160}}))
    file = tmp_path / "glm.yaml"

    def resource(**model: Any) -> str:
        file.write_text(json.dumps({"kind": "AutoGLMDeployment", "metadata": {"name": "glm"},
                                    "spec": {"model": {"name": "glm", **model}}}))
        return str(file)

    name, spec = rt.read_resource(Path(resource(version=3, repository=str(repo))))
    assert (name, spec.model.num_experts) == ("glm", 160)
    # given, it stays as it is (the servers then check it against the version)
    _, spec = rt.read_resource(Path(resource(version=3, repository=str(repo), numExperts=8)))
    assert spec.model.num_experts == 8
    # a version the repository does not hold, or no repository here: still required
    for model in ({"version": 4, "repository": str(repo)},
                  {"version": 3, "repository": "/not-here"},
                  {"version": 3, "repository": "s3://bucket/glm"}):
        with pytest.raises(rt.LocalError, match=r"spec\.model\.numExperts: required") as e:
            rt.read_resource(Path(resource(**model)))
        local = str(model["repository"]).startswith("/")
        assert (f"nor does {model['repository']} hold version {model['version']}"
                in str(e.value)) == local, e.value
