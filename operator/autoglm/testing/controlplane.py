"""A real Kubernetes control plane on loopback, for tests and benchmarks.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, as controller-runtime's
envtest runs them, plus kwok, whose fake nodes turn scheduled pods Running and Ready, so
Deployments become available and EndpointSlices list their pods. Pods can ask kwok to fail
instead (see :data:`BEHAVIOUR_LABEL`, :data:`NEVER_READY_VERSION`, :data:`CRASH_LOOP_VERSION`).

The apiserver authenticates a static admin token (group ``system:masters``) and
ServiceAccount tokens it signs itself, and authorizes with ``Node,RBAC``, so RBAC bugs show.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from autoglm.procs import free_port, group_rss_bytes, spawn, terminate

REPO_ROOT = Path(__file__).resolve().parents[3]
ASSETS_SCRIPT = REPO_ROOT / ".ci" / "k8s-assets.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
            "kwok")

# The cluster's addresses, all inside 198.18.0.0/15 (RFC 2544's benchmarking range, used on no
# network here) so that nothing kube-proxy programs can route off the machine: Services,
# kwok's pods and nodes, and (autoglm.testing.node) the real node's pods and address.
GUARDED_RANGE = "198.18.0.0/15"
SERVICE_CIDR = "198.19.0.0/16"
KUBERNETES_SERVICE_IP = "198.19.0.1"  # the first address of SERVICE_CIDR
KWOK_POD_CIDR = "198.18.128.0/18"
KWOK_NODE_IP = "198.18.192.1"

# What each fake node advertises: enough for the tiny example and for GPU-requesting pods.
NODE_CAPACITY = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "8"}

# Failures kwok simulates, for tests of the paths that must handle them (the swap's aborts).
# A pod labelled BEHAVIOUR_LABEL=NEVER_READY runs but its containers never become ready; one
# labelled BEHAVIOUR_LABEL=CRASH_LOOP crash-loops (waiting in CrashLoopBackOff, last exit 1,
# restartCount growing every CRASH_LOOP_RESTART_MS). The operator writes its pods' labels
# itself, so tests pick a failure through what they do control, spec.model.version: these two
# versions are reserved for it. Every other pod becomes Running and Ready as kwok's default.
BEHAVIOUR_LABEL = "autoglm.io/test-behaviour"
NEVER_READY = "never-ready"
CRASH_LOOP = "crash-loop"
VERSION_LABEL = "autoglm.io/model-version"
NEVER_READY_VERSION = 13
CRASH_LOOP_VERSION = 14
CRASH_LOOP_RESTART_MS = 2000
# The crash-looping containers' last termination message, as `autoglm triton-serve` writes
# one when its model does not load (what the operator puts in a failed swap's reason).
CRASH_LOOP_MESSAGE = "kwok crash-loop: the server exited with status 1"
# An expert server of version DOES_NOT_FIT_VERSION that holds more than one expert refuses
# them as one whose memory limit has room for one (backends/expect.check_fits); holding one,
# it serves.
DOES_NOT_FIT = "does-not-fit"
DOES_NOT_FIT_VERSION = 15
DOES_NOT_FIT_MESSAGE = (
    f"experts v{DOES_NOT_FIT_VERSION}: the 2 experts assigned to this server need 24 MiB "
    "(12.0 MiB each) but its memory limit of 1024 MiB, 1000 MiB in use, leaves room for 1: "
    "set spec.experts.perServer to at most 1 or raise spec.experts.resources.limits.memory")


class ControlPlaneError(RuntimeError):
    """The control plane could not be provisioned or started; the message says why."""


def provision_assets() -> Path:
    """The directory holding the pinned binaries, building what is missing.

    ``$AUTOGLM_K8S_ASSETS`` (set by ``make test`` after it ran the script) short-cuts the
    script; otherwise ``.ci/k8s-assets.sh`` honours ``$KUBEBUILDER_ASSETS`` and its cache.
    """
    given = os.environ.get("AUTOGLM_K8S_ASSETS")
    if given:
        bin_dir = Path(given)
    else:
        if not ASSETS_SCRIPT.exists():
            raise ControlPlaneError(f"provisioning script not found: {ASSETS_SCRIPT}")
        proc = subprocess.run(
            ["bash", str(ASSETS_SCRIPT)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-30:])
            raise ControlPlaneError(
                f"{ASSETS_SCRIPT} failed (exit {proc.returncode}):\n{tail}"
            )
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"missing control-plane binaries in {bin_dir}: {missing}")
    return bin_dir


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def issue_cert(pki: Path, name: str, common_name: str, organizations: tuple[str, ...] = (),
               ips: tuple[str, ...] = (), dns: tuple[str, ...] = (),
               server: bool = False, out_dir: Path | None = None) -> tuple[Path, Path]:
    """A certificate signed by the test CA in ``pki``, written as ``name``.crt/.key into
    ``out_dir`` (default ``pki``): a client certificate (the apiserver maps CN to the user,
    O to groups) or, with ``server``, a serving one for ``ips`` and ``dns``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out = out_dir or pki
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(_pem_key(key))
    return out / f"{name}.crt", out / f"{name}.key"


