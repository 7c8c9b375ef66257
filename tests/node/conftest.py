"""Fixtures for tests on the real node (marker ``node``): one cluster per session.

The cluster (a control plane on the node's address plus containerd, kubelet, kube-proxy and
CoreDNS) starts on first use; a test may stop it to check what teardown leaves (the next
test starts it again, a warm start of seconds). A node that cannot be provisioned or
started (not root, say) fails the tests that need it, with the reason; outside CI they can
be skipped by ``AUTOGLM_SKIP_NODE_TESTS=1``, and the skip says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from autoglm.testing import unavailable as fail_or_opt_out
from autoglm.testing.controlplane import ControlPlaneError, provision_assets
from autoglm.testing.node import (
    HostState,
    RealCluster,
    host_state,
    preflight,
    provision_node_assets,
)


def unavailable(why: str) -> NoReturn:
    fail_or_opt_out("real node", why)


class NodeClusterHolder:
    """The session's :class:`RealCluster`, started on demand, and the host's state from
    before its first start (what every stop must return to)."""

    def __init__(self, k8s_assets: Path, node_assets: Path) -> None:
        self.k8s_assets, self.node_assets = k8s_assets, node_assets
        self.cluster: RealCluster | None = None
        self.before: HostState | None = None
        self.starts: list[float] = []

    def snapshot(self) -> HostState:
        return host_state(self.node_assets)

    def ensure(self) -> RealCluster:
        if self.cluster is None:
            if self.before is None:
                self.before = self.snapshot()
            cluster = RealCluster(self.k8s_assets, self.node_assets)
            t0 = time.monotonic()
            try:
                cluster.start()
            except ControlPlaneError as e:
                unavailable(str(e))
            self.starts.append(time.monotonic() - t0)
            mem = cluster.node.memory_rss()
            cp_mem = cluster.control_plane.memory_rss()
            print(f"\nreal cluster started in {self.starts[-1]:.1f} s (node "
                  f"{cluster.node.startup_seconds:.1f} s); node RSS "
                  f"{sum(mem.values()) / 2**20:.0f} MiB "
                  f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in mem.items())}); "
                  f"control plane RSS {sum(cp_mem.values()) / 2**20:.0f} MiB",
                  file=sys.stderr)
            self.cluster = cluster
        return self.cluster

    def stop(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.stop()


@pytest.fixture(scope="session")
def node_holder() -> Iterator[NodeClusterHolder]:
    why = preflight()
    if why:
        unavailable("; ".join(why))
    try:
        holder = NodeClusterHolder(provision_assets(), provision_node_assets())
    except ControlPlaneError as e:
        unavailable(str(e))
    try:
        yield holder
    finally:
        holder.stop()


@pytest.fixture
def real_cluster(node_holder: NodeClusterHolder) -> RealCluster:
    """The session's real cluster (started if it is not running)."""
    return node_holder.ensure()
