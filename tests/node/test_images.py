"""The images `make images` builds without a Docker engine (.ci/images.py), checked without
one: each OCI archive is unpacked with umoci and its commands run chrooted into the root
filesystem as the pods run them — user 1000:1000, the root read-only, /tmp and /dev/shm
tmpfs, the image's own environment — in private mount (and network) namespaces, so nothing
stays mounted. The images are built once (cached) for the module; the Triton image is the
CPU variant only.

Anything missing (root, tools, a build that fails) fails these tests with the reason;
outside CI they can be skipped by ``AUTOGLM_SKIP_NODE_TESTS=1``, and the skip says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from autoglm.testing import unavailable as fail_or_opt_out

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / ".ci" / "images.py"
CPU_LEAVES_OUT = {"triton", "nvidia-cusolver-cu12", "nvidia-cuda-nvrtc-cu12", "nvidia-nvtx-cu12"}
BUILD_TIMEOUT = 3600  # a cold build of both images: base, ~2.5 GB of wheels, the model


def unavailable(why: str) -> NoReturn:
    fail_or_opt_out("images", why)


def build(*args: str) -> dict[str, dict[str, Any]]:
    """Runs the builder (cached) and returns its JSON by image key."""
    try:
        p = subprocess.run([sys.executable, str(BUILDER), "build", "--json", *args],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        unavailable(f"{BUILDER.name} build {' '.join(args)} ran over {BUILD_TIMEOUT} s")
    if p.returncode != 0:
        unavailable(f"{BUILDER.name} build {' '.join(args)} exited {p.returncode}: "
                    f"{p.stderr[-3000:]}")
    return {r["image"]: r for r in json.loads(p.stdout)}


def apt_install(tool: str, package: str) -> None:
    if shutil.which(tool):
        return
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(cmd, capture_output=True)
    if not shutil.which(tool):
        unavailable(f"{tool} is missing and apt-get could not install {package}")


@pytest.fixture(scope="module")
def images() -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0:
        unavailable("building and running the images needs root (mmdebstrap, mounts, chroot)")
    for tool in ("unshare", "chroot", "mount", "ip"):
        if not shutil.which(tool):
            unavailable(f"{tool} is missing (util-linux, coreutils, iproute2)")
    apt_install("umoci", "umoci")
    return build("operator", "triton-cpu")


def our_mounts(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {path}" in line]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="autoglm-images-"))
    try:
        yield d
    finally:
        leftover = our_mounts(d)
        shutil.rmtree(d, ignore_errors=True)
        assert not leftover, f"mounts left behind: {leftover}"


def unpack(image: dict[str, Any], dest: Path) -> Path:
    """The image's root filesystem, unpacked by umoci from the OCI archive."""
    layout, bundle = dest / "oci", dest / "bundle"
    layout.mkdir(parents=True)
    subprocess.run(["tar", "-xf", image["archive"], "-C", str(layout)], check=True)
    tag = image["name"].rsplit(":", 1)[1]
    p = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"umoci unpack: {p.stderr}"
    shutil.rmtree(layout)
    return bundle / "rootfs"


# A pod's view of the root filesystem: read-only, its own /proc, a minimal /dev with a tmpfs
# /dev/shm, a tmpfs /tmp, loopback only (a new network namespace). Then "$@" as 1000:1000.
POD = r"""
set -euo pipefail
root=$1 user=$2; shift 2
ip link set lo up
mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
for d in null zero full random urandom tty; do
  touch "$root/dev/$d" && mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
exec chroot --userspec="$user" "$root" /usr/bin/env -i "$@"
"""


def in_image(rootfs: Path, image: dict[str, Any], *argv: str, timeout: float = 120,
             ) -> subprocess.CompletedProcess[str]:
    env = [f"{k}={v}" for k, v in image["env"].items()]
    return subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc",
                           "bash", "-c", POD, "pod", str(rootfs), image["user"], *env, *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def operator_root(images: dict[str, dict[str, Any]], workdir: Path) -> Path:
    return unpack(images["operator"], workdir / "operator")


@pytest.fixture(scope="module")
def triton_root(images: dict[str, dict[str, Any]], workdir: Path) -> Path:
    return unpack(images["triton-cpu"], workdir / "triton")


