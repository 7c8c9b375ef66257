"""The canary check of a router, over the KServe v2 HTTP protocol (no client library).

A request to the router without ``INPUT_IDS`` runs the version's canary input and returns,
beside the logits, the output the single-process reference forward gave at build time
(``CANARY_EXPECTED``). The router passes when the version that answered is the one asked
for and the logits match within tolerance. Anything that is not an answer (refused
connection, timeout, an error response while servers settle) is "no answer yet", so the
swap waits for one until its timeout rather than failing a version on a transient error.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

from autoglm.plan import generate_model, router_model

TOLERANCE = 1e-4


def check(url: str, version: int, timeout: float = 10.0,
          tolerance: float = TOLERANCE) -> tuple[bool | None, str]:
    """(True, detail) pass, (False, detail) mismatch, (None, detail) no answer yet."""
    body = json.dumps({"inputs": [], "outputs": [
        {"name": n} for n in ("LOGITS", "MODEL_VERSION", "CANARY_EXPECTED")]}).encode()
    req = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{router_model()}/versions/{version}/infer",
        data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return None, f"{url} answered {e.code}: {e.read().decode(errors='replace')[:200]}"
    except (OSError, ValueError) as e:
        return None, f"{url}: {e}"
    out = {o["name"]: o["data"] for o in answer.get("outputs", [])}
    if not {"LOGITS", "MODEL_VERSION", "CANARY_EXPECTED"} <= out.keys():
        return None, f"{url}: incomplete answer (outputs {sorted(out)})"
    served = int(out["MODEL_VERSION"][0])
    got, want = out["LOGITS"], out["CANARY_EXPECTED"]
    if len(got) != len(want):
        return False, f"version {served} answered {len(got)} values, expected {len(want)}"
    err = max((abs(g - w) for g, w in zip(got, want, strict=True)), default=0.0)
    ok = served == version and all(
        math.isclose(g, w, rel_tol=tolerance, abs_tol=tolerance)
        for g, w in zip(got, want, strict=True))
    detail = f"version {served} answered, max abs error {err:.3g}"
    if not ok:
        return ok, detail
    greedy, more = check_generation(url, version, timeout)
    return greedy, f"{detail}; {more}"


def check_generation(url: str, version: int, timeout: float = 10.0,
                     ) -> tuple[bool | None, str]:
    """The version's stored prompt, generated greedily through its ``generate`` model, must
    give the reference's tokens. A version without one (no tokenizer) passes on logits."""
    body = json.dumps({"parameters": {"canary": True}}).encode()
    req = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{generate_model()}/versions/{version}/generate_stream",
        data=body, headers={"Content-Type": "application/json"})
    tokens: list[int] = []
    expected: list[int] | None = None
    served = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line.removeprefix("data:"))
                if "error" in event:
                    return None, f"{url}: generation canary: {event['error']}"
                ids = event.get("output_ids", [])
                tokens += ids if isinstance(ids, list) else [ids]
                served = int(event.get("model_version", -1))
                if "canary_expected" in event:
                    exp = event["canary_expected"]
                    expected = exp if isinstance(exp, list) else [exp]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return True, "no generate model: logits only"
        return None, f"{url} answered {e.code}: {e.read().decode(errors='replace')[:200]}"
    except (OSError, ValueError) as e:
        return None, f"{url}: generation canary: {e}"
    if expected is None:
        return None, f"{url}: generation canary: incomplete answer"
    if served != version or tokens != expected:
        return False, f"version {served} generated {tokens}, expected {expected}"
    return True, f"greedy tokens equal ({len(tokens)})"
