#!/usr/bin/env python3
"""Build AutoGLM's container images without a Docker engine (``make images``).

    python3 .ci/images.py build [IMAGE ...] [--json] [--rebuild STAGE ...]
    python3 .ci/images.py lock        # re-pin manifests/images/*.lock from pyproject.toml

Images (IMAGES below): ``operator`` → autoglm/operator:<version>, ``triton-cpu`` →
autoglm/triton:<version>, ``triton-gpu`` → autoglm/triton:<version>-gpu. Each is three
layers, each cached under ``${AUTOGLM_CACHE:-~/.cache/autoglm}/images/`` by a content hash
of its inputs, so an unchanged rebuild takes seconds and a source change rebuilds only the
project layer:

  base     Debian bookworm (mmdebstrap, minbase, this machine's configured Debian mirror)
           with manifests/images/packages.txt (one base for all images); key: that list +
           the mirror's Release files as the host's apt lists hold them (`apt-get update`
           picks up a newer mirror).
  deps     a virtualenv at /opt/autoglm with manifests/images/<image>.lock (every wheel
           pinned by hash), byte-compiled; key: base key + the lock.
  project  this package (and for Triton its model_repo and the tiny model at /models);
           key: deps key + the bytes of every project file.

Steps that run code of the image run it chrooted into an overlay mount of the layers below
(the new layer is the overlay's upper directory), inside a private mount namespace: every
mount goes away with the process. Layers are packed reproducibly (sorted entries, mtimes
clamped to the mirror's newest Release date, numeric owners, hash-based .pyc), so the same
inputs give the same digests. The result is an OCI image-layout tar (`ctr images import`,
`skopeo copy oci-archive:`, umoci after untarring). Output: one archive path per line, or
with --json every image's name, archive, digests, sizes and per-layer timings.

Needs root (mmdebstrap, overlay mounts, chroot); installs mmdebstrap with apt-get if
missing. Standard library only: runs before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import email.utils
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
LISTS = ROOT / "manifests" / "images"
CACHE = Path(os.environ.get("AUTOGLM_CACHE",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                            / "autoglm")) / "images"
# Bump when a stage's recipe changes in a way its key cannot see.
RECIPE = {"base": "1", "deps": "1", "project": "1"}
SUITE = "bookworm"
PIP = "pip==26.3"             # runs from its wheel during the build; not in the images
SETUPTOOLS = "setuptools==84.2.1"  # the project's build backend (pyproject build-system)
VENV = "/opt/autoglm"
SITE = f"{VENV}/lib/python3.11/site-packages"
TRITON = f"{SITE}/pytriton/tritonserver"
BACKENDS = "/opt/tritonserver/backends"
MODEL_SOURCE = "/src/model_repo"
USER = "1000:1000"
GZIP_LEVEL = 1        # 2x faster than 6 for 10% more bytes; layers are compressed in chunks
CHUNK = 16 << 20      # one gzip member per chunk, compressed on every core
# Docs, manuals and translations are left out of the Debian root (copyright files stay).
DPKG_EXCLUDES = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                 "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                 "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*")
PROJECT_FILES = ("pyproject.toml", "README.md", "operator", "model_repo")

COMMON_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    # the root filesystem is read-only in the pods; /tmp is an emptyDir
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
}
TRITON_ENV = {
    "AUTOGLM_TRITONSERVER": f"{TRITON}/bin/tritonserver",
    "AUTOGLM_TRITON_BACKENDS": BACKENDS,
    "AUTOGLM_MODEL_SOURCE": MODEL_SOURCE,
    # the Python backend stub copied into BACKENDS finds libcudart & co. here (not by RPATH)
    "LD_LIBRARY_PATH": f"{SITE}/nvidia_pytriton.libs",
}


@dataclass(frozen=True)
class Image:
    key: str                 # operator, triton-cpu, triton-gpu
    repo: str                # autoglm/operator
    suffix: str              # tag suffix after the version
    lock: str                # manifests/images/<lock>.lock
    env: dict[str, str]
    cmd: list[str]
    triton: bool = False     # Triton's backend folder, model_repo and /models

    @property
    def tag(self) -> str:
        return project_version() + self.suffix

    @property
    def name(self) -> str:
        return f"{self.repo}:{self.tag}"


IMAGES = {
    "operator": Image("operator", "autoglm/operator", "", "operator",
                      COMMON_ENV, ["operator"]),
    "triton-cpu": Image("triton-cpu", "autoglm/triton", "", "triton-cpu",
                        {**COMMON_ENV, **TRITON_ENV}, ["--help"], triton=True),
    "triton-gpu": Image("triton-gpu", "autoglm/triton", "-gpu", "triton-gpu",
                        {**COMMON_ENV, **TRITON_ENV}, ["--help"], triton=True),
}
ENTRYPOINT = ["autoglm"]


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def read_list(path: Path) -> list[str]:
    """Non-empty lines without comments (the format of packages.txt)."""
    return [w for line in path.read_text().splitlines() for w in line.split("#")[0].split()]


# --- the Debian mirror -------------------------------------------------------------------

def debian_sources() -> list[str]:
    """The host's apt sources for bookworm as one-line `deb URI SUITE COMPONENTS` entries:
    the base layer uses exactly the mirror this machine is configured with."""
    lines: list[str] = []
    d = Path("/etc/apt")
    for f in sorted([d / "sources.list", *(d / "sources.list.d").glob("*.list")]):
        if f.is_file():
            for line in f.read_text().splitlines():
                w = line.split("#")[0].split()
                if len(w) >= 4 and w[0] == "deb" and w[2].startswith(SUITE):
                    lines.append(" ".join(w))
    for f in sorted((d / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite.startswith(SUITE):
                        lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    if not lines:
        raise SystemExit(f"images: no Debian {SUITE} source in /etc/apt: the base layer "
                         "is built from this machine's configured Debian mirror")
    return sorted(set(lines))


def mirror_state(sources: list[str]) -> tuple[str, int]:
    """(a digest of the Release files the host's apt lists hold for `sources`, the newest
    Release date as a Unix time). The date is SOURCE_DATE_EPOCH: no file from the mirror is
    newer, so clamping mtimes to it keeps Debian's own mtimes (and its timestamp .pyc)."""
    lists = Path("/var/lib/apt/lists")

    def release_files() -> list[Path]:
        found = []
        for src in sources:
            _, uri, suite, *_ = src.split()
            stem = re.sub(r"^[a-z]+://", "", uri).rstrip("/").replace("/", "_")
            cands = [lists / f"{stem}_dists_{suite}_{n}" for n in ("InRelease", "Release")]
            found.append(next((c for c in cands if c.exists()), None))
        return [f for f in found if f is not None] if all(found) else []

    files = release_files()
    if not files:
        log("apt lists missing for the Debian sources: apt-get update")
        run(["apt-get", "update", "-qq"], stdout=sys.stderr)
        files = release_files()
    if not files:
        raise SystemExit("images: apt-get update gave no Release file for " + ", ".join(sources))
    digests, newest = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        m = re.search(r"^Date: (.+)$", text, re.M)
        if m:
            newest = max(newest, int(email.utils.parsedate_to_datetime(m.group(1)).timestamp()))
        digests.append(f"{f.name} {sha256(text)}")
    return sha256("\n".join(sorted(digests))), newest