def _write_pki(d: Path, address: str) -> None:
    """A CA, a serving certificate for ``address``/localhost/the ``kubernetes`` Service, the
    apiserver's client certificate for kubelets and a ServiceAccount signing key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    pem_key = _pem_key
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autoglm-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                  "kubernetes.default.svc",
                                  "kubernetes.default.svc.cluster.local")
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(a))
             for a in sorted({"127.0.0.1", KUBERNETES_SERVICE_IP, address})]
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "ca.key").write_bytes(pem_key(ca_key))
    (d / "apiserver.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.key").write_bytes(pem_key(srv_key))
    (d / "sa.key").write_bytes(pem_key(sa_key))
    # what the apiserver presents to kubelets (exec, logs, port-forward): system:masters
    issue_cert(d, "apiserver-kubelet-client", "kube-apiserver-kubelet-client",
               ("system:masters",))


def kubeconfig_yaml(server: str, ca_file: Path, token: str, user: str = "admin") -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "autoglm-test",
                 "cluster": {"server": server, "certificate-authority": str(ca_file)}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": "autoglm-test", "context": {"cluster": "autoglm-test", "user": user}}
            ],
            "current-context": "autoglm-test",
        },
        indent=1,
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


class Daemons:
    """Named daemons started from ``bin_dir``, each logging to ``workdir/<name>.log``, and
    waiting on a condition while checking they still run; errors are ``error``s quoting
    their logs' tails. For the test cluster's control plane and its real node."""

    workdir: Path
    _procs: list[Proc]
    error: ClassVar[type[Exception]]
    exit_tail: ClassVar[int] = 20  # log lines quoted when a daemon exited
    timeout_tail: ClassVar[int] = 0  # ... of each daemon when a wait timed out

    if TYPE_CHECKING:  # a field of one subclass, a property of the other
        @property
        def bin_dir(self) -> Path: ...

    def logs(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None,
               ) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self._procs.append(Proc(name, spawn([str(self.bin_dir / name), *args], log, env), log))

    def _check_alive(self) -> None:
        for p in self._procs:
            if p.popen.poll() is not None:
                tail = "\n".join(self.logs(p.name).splitlines()[-self.exit_tail:])
                raise self.error(f"{p.name} exited with {p.popen.returncode}:\n{tail}")

    def _until(self, deadline: float, what: str, ok: Callable[[], bool]) -> None:
        while True:
            self._check_alive()
            if ok():
                return
            if time.monotonic() > deadline:
                tails = "".join(f"\n--- {p.name}:\n" + "\n".join(
                    self.logs(p.name).splitlines()[-self.timeout_tail:])
                    for p in self._procs) if self.timeout_tail else ""
                raise self.error(f"timed out waiting for {what} (logs in {self.workdir})"
                                 f"{tails}")
            time.sleep(0.2)


@dataclass
class ControlPlane(Daemons):
    """Start with :meth:`start` (or as a context manager); :meth:`stop` leaves nothing behind."""

    bin_dir: Path
    nodes: int = 2
    # Where kube-apiserver binds and what it advertises. Loopback for kwok-only clusters;
    # a real node (autoglm.testing.node) needs an address its pods reach through the
    # `kubernetes` Service, so the endpoint reconciler then runs too.
    address: str = "127.0.0.1"
    node_capacity: dict[str, str] = field(default_factory=lambda: dict(NODE_CAPACITY))
    workdir: Path = field(init=False)
    server: str = field(init=False, default="")
    token: str = field(init=False, default="")
    startup_seconds: float = field(init=False, default=0.0)
    _procs: list[Proc] = field(init=False, default_factory=list)
    error: ClassVar[type[Exception]] = ControlPlaneError

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def node_names(self) -> list[str]:
        return [f"kwok-node-{i}" for i in range(self.nodes)]

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="autoglm-k8s-"))
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _start(self, timeout: float) -> None:
        w = self.workdir
        pki = w / "pki"
        pki.mkdir()
        _write_pki(pki, self.address)
        self.token = secrets.token_hex(16)
        (w / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://{self.address}:{api_port}"
        self.kubeconfig.write_text(kubeconfig_yaml(self.server, self.ca_file, self.token))
        kc = str(self.kubeconfig)
        deadline = time.monotonic() + timeout

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn("etcd", [
            "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        self._wait(f"{etcd_url}/health", "etcd", deadline)

        loopback = ipaddress.ip_address(self.address).is_loopback
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={self.address}", f"--secure-port={api_port}",
            f"--advertise-address={self.address}",
            # the kubernetes Service would point at loopback, which Endpoints reject
            *(["--endpoint-reconciler-type=none"] if loopback else []),
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={w / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ])
        self._wait(f"{self.server}/readyz", "kube-apiserver", deadline, auth=True)

        common = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                  f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                  "--leader-elect=false"]
        kcm_port, sched_port = free_port(), free_port()
        self._spawn("kube-controller-manager", [
            *common, f"--secure-port={kcm_port}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cert-dir={w / 'kcm-certs'}",
        ])
        self._spawn("kube-scheduler", [*common, f"--secure-port={sched_port}",
                                       f"--cert-dir={w / 'scheduler-certs'}"])
        stages = w / "kwok-stages.yaml"
        stages.write_text("\n---\n".join(json.dumps(st, indent=1) for st in pod_stages()))
        self._spawn("kwok", [
            f"--kubeconfig={kc}", f"--config={stages}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--manage-nodes-with-label-selector=",
            f"--cidr={KWOK_POD_CIDR}", f"--node-ip={KWOK_NODE_IP}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{free_port()}",
        ])
        self._wait(f"https://127.0.0.1:{kcm_port}/healthz", "kube-controller-manager", deadline)
        self._wait(f"https://127.0.0.1:{sched_port}/healthz", "kube-scheduler", deadline)
        if self.nodes:
            self.kubectl("apply", "-f", "-", input=json.dumps(self._nodes_manifest()))
        self._until(deadline, "kwok nodes Ready", self._nodes_ready)
        # Pods can only be admitted once the ServiceAccount controller made `default`.
        self._until(deadline, "the default ServiceAccount",
                    lambda: self.kubectl("get", "serviceaccount", "default",
                                         check=False).returncode == 0)

    def stop(self) -> None:
        """Stop every process (TERM, then KILL) and remove the working directory."""
        for p in reversed(self._procs):
            terminate(p.popen, timeout=10)
            p.log.close()
        self._procs.clear()
        if getattr(self, "workdir", None) and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}",
               *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        """A kubeconfig for another identity (e.g. a ServiceAccount token)."""
        path.write_text(kubeconfig_yaml(self.server, self.ca_file, token, user))
        return path

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    def memory_rss(self) -> dict[str, int]:
        """Resident memory of each component, in bytes."""
        return {p.name: group_rss_bytes(p.popen.pid) for p in self._procs}

    def _wait(self, url: str, what: str, deadline: float, auth: bool = False) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}

        def healthy() -> bool:
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        self._until(deadline, what, healthy)

    def _nodes_manifest(self) -> dict[str, Any]:
        def node(name: str) -> dict[str, Any]:
            return {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake",
                                    "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                               "kubernetes.io/arch": "amd64", "type": "kwok"},
                },
                "status": {"capacity": self.node_capacity, "allocatable": self.node_capacity},
            }

        return {"apiVersion": "v1", "kind": "List", "items": [node(n) for n in self.node_names]}

    def _nodes_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode != 0:
            return False
        items = json.loads(out.stdout)["items"]
        ready = [
            n for n in items
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in n.get("status", {}).get("conditions", []))
        ]
        return len(ready) >= self.nodes


# -- kwok pod stages ---------------------------------------------------------------------------
# kwok v0.7.0 replaces *all* its default pod stages (pod-ready, pod-complete, pod-delete of
# kustomize/stage/pod/fast) as soon as its --config holds one pod Stage, so the defaults are
# restated here, pod-ready narrowed to "normal" pods, beside the failure stages. Selectors
# are ANDed gojq queries; a query that yields nothing counts as absent (so NotIn matches).

# Which behaviour a pod asks for: the label wins, then the reserved versions, else "normal".
_BEHAVIOUR_QUERY = (
    f'.metadata.labels["{BEHAVIOUR_LABEL}"] // '
    f'(.metadata.labels["{VERSION_LABEL}"] as $v | '
    f'if $v == "{NEVER_READY_VERSION}" then "{NEVER_READY}" '
    f'elif $v == "{CRASH_LOOP_VERSION}" then "{CRASH_LOOP}" '
    f'elif $v == "{DOES_NOT_FIT_VERSION}" and ([.spec.containers[0].env[]? '
    f'| select(.name == "AUTOGLM_SERVER_EXPERTS") | .value] | first // "" | contains(",")) '
    f'then "{DOES_NOT_FIT}" else "normal" end)'
)

_ALIVE = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
_UNSTARTED = {"key": ".status.podIP", "operator": "DoesNotExist"}

# Go templates rendered by kwok over the pod (sprig functions available).
_ADDRESSES = """
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""  # noqa: E501

