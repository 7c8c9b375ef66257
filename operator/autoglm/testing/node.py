"""A real node for the test cluster: containerd + runc, kubelet, kube-proxy and CoreDNS.

Pods scheduled on it run as containers (images are imported, never pulled), get addresses
from the CNI bridge, reach Services through kube-proxy (iptables) and resolve names through
CoreDNS, so the operator, Triton and the gateway can run as their manifests say.

Nothing leaves the machine: every address the cluster uses is inside
:data:`~autoglm.testing.controlplane.GUARDED_RANGE` (198.18.0.0/15), which gets a blackhole
route (the bridge's and the node's more specific routes win) and a firewall guard that drops
packets to or from it on any interface but loopback, the pod bridge and the node's own one.
Teardown removes every process, mount, network namespace, interface, route, firewall rule
and cgroup the node made, and restores the sysctls it and kubelet changed
(:func:`host_state` snapshots all of that, for a test to compare).

Usage (the API, root only)::

    with RealCluster(provision_assets(), provision_node_assets()) as cluster:
        cluster.node.import_image(Path("operator.tar"))
        cluster.kubectl("apply", "-f", "pod.yaml")   # nodeSelector: NODE_SELECTOR

A :class:`RealCluster` is a :class:`NodeNetwork` (the host side: interface, routes, guard,
sysctls), then a :class:`~autoglm.testing.controlplane.ControlPlane` whose apiserver binds
:data:`NODE_IP`, then a :class:`RealNode`, stopped in reverse order.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from autoglm.procs import free_port, spawn, terminate
from autoglm.testing.controlplane import (
    GUARDED_RANGE,
    SERVICE_CIDR,
    ControlPlane,
    ControlPlaneError,
    Daemons,
    Proc,
    issue_cert,
    kubeconfig_yaml,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
ASSETS_SCRIPT = REPO_ROOT / ".ci" / "node-assets.sh"
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns", "containerd", "containerd-shim-runc-v2",
                 "ctr", "runc", "iptables", "nft")

NODE_NAME = "autoglm-node-0"
NODE_IP = "198.18.255.1"            # on HOST_IF; the apiserver binds it too
HOST_IF = "autoglm0"                # a port-less bridge: this kernel has no dummy driver
BRIDGE = "autoglm-cni0"             # the pods' bridge (CNI bridge plugin)
POD_CIDR = "198.18.0.0/24"
POD_GATEWAY = "198.18.0.1"
DNS_SERVICE_IP = "198.19.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "autoglm-node"        # kubelet's cgroupRoot, in every v1 hierarchy
GUARD_CHAIN = "AUTOGLM-GUARD"
# The real node's label: tests that want a real container select it (kwok nodes lack it).
NODE_LABEL = "autoglm.io/node"
NODE_SELECTOR = {NODE_LABEL: "real"}
CGROUP_FS = Path("/sys/fs/cgroup")

# Every sysctl the node, kubelet (kernel defaults it enforces), kube-proxy or the CNI
# plugins may set, recorded before start and written back on teardown.
SYSCTLS = (
    "kernel.panic", "kernel.panic_on_oops", "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes", "vm.overcommit_memory", "vm.panic_on_oom",
    "net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding", "net.ipv4.conf.default.forwarding",
    "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.all.rp_filter",
    "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_tcp_be_liberal",
    "net.ipv4.vs.conntrack",
)
# Host paths containerd 1.6 and kubelet use whatever their configuration says: removed on
# teardown when they did not exist before (their entries we made, when they did).
HOST_PATHS = (Path("/run/containerd"), Path("/run/netns"), Path("/var/log/containers"),
              Path("/var/log/pods"), Path("/var/lib/cni"), Path("/var/lib/kubelet"),
              Path("/etc/cni"), Path("/opt/cni"))


SYSCTL_STATE = Path(tempfile.gettempdir()) / "autoglm-sysctls-node.json"


class NodeError(ControlPlaneError):
    """The real node could not be provisioned or started; the message says why."""


def provision_node_assets() -> Path:
    """The directory ``.ci/node-assets.sh`` fills (building what is missing);
    ``$AUTOGLM_NODE_ASSETS`` short-cuts the script."""
    given = os.environ.get("AUTOGLM_NODE_ASSETS")
    if given:
        d = Path(given)
    else:
        if not ASSETS_SCRIPT.exists():
            raise NodeError(f"provisioning script not found: {ASSETS_SCRIPT}")
        proc = subprocess.run(["bash", str(ASSETS_SCRIPT)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-30:])
            raise NodeError(f"{ASSETS_SCRIPT} failed (exit {proc.returncode}):\n{tail}")
        d = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in NODE_BINARIES if not os.access(d / "bin" / b, os.X_OK)]
    missing += [f for f in ("images/pause.tar", "cni/bridge") if not (d / f).exists()]
    if missing:
        raise NodeError(f"missing node assets in {d}: {missing}")
    return d


def preflight() -> list[str]:
    """Why a real node cannot run on this machine (empty: it can)."""
    why = []
    if os.geteuid() != 0:
        why.append("needs root (containers, network namespaces, iptables, cgroups)")
    if not (CGROUP_FS / "memory").is_dir() and not (CGROUP_FS / "cgroup.controllers").exists():
        why.append(f"no cgroup hierarchies under {CGROUP_FS}")
    if not Path("/proc/sys/net/bridge").is_dir():
        why.append("the kernel lacks br_netfilter (net.bridge.* sysctls)")
    for tool in ("ip", "mount", "umount"):
        if shutil.which(tool) is None:
            why.append(f"{tool} not found")
    return why


# -- small host helpers --------------------------------------------------------------------

def _run(*cmd: str, check: bool = True, env: Mapping[str, str] | None = None,
         input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, env=env,
                          input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    out = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            out[name] = _sysctl_path(name).read_text().strip()
    return out


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


def _mountpoints(with_type: bool = False) -> list[str]:
    """Mount points of this mount namespace (the kernel's escaping of spaces undone), with
    ``with_type`` each followed by its file system type."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        fstype = fields[fields.index("-") + 1]
        out.append(f"{mp} {fstype}" if with_type else mp)
    return out


def _cgroup_hierarchies() -> list[Path]:
    return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())