# --- tools ---------------------------------------------------------------------------------

def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("images: needs root (mmdebstrap, overlay mounts and chroot)")
    missing = [t for t in ("mmdebstrap", "unshare", "chroot", "mount") if not shutil.which(t)]
    if "mmdebstrap" in missing:
        log("installing mmdebstrap (apt-get)")
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mmdebstrap"]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
            run(cmd, stdout=subprocess.DEVNULL)
        missing.remove("mmdebstrap")
    if missing:
        raise SystemExit(f"images: missing {', '.join(missing)} (util-linux, coreutils)")


# Runs "$@" chrooted in an overlay of the layers (lowerdir, top first) with the new layer as
# upperdir, in a private mount namespace (unshare): /proc, /dev, a tmpfs /tmp and the build
# inputs read-only at /mnt are mounted over the merged tree and never reach the layer.
CHROOT = r"""
set -euo pipefail
merged=$1 lower=$2 upper=$3 work=$4 inputs=$5; shift 5
opts="lowerdir=$lower,upperdir=$upper,workdir=$work"
# whole-file copy-ups and no redirects: the upper directory is then the layer as it is
mount -t overlay overlay -o "$opts,redirect_dir=off,metacopy=off,index=off" "$merged"
mount -t proc proc "$merged/proc"
mount --rbind /dev "$merged/dev"
mount -t tmpfs -o mode=1777 tmpfs "$merged/tmp"
mount --bind "$inputs" "$merged/mnt" && mount -o remount,bind,ro "$merged/mnt"
exec chroot "$merged" /usr/bin/env -i "$@"
"""


