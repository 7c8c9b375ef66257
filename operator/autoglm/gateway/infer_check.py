"""What the gateway checks of a KServe v2 HTTP ``infer`` request before Triton sees it.

tritonserver 2.51 sizes the buffer for an input given as JSON ``data`` from its ``shape``
before it reads the data, so ``{"shape": [1, 1000000000000], "data": [1]}`` — a 70-byte body
— aborts the whole server (``std::bad_alloc``; measured). Inputs sent as binary data or shared
memory are checked against their sizes by Triton first (measured), and so are gRPC requests.
Every JSON element takes at least one byte of the body, so an input claiming more elements
than the body has bytes cannot be right: it is refused here, as is JSON that Triton could
read differently from us (duplicate keys: rapidjson takes the first, Python the last).
"""

from __future__ import annotations

import math
from typing import Any

from autoglm.gateway.routing import parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"the request's JSON repeats the key {key!r}")
        out[key] = value
    return out


def infer_refusal(body: bytes, header_length: str | None) -> str | None:
    """Why this ``infer`` request must not reach Triton, or None to forward it as it is."""
    head = body
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            return f"{HEADER_LENGTH} is not a byte count: {header_length!r}"
        if not 0 < n <= len(body):
            return f"{HEADER_LENGTH} must be in (0, {len(body)}], got {n}"
        head = body[:n]
    try:
        request = parse_json(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        return str(e)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return f"the request's JSON does not parse: {e}"
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        if not isinstance(tensor, dict):
            continue
        params = tensor.get("parameters")
        if isinstance(params, dict) and ("binary_data_size" in params
                                         or "shared_memory_region" in params):
            continue  # Triton checks these sizes itself before it allocates
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):
            continue  # Triton refuses a shape that is not unsigned integers
        elements = math.prod(shape)
        if elements > len(body):
            return (f"input {tensor.get('name')!r} has shape {shape}: {elements} elements, "
                    f"more than a {len(body)}-byte request can carry")
    return None