_INIT_DONE = """
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  {{ if eq .restartPolicy "Always" }}
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
  {{ else }}
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
  {{ end }}
{{ end }}
"""


def _conditions(ready: bool) -> str:
    if ready:
        status, why = '"True"', ""
    else:
        status = '"False"'
        why = ("\n  reason: ContainersNotReady\n  message: 'containers with unready status: "
               "[{{ range $root.spec.containers }}{{ .name }} {{ end }}]'")
    return f"""
conditions:
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "True"
  type: Initialized
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: {status}
  type: Ready{why}
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: {status}
  type: ContainersReady{why}
{{{{ range .spec.readinessGates }}}}
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "True"
  type: {{{{ .conditionType | Quote }}}}
{{{{ end }}}}
"""


_RUNNING_CONTAINERS = """
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: %s
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
"""

# restartCount: the first failure, or one more than the pod's status says.
_CRASHED_TEMPLATE = """
containerStatuses:
{{ range $index, $c := .spec.containers }}
- image: {{ $c.image | Quote }}
  name: {{ $c.name | Quote }}
  ready: false
  restartCount: %s
  started: false
  state:
    waiting:
      reason: CrashLoopBackOff
      message: {{ printf "back-off restarting failed container=%%s pod=%%s" $c.name $root.metadata.name | Quote }}
  lastState:
    terminated:
      exitCode: 1
      reason: Error
      message: MESSAGE
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
"""  # noqa: E501