def chroot_run(lowers: list[Path], upper: Path, inputs: Path, env: dict[str, str],
               script: str) -> None:
    """Runs a shell script inside the image being built (its new files land in `upper`)."""
    upper.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=upper.parent, prefix=".overlay-") as tmp:
        merged, work = Path(tmp, "merged"), Path(tmp, "work")
        merged.mkdir()
        work.mkdir()
        envs = [f"{k}={v}" for k, v in sorted(env.items())]
        run(["unshare", "--mount", "--propagation", "private", "--fork", "bash", "-c", CHROOT,
             "chroot", str(merged), ":".join(map(str, lowers)), str(upper), str(work),
             str(inputs), *envs, "/bin/bash", "-euxc", script], stdout=sys.stderr)


# --- reproducible layers -------------------------------------------------------------------

class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to `out`."""

    def __init__(self, out: io.RawIOBase | IO[bytes] | None) -> None:
        self.out, self.hash, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.hash.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)


class _ParallelGzip(io.RawIOBase):
    """gzip, one member per CHUNK, compressed on every core: the output depends only on the
    input (no name, mtime 0), and any gzip reader (Go's, Python's) reads the members as one
    stream."""

    def __init__(self, out: io.RawIOBase | IO[bytes]) -> None:
        self.out, self.buf = out, bytearray()
        self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
        self.pending: list[concurrent.futures.Future[bytes]] = []

    @staticmethod
    def _member(data: bytes) -> bytes:
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return z.compress(data) + z.flush()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        while len(self.buf) >= CHUNK:
            self._submit(bytes(self.buf[:CHUNK]))
            del self.buf[:CHUNK]
        return len(b)

    def _submit(self, data: bytes) -> None:
        self.pending.append(self.pool.submit(self._member, data))
        while len(self.pending) > 2 * (os.cpu_count() or 1):   # bound the memory held
            self.out.write(self.pending.pop(0).result())

    def close(self) -> None:
        if not self.closed:
            if self.buf or not self.pending:
                self._submit(bytes(self.buf))
            for f in self.pending:
                self.out.write(f.result())
            self.pool.shutdown()
        super().close()


def _entries(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every path under root, depth first, names sorted bytewise; `root` itself excluded."""
    def walk(d: Path, rel: str) -> Iterator[tuple[str, Path, os.stat_result]]:
        for name in sorted(os.listdir(d), key=os.fsencode):
            p = d / name
            r = f"{rel}{name}"
            st = p.lstat()
            yield r, p, st
            if stat.S_ISDIR(st.st_mode):
                yield from walk(p, r + "/")
    yield from walk(root, "")


def pack_layer(root: Path, out: Path, epoch: int) -> dict[str, Any]:
    """`root` as a gzip'd tar layer at `out`: entries sorted, mtimes clamped to `epoch`,
    numeric owners only, overlay whiteouts turned into OCI ones, sockets and device nodes
    (the runtime provides /dev) left out. Returns digest, diff_id, sizes."""
    tmp = out.with_suffix(".partial")
    unpacked = 0
    with open(tmp, "wb") as f:
        compressed = _Hashing(f)
        gz = _ParallelGzip(compressed)
        raw = _Hashing(gz)
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            seen: dict[tuple[int, int], str] = {}
            for rel, path, st in _entries(root):
                ti = tarfile.TarInfo(rel)
                ti.uid, ti.gid, ti.uname, ti.gname = st.st_uid, st.st_gid, "", ""
                ti.mode = stat.S_IMODE(st.st_mode)
                ti.mtime = min(int(st.st_mtime), epoch)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:   # overlay whiteout
                    parent, _, name = rel.rpartition("/")
                    ti = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                    ti.mtime = epoch
                    tar.addfile(ti)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                    with contextlib.suppress(OSError):
                        if os.getxattr(path, "trusted.overlay.opaque") == b"y":
                            wh = tarfile.TarInfo(f"{rel}/.wh..wh..opq")
                            wh.mtime = epoch
                            tar.addfile(wh)
                elif stat.S_ISLNK(st.st_mode):
                    ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                    tar.addfile(ti)
                elif stat.S_ISREG(st.st_mode):
                    ino = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and ino in seen:
                        ti.type, ti.linkname = tarfile.LNKTYPE, seen[ino]
                        tar.addfile(ti)
                        continue
                    seen[ino] = rel
                    ti.size = st.st_size
                    unpacked += st.st_size
                    with open(path, "rb") as src:
                        tar.addfile(ti, src)
                # sockets, fifos and device nodes: not part of an image
        gz.close()
    tmp.rename(out)
    return {"digest": "sha256:" + compressed.hash.hexdigest(), "size": compressed.size,
            "diff_id": "sha256:" + raw.hash.hexdigest(), "unpacked": unpacked}


