"""Real Triton servers given a spec's environment (autoglm.plan.workload_env): a version
that disagrees with the spec does not load, and says why in one line; GPU instances are
what the server asks Triton for."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from autoglm import plan as p
from autoglm.models.decoder import ExpertSlice
from autoglm.models.tiny import PRESETS
from autoglm.repository import build, load_part_config, load_weights
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
    """The expert loads, is ready, and answers with the in-process slice's output."""
    s = spec(numExperts=3, topK=2, layers=2)
    server = TritonServer(repo, {"expert_1": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log").start()
    try:
        folder = repo / "expert_1" / "1"
        _, cfg = load_part_config(folder)
        ref = ExpertSlice(cfg, 1, load_weights(folder))
        layers = sorted(ref.layers)
        x = np.random.default_rng(3).standard_normal((6, cfg.hidden_size)).astype(np.float32)
        lay = np.array([[layers[i % len(layers)]] for i in range(len(x))], dtype=np.int32)
        with httpclient.InferenceServerClient(server.http_url) as c:
            assert c.is_model_ready("expert_1", "1")
            inputs = [httpclient.InferInput("LAYER", list(lay.shape), "INT32"),
                      httpclient.InferInput("HIDDEN", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(lay)
            inputs[1].set_data_from_numpy(x)
            got = c.infer("expert_1", inputs).as_numpy("OUTPUT")
        with torch.no_grad():
            want = np.stack([ref(int(lay[i, 0]), torch.from_numpy(x[i:i + 1]))[0].numpy()
                             for i in range(len(x))])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
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
