"""The pure core (DESIGN §3, §5) imports no adapter: neither our I/O modules nor the
libraries that talk to Kubernetes, Triton, Prometheus or the network, directly or through
another module of ours. Read from the source (ast), so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "autoglm"
CORE = ("spec", "plan", "swap", "autoscale", "placement")
# our adapters and I/O modules, and the libraries only adapters may use
FORBIDDEN = ("autoglm.backends", "autoglm.k8s", "autoglm.local", "autoglm.gateway",
             "autoglm.triton", "autoglm.prometheus", "autoglm.procs", "autoglm.cli",
             "kopf", "kubernetes", "aiohttp", "tritonclient", "triton_python_backend_utils",
             "prometheus_api_client", "prometheus_client", "grpc", "torch", "urllib",
             "socket", "subprocess")


def imports(module: str) -> set[str]:
    """The modules ``module`` (autoglm.X) imports, including under TYPE_CHECKING."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    source = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from autoglm import plan` imports the module autoglm.plan
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if PACKAGE.joinpath(*node.module.split(".")[1:], a.name)
                      .with_suffix(".py").exists()}
    return found


def closure(module: str) -> dict[str, str]:
    """Every module reached from ``module`` → the one of ours that imports it."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        for dep in imports(m):
            if dep not in seen:
                seen[dep] = m
                if dep.startswith("autoglm."):
                    todo.append(dep)
    return seen


def test_the_core_imports_no_adapter() -> None:
    bad = {f"autoglm.{c}": [f"{dep} (imported by {by})"
                            for dep, by in sorted(closure(f"autoglm.{c}").items())
                            if any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN)]
           for c in CORE}
    assert not any(bad.values()), bad


def test_the_check_sees_an_import_through_another_module() -> None:
    # plan reaches spec through its own import: the closure follows it
    assert closure("autoglm.plan")["autoglm.spec"] == "autoglm.plan"
    assert "pydantic" in closure("autoglm.plan")