# --- stages ----------------------------------------------------------------------------------

@dataclass
class Layer:
    stage: str
    key: str
    dir: Path            # <stage>/<key>/: layer.tar.gz, layer.json, tree/ (lower of the next)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tree(self) -> Path:
        return self.dir / "tree"

    @property
    def blob(self) -> Path:
        return self.dir / "layer.tar.gz"

    def begin(self) -> float:
        """An empty layer directory to build into; returns the start time."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        return time.monotonic()

    def cached(self) -> bool:
        if (self.dir / "layer.json").exists() and self.blob.exists():
            self.meta = json.loads((self.dir / "layer.json").read_text())
            return True
        return False

    def finish(self, seconds: float, epoch: int, keep_tree: bool) -> None:
        t = time.monotonic()
        self.meta = {"stage": self.stage, "key": self.key, **pack_layer(self.tree, self.blob,
                                                                         epoch)}
        self.meta["build_seconds"] = round(seconds, 1)
        self.meta["pack_seconds"] = round(time.monotonic() - t, 1)
        if not keep_tree:
            shutil.rmtree(self.tree)
        (self.dir / "layer.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True))


def stage_dir(stage: str, key: str, rebuild: bool) -> Layer:
    layer = Layer(stage, key, CACHE / stage / key[:16])
    if rebuild and layer.dir.exists():
        shutil.rmtree(layer.dir)
    return layer


def build_base(sources: list[str], mirror: str, epoch: int,
               rebuild: bool) -> Layer:
    packages = sorted(read_list(LISTS / "packages.txt"))
    key = sha256(json.dumps({"recipe": RECIPE["base"], "packages": packages,
                             "sources": sources, "mirror": mirror, "excludes": DPKG_EXCLUDES,
                             "user": USER}, sort_keys=True))
    layer = stage_dir("base", key, rebuild)
    if layer.cached() and layer.tree.is_dir():
        return layer
    log(f"base {key[:12]}: mmdebstrap {SUITE} + {' '.join(packages)}")
    t = layer.begin()
    run(["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=directory",
         f"--include={','.join(packages)}",
         # a snapshot-like mirror's Release files may be past their Valid-Until (as the host's
         # apt is configured)
         '--aptopt=Acquire::Check-Valid-Until "false"',
         *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES), SUITE, str(layer.tree), *sources],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}, stdout=sys.stderr)
    tree = layer.tree
    # The runtime provides /dev, /etc/resolv.conf and /etc/hostname.
    for p in [*(tree / "dev").iterdir(), tree / "etc/resolv.conf", tree / "etc/hostname"]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    # The pods run as 1000:1000; a passwd entry lets getpass/pwd name it; HOME is /tmp.
    uid, gid = USER.split(":")
    with open(tree / "etc/passwd", "a") as f:
        f.write(f"autoglm:x:{uid}:{gid}:AutoGLM:/tmp:/usr/sbin/nologin\n")
    with open(tree / "etc/group", "a") as f:
        f.write(f"autoglm:x:{gid}:\n")
    layer.finish(time.monotonic() - t, epoch, keep_tree=True)
    return layer


def _lock_lines(img: Image) -> list[str]:
    text = (LISTS / f"{img.lock}.lock").read_text()
    return [line for line in re.sub(r"\\\n", " ", text).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _wheelhouse(reqs: list[str], hashes: bool) -> Path:
    """Downloads `reqs` (pinned; with --hash options when `hashes`) into the wheel cache
    with this Python's pip and its configured index."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(reqs) + "\n")
        f.flush()
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             *(["--require-hashes"] if hashes else []), "-d", str(wheels), "-r", f.name],
            stdout=sys.stderr)
    return wheels