def _pids_in_cgroups(root: str) -> set[int]:
    pids: set[int] = set()
    for h in _cgroup_hierarchies():
        top = h / root
        if not top.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in
                                (Path(dirpath) / "cgroup.procs").read_text().split())
    return pids


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _pids_running(prefix: str) -> set[int]:
    """Processes whose executable lies under ``prefix``."""
    return {int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and _exe(int(d.name)).startswith(prefix)}


def _sockets_under(path: Path) -> list[str]:
    """Bound Unix sockets under ``path`` (any process's)."""
    prefix = str(path) + "/"
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [f[-1] for f in (ln.split() for ln in lines) if len(f) > 7 and
            f[-1].startswith(prefix)]


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- state snapshot -------------------------------------------------------------------------

@dataclass
class HostState:
    """What the node may leave behind, in comparable form (see :func:`host_state`)."""

    processes: list[str]
    mounts: list[str]
    netns: list[str]
    links: list[str]
    routes: list[str]
    iptables: list[str]
    nft_tables: list[str]
    cgroups: list[str]
    sysctls: dict[str, str]
    shm: list[str]
    paths: list[str]

    def diff(self, other: HostState) -> dict[str, tuple[Any, Any]]:
        """Fields that differ: name -> (only in self, only in other)."""
        out: dict[str, tuple[Any, Any]] = {}
        for k, mine in vars(self).items():
            theirs = getattr(other, k)
            a: Any
            b: Any
            if isinstance(mine, dict):
                a = {n: v for n, v in mine.items() if theirs.get(n) != v}
                b = {n: v for n, v in theirs.items() if mine.get(n) != v}
            else:
                a = sorted(set(mine) - set(theirs))
                b = sorted(set(theirs) - set(mine))
            if a or b:
                out[k] = (a, b)
        return out


def _iptables_rules(bin_dir: Path, ipv6: bool) -> list[str]:
    """Chains and rules of every table, without counters (built-in empty chains with their
    default ACCEPT policy are left out: they appear with a table's first use)."""
    save = bin_dir / ("ip6tables-save" if ipv6 else "iptables-save")
    if not save.exists():
        return []
    proc = _run(str(save), check=False, env=_tool_env(bin_dir))
    out, table = [], ""
    for line in proc.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy == "-" or policy != "ACCEPT":
                out.append(f"{'v6' if ipv6 else 'v4'} {table} chain {name} {policy}")
        elif line.startswith("-"):
            out.append(f"{'v6' if ipv6 else 'v4'} {table} {line}")
    return out


def _tool_env(bin_dir: Path) -> dict[str, str]:
    """Environment for the unpacked Debian tools (iptables, nft) and the node's processes."""
    lib = bin_dir.parent / "lib"
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env["LD_LIBRARY_PATH"] = str(lib)
    env["XTABLES_LIBDIR"] = str(lib / "xtables")
    return env


