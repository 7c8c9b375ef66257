"""What the peer runners and reference.py share; each runs in its own virtualenv, so only
the standard library and numpy."""

from __future__ import annotations

import json
from pathlib import Path


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