def _wheel_file(wheels: Path, req: str) -> str:
    name, version = req.split("==")
    hits = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if not hits:
        raise SystemExit(f"images: {req} missing from {wheels}")
    return hits[0].name


# Byte-compiles a tree with hash-based .pyc that Python never re-validates: the image never
# changes, nothing is written at run time, and the .pyc do not depend on mtimes.
COMPILE = ("import compileall, py_compile, sys; compileall.compile_dir(sys.argv[1], quiet=2, "
           "workers=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)")


def build_deps(img: Image, base: Layer, epoch: int, rebuild: bool) -> Layer:
    lock = _lock_lines(img)
    key = sha256(json.dumps({"recipe": RECIPE["deps"], "base": base.key, "lock": lock,
                             "pip": PIP, "triton": img.triton}, sort_keys=True))
    layer = stage_dir("deps", key, rebuild)
    if layer.cached() and layer.tree.is_dir():
        return layer
    log(f"deps {key[:12]}: {len(lock)} wheels from {img.lock}.lock")
    t = layer.begin()
    wheels = _wheelhouse(lock, hashes=True)
    _wheelhouse([PIP, SETUPTOOLS], hashes=False)
    shutil.copy(LISTS / f"{img.lock}.lock", wheels / f".{img.lock}.lock")
    script = f"""
python3.11 -m venv --without-pip {VENV}
{VENV}/bin/python /mnt/{_wheel_file(wheels, PIP)}/pip install -q --no-index --find-links /mnt \
  --no-deps --require-hashes --no-compile --no-cache-dir -r /mnt/.{img.lock}.lock
{VENV}/bin/python -c '{COMPILE}' {SITE}
"""
    if img.triton:
        # Triton's Python backend with the stub for Python 3.11 (DESIGN.md §7), made once
        # here: the root filesystem is read-only in the pods.
        script += f"""
mkdir -p {BACKENDS}/python /usr/local/bin
cp {TRITON}/backends/python/libtriton_python.so \
   {TRITON}/backends/python/triton_python_backend_utils.py \
   {TRITON}/python_backend_stubs/3.11/triton_python_backend_stub {BACKENDS}/python/
ln -s {TRITON}/bin/tritonserver /usr/local/bin/tritonserver
"""
    chroot_run([base.tree], layer.tree, wheels, {**img.env, "SOURCE_DATE_EPOCH": str(epoch)},
               script)
    layer.finish(time.monotonic() - t, epoch, keep_tree=True)
    return layer


def project_files() -> list[str]:
    """The project's files that go into the images: tracked or not ignored, under
    PROJECT_FILES."""
    try:
        out = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard", "--", *PROJECT_FILES], capture_output=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):   # not a git checkout
        files = [str(p.relative_to(ROOT)) for top in PROJECT_FILES
                 for p in ([ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts]
    return sorted(f for f in files if (ROOT / f).is_file())


def build_project(img: Image, base: Layer, deps: Layer, epoch: int, rebuild: bool) -> Layer:
    files = project_files()
    tree_hash = sha256("".join(
        f"{f}\0{os.access(ROOT / f, os.X_OK)}\0{sha256((ROOT / f).read_bytes())}\n"
        for f in files))
    key = sha256(json.dumps({"recipe": RECIPE["project"], "deps": deps.key, "files": tree_hash,
                             "setuptools": SETUPTOOLS}, sort_keys=True))
    layer = stage_dir("project", key, rebuild)
    if layer.cached():
        return layer
    log(f"project {key[:12]}: {len(files)} files")
    t = layer.begin()
    wheels = CACHE / "wheels"
    _wheel_file(wheels, PIP)
    _wheel_file(wheels, SETUPTOOLS)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".inputs-") as inputs:
        # the inputs: the wheels the build needs, and a copy of the sources (setuptools
        # writes build/ and *.egg-info next to them: never into the checkout)
        for req in (PIP, SETUPTOOLS):
            os.link(wheels / _wheel_file(wheels, req), Path(inputs, _wheel_file(wheels, req)))
        for f in files:
            dest = Path(inputs, "src", f)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest)
        script = f"""
cp -r /mnt/src /tmp/src
{VENV}/bin/python /mnt/{_wheel_file(wheels, PIP)}/pip install -q --no-index --find-links /mnt \
  --no-deps --no-compile --no-cache-dir /tmp/src
{VENV}/bin/python -c '{COMPILE}' {SITE}/autoglm
"""
        if img.triton:
            script += f"""
mkdir -p {MODEL_SOURCE}
cp -r /tmp/src/model_repo/. {MODEL_SOURCE}/
find {MODEL_SOURCE} -name __pycache__ -prune -exec rm -rf {{}} +
autoglm model build /models --version 1
chown -R {USER} /models
"""
        chroot_run([deps.tree, base.tree], layer.tree, Path(inputs),
                   {**img.env, "SOURCE_DATE_EPOCH": str(epoch)}, script)
    layer.finish(time.monotonic() - t, epoch, keep_tree=False)
    return layer


