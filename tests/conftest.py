"""Shared fixtures: the real Kubernetes control plane (marker ``k8s``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch
from kubernetes import client, config

from autoglm.testing.controlplane import ControlPlane, ControlPlaneError, provision_assets

# One torch thread in the test process: the servers the tests start share the same 2 cores,
# and torch's second thread spinning against them made small in-process models 20x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok nodes, for the session.

    A failure to provision or start it fails the tests that need it, with the reason: it
    never skips (the suite must not pass without having run them).
    """
    try:
        cp = ControlPlane(provision_assets())
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(f"Kubernetes control plane unavailable: {e}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin client (group system:masters)."""
    c = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)
