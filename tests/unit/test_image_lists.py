"""The images built without Docker (.ci/images.py) and the Dockerfiles install the same
things: both read manifests/images/packages.txt and the *.lock files, whose pins agree with
pyproject.toml, and both set the same environment, user and entry point."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = ROOT / "manifests" / "images"


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("autoglm_images", ROOT / ".ci" / "images.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


images = _builder()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(req_lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in req_lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line.strip())
        assert m, f"not pinned: {line}"
        pins[_norm(m.group(1))] = m.group(3)
    return pins


def _lock(name: str) -> dict[str, str]:
    lines: list[str] = images._lock_lines(images.IMAGES[name])
    assert all("--hash=sha256:" in line for line in lines), f"{name}.lock: a pin lacks its hash"
    return _pins(lines)


@pytest.mark.parametrize(("image", "top"), [("operator", "operator"), ("triton-cpu", "triton"),
                                            ("triton-gpu", "triton")])
def test_locks_pin_pyprojects_versions(image: str, top: str) -> None:
    wanted = _pins(images._requirements()[top])
    locked = _lock(image)
    if image == "triton-cpu":
        wanted = {n: v for n, v in wanted.items() if not images.is_cuda_only(n)}
    assert {n: locked.get(n) for n in wanted} == wanted, \
        "a lock disagrees with pyproject.toml: run `python3 .ci/images.py lock`"


def test_operator_image_has_no_torch_and_cpu_image_no_cuda_wheels() -> None:
    assert "torch" not in _lock("operator")
    assert {"tritonclient", "grpcio", "numpy"} <= set(_lock("operator"))
    cpu, gpu = _lock("triton-cpu"), _lock("triton-gpu")
    assert "torch" in cpu and "nvidia-pytriton" in cpu
    assert not [n for n in cpu if images.is_cuda_only(n)]
    assert [n for n in gpu if n.startswith("nvidia-cu")]
    assert cpu.items() <= gpu.items()


def _final_stage(dockerfile: Path) -> tuple[list[str], dict[str, Any]]:
    """(the COPY sources of every stage, the final stage's ENV/USER/ENTRYPOINT/CMD)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    copies: list[str] = []
    final: dict[str, Any] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            final = {"env": {}}
        elif word == "COPY" and "--from" not in rest:
            copies += shlex.split(rest)[:-1]
        elif word == "ENV":
            final["env"].update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word in ("USER", "ENTRYPOINT", "CMD", "WORKDIR"):
            final[word] = json.loads(rest) if rest.startswith("[") else rest.strip()
    return copies, final


@pytest.mark.parametrize(("dockerfile", "image"), [("operator.Dockerfile", "operator"),
                                                   ("triton.Dockerfile", "triton-cpu"),
                                                   ("triton.Dockerfile", "triton-gpu")])
def test_dockerfiles_agree_with_the_builder(dockerfile: str, image: str) -> None:
    img = images.IMAGES[image]
    copies, final = _final_stage(IMAGES_DIR / dockerfile)
    assert "manifests/images/packages.txt" in copies
    variant = image.removeprefix("triton-")
    locks = [c.replace("${VARIANT}", variant) for c in copies if c.endswith(".lock")]
    assert locks == [f"manifests/images/{img.lock}.lock"]
    assert final["env"] == img.env
    assert final["USER"] == images.USER
    assert final["ENTRYPOINT"] == images.ENTRYPOINT
    assert final["CMD"] == img.cmd
    assert final["WORKDIR"] == "/tmp"


def test_packages_list_is_what_the_dockerfiles_install() -> None:
    packages = images.read_list(IMAGES_DIR / "packages.txt")
    assert "python3.11" in packages and "libpython3.11" in packages
    for dockerfile in ("operator.Dockerfile", "triton.Dockerfile"):
        text = (IMAGES_DIR / dockerfile).read_text()
        assert "$(sed 's/#.*//' /tmp/packages.txt)" in text