def host_state(assets: Path, also: tuple[Path, ...] = ()) -> HostState:
    """A snapshot of what a real node touches on the host: its processes (executables from
    ``assets`` or ``also``, anything in its cgroups), its mounts (under its work directories
    and the runtime's host paths: container root file systems, volumes, netns pins), network
    namespaces, links, routes, iptables rules and nftables tables, its cgroups, the
    :data:`SYSCTLS`, /dev/shm and :data:`HOST_PATHS`."""
    bin_dir = assets / "bin"
    procs = _pids_in_cgroups(CGROUP_ROOT)
    for prefix in (assets, *also):
        procs |= _pids_running(str(prefix))
    prefixes = (tempfile.gettempdir() + "/autoglm-node-", tempfile.gettempdir() + "/autoglm-k8s-",
                *(str(p) for p in HOST_PATHS))
    # (by path only: another runtime on the machine may mount overlays of its own)
    mounts = sorted(m for m in _mountpoints(with_type=True) if m.startswith(prefixes))
    processes = sorted(f"{p} {_exe(p)}" for p in procs if _exe(p))
    netns_dir = Path("/run/netns")
    netns = sorted(p.name for p in netns_dir.iterdir()) if netns_dir.is_dir() else []
    links = sorted(re.sub(r"@.*", "", ln.split(":")[1].strip())
                   for ln in _run("ip", "-o", "link", "show").stdout.splitlines())
    routes = sorted(ln.strip() for fam in ("-4", "-6")
                    for ln in _run("ip", fam, "route", "show", "table", "all").stdout
                    .splitlines() if "table local" not in ln or "198.1" in ln)
    nft = bin_dir / "nft"
    tables = sorted(_run(str(nft), "list", "tables", check=False, env=_tool_env(bin_dir))
                    .stdout.splitlines()) if nft.exists() else []
    cgroups = sorted(str(h / d) for h in _cgroup_hierarchies() for d in os.listdir(h)
                     if (h / d).is_dir() and (d == CGROUP_ROOT or d.startswith("kubepods")))
    # Pods' /dev/shm is a tmpfs of their own; host Triton servers (other tests, other runs)
    # come and go with their regions, which are not the node's.
    shm = sorted(e for e in os.listdir("/dev/shm") if not e.startswith("triton_python_"))
    paths = [str(p) for p in HOST_PATHS if p.exists() or p.is_symlink()]
    paths += [os.path.join(d, e) for p in HOST_PATHS if p.is_dir()
              for d, dirs, files in os.walk(p) for e in (*dirs, *files)]
    return HostState(
        processes=processes, mounts=mounts, netns=netns, links=links,
        routes=routes, iptables=_iptables_rules(bin_dir, False) + _iptables_rules(bin_dir, True),
        nft_tables=tables, cgroups=cgroups, sysctls=read_sysctls(), shm=shm,
        paths=sorted(paths))


# -- the host side: interface, routes, guard, sysctls ---------------------------------------

