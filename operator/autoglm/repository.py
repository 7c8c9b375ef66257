"""``autoglm model build``: write version V of a model into a Triton model repository.

Layout (one Triton model per part, numeric version folders; versions coexist)::

    <repo>/router/config.pbtxt               the newest version's configuration
    <repo>/router/<V>/model.py               from model_repo/router/model.py
    <repo>/router/<V>/{weights.pt, moe.json, config.json, canary.npz}
    <repo>/expert_<i>/config.pbtxt
    <repo>/expert_<i>/<V>/{model.py, weights.pt, moe.json, config.json}

``config.json`` is version V's full Triton configuration with ``version_policy`` pinned to
V: servers load it as an override, so a server serves exactly the version it was told.
``canary.npz`` holds a canary input and the reference forward's output for it; a request to
the router without ``INPUT_IDS`` runs that input and also returns the expected output, so
whoever can reach a router (the operator, in a cluster) can verify a version without
reading the repository.
Weights are deterministic in (name, version): building again gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from autoglm.moe import MoEConfig, MoEModel, build_model
from autoglm.plan import expert_model, router_model

MODEL_SOURCE = Path(os.environ.get("AUTOGLM_MODEL_SOURCE",
                                   Path(__file__).resolve().parents[2] / "model_repo"))
CANARY_SHAPE = (2, 8)
LAYOUT = 2  # bump when the files of a version change: older builds are then rebuilt


def triton_config(model: str, version: int, cfg: MoEConfig, instances: int = 1,
                  ) -> dict[str, Any]:
    """A complete Triton model configuration (JSON form), pinned to ``version``."""
    common: dict[str, Any] = {
        "name": model,
        "backend": "python",
        "version_policy": {"specific": {"versions": [version]}},
        "instance_group": [{"kind": "KIND_CPU", "count": instances}],
    }
    if model == router_model():
        return {**common, "max_batch_size": 0,
                # No INPUT_IDS: the version's own canary runs (see CANARY_EXPECTED).
                "input": [{"name": "INPUT_IDS", "data_type": "TYPE_INT64", "dims": [-1, -1],
                           "optional": True}],
                "output": [
                    {"name": "LOGITS", "data_type": "TYPE_FP32",
                     "dims": [-1, -1, cfg.vocab_size]},
                    {"name": "MODEL_VERSION", "data_type": "TYPE_INT64", "dims": [1]},
                    {"name": "CANARY_EXPECTED", "data_type": "TYPE_FP32",
                     "dims": [-1, -1, cfg.vocab_size]},
                ]}
    # Experts batch across requests: every token is one batch item.
    return {**common, "max_batch_size": 4096,
            "dynamic_batching": {"max_queue_delay_microseconds": 200},
            "input": [{"name": "LAYER", "data_type": "TYPE_INT32", "dims": [1]},
                      {"name": "HIDDEN", "data_type": "TYPE_FP32", "dims": [cfg.d_model]}],
            "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [cfg.d_model]}]}


def to_pbtxt(config: dict[str, Any]) -> str:
    """Protobuf text format, validated against Triton's ModelConfig message."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    msg = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return str(text_format.MessageToString(msg))


@dataclass(frozen=True)
class Built:
    repository: Path
    name: str
    version: int
    config: MoEConfig
    created: bool


def _write_version(model_dir: Path, version: int, files: dict[str, Any], source: str,
                   config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_dir))
    shutil.copyfile(MODEL_SOURCE / source / "model.py", tmp / "model.py")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name, value in files.items():
        if name.endswith(".pt"):
            torch.save(value, tmp / name)
        elif name.endswith(".npz"):
            np.savez(tmp / name, **value)
        else:
            (tmp / name).write_text(json.dumps(value, indent=1))
    final = model_dir / str(version)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # a version folder appears whole or not at all
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config))


def build(repository: Path, name: str, version: int, cfg: MoEConfig,
          router_instances: int = 2, force: bool = False) -> Built:
    """Write version ``version`` unless it is already there (same name and shape)."""
    meta = {"name": name, "version": version, "config": cfg.as_dict(), "layout": LAYOUT}
    marker = repository / router_model() / str(version) / "moe.json"
    if not force and marker.exists() and json.loads(marker.read_text()) == meta:
        return Built(repository, name, version, cfg, created=False)
    model = build_model(cfg, name, version)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(version)
        ids = torch.randint(0, cfg.vocab_size, CANARY_SHAPE, generator=gen)
        expected = model(ids)
    for i in range(cfg.num_experts):
        _write_version(repository / expert_model(i), version,
                       {"weights.pt": model.experts[i].state_dict(),
                        "moe.json": {**meta, "expert": i}},
                       "expert", triton_config(expert_model(i), version, cfg))
    # the router last: its moe.json marks the version complete
    _write_version(repository / router_model(), version,
                   {"weights.pt": model.router.state_dict(),
                    "canary.npz": {"input_ids": ids.numpy(), "logits": expected.numpy()},
                    "moe.json": meta},
                   "router", triton_config(router_model(), version, cfg, router_instances))
    return Built(repository, name, version, cfg, created=True)


def read_meta(repository: Path, version: int) -> dict[str, Any]:
    return dict(json.loads((repository / router_model() / str(version) / "moe.json")
                           .read_text()))


def pinned_config(repository: Path, model: str, version: int) -> dict[str, Any]:
    return dict(json.loads((repository / model / str(version) / "config.json").read_text()))


def load_canary(repository: Path, version: int) -> tuple[NDArray[Any], NDArray[Any]]:
    with np.load(repository / router_model() / str(version) / "canary.npz") as z:
        return z["input_ids"], z["logits"]


def load_reference(repository: Path, version: int) -> MoEModel:
    """The single-process model from the weights stored in the repository."""
    meta = read_meta(repository, version)
    model = MoEModel(MoEConfig(**meta["config"]))
    model.router.load_state_dict(torch.load(
        repository / router_model() / str(version) / "weights.pt", weights_only=True))
    for i, stack in enumerate(model.experts):
        stack.load_state_dict(torch.load(
            repository / expert_model(i) / str(version) / "weights.pt", weights_only=True))
    model.eval()
    return model
