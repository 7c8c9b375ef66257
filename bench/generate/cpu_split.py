"""Where a generation step's CPU goes: AutoGLM (router + expert servers of ``--per-server``
experts + gateway) at concurrency C against transformers' batched ``generate`` on the same
``bench`` checkpoint.

Three figures, measured in the same run:

1. transformers' step: one batched ``generate`` of C prompts, wall time per step;
2. AutoGLM's step: C streamed generations through the gateway, wall time per step and the
   CPU seconds each kind of process used (from /proc), per step;
3. one expert server call in isolation (sequential calls carrying C*top_k/num_experts tokens
   for each expert the server holds, what a decode step sends it on average): CPU of the
   caller, of tritonserver and of the Python backend stub, per call. Times the calls one step
   makes (MoE layers x servers, the router's own count of calls per step), that is the CPU a
   step spends on the fan-out — on this machine's cores, a lower bound of a step's wall
   time.

Printed as ratios to transformers' step.

    .venv/bin/python bench/generate/cpu_split.py [--concurrency 32] [--per-server 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg

from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS

TICK = os.sysconf("SC_CLK_TCK")


def kind(cmdline: str) -> str | None:
    if "triton_python_backend_stub" in cmdline:
        model = Path(cmdline.split()[1]).parent.parent.name
        return "stub " + model
    if "tritonserver" in cmdline:
        return "tritonserver"
    return None


def cpu_by_pid() -> dict[int, tuple[float, str]]:
    """pid → (CPU seconds so far, the process's kind); this process is "bench+gateway"."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        k = "bench+gateway" if int(p.name) == os.getpid() else kind(cmd)
        if k is not None:
            out[int(p.name)] = ((int(fields[11]) + int(fields[12])) / TICK, k)
    return out


def cpu_spent(before: dict[int, tuple[float, str]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (cpu, k) in cpu_by_pid().items():
        spent[k] = spent.get(k, 0.0) + cpu - before.get(pid, (0.0, k))[0]
    return spent


def isolated_call(plane: DataPlane, d_model: int, tokens: int,
                  calls: int = 400) -> tuple[dict[str, float], list[int]]:
    """CPU ms per call to one expert server (rows for each expert it holds, ``tokens``
    each), by process kind; and the experts the call carried."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    first = plane.expert_servers[0]
    held = sorted(first.held)
    client = InferenceServerClient(first.server.grpc_url)
    h = np.random.default_rng(0).random((tokens * len(held), d_model), dtype=np.float32)
    arrays = [("LAYER", np.zeros(1, dtype=np.int32)), ("EXPERTS", np.array(held, np.int32)),
              ("COUNTS", np.full(len(held), tokens, np.int32)), ("HIDDEN", h)]
    inputs = []
    for name, a in arrays:
        i = InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    for _ in range(50):
        client.infer("experts", inputs)
    before = cpu_by_pid()
    me = time.process_time()
    for _ in range(calls):
        client.infer("experts", inputs)
    spent = cpu_spent(before)
    client.close()
    out = {"caller (tritonclient)": (time.process_time() - me) / calls * 1e3}
    # the other servers idle: what their processes spent is noise next to this server's
    for k in ("tritonserver", "stub experts"):
        out[k] = spent[k] / calls * 1e3
    return out, held


def calls_per_step(plane: DataPlane) -> float:
    """The router's own count: expert server calls / engine steps, since it started."""
    import re
    import urllib.request

    assert plane.router is not None
    text = urllib.request.urlopen(plane.router.metrics_url, timeout=5).read().decode()

    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return total("autoglm_expert_server_calls_total") / max(
        total("autoglm_generate_steps_total"), 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--per-server", type=int, default=4,
                    help="experts per expert server (1: a server per expert)")
    args = ap.parse_args()
    c = args.concurrency
    torch.set_num_threads(int(os.environ.get("AUTOGLM_BENCH_THREADS", "2")))
    spec = PRESETS["bench"]
    prompts = bg.bench_prompts(c)
    steps = bg.NEW_TOKENS  # the prefill step makes the first token
    per_expert = max(1, c * spec.top_k // spec.num_experts)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-split-") as tmp, \
            bg.served(Path(tmp), args.per_server) as (src, plane, port):
        hf, _ = bg.transformers_form(src)
        ours, _ = bg.autoglm_form(port)
        hf(prompts), ours(prompts)  # warm
        base = hf(prompts).seconds / steps
        before = cpu_by_pid()
        run = ours(prompts)
        spent = cpu_spent(before)
        step = run.seconds / steps
        time.sleep(1.0)  # the router's counters reach Triton
        calls = calls_per_step(plane)
        servers = len(plane.expert_servers)
        per_call, held = isolated_call(plane, spec.d_model, per_expert)
    print(f"concurrency {c}; {servers} expert servers of up to {args.per_server} experts; "
          f"ratios to transformers' batched step ({base * 1e3:.1f} ms)")
    print(f"AutoGLM step (wall)                      {step * 1e3:7.1f} ms {step / base:6.2f}x")
    print("AutoGLM CPU per step, by process:")
    for k, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<38} {s / steps * 1e3:7.1f} ms {s / steps / base:6.2f}x")
    total = sum(per_call.values())
    print(f"one expert server call in isolation, CPU ({per_expert} tokens for each of "
          f"experts {held}):")
    for k, ms in per_call.items():
        print(f"  {k:<38} {ms:7.2f} ms")
    floor = total * calls / 1e3
    print(f"fan-out CPU per step, {calls:.1f} calls (router's count; at most "
          f"{spec.layers} layers x {servers} servers) {floor * 1e3:7.1f} ms {floor / base:6.2f}x")
    cores = os.cpu_count() or 1
    print(f"  over {cores} cores, a step's wall-time floor  {floor / cores * 1e3:7.1f} ms"
          f" {floor / cores / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