@dataclass
class NodeNetwork:
    """The node's address on :data:`HOST_IF`, the blackhole route for the guarded range, the
    Service range's route, the firewall guard and the sysctls pods need. :meth:`down`
    also restores every sysctl recorded in :meth:`up` (whoever changed it since)."""

    assets: Path
    _saved_sysctls: dict[str, str] = field(init=False, default_factory=dict)
    _routes: list[list[str]] = field(init=False, default_factory=list)
    _links: list[str] = field(init=False, default_factory=list)
    _guard: bool = field(init=False, default=False)
    _before: HostState | None = field(init=False, default=None)

    @property
    def bin_dir(self) -> Path:
        return self.assets / "bin"

    def ipt(self, *args: str, ipv6: bool = False, check: bool = True) -> str:
        tool = "ip6tables" if ipv6 else "iptables"
        return _run(str(self.bin_dir / tool), "-w", *args, check=check,
                    env=_tool_env(self.bin_dir)).stdout

    def up(self) -> None:
        why = preflight()
        if why:
            raise NodeError("a real node cannot run here: " + "; ".join(why))
        self._before = host_state(self.assets)
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        self._saved_sysctls = read_sysctls()
        # kept on disk too, so that reclaim() can restore them after a killed run
        SYSCTL_STATE.write_text(json.dumps(self._saved_sysctls))
        if Path(f"/sys/class/net/{HOST_IF}").exists():
            raise NodeError(f"{HOST_IF} exists: another real node runs here, or one was "
                            f"left behind (remove it with `ip link del {HOST_IF}`)")
        _run("ip", "link", "add", HOST_IF, "type", "bridge")
        self._links.append(HOST_IF)
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", HOST_IF)
        _run("ip", "link", "set", HOST_IF, "up")
        # Anything in the range not more specifically routed goes nowhere; Service addresses
        # route to HOST_IF so the host's own connections get as far as kube-proxy's DNAT
        # (a blackhole route would fail them at connect()).
        for route in (["blackhole", GUARDED_RANGE], [SERVICE_CIDR, "dev", HOST_IF]):
            _run("ip", "route", "add", *route)
            self._routes.append(route)
        self._install_guard()
        # Service traffic between pods on one bridge must pass iptables (kube-proxy's DNAT).
        write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
        write_sysctl("net.ipv4.ip_forward", "1")

    def _install_guard(self) -> None:
        # mangle POSTROUTING sees every packet about to leave, the host's and forwarded
        # ones, with its final interface and before any SNAT; kube-proxy puts its ACCEPTs
        # ahead of anything in filter OUTPUT/FORWARD but never hooks here.
        self.ipt("-t", "mangle", "-N", GUARD_CHAIN)
        self._guard = True
        for ifname in ("lo", HOST_IF, BRIDGE):
            self.ipt("-t", "mangle", "-A", GUARD_CHAIN, "-o", ifname, "-j", "RETURN")
        for flag in ("-d", "-s"):
            self.ipt("-t", "mangle", "-A", GUARD_CHAIN, flag, GUARDED_RANGE, "-j", "DROP")
        self.ipt("-t", "mangle", "-I", "POSTROUTING", "1", "-j", GUARD_CHAIN)

    def guard_drops(self) -> int:
        """Packets the guard dropped so far."""
        out = self.ipt("-t", "mangle", "-L", GUARD_CHAIN, "-n", "-v", "-x")
        return sum(int(ln.split()[0]) for ln in out.splitlines()
                   if ln.split()[2:3] == ["DROP"])

    def down(self) -> None:
        """Undo :meth:`up`; each step runs even if an earlier one failed."""
        errors: list[str] = []

        def attempt(fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # keep tearing down; report at the end
                errors.append(str(e))

        if self._guard:
            attempt(functools.partial(self.ipt, "-t", "mangle", "-D", "POSTROUTING", "-j",
                                      GUARD_CHAIN, check=False))
            attempt(functools.partial(self.ipt, "-t", "mangle", "-F", GUARD_CHAIN))
            attempt(functools.partial(self.ipt, "-t", "mangle", "-X", GUARD_CHAIN))
            self._guard = False
        for route in reversed(self._routes):
            attempt(functools.partial(_run, "ip", "route", "del", *route))
        self._routes.clear()
        for link in self._links:
            attempt(functools.partial(_run, "ip", "link", "del", link))
        self._links.clear()
        if self._before is not None:
            attempt(functools.partial(_drop_new_tables, self.bin_dir, self._before))
        for name, value in self._saved_sysctls.items():
            with contextlib.suppress(OSError):
                if _sysctl_path(name).read_text().strip() != value:
                    attempt(functools.partial(write_sysctl, name, value))
        self._saved_sysctls.clear()
        SYSCTL_STATE.unlink(missing_ok=True)
        if errors:
            raise NodeError("network teardown: " + "; ".join(errors))


def _drop_new_tables(bin_dir: Path, before: HostState) -> None:
    """Delete nftables tables that appeared since ``before`` once they hold nothing of
    anyone else (iptables-nft creates them on first use and never removes them)."""
    nft = bin_dir / "nft"
    if not nft.exists():
        return
    now = _run(str(nft), "list", "tables", env=_tool_env(bin_dir)).stdout.splitlines()
    for line in now:
        if line in before.nft_tables:
            continue
        _, family, name = line.split()
        _run(str(nft), "delete", "table", family, name, check=False, env=_tool_env(bin_dir))


def _leftover_paths(workdirs: list[Path], netns_pins: list[str]) -> set[str]:
    """Files under :data:`HOST_PATHS` a killed node left: its netns pins, CNI result caches
    of its sandboxes, log links into its work directories, dead sockets (directories stay:
    who made one cannot be told after the fact)."""
    sandboxes = {d.name for w in workdirs for d in
                 (w / "containerd/state/io.containerd.grpc.v1.cri/sandboxes").glob("*")}
    bound = set(_sockets_under(Path("/")))

    def ours(p: Path) -> bool:
        if p.is_symlink():
            return any(os.readlink(p).startswith(str(w)) for w in workdirs)
        if p.is_dir():  # whose a directory is cannot be told after the fact: kept
            return False
        if str(p) in netns_pins:
            return True
        if p.parent.name == "results" and any(i in p.name for i in sandboxes):
            return True
        return p.is_socket() and str(p) not in bound

    out = set()
    for top in HOST_PATHS:
        if top.is_dir():
            for d, dirs, files in os.walk(top):
                for e in [Path(d) / f for f in (*dirs, *files)]:
                    if ours(e):
                        out.add(str(e))
        if (top.exists() or top.is_symlink()) and ours(top):
            out.add(str(top))
    return out


def _drop_empty_xtables(bin_dir: Path) -> None:
    """Delete iptables-nft's tables that hold no rule and no chain of their own (what a
    killed node's tables are once its chains are gone; anyone's next use recreates them)."""
    nft, env = bin_dir / "nft", _tool_env(bin_dir)
    if not nft.exists():
        return
    for family, save in (("ip", "iptables-save"), ("ip6", "ip6tables-save")):
        table, busy = "", False
        for line in [*_run(str(bin_dir / save), env=env).stdout.splitlines(), "*END"]:
            if line.startswith("*"):
                if table and not busy:
                    _run(str(nft), "delete", "table", family, table, check=False, env=env)
                table, busy = line[1:], False
            elif line.startswith("-A") or (line.startswith(":") and
                                           line.split()[1] == "-"):
                busy = True


# -- the node ------------------------------------------------------------------------------

@dataclass
class RealNode(Daemons):
    """containerd, kubelet, kube-proxy and CoreDNS joined to ``control_plane`` as node
    :data:`NODE_NAME` (labelled :data:`NODE_SELECTOR`). The control plane's apiserver must
    bind :data:`NODE_IP` (``ControlPlane(address=NODE_IP)``) and a :class:`NodeNetwork` be
    up; :class:`RealCluster` does all three."""

    assets: Path
    control_plane: ControlPlane
    name: str = NODE_NAME
    workdir: Path = field(init=False)
    startup_seconds: float = field(init=False, default=0.0)
    _procs: list[Proc] = field(init=False, default_factory=list)
    error: ClassVar[type[Exception]] = NodeError
    exit_tail: ClassVar[int] = 25
    timeout_tail: ClassVar[int] = 8
    _host_before: HostState | None = field(init=False, default=None)
    _created_paths: list[Path] = field(init=False, default_factory=list)
    _cgroups_made: bool = field(init=False, default=False)
    _kubelet_port: int = field(init=False, default=0)
    _dns_ready_port: int = field(init=False, default=0)

    @property
    def bin_dir(self) -> Path:
        return self.assets / "bin"

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def ip(self) -> str:
        return NODE_IP

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        if self.control_plane.address != NODE_IP:
            raise NodeError(f"the control plane's apiserver must bind {NODE_IP} "
                            f"(ControlPlane(address=NODE_IP)), not {self.control_plane.address}")
        self.workdir = Path(tempfile.mkdtemp(prefix="autoglm-node-"))
        self._host_before = host_state(self.assets)
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    # -- start ----------------------------------------------------------------------------

    def _start(self, deadline: float) -> None:
        w = self.workdir
        for d in ("pki", "cni/net.d", "cni/ipam", "certs.d/_default", "certs.d/autoglm.local",
                  "kubelet", "pod-logs"):
            (w / d).mkdir(parents=True)
        self._make_cgroups()
        self._start_containerd(deadline)
        self.import_image(self.assets / "images" / "pause.tar")
        self._start_kubelet(deadline)
        self._start_kube_proxy()
        self._start_coredns(deadline)
        self._until(deadline, f"node {self.name} Ready", self._node_ready)
        self._until(deadline, "CoreDNS ready", lambda: _http_ok(
            f"http://127.0.0.1:{self._dns_ready_port}/ready"))

    def _make_cgroups(self) -> None:
        # kubelet refuses a cgroupRoot that does not exist in every hierarchy; cpuset
        # children start empty (no CPUs, no memory nodes) unless given the parent's.
        for h in _cgroup_hierarchies():
            d = h / CGROUP_ROOT
            if d.exists():
                raise NodeError(f"{d} exists: another real node runs here or one was left "
                                "behind")
        self._cgroups_made = True
        for h in _cgroup_hierarchies():
            (h / CGROUP_ROOT).mkdir()
            if (h / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (h / CGROUP_ROOT / f).write_text((h / f).read_text())

    def _start_containerd(self, deadline: float) -> None:
        w, a = self.workdir, self.assets
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{w}/containerd/root"
state = "{w}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{w}/containerd/opt"
  {cri}]
    sandbox_image = "{self.pause_image}"
    disable_apparmor = true
    # this VM withholds CAP_SYS_RESOURCE: no process may lower its oom_score_adj, so
    # runc would fail setting the sandbox's -998; clamp to containerd's own instead
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    {cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      {cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        {cri}.containerd.runtimes.runc.options]
          BinaryName = "{a}/bin/runc"
          Root = "{w}/runc"
          SystemdCgroup = false
    {cri}.cni]
      bin_dir = "{a}/cni"
      conf_dir = "{w}/cni/net.d"
      max_conf_num = 1
    {cri}.registry]
      config_path = "{w}/certs.d"