def test_operator_image_runs_the_operator_and_gateway_without_torch(
        images: dict[str, dict[str, Any]], operator_root: Path) -> None:
    img = images["operator"]
    assert img["name"] == "autoglm/operator:0.1.0"
    assert (img["entrypoint"], img["cmd"], img["user"]) == (["autoglm"], ["operator"],
                                                            "1000:1000")
    p = in_image(operator_root, img, "autoglm", "--help")
    assert p.returncode == 0 and "gateway" in p.stdout and "operator" in p.stdout, p.stderr
    for what in ("operator", "gateway"):
        p = in_image(operator_root, img, "autoglm", what, "--help")
        assert p.returncode == 0, p.stderr
    p = in_image(operator_root, img, "python", "-c",
                 "import autoglm.gateway.app, autoglm.gateway.k8s, autoglm.k8s.handlers")
    assert p.returncode == 0, p.stderr
    p = in_image(operator_root, img, "python", "-c", "import torch")
    assert p.returncode != 0 and "No module named 'torch'" in p.stderr
    # precompiled: a read-only root never sees Python try to write bytecode
    site = operator_root / "opt/autoglm/lib/python3.11/site-packages"
    assert (site / "autoglm/__pycache__/cli.cpython-311.pyc").is_file()
    assert (site / "kopf/__pycache__/__init__.cpython-311.pyc").is_file()


def test_triton_cpu_image_has_tritonserver_torch_without_cuda_and_the_model(
        images: dict[str, dict[str, Any]], triton_root: Path) -> None:
    img = images["triton-cpu"]
    assert img["name"] == "autoglm/triton:0.1.0"
    p = in_image(triton_root, img, "tritonserver", "--help")
    assert "--model-repository" in p.stdout + p.stderr, p.stderr
    p = in_image(triton_root, img, "python", "-c", (
        "import json, torch, importlib.metadata as md; "
        "print((torch.ones(2, 3) @ torch.ones(3, 2)).sum().item()); "
        "print(json.dumps(sorted(d.metadata['Name'] for d in md.distributions())))"))
    assert p.returncode == 0, p.stderr
    total, listed = p.stdout.splitlines()
    dists = json.loads(listed)
    assert float(total) == 12.0
    # torch 2.9.1's PyPI wheel is the CUDA build: it loads most CUDA libraries even on CPU;
    # the CPU image leaves out those it does not load (.ci/images.py CPU_LEAVES_OUT)
    assert "torch" in dists and "nvidia-pytriton" in dists
    assert not CPU_LEAVES_OUT & {d.lower() for d in dists}
    site = triton_root / "opt/autoglm/lib/python3.11/site-packages"
    assert not (site / "nvidia/cusolver").exists()
    assert (triton_root / "models/router/1").is_dir()
    assert (triton_root / "models/experts/1").is_dir()
    assert (triton_root / "models/expert_0/1/weights.safetensors").is_file()
    env = img["env"]
    for var in ("AUTOGLM_TRITONSERVER", "AUTOGLM_MODEL_SOURCE"):
        assert (triton_root / env[var].lstrip("/")).exists(), var
    assert (triton_root / env["AUTOGLM_TRITON_BACKENDS"].lstrip("/") /
            "python/triton_python_backend_stub").is_file()


# `autoglm triton-serve` as a pod runs it: the model loads (Python backend stub, torch) and
# Triton answers ready on 8000 — in the test's own network namespace.
SERVE = r"""
AUTOGLM_SERVER_EXPERTS=0,2 autoglm triton-serve --repository=/models --model=experts --version=1 &
pid=$!
python - <<'EOF'
import time, urllib.request
url = "http://127.0.0.1:8000/v2/models/experts/versions/1/ready"
for _ in range(240):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            print("READY")
            break
    except OSError:
        time.sleep(0.5)
EOF
kill -TERM $pid
wait $pid
"""


def test_triton_cpu_image_serves_a_model_read_only_as_user_1000(
        images: dict[str, dict[str, Any]], triton_root: Path) -> None:
    p = in_image(triton_root, images["triton-cpu"], "bash", "-c", SERVE, timeout=300)
    assert "READY" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]


def same_key_same_digest(a: dict[str, Any], b: dict[str, Any]) -> int:
    """Asserts that layers built from the same inputs (same key) have the same digest;
    returns how many layers were compared. (A project file edited between two builds
    changes the project layer's key: that layer is then rightly different.)"""
    pairs = [(la, lb) for la, lb in zip(a["layers"], b["layers"], strict=True)
             if la["key"] == lb["key"]]
    for la, lb in pairs:
        assert la["digest"] == lb["digest"], f"{la['stage']}: same inputs, other bytes"
        assert la["diff_id"] == lb["diff_id"]
    return len(pairs)


def test_same_inputs_give_the_same_digests(images: dict[str, dict[str, Any]]) -> None:
    again = build("operator", "triton-cpu")
    for key in ("operator", "triton-cpu"):
        assert same_key_same_digest(images[key], again[key]) >= 2   # base and deps at least
        if same_key_same_digest(images[key], again[key]) == 3:
            assert again[key]["manifest"] == images[key]["manifest"]
    # packing is reproducible, not only cached: the operator's dependency and project
    # layers rebuilt from scratch are the same bytes
    rebuilt = build("operator", "--rebuild", "deps", "--rebuild", "project")["operator"]
    assert same_key_same_digest(again["operator"], rebuilt) >= 2
