"""Where a generation step's CPU goes: AutoGLM (router + one server per expert + gateway) at
concurrency C against transformers' batched ``generate`` on the same ``bench`` checkpoint.

Three figures, measured in the same run:

1. transformers' step: one batched ``generate`` of C prompts, wall time per step;
2. AutoGLM's step: C streamed generations through the gateway, wall time per step and the
   CPU seconds each kind of process used (from /proc), per step;
3. one expert call in isolation (one expert server, sequential calls of C*top_k/num_experts
   tokens, the average a decode step sends an expert): CPU of the caller, of tritonserver and
   of the Python backend stub, per call. Times the calls one step makes (layers x experts),
   that is the CPU a step spends on the fan-out before any model math — on this machine's
   cores, a lower bound of a step's wall time.

Printed as ratios to transformers' step.

    .venv/bin/python bench/generate/cpu_split.py [--concurrency 32]
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
        return "stub " + ("expert_*" if model.startswith("expert_") else model)
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
                  calls: int = 400) -> dict[str, float]:
    """CPU ms per call to one expert server, by process kind."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    server = plane.experts[0][0]
    client = InferenceServerClient(server.grpc_url)
    h = np.random.default_rng(0).random((tokens, d_model), dtype=np.float32)
    inputs = [InferInput("LAYER", [tokens, 1], "INT32"),
              InferInput("HIDDEN", list(h.shape), "FP32")]
    inputs[0].set_data_from_numpy(np.zeros((tokens, 1), dtype=np.int32))
    inputs[1].set_data_from_numpy(h)
    for _ in range(50):
        client.infer("expert_0", inputs)
    before = cpu_by_pid()
    me = time.process_time()
    for _ in range(calls):
        client.infer("expert_0", inputs)
    spent = cpu_spent(before)
    client.close()
    out = {"caller (tritonclient)": (time.process_time() - me) / calls * 1e3}
    for k in ("tritonserver", "stub expert_*"):
        out[k] = spent[k] / calls * 1e3  # only expert 0 is busy
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    c = args.concurrency
    torch.set_num_threads(int(os.environ.get("AUTOGLM_BENCH_THREADS", "2")))
    spec = PRESETS["bench"]
    prompts = bg.bench_prompts(c)
    steps = bg.NEW_TOKENS  # the prefill step makes the first token
    per_expert = max(1, c * spec.top_k // spec.num_experts)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-split-") as tmp, \
            bg.served(Path(tmp)) as (src, plane, port):
        hf, _ = bg.transformers_form(src)
        ours, _ = bg.autoglm_form(port)
        hf(prompts), ours(prompts)  # warm
        base = hf(prompts).seconds / steps
        before = cpu_by_pid()
        run = ours(prompts)
        spent = cpu_spent(before)
        step = run.seconds / steps
        per_call = isolated_call(plane, spec.d_model, per_expert)
    calls = spec.layers * spec.num_experts
    print(f"concurrency {c}; ratios to transformers' batched step ({base * 1e3:.1f} ms)")
    print(f"AutoGLM step (wall)                      {step * 1e3:7.1f} ms {step / base:6.2f}x")
    print("AutoGLM CPU per step, by process:")
    for k, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<38} {s / steps * 1e3:7.1f} ms {s / steps / base:6.2f}x")
    total = sum(per_call.values())
    print(f"one expert call in isolation, CPU ({per_expert} tokens):")
    for k, ms in per_call.items():
        print(f"  {k:<38} {ms:7.2f} ms")
    floor = total * calls / 1e3
    print(f"fan-out CPU per step, {calls} calls        {floor * 1e3:7.1f} ms {floor / base:6.2f}x")
    cores = os.cpu_count() or 1
    print(f"  over {cores} cores, a step's wall-time floor  {floor / cores * 1e3:7.1f} ms"
          f" {floor / cores / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
