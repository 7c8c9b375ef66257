"""`autoglm up` claims its home's run of a resource (run/<name>/instance.json): a second one
is refused while the first runs; what a killed one left (processes of its servers, found by
their shared-memory group; its shared-memory regions) is removed by the next, and nothing of
another run is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm.local.runtime import LocalError, LocalRuntime
from autoglm.procs import process_start, processes_with, running
from autoglm.triton import shm_group_marker, shm_group_regions, shm_prefix


def runtime(home: Path, said: list[str]) -> LocalRuntime:
    return LocalRuntime(home / "tiny.yaml", home=home, say=said.append, name="tiny")


def fake_server(group: str) -> subprocess.Popen[bytes]:
    """A process whose command line carries ``group``'s marker, as a Python-backend stub's
    does (its shared-memory region's name is an argument)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             shm_prefix(group) + "stub"], start_new_session=True)


@pytest.fixture
def groups() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for g in made:
        for f in shm_group_regions(g):
            f.unlink(missing_ok=True)


def test_process_identity() -> None:
    me = process_start(os.getpid())
    assert me is not None and running(os.getpid(), me)
    assert not running(os.getpid(), me + 1)  # a pid reused is another process
    assert not running(os.getpid(), None)
    p = subprocess.Popen(["true"])
    p.wait()
    assert process_start(p.pid) is None


def test_grouped_prefixes_never_match_another_group_or_an_ungrouped_one() -> None:
    a, b = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    assert shm_prefix(a).startswith(shm_group_marker(a))
    assert not shm_prefix(b).startswith(shm_group_marker(a))
    assert not shm_prefix().startswith(shm_group_marker(a))
    assert shm_prefix(a) != shm_prefix(a)


def test_a_running_instance_refuses_a_second(tmp_path: Path) -> None:
    first, said = runtime(tmp_path, []), list[str]()
    first._claim()
    mine = json.loads(first.instance_file.read_text())
    assert mine["pid"] == os.getpid() and mine["shm_group"] == first.shm_group
    second = runtime(tmp_path, said)
    with pytest.raises(LocalError, match=rf"already served .* \(pid {os.getpid()}\)"):
        second._claim()
    second.stop()  # refused: leaves the running one's files alone
    assert first.instance_file.exists()
    first.stop()
    assert not first.instance_file.exists()


def test_what_a_killed_instance_left_is_reclaimed_and_nothing_else(
        tmp_path: Path, groups: list[str]) -> None:
    dead, other = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    groups += [dead, other]
    gone = subprocess.Popen(["true"])
    gone.wait()  # the killed `autoglm up`: its pid names no process now
    ours, theirs = fake_server(dead), fake_server(other)
    try:
        for g in (dead, dead, other):
            Path(f"/dev/shm/{shm_prefix(g)}region").write_bytes(b"\0" * 4096)
        workdir = tmp_path / "run" / "tiny"
        workdir.mkdir(parents=True)
        (workdir / "instance.json").write_text(json.dumps(
            {"pid": gone.pid, "started": 1, "shm_group": dead}))
        (workdir / "status.json").write_text("{}")
        assert processes_with([shm_group_marker(dead)]) == [ours.pid]

        said: list[str] = []
        rt = runtime(tmp_path, said)
        rt._claim()
        assert ours.wait(timeout=10) == -9
        assert theirs.poll() is None, "another run's process is not touched"
        assert not shm_group_regions(dead)
        assert len(shm_group_regions(other)) == 1, "another run's regions are not touched"
        assert not (workdir / "status.json").exists()
        assert said == [f"the previous `autoglm up` of tiny (pid {gone.pid}) did not stop; "
                        "reclaimed what it left: 1 process, 2 shared-memory regions "
                        "(0.0 MiB)"]
        assert rt.shm_group not in (dead, other)
        assert json.loads(rt.instance_file.read_text())["shm_group"] == rt.shm_group
        rt.stop()
        assert not rt.instance_file.exists()
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()


def test_a_killed_instance_that_left_nothing(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    workdir = tmp_path / "run" / "tiny"
    workdir.mkdir(parents=True)
    (workdir / "instance.json").write_text(json.dumps(
        {"pid": gone.pid, "started": 1, "shm_group": uuid.uuid4().hex[:12]}))
    said: list[str] = []
    rt = runtime(tmp_path, said)
    rt._claim()
    assert said[0].endswith("reclaimed what it left: nothing")
    rt.stop()


def test_status_says_a_killed_instance_is_not_running(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    workdir = tmp_path / "run" / "tiny"
    workdir.mkdir(parents=True)
    (workdir / "instance.json").write_text(json.dumps(
        {"pid": gone.pid, "started": 1, "shm_group": "x"}))
    (workdir / "status.json").write_text(json.dumps({"name": "tiny"}))
    out = subprocess.run([sys.executable, "-m", "autoglm.cli", "status", "--home",
                          str(tmp_path)], capture_output=True, text=True, check=False)
    assert out.returncode == 1, out.stderr
    assert out.stdout == ("tiny: not running: the `autoglm up` that served it was killed (the "
                          "next `autoglm up` of it reclaims what it left)\n")
