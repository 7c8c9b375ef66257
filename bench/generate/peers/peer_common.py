"""What the peer runners and reference.py share; each runs in its own virtualenv, so only
the standard library and numpy."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_prompts(path: Path) -> list[list[int]]:
    """A JSON list of token-id lists, or {"prompts": [...]}."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data["prompts"]
    return [[int(t) for t in p] for p in data]


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile of xs, to 3 decimals; None if there is none."""
    if not xs:
        return None
    import numpy as np

    return round(float(np.percentile(xs, q)), 3)


def summary(engine: str, concurrency: int, outputs: Sequence[list[int]],
            starts: Sequence[float], times: Sequence[Sequence[float]], seconds: float,
            settings: dict[str, Any], dump: Path | None = None) -> dict[str, Any]:
    """A runner's JSON line: per request its tokens, when it was submitted and when each
    token came (TTFT from submission, ITL between consecutive tokens, in ms); ``dump``
    gets every request's tokens."""
    ttft = [(t[0] - s) * 1e3 for s, t in zip(starts, times, strict=True)]
    itl = [(b - a) * 1e3 for t in times for a, b in itertools.pairwise(t)]
    total = sum(len(o) for o in outputs)
    if dump:
        dump.write_text(json.dumps({"tokens": list(outputs)}))
    return {
        "engine": engine,
        "concurrency": concurrency,
        "tokens": total,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(total / seconds, 2),
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "first_tokens": outputs[0][:8],
        "settings": settings,
    }
