"""`make demo`: a scripted tour of the local runtime that exits 0.

Starts `autoglm up` on a copy of examples/tiny.yaml, sends traffic through the gateway
with the stock Triton client, rolls to another version and back (double-buffered), scales
the experts by editing the file, and shows `autoglm status` along the way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from autoglm.testing.up import UpProcess

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="autoglm-demo-"))
    file = home / "tiny.yaml"
    shutil.copy(ROOT / "examples" / "tiny.yaml", file)
    up = UpProcess.start(file, home, echo="  [autoglm up] ")
    port = up.port

    def wait_for(text: str, since: int = 0, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not up.said(text, since):
            if up.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"demo: `autoglm up` did not say {text!r}")
            time.sleep(0.2)

    def traffic(n: int) -> None:
        rng = np.random.default_rng(n)
        t0, versions = time.monotonic(), set()
        with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
            for _ in range(n):
                ids = rng.integers(0, 256, (1, 8)).astype(np.int64)
                inp = httpclient.InferInput("INPUT_IDS", [1, 8], "INT64")
                inp.set_data_from_numpy(ids)
                versions.add(int(c.infer("router", [inp]).as_numpy("MODEL_VERSION")[0]))
        dt = time.monotonic() - t0
        print(f"demo: {n} requests in {dt:.1f} s ({n / dt:.0f}/s), all answered by "
              f"version(s) {sorted(versions)}", flush=True)

    def chat() -> None:
        body = json.dumps({"model": "tiny-moe", "stream": True, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Hi!"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        text, chunks = "", 0
        with urllib.request.urlopen(req, timeout=60) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    chunks += 1
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        print(f"demo:    {chunks} chunks: {text!r} (a tiny random model: any text)", flush=True)

    def status() -> None:
        out = subprocess.run([sys.executable, "-m", "autoglm.cli", "status", f"--home={home}"],
                             capture_output=True, text=True, check=False).stdout
        print("demo: autoglm status\n" + "".join(f"    {x}\n" for x in out.splitlines()),
              flush=True)

    try:
        print("demo: 1. start the tiny model (real Triton servers, Prometheus, gateway)")
        wait_for("serving tiny")
        print("demo: 2. traffic through the gateway with the stock tritonclient.http")
        traffic(200)
        print("demo:    a streaming chat completion through the OpenAI API (SSE):")
        chat()
        status()
        print("demo: 3. roll to version 2 by editing spec.model.version: it loads beside v1, "
              "answers the canary, then takes traffic; v1 stays warm")
        mark = len(up.lines)
        file.write_text(file.read_text().replace("version: 1", "version: 2"))
        wait_for("Flipped", since=mark)
        traffic(50)
        print("demo:    and back to version 1: the warm slot takes traffic at once")
        mark = len(up.lines)
        file.write_text(file.read_text().replace("version: 2", "version: 1"))
        wait_for("Flipped", since=mark)
        traffic(50)
        print("demo: 4. more capacity per expert: experts.minReplicas 1 -> 2")
        mark = len(up.lines)
        file.write_text(file.read_text().replace("minReplicas: 1", "minReplicas: 2"))
        wait_for("applied the change", since=mark)
        traffic(200)
        time.sleep(3)  # a few Prometheus scrapes for the loads
        status()
    finally:
        print("demo: 5. stop (Ctrl-C does the same)")
        code = up.stop()
        shutil.rmtree(home, ignore_errors=True)
    print(f"demo: done (autoglm up exited {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
