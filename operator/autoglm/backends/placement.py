"""Where a Triton model instance computes: the GPU Triton gave it, in the checkpoint's dtype
(bf16 for real checkpoints), or the CPU in fp32."""

from __future__ import annotations

from typing import Any

import torch


def placement(args: dict[str, Any]) -> tuple[str, torch.dtype | None]:
    """(device, dtype to load weights in; None keeps the checkpoint's)."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{int(args.get('model_instance_device_id', 0))}", None
    return "cpu", torch.float32
