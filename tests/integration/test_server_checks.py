"""Real Triton servers given a spec's environment (autoglm.plan.workload_env): a version
that disagrees with the spec does not load, and says why in one line; GPU instances are
what the server asks Triton for."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from autoglm import plan as p
from autoglm.models.tiny import PRESETS
from autoglm.repository import build
from autoglm.spec import AutoGLMSpec, parse
from autoglm.triton import TritonError, TritonServer

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1: the tiny model with 3 routed experts."""
    repo = tmp_path_factory.mktemp("repo")
    build(repo, "tiny-moe", 1, dataclasses.replace(PRESETS["tiny"], num_experts=3))
    return repo


def spec(gpus: int = 0, **model: object) -> AutoGLMSpec:
    return parse({"model": {"name": "tiny-moe", "version": 1, "repository": "/m", **model},
                  "experts": {"gpus": gpus}}, "x")


def test_an_expert_refuses_a_version_the_spec_disagrees_with(repo: Path,
                                                            tmp_path: Path) -> None:
    s = spec(numExperts=4, layers=3)
    server = TritonServer(repo, {"expert_0": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log")
    with pytest.raises(TritonError) as err:
        server.start()
    assert err.value.summary == (
        "expert_0 v1: version 1 has 3 routed experts but spec.model.numExperts is 4; "
        "version 1 has 2 layers but spec.model.layers is 3")
    assert server.popen is None and not server.shm_regions(), "nothing left running"


def test_a_spec_that_agrees_loads(repo: Path, tmp_path: Path) -> None:
    s = spec(numExperts=3, topK=2, layers=2)
    server = TritonServer(repo, {"expert_1": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log").start()
    server.stop()


def gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.stdout.count("GPU ") if out.returncode == 0 else 0


def test_gpu_experts_ask_triton_for_gpu_instances(repo: Path, tmp_path: Path) -> None:
    """spec.experts.gpus > 0: the pinned configuration is loaded with KIND_GPU instances (on
    a machine without GPUs Triton says so; with one, the expert loads on it)."""
    s = spec(gpus=1, numExperts=3)
    server = TritonServer(repo, {"expert_0": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log")
    if gpus():
        server.start()
        server.stop()
        assert "(GPU device 0)" in (tmp_path / "expert.log").read_text()
    else:
        with pytest.raises(TritonError) as err:
            server.start()
        assert err.value.summary == ("expert_0 v1: instance group expert_0_0 of model "
                                     "expert_0 has kind KIND_GPU but no GPUs are available")
