"""The MoE model, its deterministic build, and the endpoint balancer (pure, no servers)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.endpoints import Balancer, NoReplica, Resolver
from autoglm.moe import PRESETS, MoEConfig, build_model, route
from autoglm.repository import build, load_canary, load_reference, pinned_config, to_pbtxt


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_versions_coexist(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"]
    a, b = tmp_path / "a", tmp_path / "b"
    build(a, "tiny-moe", 1, cfg)
    build(b, "tiny-moe", 1, cfg)
    build(a, "tiny-moe", 2, cfg)
    assert not build(a, "tiny-moe", 1, cfg).created, "an existing version is kept"
    for part in ("router", "expert_0", "expert_3"):
        w1 = f"{part}/1/weights.pt"
        assert digest(a / w1) == digest(b / w1), "same (name, version), same weights"
        assert digest(a / w1) != digest(a / f"{part}/2/weights.pt")
        assert (a / part / "config.pbtxt").exists()
    assert pinned_config(a, "expert_2", 1)["version_policy"] == {"specific": {"versions": [1]}}
    assert 'backend: "python"' in to_pbtxt(pinned_config(a, "router", 2))
    assert not list(a.glob("*/.*")), "no half-written version folders"


def test_reference_from_stored_weights_reproduces_the_canary(tmp_path: Path) -> None:
    build(tmp_path, "tiny-moe", 3, PRESETS["tiny"])
    ids, expected = load_canary(tmp_path, 3)
    got = load_reference(tmp_path, 3)(torch.from_numpy(ids)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_gate_selects_top_k_with_renormalized_weights() -> None:
    cfg = MoEConfig(num_experts=6, top_k=3)
    model = build_model(cfg, "m", 1)
    x = torch.randn(10, cfg.d_model)
    _, idx, w = route(model.router, 0, x)
    assert idx.shape == (10, 3) and len({tuple(sorted(r)) for r in idx.tolist()}) > 1
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    # each expert receives exactly its tokens
    sent: dict[int, int] = {}

    def fanout(layer: int, sends: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        for e, h in sends.items():
            sent[e] = sent.get(e, 0) + h.shape[0]
        return model.local_fanout(layer, sends)

    from autoglm.moe import disaggregated_forward
    disaggregated_forward(model.router, torch.randint(0, cfg.vocab_size, (2, 5)), fanout)
    assert sum(sent.values()) == cfg.layers * 2 * 5 * cfg.top_k


def test_balancer_prefers_least_outstanding_and_skips_failed() -> None:
    now = [0.0]
    closed: list[str] = []
    b: Balancer[str] = Balancer(lambda a: f"ch:{a}", closed.append, penalty_seconds=2,
                                clock=lambda: now[0])
    b.update({0: ["r1", "r2"]})
    first = b.acquire(0)
    second = b.acquire(0)
    assert {first.address, second.address} == {"r1", "r2"}, "spread while both busy"
    b.release(first)
    assert b.acquire(0).address == first.address, "the idle one wins"
    b.release(second, failed=True)
    b.release(first)
    assert b.acquire(0).address == first.address, "a failed replica rests a while"
    now[0] = 3.0
    b.update({0: ["r1", "r3"]})
    assert closed == ["ch:r2"] and b.addresses(0) == ["r1", "r3"]
    with pytest.raises(NoReplica):
        b.acquire(1)


def test_resolver_reads_static_lists_and_files(tmp_path: Path) -> None:
    assert Resolver(["a:1|b:2", "c:3"]).resolve() == {0: ["a:1", "b:2"], 1: ["c:3"]}
    assert Resolver(["dns:///localhost:8001"]).resolve()[0]
    f = tmp_path / "endpoints.json"
    f.write_text('{"0": ["x:1"], "1": []}')
    r = Resolver(file=f)
    assert r.resolve() == {0: ["x:1"], 1: []}
    f.write_text("{broken")
    assert r.resolve() == {0: ["x:1"], 1: []}, "keeps the last good view"
