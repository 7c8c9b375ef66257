"""Bad checkpoints are refused with one clear line, and the repository is left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from autoglm.models.errors import CheckpointError
from autoglm.repository import import_checkpoint
from autoglm.testing.checkpoints import write_checkpoint

ARCH = "Qwen3MoeForCausalLM"


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(ARCH, tmp_path_factory.mktemp("good") / "ckpt", seed=1)


def rewrite(src: Path, change: Callable[[dict[str, object]], object]) -> None:
    tensors: dict[str, object] = dict(load_file(str(src / "model.safetensors")))
    change(tensors)
    save_file(tensors, str(src / "model.safetensors"))  # type: ignore[arg-type]


def edit_config(src: Path, **values: object) -> None:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **values}))


def truncate(src: Path) -> None:
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "unsupported architecture": (
        lambda s: edit_config(s, architectures=["LlamaForCausalLM"]),
        "architectures ['LlamaForCausalLM'] is not supported; supported: MixtralForCausalLM, "
        "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, Glm4MoeForCausalLM, DeepseekV3ForCausalLM"),
    "missing tensor": (lambda s: rewrite(s, lambda t: t.pop(EXPERT)),
                       f"missing tensor {EXPERT}"),
    "unexpected tensor": (
        lambda s: rewrite(s, lambda t: t.update(
            {"model.layers.0.mlp.experts.9.up_proj.weight": t[EXPERT].clone()})),  # type: ignore[attr-defined]
        "unexpected tensor model.layers.0.mlp.experts.9.up_proj.weight"),
    "shape that does not fit the config": (
        lambda s: edit_config(s, moe_intermediate_size=48),
        "down_proj.weight: shape [64, 32] does not fit the config (expected [64, 48])"),
    "truncated file": (truncate, "not a readable safetensors file"),
    "no config": (lambda s: (s / "config.json").unlink(), "no config.json"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(),
                   "no model.safetensors or model.safetensors.index.json"),
    "activation": (lambda s: edit_config(s, hidden_act="gelu"),
                   "hidden_act 'gelu' is not supported"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_refused_and_dest_unchanged(case: str, good: Path,
                                                      tmp_path: Path) -> None:
    import shutil

    damage, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    damage(src)
    dest = tmp_path / "repo"
    import_checkpoint(good, dest, 1, "m", progress=False)  # a version already served
    before = tree(dest)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(src, dest, 2, "m", progress=False)
    assert message in str(err.value)
    assert "\n" not in str(err.value), "one line"
    assert tree(dest) == before, "nothing half-written, nothing removed"


def test_existing_version_is_not_overwritten(good: Path, tmp_path: Path) -> None:
    import_checkpoint(good, tmp_path, 1, "m", progress=False)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="version 1 is already in the repository"):
        import_checkpoint(good, tmp_path, 1, "m", progress=False)
    assert tree(tmp_path) == before


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autoglm.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_imports_and_refuses_in_one_line(good: Path, tmp_path: Path) -> None:
    ok = cli("model", "import", str(good), str(tmp_path / "repo"), "--version", "4")
    assert ok.returncode == 0, ok.stderr
    assert "version 4 imported: Qwen3MoeForCausalLM, 8 routed experts (top-2)" in ok.stdout
    bad = cli("model", "import", str(tmp_path / "nowhere"), str(tmp_path / "repo"),
              "--version", "5")
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "no such directory" in bad.stderr
