"""The gateway's check of KServe v2 ``infer`` bodies before they reach Triton."""

from __future__ import annotations

import json

import pytest

from autoglm.gateway.infer_check import infer_refusal


def body(*inputs: dict[str, object]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def ids(shape: list[object], data: list[object], **extra: object) -> dict[str, object]:
    return {"name": "INPUT_IDS", "shape": shape, "datatype": "INT64", "data": data, **extra}


@pytest.mark.parametrize("raw", [
    body(ids([1, 3], [1, 2, 3])),
    body(ids([1, 0], [])),
    body(ids([-1, 3], [1, 2, 3])),  # Triton refuses negative dimensions itself
    body(ids(["x"], [1])),  # so it does non-integers
    body({"name": "INPUT_IDS", "shape": [1, 10**12], "datatype": "INT64",
          "parameters": {"binary_data_size": 8}}),  # Triton checks binary sizes first
    b"[]", b"{}", b'{"inputs": 3}', b'{"inputs": [1, "a"]}',
])
def test_forwarded(raw: bytes) -> None:
    assert infer_refusal(raw, None) is None


def test_a_shape_larger_than_the_body_is_refused() -> None:
    why = infer_refusal(body(ids([1, 10**12], [1])), None)
    assert why is not None and "1000000000000 elements" in why
    # as many elements as the body has bytes is possible; one more is not
    raw = body(ids([1, 1], [1]))
    assert infer_refusal(raw.replace(b"[1, 1]", b"[1, %d]" % len(raw)), None) is None
    raw = raw.replace(b"[1, 1]", b"[1, %d]" % (len(raw) + 10))
    assert infer_refusal(raw, None) is not None


def test_duplicate_keys_are_refused() -> None:
    # rapidjson (Triton) reads the first "shape", Python the last: they must not disagree
    raw = b'{"inputs": [{"name": "X", "shape": [1000000000000], "shape": [1], "data": [1]}]}'
    assert infer_refusal(raw, None) == "the request's JSON repeats the key 'shape'"


@pytest.mark.parametrize(("raw", "why"), [
    (b"{", "does not parse"),
    (b'{"inputs": [{"name": "\xff"}]}', "does not parse"),
])
def test_unreadable_json_is_refused(raw: bytes, why: str) -> None:
    refusal = infer_refusal(raw, None)
    assert refusal is not None and why in refusal


def test_binary_requests_check_their_json_header() -> None:
    head = body(ids([1, 10**9], [1]))
    raw = head + b"\0" * 16
    assert infer_refusal(raw, str(len(head))) is not None
    ok = body({"name": "INPUT_IDS", "shape": [1, 2], "datatype": "INT64",
               "parameters": {"binary_data_size": 16}})
    assert infer_refusal(ok + b"\0" * 16, str(len(ok))) is None
    assert infer_refusal(ok, "abc") == "Inference-Header-Content-Length is not a byte count: 'abc'"
    assert "must be in (0," in (infer_refusal(ok, str(len(ok) + 1)) or "")
    assert "must be in (0," in (infer_refusal(ok, "0") or "")