# --- the OCI archive -------------------------------------------------------------------------

def _blob(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def write_archive(img: Image, layers: list[Layer], epoch: int) -> dict[str, Any]:
    created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = _blob({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Env": [f"{k}={v}" for k, v in img.env.items()], "Entrypoint": ENTRYPOINT,
                   "Cmd": img.cmd, "User": USER, "WorkingDir": "/tmp",
                   "Labels": {"org.opencontainers.image.title": img.repo,
                              "org.opencontainers.image.version": img.tag}},
        "rootfs": {"type": "layers", "diff_ids": [la.meta["diff_id"] for la in layers]},
        "history": [{"created": created, "created_by": f"autoglm images: {la.stage} "
                     f"{la.key[:16]}"} for la in layers],
    })
    manifest = _blob({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": la.meta["digest"], "size": la.meta["size"]} for la in layers],
    })
    digest = "sha256:" + sha256(manifest)
    index = _blob({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest, "size": len(manifest),
                       "annotations": {
                           # containerd names the imported image by this one
                           "io.containerd.image.name": f"docker.io/{img.name}",
                           # umoci, skopeo: the tag
                           "org.opencontainers.image.ref.name": img.tag}}],
    })
    out = CACHE / "archives" / f"{img.key}-{digest[7:19]}.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes | None = None, path: Path | None = None,
                    size: int = 0) -> None:
                ti = tarfile.TarInfo(name)
                ti.mtime, ti.mode = epoch, 0o644
                if data is not None:
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
                elif path is not None:
                    ti.size = size
                    with open(path, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(ti)
            add("blobs")
            add("blobs/sha256")
            add("oci-layout", _blob({"imageLayoutVersion": "1.0.0"}))
            add("index.json", index)
            add(f"blobs/sha256/{digest[7:]}", manifest)
            add(f"blobs/sha256/{sha256(config)}", config)
            for la in layers:
                add(f"blobs/sha256/{la.meta['digest'][7:]}", path=la.blob, size=la.meta["size"])
        tmp.rename(out)
        for old in out.parent.glob(f"{img.key}-*.tar"):   # earlier builds of this image
            if old != out:
                old.unlink()
    return {"image": img.key, "name": img.name, "ref": f"docker.io/{img.name}",
            "archive": str(out), "manifest": digest, "config": "sha256:" + sha256(config),
            "archive_size": out.stat().st_size,
            "unpacked": sum(la.meta["unpacked"] for la in layers),
            "env": img.env, "entrypoint": ENTRYPOINT, "cmd": img.cmd, "user": USER,
            "layers": [la.meta for la in layers]}


def prune(results: list[dict[str, Any]]) -> None:
    """After building every image: drop the layers no image uses any more (earlier source
    trees, locks or mirror states) — the cache holds one set of images."""
    for i, stage in enumerate(("base", "deps", "project")):
        keep = {r["layers"][i]["key"][:16] for r in results}
        for d in (CACHE / stage).glob("*"):
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


def build(names: list[str], rebuild: set[str]) -> list[dict[str, Any]]:
    ensure_tools()
    sources = debian_sources()
    mirror, epoch = mirror_state(sources)
    results = []
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)    # one build at a time per cache
        for name in names:
            img = IMAGES[name]
            t = time.monotonic()
            base = build_base(sources, mirror, epoch, "base" in rebuild)
            deps = build_deps(img, base, epoch, "deps" in rebuild)
            project = build_project(img, base, deps, epoch, "project" in rebuild)
            res = write_archive(img, [base, deps, project], epoch)
            res["seconds"] = round(time.monotonic() - t, 1)
            log(f"{img.name}: {res['archive']} ({res['archive_size'] >> 20} MiB, "
                f"{res['unpacked'] >> 20} MiB unpacked, {res['seconds']} s)")
            results.append(res)
        if set(names) == set(IMAGES):
            prune(results)
    return results


