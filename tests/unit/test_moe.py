"""The built-in tiny model (a real architecture), its deterministic build, and the endpoint
balancer (pure, no servers)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.endpoints import Balancer, Resolver
from autoglm.models import layers as L
from autoglm.models.decoder import forward
from autoglm.models.tiny import PRESETS
from autoglm.repository import (
    build,
    import_checkpoint,
    load_canary,
    load_reference,
    pinned_config,
    read_meta,
    to_pbtxt,
)


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
        w1 = f"{part}/1/weights.safetensors"
        assert digest(a / w1) == digest(b / w1), "same (name, version), same weights"
        assert digest(a / w1) != digest(a / f"{part}/2/weights.safetensors")
        # Triton models have a configuration; an expert's folder holds only its weights
        assert (a / part / "config.pbtxt").exists() == (part == "router")
    assert (a / "experts" / "config.pbtxt").exists()
    assert pinned_config(a, "experts", 1)["version_policy"] == {"specific": {"versions": [1]}}
    assert 'backend: "python"' in to_pbtxt(pinned_config(a, "router", 2))
    assert not list(a.glob("*/.*")) and not list(a.glob(".*")), "no half-written folders"
    assert read_meta(a, 1)["architecture"] == "Qwen3MoeForCausalLM"


def test_reference_from_stored_weights_reproduces_the_canary(tmp_path: Path) -> None:
    build(tmp_path, "tiny-moe", 3, PRESETS["tiny"])
    ids, expected = load_canary(tmp_path, 3)
    got = load_reference(tmp_path, 3)(torch.from_numpy(ids)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_gate_routes_each_token_to_top_k_experts_and_sends_each_only_its_tokens(
        tmp_path: Path) -> None:
    cfg = replace(PRESETS["tiny"], num_experts=6, top_k=3)
    model = load_reference(build(tmp_path, "m", 1, cfg).repository, 1)
    x = torch.randn(10, cfg.d_model)
    idx, w = model.router.route(0, x)
    assert idx.shape == (10, 3) and len({tuple(sorted(r)) for r in idx.tolist()}) > 1
    torch.testing.assert_close(w.sum(-1), torch.ones(10))  # norm_topk_prob
    sent: dict[int, int] = {}

    def fanout(layer: int, sends: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        for e, h in sends.items():
            sent[e] = sent.get(e, 0) + h.shape[0]
        return model.local_fanout(layer, sends)

    _, routed = forward(model.router, torch.randint(0, cfg.vocab_size, (2, 5)), fanout)
    assert routed == sent and sum(sent.values()) == cfg.layers * 2 * 5 * cfg.top_k


def test_tiny_checkpoint_is_a_real_architecture_transformers_loads(tmp_path: Path) -> None:
    from autoglm.models.tiny import write_tiny_checkpoint
    from autoglm.testing.checkpoints import reference_model

    src = write_tiny_checkpoint(tmp_path / "ckpt", PRESETS["tiny"], "tiny-moe", 1)
    built = import_checkpoint(src, tmp_path / "repo", 1, "tiny-moe", progress=False)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 9))
    with torch.no_grad():
        want = reference_model(src)(ids).logits
    torch.testing.assert_close(load_reference(built.repository, 1)(ids), want,
                               rtol=1e-4, atol=1e-4)


def test_balancer_prefers_least_outstanding_and_skips_failed() -> None:
    now = [0.0]
    b = Balancer(penalty_seconds=2, clock=lambda: now[0])
    b.update({"r1": [0], "r2": [0]})
    first = b.assign([0])[0][0]
    second = b.assign([0])[0][0]
    assert {first.address, second.address} == {"r1", "r2"}, "spread while both busy"
    b.release(first)
    assert b.assign([0])[0][0].address == first.address, "the idle one wins"
    b.release(second, failed=True)
    b.release(first)
    assert b.assign([0])[0][0].address == first.address, "a failed server rests a while"
    now[0] = 3.0
    b.update({"r1": [0], "r3": [0, 1]})
    assert b.addresses(0) == ["r1", "r3"] and b.addresses(1) == ["r3"]
    chosen, missing = b.assign([1, 2], exclude={1: ["r3"]})
    assert chosen == {} and missing == {1: "every server reporting it failed",
                                        2: "no server reports it"}


def test_balancer_makes_one_call_per_server_per_layer() -> None:
    """The experts chosen on one server share its call: in flight once per server."""
    b = Balancer()
    b.update({"a": [0, 1, 2], "b": [2, 3], "c": [1, 3]})
    for _ in range(3):
        chosen, missing = b.assign([0, 1, 2, 3])
        assert not missing and chosen[0].address == "a"  # its only server
        servers = {s.address: s for s in chosen.values()}
        assert all(s.in_flight == 1 for s in servers.values())
        for s in servers.values():
            b.release(s)


def test_resolver_reads_static_lists_and_files(tmp_path: Path) -> None:
    assert Resolver(["a:1|b:2", "c:3", "b:2"]).resolve() == ["a:1", "b:2", "c:3"]
    assert Resolver(["dns:///localhost:8001"]).resolve()
    f = tmp_path / "endpoints.json"
    f.write_text('["y:1", "x:1"]')
    r = Resolver(file=f)
    assert r.resolve() == ["x:1", "y:1"]
    f.write_text("{broken")
    assert r.resolve() == ["x:1", "y:1"], "keeps the last good view"
    f.write_text('{"0": ["z:1"]}')
    assert r.resolve() == ["x:1", "y:1"], "not a list: keeps the last good view"


def test_resolver_keeps_the_last_answer_when_dns_gives_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A DNS timeout is not "no servers" (every expert would fail until the next answer);
    a name that no longer exists is."""
    import socket

    answers: list[Any] = [[(0, 0, 0, "", ("10.0.0.1", 8001))],
                          socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
                          socket.gaierror(socket.EAI_NONAME, "Name or service not known")]

    def getaddrinfo(*_: Any, **__: Any) -> Any:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    r = Resolver(["dns:///svc:8001"])
    assert r.resolve() == ["10.0.0.1:8001"]
    assert r.resolve() == ["10.0.0.1:8001"], "no answer now: the last one"
    assert r.resolve() == [], "no such name: none"


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
@settings(max_examples=30, deadline=None)
def test_grouped_swiglu_equals_one_swiglu_per_expert(counts: list[int]) -> None:
    """The batched layout an expert server uses on a GPU gives what the per-expert chain
    gives, whatever the group sizes (empty groups too)."""
    g = torch.Generator().manual_seed(len(counts) * 7 + sum(counts))
    d, i, k = 8, 12, len(counts)
    gate, up = torch.randn(k, i, d, generator=g), torch.randn(k, i, d, generator=g)
    down = torch.randn(k, d, i, generator=g)
    x = torch.randn(sum(counts), d, generator=g)
    chained, start = [], 0
    for e, n in enumerate(counts):
        chained.append(L.swiglu(x[start:start + n], gate[e], up[e], down[e]))
        start += n
    torch.testing.assert_close(L.grouped_swiglu(x, counts, gate, up, down),
                               torch.cat(chained), rtol=1e-5, atol=1e-5)
