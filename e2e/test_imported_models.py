"""`autoglm up` serving a repository of imported versions as it is, and refusing a version
that disagrees with the spec: at start (one line, exit 2, nothing left running) and as a new
version (RolloutFailed with the servers' reason; the active version keeps serving)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import yaml

from autoglm.models.tiny import PRESETS
from autoglm.repository import build, load_reference
from autoglm.testing import eventually
from autoglm.testing.up import UpProcess as Up
from autoglm.testing.up import port_open

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
REFUSED = "version 2 has 3 routed experts but spec.model.numExperts is 4"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 with 4 routed experts, version 2 with 3, as `autoglm model import` writes
    them (the tiny builder is that import of a checkpoint it writes)."""
    repo = tmp_path_factory.mktemp("imported")
    build(repo, "tiny-moe", 1, PRESETS["tiny"])
    build(repo, "tiny-moe", 2, dataclasses.replace(PRESETS["tiny"], num_experts=3))
    return repo


def resource(path: Path, repo: Path, version: int) -> Path:
    """The tiny example pointed at ``repo``, numExperts 4 and no topK/layers (an imported
    model has its own); no autoscaling (replicas stay put), a short ready timeout."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = path.stem
    spec = doc["spec"]
    spec["model"] = {"name": "tiny-moe", "version": version, "repository": str(repo),
                     "numExperts": 4}
    spec.pop("autoscaling")
    spec["rollout"] = {"readyTimeoutSeconds": 120, "drainTimeoutSeconds": 1,
                       "keepPreviousSeconds": 60}
    path.write_text(yaml.safe_dump(doc))
    return path


def infer(port: int, ids: np.ndarray) -> tuple[np.ndarray, int]:  # type: ignore[type-arg]
    with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        r = c.infer("router", [inp])
        return r.as_numpy("LOGITS"), int(r.as_numpy("MODEL_VERSION")[0])


def test_imported_version_serves_and_a_disagreeing_one_is_refused(
        repo: Path, tmp_path: Path) -> None:
    file = resource(tmp_path / "imported.yaml", repo, 1)
    with Up.serving(file, tmp_path / "home") as up:
        assert up.said(f"served from {repo}"), "the repository as it is"
        assert not up.said("built in"), "nothing built"
        ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
        logits, version = infer(up.port, ids)
        assert version == 1
        np.testing.assert_allclose(logits, load_reference(repo, 1)(torch.from_numpy(ids))
                                   .numpy(), rtol=1e-5, atol=1e-5)

        since = len(up.lines)
        file.write_text(file.read_text().replace("version: 1", "version: 2"))
        line = eventually(lambda: next((t for t in up.text[since:] if "RolloutFailed" in t),
                                       None), "version 2 to be refused", timeout=120)
        # one line naming both values; the servers' log tails stay in their files
        assert re.fullmatch(rf"warning: RolloutFailed: version 2: standby failed: "
                            rf"experts v2: {REFUSED}; version 1 keeps serving", line), line
        def status() -> dict[str, Any]:
            path = up.home / "run" / "imported" / "status.json"
            return dict(json.loads(path.read_text()))

        # written just after the line is said
        st = eventually(lambda: (s := status())["reason"] and s, "the reason in status.json")
        assert REFUSED in st["reason"] and st["active"] == {"slot": "a", "version": 1}
        assert infer(up.port, ids)[1] == 1, "version 1 keeps serving"
        eventually(lambda: status()["slots"].keys() == {"a"}, "the refused slot removed")
        assert infer(up.port, ids)[1] == 1


def test_starting_with_a_version_that_disagrees_fails_in_one_line(
        repo: Path, tmp_path: Path) -> None:
    file = resource(tmp_path / "refused.yaml", repo, 2)
    home = tmp_path / "home"
    up = Up.start(file, home)
    assert up.wait(timeout=120) == 2
    errors = [t for t in up.text if t.startswith("error:")]
    assert len(errors) == 1 and f"experts v2: {REFUSED}" in errors[0], up.text
    assert not any("Traceback" in t for t in up.text), up.text
    assert not up.leftovers(), up.leftovers()
    assert not port_open(up.port)
    assert not (home / "run" / "refused" / "status.json").exists()