# --- locking the requirement lists -----------------------------------------------------------

def _requirements() -> dict[str, list[str]]:
    """The top-level pins of each lock, from pyproject.toml: the operator image gets the
    base dependencies and what the gateway imports from the `model` extra (tritonclient's
    gRPC client, numpy; no torch); Triton's gets the base, `model` and nvidia-pytriton."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    base = list(project["dependencies"])
    extras = project["optional-dependencies"]
    model = list(extras["model"])
    local = [r for r in extras["local"] if not r.startswith("autoglm")]
    gateway = [re.sub(r"^tritonclient\[all\]", "tritonclient[grpc]", r) for r in model
               if re.match(r"^(tritonclient|numpy)\b", r)]
    return {"operator": base + gateway, "triton": base + model + local}


# What the CPU image leaves out: torch's GPU kernel compiler and the CUDA libraries torch does
# not load at import. The others stay: torch 2.9.1's only Linux x86_64 wheel on PyPI is the
# CUDA build, and libtorch.so needs libtorch_cuda.so, which needs cudart, cublas, cudnn,
# cufft, curand, cusparse(Lt), nccl, nvshmem, cufile (and libtorch_cpu.so cupti) to load at
# all, GPU or not (measured: without them `import torch` fails on libcudart.so.12).
CPU_LEAVES_OUT = {"triton", "nvidia-cusolver-cu12", "nvidia-cuda-nvrtc-cu12", "nvidia-nvtx-cu12"}


def is_cuda_only(name: str) -> bool:
    """A wheel the CPU image leaves out."""
    return re.sub(r"[-_.]+", "-", name).lower() in CPU_LEAVES_OUT


def lock() -> None:
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        raise SystemExit("images: lock with Python 3.11 on Linux x86_64 (the images' platform)")
    for name, reqs in _requirements().items():
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp, "report.json")
            run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                 "--only-binary=:all:", "--report", str(report), *reqs])
            installs = json.loads(report.read_text())["install"]
        pins = sorted((i["metadata"]["name"], i["metadata"]["version"],
                       i["download_info"]["archive_info"]["hashes"]["sha256"])
                      for i in installs)
        variants = {"operator": pins} if name == "operator" else {
            "triton-cpu": [p for p in pins if not is_cuda_only(p[0])], "triton-gpu": pins}
        for variant, chosen in variants.items():
            lines = [f"# {variant}: generated by `python3 .ci/images.py lock` from pyproject.toml"
                     " (do not edit).", f"# top level: {' '.join(reqs)}"]
            if variant == "triton-cpu":
                left_out = " ".join(sorted(CPU_LEAVES_OUT))
                lines.append(f"# left out (torch does not load them on CPU): {left_out}")
            lines += [f"{n}=={v} \\\n    --hash=sha256:{h}" for n, v, h in chosen]
            (LISTS / f"{variant}.lock").write_text("\n".join(lines) + "\n")
            log(f"{variant}.lock: {len(chosen)} pins")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=".ci/images.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or take from the cache) the images")
    b.add_argument("images", nargs="*", choices=[[], *IMAGES], default=[],
                   help="default: all")
    b.add_argument("--json", action="store_true", help="print a JSON list of the images")
    b.add_argument("--rebuild", action="append", default=[], choices=["base", "deps", "project"],
                   help="rebuild this stage even if cached (repeatable)")
    sub.add_parser("lock", help="re-pin manifests/images/*.lock from pyproject.toml")
    args = p.parse_args(argv)
    if args.command == "lock":
        lock()
        return 0
    results = build(args.images or list(IMAGES), set(args.rebuild))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["archive"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
