"""Helpers for the processes AutoGLM starts (Triton servers, test control planes)."""

from __future__ import annotations

import signal
import socket


def die_with_parent() -> None:
    """In the child before exec: be killed if the process that started us dies, so a killed
    test run leaves no control plane behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
