"""What a Triton server is told when it loads a model, and how it says a load failed (no
server started: the configuration sent, the error parsed, the termination message)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoglm import plan as p
from autoglm.spec import parse
from autoglm.triton import (
    TritonError,
    TritonServer,
    load_error,
    serve,
    with_instance_kind,
    write_termination_message,
)

# What tritonserver 2.51 answered when expert_0's initialize() raised our CheckpointError
# (measured: the Python backend appends the traceback).
REFUSAL = json.dumps({"error": (
    "load failed for model 'expert_0': version 2 is at UNAVAILABLE state: Internal: "
    "CheckpointError: version 2 has 3 routed experts but spec.model.numExperts is 4; "
    "version 2 has 2 layers but spec.model.layers is 3\n\nAt:\n"
    "  /work/main/operator/autoglm/backends/expect.py(49): check_expectations\n"
    "  /work/main/operator/autoglm/backends/expert.py(22): initialize\n;\n")})


def test_a_failed_load_is_one_line_with_the_models_own_message() -> None:
    assert load_error(REFUSAL) == ("version 2 has 3 routed experts but spec.model.numExperts "
                                   "is 4; version 2 has 2 layers but spec.model.layers is 3")
    # another exception keeps its class name; Triton's own errors stay as they are
    other = json.dumps({"error": "load failed for model 'router': version 1 is at UNAVAILABLE "
                                 "state: Internal: FileNotFoundError: no weights\n\nAt:\n x\n"})
    assert load_error(other) == "FileNotFoundError: no weights"
    assert load_error(json.dumps({"error": "failed to load 'x', failed to poll from model "
                                           "repository"})) \
        == "failed to load 'x', failed to poll from model repository"
    assert load_error("not json\nat all") == "not json at all"
    gpu = json.dumps({"error": "load failed for model 'expert_0': version 2 is at UNAVAILABLE "
                               "state: Invalid argument: instance group expert_0_0 of model "
                               "expert_0 has kind KIND_GPU but no GPUs are available;\n"})
    assert load_error(gpu) == ("instance group expert_0_0 of model expert_0 has kind KIND_GPU "
                               "but no GPUs are available")


def pinned(tmp_path: Path, model: str = "expert_0", version: int = 1) -> Path:
    folder = tmp_path / model / str(version)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "name": model, "backend": "python",
        "version_policy": {"specific": {"versions": [version]}},
        "instance_group": [{"kind": "KIND_CPU", "count": 2}]}))
    return tmp_path


@pytest.fixture(autouse=True)
def _no_kind_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(p.INSTANCE_KIND_ENV, raising=False)


def test_gpu_servers_load_gpu_instances(tmp_path: Path) -> None:
    repo = pinned(tmp_path)
    stored = TritonServer(repo, {"expert_0": 1}).load_config("expert_0", 1)
    assert stored["instance_group"] == [{"kind": "KIND_CPU", "count": 2}]
    gpu = TritonServer(repo, {"expert_0": 1}, env={p.INSTANCE_KIND_ENV: "KIND_GPU"})
    config = gpu.load_config("expert_0", 1)
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]
    assert config["version_policy"] == {"specific": {"versions": [1]}}, "still pinned"
    assert with_instance_kind({"name": "x"}, "KIND_GPU")["instance_group"] == [
        {"count": 1, "kind": "KIND_GPU"}]


def test_the_instance_kind_comes_from_the_environment_of_a_pod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`autoglm triton-serve` in a container: the kind is in its own environment."""
    monkeypatch.setenv(p.INSTANCE_KIND_ENV, "KIND_GPU")
    server = TritonServer(pinned(tmp_path), {"expert_0": 1})
    assert server.load_config("expert_0", 1)["instance_group"][0]["kind"] == "KIND_GPU"
    monkeypatch.setenv(p.INSTANCE_KIND_ENV, "KIND_TPU")
    with pytest.raises(TritonError, match="KIND_TPU"):
        server.load_config("expert_0", 1)


def test_a_version_not_in_the_repository_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TritonError) as err:
        TritonServer(tmp_path, {"expert_0": 7}).load_config("expert_0", 7)
    assert err.value.summary == f"expert_0 v7: not in the model repository {tmp_path}"


def test_workload_env_is_the_specs_shape_and_gpus() -> None:
    model = {"name": "m", "version": 1, "repository": "/m", "numExperts": 8}
    s = parse({"model": model}, "m")
    assert p.workload_env(s, "router") == p.workload_env(s, "expert") == {
        "AUTOGLM_EXPECT_NUM_EXPERTS": "8"}
    g = parse({"model": {**model, "topK": 2, "layers": 4}, "experts": {"gpus": 1}}, "m")
    assert p.workload_env(g, "expert") == {
        "AUTOGLM_EXPECT_NUM_EXPERTS": "8", "AUTOGLM_EXPECT_TOP_K": "2",
        "AUTOGLM_EXPECT_LAYERS": "4", p.INSTANCE_KIND_ENV: "KIND_GPU"}
    assert p.INSTANCE_KIND_ENV not in p.workload_env(g, "router")


def test_a_stream_interval_reaches_routers_only_and_only_when_set() -> None:
    """The default adds nothing: existing router pod templates stay as they are."""
    model = {"name": "m", "version": 1, "repository": "/m", "numExperts": 8}
    assert parse({"model": model}, "m").router.stream_interval == 1
    assert parse({"model": model, "router": {"streamInterval": 1}}, "m") \
        == parse({"model": model}, "m")
    s = parse({"model": model, "router": {"streamInterval": 4}}, "m")
    assert p.workload_env(s, "router") == {"AUTOGLM_EXPECT_NUM_EXPERTS": "8",
                                           p.STREAM_INTERVAL_ENV: "4"}
    assert p.STREAM_INTERVAL_ENV not in p.workload_env(s, "expert")


def test_termination_message_only_where_the_kubelet_provides_the_file(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    assert not write_termination_message("why", log), "no file: not a container"
    assert not log.exists()
    log.touch()
    assert write_termination_message("why", log)
    assert log.read_text() == "why\n"


@pytest.fixture
def _signals() -> Iterator[None]:
    """serve() installs SIGTERM/SIGINT handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.usefixtures("_signals")
def test_serve_refusing_a_version_exits_1_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    summary = "expert_0 v2: version 2 has 8 routed experts but spec.model.numExperts is 4"

    def refuse(self: TritonServer, timeout: float = 0) -> Any:
        raise TritonError("loading expert_0 v2: {...}\n<log tail>", summary)

    monkeypatch.setattr(TritonServer, "start", refuse)
    log = tmp_path / "termination-log"
    log.touch()
    assert serve(tmp_path, "expert_0", 2, [], termination_log=log) == 1
    assert log.read_text() == summary + "\n"
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: {summary}"
    assert "<log tail>" in err, "the whole story stays in the pod's log"