_CRASHED_CONTAINERS = _CRASHED_TEMPLATE.replace("MESSAGE", json.dumps(CRASH_LOOP_MESSAGE))
_REFUSED_CONTAINERS = _CRASHED_TEMPLATE.replace("MESSAGE", json.dumps(DOES_NOT_FIT_MESSAGE))

_PREAMBLE = "{{ $now := Now }}\n{{ $root := . }}\n"
_RESTARTS = "{{ add1 ( index $root.status.containerStatuses $index ).restartCount }}"


def _pod_stage(name: str, match: list[dict[str, Any]], nxt: dict[str, Any],
               delay_ms: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
        "selector": {"matchExpressions": match},
        "next": nxt,
    }
    if delay_ms is not None:
        spec["delay"] = {"durationMilliseconds": delay_ms}
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage",
            "metadata": {"name": name}, "spec": spec}


def pod_stages() -> list[dict[str, Any]]:
    """kwok's default ("fast") pod stages, plus never-ready, crash-loop and does-not-fit
    pods."""
    def behaviour(op: str, *values: str) -> dict[str, Any]:
        return {"key": _BEHAVIOUR_QUERY, "operator": op, "values": list(values)}

    back_off = {"type": "Warning", "reason": "BackOff",
                "message": "Back-off restarting failed container"}
    failing = (NEVER_READY, CRASH_LOOP, DOES_NOT_FIT)
    crashing = []
    for kind, containers in ((CRASH_LOOP, _CRASHED_CONTAINERS),
                             (DOES_NOT_FIT, _REFUSED_CONTAINERS)):
        crashing += [
            _pod_stage(f"pod-{kind}", [_ALIVE, _UNSTARTED, behaviour("In", kind)],
                       {"event": back_off,
                        "statusTemplate": _PREAMBLE + _conditions(False)
                        + containers % "1" + _INIT_DONE + _ADDRESSES}),
            # matches its own result again, so the pod keeps "restarting" until deleted
            _pod_stage(f"pod-{kind}-restart",
                       [_ALIVE, behaviour("In", kind),
                        {"key": ".status.podIP", "operator": "Exists"},
                        {"key": ".status.containerStatuses.[].state.waiting.reason",
                         "operator": "In", "values": ["CrashLoopBackOff"]}],
                       {"event": back_off,
                        "statusTemplate": _PREAMBLE + containers % _RESTARTS},
                       delay_ms=CRASH_LOOP_RESTART_MS)]
    return [
        _pod_stage("pod-ready", [_ALIVE, _UNSTARTED, behaviour("NotIn", *failing)],
                   {"statusTemplate": _PREAMBLE + _conditions(True)
                    + _RUNNING_CONTAINERS % "true" + _INIT_DONE + _ADDRESSES}),
        _pod_stage("pod-never-ready", [_ALIVE, _UNSTARTED, behaviour("In", NEVER_READY)],
                   {"statusTemplate": _PREAMBLE + _conditions(False)
                    + _RUNNING_CONTAINERS % "false" + _INIT_DONE + _ADDRESSES}),
        *crashing,
        _pod_stage("pod-complete",
                   [_ALIVE, {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                    {"key": ".metadata.ownerReferences.[].kind", "operator": "In",
                     "values": ["Job"]}, behaviour("NotIn", *failing)],
                   {"statusTemplate": _PREAMBLE + """
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
{{ end }}
phase: Succeeded
"""}),
        _pod_stage("pod-delete",
                   [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
                   {"finalizers": {"empty": True}, "delete": True}),
    ]
