"""Real Triton servers given a spec's environment (autoglm.plan.workload_env): a version
that disagrees with the spec does not load, and says why in one line; GPU instances are
what the server asks Triton for."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from autoglm import plan as p
from autoglm.local.dataplane import control
from autoglm.models.decoder import ExpertSlice
from autoglm.models.tiny import PRESETS
from autoglm.repository import build, load_part_config, load_weights
from autoglm.spec import AutoGLMSpec, parse
from autoglm.testing import eventually
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
    server = TritonServer(repo, {"experts": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log")
    with pytest.raises(TritonError) as err:
        server.start()
    assert err.value.summary == (
        "experts v1: version 1 has 3 routed experts but spec.model.numExperts is 4; "
        "version 1 has 2 layers but spec.model.layers is 3")
    assert server.popen is None and not server.shm_regions(), "nothing left running"


@pytest.mark.parametrize("grouped", ["0", "1"], ids=["per-expert", "grouped"])
def test_a_spec_that_agrees_loads(repo: Path, tmp_path: Path, grouped: str) -> None:
    """A server given experts 0 and 2 loads, reports them, and answers one call carrying
    rows of both (one layer per call, in either order) with the in-process slices' output:
    with a matmul chain per expert (CPU) and with the batched layout a GPU gets."""
    s = spec(numExperts=3, topK=2, layers=2)
    server = TritonServer(repo, {"experts": 1},
                          env={**p.workload_env(s, "expert"), p.SERVER_EXPERTS_ENV: "2,0",
                               p.GROUPED_ENV: grouped},
                          log_path=tmp_path / "expert.log").start()
    try:
        refs = {}
        for e in (0, 2):
            folder = repo / f"expert_{e}" / "1"
            _, cfg = load_part_config(folder)
            refs[e] = ExpertSlice(cfg, e, load_weights(folder))
        rng = np.random.default_rng(3)
        with httpclient.InferenceServerClient(server.http_url) as c:
            assert c.is_model_ready("experts", "1")
            held = c.infer("experts", [], outputs=[httpclient.InferRequestedOutput("HELD")])
            assert held.as_numpy("HELD").tolist() == [0, 2]
            for layer in sorted(refs[0].layers):
                for (a, b), (n, m) in (((2, 0), (4, 2)), ((0, 2), (1, 5))):
                    x = rng.standard_normal((6, cfg.hidden_size)).astype(np.float32)
                    got = c.infer("experts", tensors(layer, [a, b], [n, m], x)) \
                        .as_numpy("OUTPUT")
                    with torch.no_grad():
                        want = np.concatenate([refs[a](layer, torch.from_numpy(x[:n])).numpy(),
                                               refs[b](layer, torch.from_numpy(x[n:])).numpy()])
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            with pytest.raises(InferenceServerException, match="expert 1 is not held here"):
                c.infer("experts", tensors(layer, [1], [6], x))
    finally:
        server.stop()


def tensors(layer: int, experts: list[int], counts: list[int], x: np.ndarray[Any, Any],
            ) -> list[httpclient.InferInput]:
    arrays = [("LAYER", np.array([layer], dtype=np.int32)),
              ("EXPERTS", np.array(experts, dtype=np.int32)),
              ("COUNTS", np.array(counts, dtype=np.int32)), ("HIDDEN", x)]
    inputs = []
    for name, a in arrays:
        i = httpclient.InferInput(name, list(a.shape), "INT32" if a.dtype == np.int32 else "FP32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    return inputs


def test_a_server_given_an_expert_the_version_lacks_refuses_it(repo: Path,
                                                              tmp_path: Path) -> None:
    server = TritonServer(repo, {"experts": 1}, env={p.SERVER_EXPERTS_ENV: "1,7"},
                          log_path=tmp_path / "expert.log")
    with pytest.raises(TritonError) as err:
        server.start()
    assert err.value.summary == ("experts v1: this server was assigned expert 7 but version 1 "
                                 "has 3 routed experts (0..2)")
    assert server.popen is None and not server.shm_regions(), "nothing left running"


def test_a_server_whose_experts_do_not_fit_its_memory_limit_refuses_them(
        repo: Path, tmp_path: Path) -> None:
    """The limit a pod gets from limits.memory, below what tritonserver and the stub use
    already: the load fails before a weight is read, naming the fix (not an OOM kill)."""
    server = TritonServer(repo, {"experts": 1},
                          env={p.SERVER_EXPERTS_ENV: "0,2", p.MEMORY_LIMIT_ENV: str(64 << 20)},
                          log_path=tmp_path / "expert.log")
    with pytest.raises(TritonError) as err:
        server.start()
    assert err.value.summary.startswith("experts v1: the 2 experts assigned to this server "
                                        "need "), err.value.summary
    assert err.value.summary.endswith("MiB in use, leaves room for 0: raise "
                                      "spec.experts.resources.limits.memory")
    assert server.popen is None and not server.shm_regions(), "nothing left running"


def gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.stdout.count("GPU ") if out.returncode == 0 else 0


def test_gpu_experts_ask_triton_for_gpu_instances(repo: Path, tmp_path: Path) -> None:
    """spec.experts.gpus > 0: the pinned configuration is loaded with KIND_GPU instances (on
    a machine without GPUs Triton says so; with one, the expert loads on it)."""
    s = spec(gpus=1, numExperts=3)
    server = TritonServer(repo, {"experts": 1}, env=p.workload_env(s, "expert"),
                          log_path=tmp_path / "expert.log")
    if gpus():
        server.start()
        server.stop()
        assert "(GPU device 0)" in (tmp_path / "expert.log").read_text()
    else:
        with pytest.raises(TritonError) as err:
            server.start()
        assert err.value.summary == ("experts v1: instance group experts_0 of model "
                                     "experts has kind KIND_GPU but no GPUs are available")


def held(c: httpclient.InferenceServerClient) -> list[int]:
    out = c.infer("experts", [], outputs=[httpclient.InferRequestedOutput("HELD")])
    return [int(e) for e in out.as_numpy("HELD")]


@pytest.mark.parametrize("grouped", ["0", "1"], ids=["per-expert", "grouped"])
def test_experts_move_in_and_out_of_a_serving_server(repo: Path, tmp_path: Path,
                                                     grouped: str) -> None:
    """A live move, no restart: a server holding expert 0 loads 1 and 2 in the background
    while it answers calls for 0, reports them once loaded and answers for them as the
    in-process slices do; a dropped expert is no longer reported at once but answered until
    its drain ends, then refused. Bad orders are refused and change nothing."""
    server = TritonServer(repo, {"experts": 1},
                          env={p.SERVER_EXPERTS_ENV: "0", p.GROUPED_ENV: grouped,
                               "AUTOGLM_DRAIN_SECONDS": "2"},
                          log_path=tmp_path / "expert.log").start()
    try:
        _, cfg = load_part_config(repo / "expert_0" / "1")
        refs = {e: ExpertSlice(cfg, e, load_weights(repo / f"expert_{e}" / "1"))
                for e in range(3)}
        layer = sorted(refs[0].layers)[0]
        x = np.random.default_rng(5).standard_normal((3, cfg.hidden_size)).astype(np.float32)

        def answer(c: httpclient.InferenceServerClient, e: int) -> None:
            got = c.infer("experts", tensors(layer, [e], [3], x)).as_numpy("OUTPUT")
            with torch.no_grad():
                want = refs[e](layer, torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        with httpclient.InferenceServerClient(server.http_url) as c:
            assert held(c) == [0]
            assert control(server, load=[1, 2]) == [0], "reported only once loaded"
            served = 0
            while held(c) != [0, 1, 2]:  # expert 0 keeps serving while they load
                answer(c, 0)
                served += 1
                assert served < 2000, "experts 1 and 2 never reported"
            answer(c, 1)
            answer(c, 2)
            assert control(server, drop=[0]) == [1, 2], "no longer reported at once"
            answer(c, 0)  # still answered: routers ask it until their next probe
            for bad, why in (({"load": [7]}, "version 1 has 3 routed experts"),
                             ({"load": "x"}, "CONTROL must be JSON")):
                with pytest.raises(InferenceServerException, match=why):
                    control(server, **bad)
            assert held(c) == [1, 2]
            eventually(lambda: _refused(c, lambda: answer(c, 0)), "expert 0 freed", 30)
            assert control(server, load=[0]) == [1, 2]
            eventually(lambda: held(c) == [0, 1, 2], "expert 0 back", 30)
            answer(c, 0)
    finally:
        server.stop()


def _refused(c: httpclient.InferenceServerClient, call: Any) -> bool:
    try:
        call()
    except InferenceServerException as e:
        return "is not held here" in str(e)
    return False