"""
        (w / "containerd.toml").write_text(config)
        # No registry is ever contacted: images are imported. Should something try a pull
        # anyway, every host resolves to a closed loopback port and so does any proxy.
        nowhere = "http://127.0.0.1:9"
        for host in ("_default", "autoglm.local"):
            (w / "certs.d" / host / "hosts.toml").write_text(
                f'server = "{nowhere}"\n[host."{nowhere}"]\n  capabilities = ["pull", "resolve"]\n')
        (w / "cni/net.d/10-autoglm.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "autoglm",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True,
                 # no masquerade: pod traffic has no business leaving the machine
                 "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(w / "cni/ipam"),
                          "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=1))
        env = self._env()
        env.update(HTTP_PROXY=nowhere, HTTPS_PROXY=nowhere, NO_PROXY="", http_proxy=nowhere,
                   https_proxy=nowhere, no_proxy="")
        self._spawn("containerd", ["--config", str(w / "containerd.toml")], env)
        self._until(deadline, "containerd", lambda: self.ctr("version", check=False)
                    .returncode == 0)

    def _start_kubelet(self, deadline: float) -> None:
        w, cp = self.workdir, self.control_plane
        crt, key = issue_cert(cp.pki_dir, "kubelet-client", f"system:node:{self.name}",
                              ("system:nodes",), out_dir=w / "pki")
        serving = issue_cert(cp.pki_dir, "kubelet", self.name, ips=(NODE_IP,),
                             dns=(self.name,), server=True, out_dir=w / "pki")
        ca = cp.ca_file
        (w / "kubelet.kubeconfig").write_text(_cert_kubeconfig(cp.server, ca, crt, key))
        (w / "resolv.conf").write_text(f"nameserver {DNS_SERVICE_IP}\n")
        self._kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": self._kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "tlsCertFile": str(serving[0]), "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(w / "resolv.conf"),
            "podLogsDir": str(w / "pod-logs"),
            # a test machine's disk may be fuller than kubelet's defaults like: never evict
            # or collect images (they are imported, so a collected one would be lost)
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "0%",
                             "imagefs.available": "0%", "nodefs.inodesFree": "0%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "5s",
            "fileCheckFrequency": "5s", "httpCheckFrequency": "5s",
            "maxPods": 110, "protectKernelDefaults": False,
            "volumeStatsAggPeriod": "0s",
        }
        (w / "kubelet.yaml").write_text(json.dumps(config, indent=1))
        self._spawn("kubelet", [
            f"--config={w / 'kubelet.yaml'}", f"--kubeconfig={w / 'kubelet.kubeconfig'}",
            f"--root-dir={w / 'kubelet'}", f"--cert-dir={w / 'pki'}",
            f"--hostname-override={self.name}", f"--node-ip={NODE_IP}",
            # cAdvisor's own containerd client (container stats) defaults to /run/containerd
            f"--containerd={self.containerd_socket}",
            f"--node-labels={NODE_LABEL}={NODE_SELECTOR[NODE_LABEL]}",
            "--v=1",
        ], self._env())

    def _start_kube_proxy(self) -> None:
        w, cp = self.workdir, self.control_plane
        crt, key = issue_cert(cp.pki_dir, "kube-proxy", "system:kube-proxy",
                              out_dir=w / "pki")
        (w / "kube-proxy.kubeconfig").write_text(_cert_kubeconfig(cp.server, cp.ca_file,
                                                                  crt, key))
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(w / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name, "mode": "iptables",
            "clusterCIDR": POD_CIDR, "detectLocalMode": "ClusterCIDR",
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # NodePorts answer on the node's address only, never the machine's interfaces
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # leave the conntrack sysctls alone (0: do not set)
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s",
                         "minSyncPeriod": "0s"},
        }
        (w / "kube-proxy.yaml").write_text(json.dumps(config, indent=1))
        self._spawn("kube-proxy", [f"--config={w / 'kube-proxy.yaml'}", "--v=1"], self._env())

    def _start_coredns(self, deadline: float) -> None:
        """CoreDNS as a host process on the node's address; the ``kube-dns`` Service (at
        :data:`DNS_SERVICE_IP`) points at it through a hand-written EndpointSlice."""
        w, cp = self.workdir, self.control_plane
        port, self._dns_ready_port, health = free_port(), free_port(), free_port()
        # No `forward`: names outside the cluster get no answer rather than a query out.
        zones = f"{CLUSTER_DOMAIN}:{port} in-addr.arpa:{port} ip6.arpa:{port}"
        (w / "Corefile").write_text(f"""{zones} {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{self._dns_ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {cp.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
.:{port} {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        self._spawn("coredns", ["-conf", str(w / "Corefile")], self._env())
        ports = [{"name": "dns", "port": 53, "targetPort": port, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "targetPort": port, "protocol": "TCP"}]
        objs = [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system",
                          "labels": {"k8s-app": "kube-dns"}},
             "spec": {"clusterIP": DNS_SERVICE_IP, "ports": ports}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by":
                                         "autoglm-real-node"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True},
                            "nodeName": self.name}],
             "ports": [{"name": p["name"], "port": port, "protocol": p["protocol"]}
                       for p in ports]},
        ]
        cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                         "items": objs}))

    # -- use ------------------------------------------------------------------------------

    @property
    def pause_image(self) -> str:
        return (self.assets / "images" / "pause.name").read_text().strip()

    @property
    def busybox_image(self) -> str:
        """A tiny image (static busybox: sh, nc, nslookup, httpd), imported on demand
        by :meth:`import_busybox`."""
        return (self.assets / "images" / "busybox.name").read_text().strip()

    def import_busybox(self) -> str:
        self.import_image(self.assets / "images" / "busybox.tar")
        return self.busybox_image

    def import_image(self, archive: Path) -> None:
        """Import an image archive (OCI layout or docker-archive tar) into the CRI's
        ``k8s.io`` namespace, unpacked for overlayfs, so pods use it without a pull."""
        self.ctr("-n", "k8s.io", "images", "import", "--no-unpack=false", str(archive),
                 timeout=600)

    def images(self) -> list[str]:
        out = self.ctr("-n", "k8s.io", "images", "ls", "-q").stdout
        return [ln for ln in out.splitlines() if ln and not ln.startswith("sha256:")]

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(str(self.bin_dir / "ctr"), "--address", str(self.containerd_socket),
                    *args, check=check, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, input=input, check=check)

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes: each node daemon, the containerd shims, and
        ``pods`` (every process in the pods' cgroups)."""
        out = {p.name: _rss(p.popen.pid) for p in self._procs}
        shim = str(self.bin_dir / "containerd-shim-runc-v2")
        out["shims"] = sum(_rss(p) for p in _pids_running(shim))
        out["pods"] = sum(_rss(p) for p in _pids_in_cgroups(CGROUP_ROOT))
        return out

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (containers and shims included) and remove every mount,
        network namespace, interface, iptables chain, cgroup and file the node made; each
        step runs even if an earlier one failed, the first errors are raised at the end."""
        if not getattr(self, "workdir", None):
            return
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                errors.append(f"{what}: {e}")

        by_name = {p.name: p for p in self._procs}
        for name in ("kubelet", "kube-proxy", "coredns"):
            if name in by_name:
                attempt(name, functools.partial(terminate, by_name[name].popen, timeout=10))
        attempt("containers", self._kill_containers)
        if "containerd" in by_name:
            attempt("containerd", lambda: terminate(by_name["containerd"].popen, timeout=10))
        # shims outlive containerd (they run in sessions of their own)
        attempt("shims", lambda: self._kill(_pids_running(str(self.bin_dir))))
        for p in self._procs:
            p.log.close()
        self._procs.clear()
        attempt("mounts", self._unmount_all)
        attempt("interfaces", lambda: _run("ip", "link", "del", BRIDGE)
                if Path(f"/sys/class/net/{BRIDGE}").exists() else None)
        attempt("iptables", self._clean_iptables)
        attempt("cgroups", self._remove_cgroups)
        attempt("host paths", self._remove_host_paths)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise NodeError("node teardown: " + "; ".join(errors[:5]))

    def _kill(self, pids: set[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and _exe(p) for p in pids):
            if time.monotonic() > deadline:
                raise NodeError(f"processes survived SIGKILL: {sorted(pids)}")
            time.sleep(0.05)

    def _kill_containers(self) -> None:
        # Freeze-free: kill repeatedly until the pods' cgroups hold nothing (a dying pod
        # can have its runtime start another process in between).
        for _ in range(20):
            pids = _pids_in_cgroups(CGROUP_ROOT)
            if not pids:
                return
            self._kill(pids)
        raise NodeError(f"processes keep appearing in the node's cgroups: {sorted(pids)}")

    def _unmount_all(self) -> None:
        ours = [str(self.workdir)]
        before = {m.rsplit(" ", 1)[0] for m in self._host_before.mounts} \
            if self._host_before else set()
        for base in ("/run/containerd", "/run/netns", "/var/run/netns"):
            ours.append(base)
        for _ in range(10):
            mps = [m for m in _mountpoints() if m not in before and
                   any(m == o or m.startswith(o + "/") for o in ours)]
            if not mps:
                return
            for m in sorted(mps, key=lambda m: m.count("/"), reverse=True):
                if _run("umount", m, check=False).returncode != 0:
                    _run("umount", "-l", m, check=False)
        raise NodeError(f"mounts remain: {mps}")

    def _clean_iptables(self) -> None:
        env = _tool_env(self.bin_dir)
        kp = self.bin_dir / "kube-proxy"
        if kp.exists():
            _run(str(kp), "--cleanup", "--v=0", check=False, env=env)
        # what --cleanup leaves: kubelet's KUBE-* chains and the portmap plugin's CNI-*
        for ipv6 in (False, True):
            save = self.bin_dir / ("ip6tables-save" if ipv6 else "iptables-save")
            restore = self.bin_dir / ("ip6tables-restore" if ipv6 else "iptables-restore")
            dump = _run(str(save), check=False, env=env).stdout
            script: list[str] = []
            chains: list[str] = []
            rules: list[str] = []
            table = ""
            for line in [*dump.splitlines(), "*END"]:
                if line.startswith("*"):
                    if table and (chains or rules):
                        script += [f"*{table}", *rules, *[f"-F {c}" for c in chains],
                                   *[f"-X {c}" for c in chains], "COMMIT"]
                    table, chains, rules = line[1:], [], []
                elif line.startswith(":"):
                    name = line[1:].split()[0]
                    if name.startswith(("KUBE-", "CNI-")):
                        chains.append(name)
                elif line.startswith("-A ") and re.search(r"-j (KUBE|CNI)-", line) and \
                        not line.split()[1].startswith(("KUBE-", "CNI-")):
                    rules.append("-D " + line[3:])
            if script:
                _run(str(restore), "-w", "--noflush", input="\n".join(script) + "\n", env=env)

    def _remove_cgroups(self) -> None:
        if not self._cgroups_made:
            return
        for h in _cgroup_hierarchies():
            top = h / CGROUP_ROOT
            if not top.is_dir():
                continue
            dirs = sorted((Path(d) for d, _, _ in os.walk(top)),
                          key=lambda p: len(p.parts), reverse=True)
            for d in dirs:
                for _ in range(50):  # a cgroup empties a moment after its last task died
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
                else:
                    raise NodeError(f"cgroup {d} cannot be removed")
        self._cgroups_made = False

    def _remove_host_paths(self) -> None:
        """What appeared under :data:`HOST_PATHS` since start (all of a directory that
        appeared, unless another runtime started meanwhile and bound sockets there)."""
        before = set(self._host_before.paths) if self._host_before else set()

        def remove(q: Path) -> None:
            if q.is_symlink() or not q.is_dir():
                q.unlink(missing_ok=True)
            elif not _sockets_under(q):
                shutil.rmtree(q, ignore_errors=True)

        for top in HOST_PATHS:
            if not (top.exists() or top.is_symlink()):
                continue
            if str(top) not in before:
                remove(top)
                continue
            for d, dirs, files in os.walk(top):
                for name in files:
                    if os.path.join(d, name) not in before:
                        remove(Path(d) / name)
                for name in list(dirs):
                    if os.path.join(d, name) not in before:
                        remove(Path(d) / name)
                        dirs.remove(name)

    # -- helpers --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return _tool_env(self.bin_dir)

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", self.name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conds = json.loads(out.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _http_ok(url: str) -> bool:
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
        return bool(r.status == 200)
    return False


def _cert_kubeconfig(server: str, ca: Path, crt: Path, key: Path) -> str:
    cfg = json.loads(kubeconfig_yaml(server, ca, "", "node"))
    cfg["users"] = [{"name": "node", "user": {"client-certificate": str(crt),
                                              "client-key": str(key)}}]
    return json.dumps(cfg, indent=1)


def reclaim(assets: Path) -> bool:
    """Remove what a real node killed without its teardown (SIGKILL, a crash) left behind:
    its containers and shims, mounts and files under its work directories, interfaces,
    routes, iptables chains, cgroups, and the sysctls it recorded. Refuses while a kubelet
    of ``assets`` runs (a live node). Whether there was anything to reclaim."""
    tmp = Path(tempfile.gettempdir())
    workdirs = sorted(tmp.glob("autoglm-node-*"))
    workdirs = [d for d in workdirs if d.is_dir()]
    leftovers = (workdirs or SYSCTL_STATE.exists() or
                 Path(f"/sys/class/net/{HOST_IF}").exists() or
                 any((h / CGROUP_ROOT).exists() for h in _cgroup_hierarchies()))
    if not leftovers:
        return False
    if _pids_running(str(assets / "bin" / "kubelet")):
        raise NodeError("a real node runs on this machine already (its kubelet is alive)")
    errors: list[str] = []
    now = host_state(assets)
    # what the teardown below may unmount: the leftovers' mounts and pod netns pins (a pod's
    # namespace holds an address of POD_CIDR), not other runtimes' namespaces
    ours = [str(d) for d in workdirs]
    for name in now.netns:
        addrs = _run("ip", "-n", name, "-o", "-4", "addr", "show", check=False).stdout
        if f" {POD_CIDR.rsplit('.', 1)[0]}." in addrs:
            ours += [f"/run/netns/{name}", f"/var/run/netns/{name}"]
    now.mounts = [m for m in now.mounts
                  if not any(m.startswith((o + " ", o + "/")) for o in ours)]
    now.paths = [p for p in now.paths if p not in _leftover_paths(workdirs, ours)]
    for d in workdirs or [tmp / "autoglm-node-none"]:
        node = RealNode.__new__(RealNode)  # only its teardown: no control plane needed
        node.assets, node.workdir, node._procs = assets, d, []
        node._host_before, node._cgroups_made = now, True
        try:
            node.stop()
        except NodeError as e:
            errors.append(str(e))
    net = NodeNetwork(assets)
    net._guard = True
    net._links = [HOST_IF] if Path(f"/sys/class/net/{HOST_IF}").exists() else []
    routes = _run("ip", "route", "show", GUARDED_RANGE, "type", "blackhole").stdout
    net._routes = [["blackhole", GUARDED_RANGE]] if routes.strip() else []
    if SYSCTL_STATE.exists():
        with contextlib.suppress(ValueError):
            net._saved_sysctls = json.loads(SYSCTL_STATE.read_text())
    try:
        net.down()
    except NodeError as e:
        # the guard chain may be gone already (that step alone failing is fine)
        errors += [m for m in str(e).split("; ") if GUARD_CHAIN not in m]
    SYSCTL_STATE.unlink(missing_ok=True)
    with contextlib.suppress(NodeError):
        _drop_empty_xtables(assets / "bin")
    if errors:
        raise NodeError("reclaiming a killed node's leftovers: " + "; ".join(errors))
    return True


# -- the whole ------------------------------------------------------------------------------

@dataclass
class RealCluster:
    """A :class:`NodeNetwork`, a control plane on :data:`NODE_IP` (with ``kwok_nodes`` fake
    nodes beside the real one) and a :class:`RealNode`; :meth:`stop` undoes all three."""

    k8s_assets: Path
    node_assets: Path
    kwok_nodes: int = 0
    network: NodeNetwork = field(init=False)
    control_plane: ControlPlane = field(init=False)
    node: RealNode = field(init=False)
    startup_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.network = NodeNetwork(self.node_assets)
        self.control_plane = ControlPlane(self.k8s_assets, nodes=self.kwok_nodes,
                                          address=NODE_IP)
        self.node = RealNode(self.node_assets, self.control_plane)

    def __enter__(self) -> RealCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        reclaim(self.node_assets)
        try:
            self.network.up()
            self.control_plane.start()
            self.node.start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        errors = []
        for step in (self.node.stop, self.control_plane.stop, self.network.down):
            try:
                step()
            except Exception as e:
                errors.append(str(e))
        if errors:
            raise NodeError("; ".join(errors))

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, input=input, check=check)

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, port: int,
                     timeout: float = 30.0) -> Iterator[int]:
        """``kubectl port-forward`` of ``target`` (``pod/x``, ``service/y``) ``port`` to a
        free local port on 127.0.0.1; yields that port once it accepts connections."""
        local = free_port()
        cp = self.control_plane
        log = (self.node.workdir / f"port-forward-{local}.log").open("wb")
        proc = spawn([str(cp.bin_dir / "kubectl"), f"--kubeconfig={cp.kubeconfig}",
                      "port-forward", "-n", namespace, target, f"{local}:{port}"], log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise NodeError(f"kubectl port-forward exited {proc.returncode}: " +
                                    Path(log.name).read_text(errors="replace"))
                with contextlib.suppress(OSError), \
                        socket.create_connection(("127.0.0.1", local), timeout=1):
                    break
                if time.monotonic() > deadline:
                    raise NodeError(f"kubectl port-forward {target} {port}: no listener")
                time.sleep(0.1)
            yield local
        finally:
            terminate(proc, timeout=5)
            log.close()


@contextlib.contextmanager
def real_cluster(kwok_nodes: int = 0) -> Iterator[RealCluster]:
    """Provision (build what is missing) and run a :class:`RealCluster`."""
    from autoglm.testing.controlplane import provision_assets

    with RealCluster(provision_assets(), provision_node_assets(), kwok_nodes) as c:
        yield c
