"""The Triton model repository: ``autoglm model import`` (a Hugging Face checkpoint → version V)
and the built-in tiny builder (``autoglm model build``, the same import of a checkpoint it
writes itself).

Layout (one Triton model per part, numeric version folders; versions coexist)::

    <repo>/router/config.pbtxt               the newest version's configuration
    <repo>/router/<V>/model.py               from model_repo/router/model.py
    <repo>/router/<V>/{weights.safetensors, moe.json, config.json, canary.npz}
    <repo>/router/<V>/hf/                    config.json, tokenizer and generation config
    <repo>/generate/<V>/{model.py, moe.json, config.json}   text generation (decoupled),
                                             on the router's weights and tokenizer
    <repo>/experts/<V>/{model.py, moe.json, config.json}   what every expert server loads
    <repo>/expert_<i>/<V>/{weights.safetensors, moe.json}  expert i of every MoE layer

Each folder holds only its own tensors (the router everything but the routed experts,
``expert_<i>`` expert *i* of every MoE layer), in the checkpoint's dtype. An expert server
loads ``experts``, which reads the ``expert_<i>`` folders of the experts it was given: the
weights are stored per expert, and any packing of them onto servers is a setting of the
server, not of the repository. ``moe.json`` holds
the normalized model config. ``config.json`` is version V's full Triton configuration with
``version_policy`` pinned to V: servers load it as an override, so a server serves exactly the
version it was told. ``canary.npz`` holds a canary input and the reference forward's output;
a request to the router without ``INPUT_IDS`` runs it and also returns the expected output,
so whoever can reach a router can verify a version without reading the repository.

Import is all or nothing: the checkpoint is checked whole (config, every tensor's name and
shape) before anything is written, every folder is written under a temporary name, and the
version's folders are renamed into place at the end, the router's last (its ``moe.json``
marks a version complete).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import safe_open
from safetensors.torch import save_file

from autoglm.models.checkpoint import Checkpoint
from autoglm.models.config import ModelConfig
from autoglm.models.decoder import (
    ExpertFanout,
    ExpertSlice,
    Model,
    RouterTier,
    forward,
    layer_prefix,
)
from autoglm.models.errors import CheckpointError
from autoglm.models.layers import swiglu
from autoglm.models.tiny import TinySpec, as_dict, write_tiny_checkpoint
from autoglm.plan import expert_folder, experts_model, generate_model, router_model

MODEL_SOURCE = Path(os.environ.get("AUTOGLM_MODEL_SOURCE",
                                   Path(__file__).resolve().parents[2] / "model_repo"))
LAYOUT = 5  # bump when the files of a version change: older builds are then rebuilt
WEIGHTS = "weights.safetensors"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
CANARY_TEXT = ("The quick brown fox jumps over the lazy dog.",
               "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)")
CANARY_TOKENS = 8
CANARY_NEW_TOKENS = 8  # greedy tokens the canary of a version must generate


def triton_config(model: str, version: int, cfg: ModelConfig, instances: int = 1,
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
    if model == generate_model():
        def io(name: str, dtype: str, dims: list[int], optional: bool = False,
               ) -> dict[str, Any]:
            return {"name": name, "data_type": dtype, "dims": dims,
                    **({"optional": True} if optional else {})}

        # decoupled: any number of responses per request, sent as tokens are made
        return {**common, "max_batch_size": 0,
                "instance_group": [{"kind": "KIND_CPU", "count": 1}],
                "model_transaction_policy": {"decoupled": True},
                "input": [io("text_input", "TYPE_STRING", [1], True),
                          io("messages", "TYPE_STRING", [1], True),
                          io("input_ids", "TYPE_INT64", [-1], True)],
                "output": [io("text_output", "TYPE_STRING", [1]),
                           io("output_ids", "TYPE_INT64", [-1]),
                           io("finish_reason", "TYPE_STRING", [1]),
                           io("prompt_tokens", "TYPE_INT32", [1]),
                           io("completion_tokens", "TYPE_INT32", [1]),
                           io("model_version", "TYPE_INT64", [1]),
                           io("canary_expected", "TYPE_INT64", [-1])]}
    # One call is one layer's rows for several experts (backends/experts.py); without
    # HIDDEN it answers what the server holds; CONTROL moves experts in or out.
    def opt(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
        return {"name": name, "data_type": dtype, "dims": dims, "optional": True}

    return {**common, "max_batch_size": 0,
            "input": [opt("LAYER", "TYPE_INT32", [1]), opt("EXPERTS", "TYPE_INT32", [-1]),
                      opt("COUNTS", "TYPE_INT32", [-1]),
                      opt("HIDDEN", "TYPE_FP32", [-1, cfg.hidden_size]),
                      opt("CONTROL", "TYPE_STRING", [1])],
            "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32",
                        "dims": [-1, cfg.hidden_size]},
                       {"name": "HELD", "data_type": "TYPE_INT32", "dims": [-1]},
                       {"name": "MODEL_VERSION", "data_type": "TYPE_INT64", "dims": [1]}]}


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
    config: ModelConfig
    created: bool


Progress = Callable[[int], None]  # bytes written so far, added


@contextmanager
def _progress(total: int, label: str, show: bool | None) -> Iterator[Progress]:
    """A progress bar on stderr for long imports (shown on a terminal unless told)."""
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
              disable=not show if show is not None else None, leave=False) as bar:
        yield bar.update


def _write_folder(tmp: Path, source: str | None, files: Mapping[str, Any],
                  config: dict[str, Any] | None) -> None:
    """A model's version folder (``source``: the model.py to copy), or a folder of weights."""
    tmp.mkdir(parents=True)
    if source is not None and config is not None:
        shutil.copyfile(MODEL_SOURCE / source / "model.py", tmp / "model.py")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name, value in files.items():
        if name.endswith(".npz"):
            np.savez(tmp / name, **value)
        else:
            (tmp / name).write_text(json.dumps(value, indent=1))


def _save(tensors: dict[str, torch.Tensor], path: Path, progress: Progress) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates its file 0600: Triton pods (user 1000) reading a repository on a
    # volume could not open it. Readable as any file we write: 0666 less the umask.
    path.chmod(0o666 & ~_umask())
    progress(sum(t.numel() * t.element_size() for t in tensors.values()))


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, for every thread)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines()
                        if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def canary_ids(src: Path, vocab_size: int) -> torch.Tensor:
    """A fixed prompt pair [2, 8]: the checkpoint's tokenization of fixed text, or fixed ids."""
    tok = src / "tokenizer.json"
    rows: list[list[int]] = []
    if tok.exists():
        from tokenizers import Tokenizer

        try:
            t = Tokenizer.from_file(str(tok))
            rows = [t.encode(s, add_special_tokens=False).ids[:CANARY_TOKENS]
                    for s in CANARY_TEXT]
        except Exception:  # a tokenizer we cannot read is not the weights' fault
            rows = []
    if len(rows) != 2 or any(len(r) < CANARY_TOKENS or max(r) >= vocab_size for r in rows):
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (2, CANARY_TOKENS), generator=gen)
    return torch.tensor(rows, dtype=torch.int64)


class _StreamedExperts:
    """The experts of a version read from its expert files one layer slice at a time, so
    the canary forward never holds every expert at once."""

    def __init__(self, folders: Mapping[int, Path]) -> None:
        self.folders = folders

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        out = {}
        for e, h in sends.items():
            with safe_open(str(self.folders[e] / WEIGHTS), framework="pt") as st:
                p = f"{layer_prefix(layer)}.mlp.experts.{e}"
                g, u, d = (st.get_tensor(f"{p}.{m}.weight").to(torch.float32)
                           for m in ("gate_proj", "up_proj", "down_proj"))
            out[e] = swiglu(h, g, u, d)
        return out


def greedy_tokens(router: RouterTier, fanout: ExpertFanout, prompt: torch.Tensor,
                  n: int) -> torch.Tensor:
    """The reference's greedy continuation of ``prompt`` [S] (a whole forward per token:
    no cache, so it checks the generation engine's cache path independently)."""
    ids = prompt.unsqueeze(0)
    for _ in range(n):
        logits, _ = forward(router, ids, fanout)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[0]:]


def import_checkpoint(src: Path, repository: Path, version: int, name: str | None = None,
                      router_instances: int = 2, force: bool = False,
                      progress: bool | None = None) -> Built:
    """Write version ``version`` of ``repository`` from the checkpoint at ``src``.

    Raises :class:`CheckpointError` (one line) for anything wrong with the input; the
    repository is then unchanged."""
    if version < 1:
        raise CheckpointError(f"version {version}: versions are positive integers")
    ckpt = Checkpoint(src)
    ckpt.validate()
    cfg = ckpt.config
    name = name or src.resolve().name
    if not force:
        for model in (router_model(), generate_model(), experts_model(),
                      *(expert_folder(i) for i in range(cfg.num_experts))):
            if (repository / model / str(version)).exists():
                raise CheckpointError(f"{repository / model / str(version)} exists: version "
                                      f"{version} is already in the repository (--force "
                                      "replaces it)")
    meta = {"name": name, "version": version, "layout": LAYOUT,
            "architecture": cfg.architecture, "config": cfg.as_dict()}
    repository.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".import-{version}.", dir=repository))
    try:
        folders = _write_version(ckpt, work, version, meta, router_instances, progress)
        _publish(repository, work, version, folders)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Built(repository, name, version, cfg, created=True)


def _write_version(ckpt: Checkpoint, work: Path, version: int, meta: dict[str, Any],
                   router_instances: int, progress: bool | None) -> dict[str, Path]:
    cfg = ckpt.config
    total = ckpt.nbytes()
    folders: dict[str, Path] = {}
    with _progress(total, f"importing {meta['name']} v{version}", progress) as advance:
        experts: dict[int, Path] = {}
        for i in range(cfg.num_experts):
            model = expert_folder(i)
            tmp = work / model
            _write_folder(tmp, None, {"moe.json": {**meta, "expert": i}}, None)
            _save(dict(ckpt.read(ckpt.names(i))), tmp / WEIGHTS, advance)
            folders[model] = experts[i] = tmp
        router_weights = dict(ckpt.read(ckpt.names(None)))
        ids = canary_ids(ckpt.src, cfg.vocab_size)
        with torch.no_grad():
            router = RouterTier(cfg, {k: v.to(torch.float32) for k, v in router_weights.items()})
            experts_fanout = _StreamedExperts(experts)
            expected, _ = forward(router, ids, experts_fanout)
            greedy = greedy_tokens(router, experts_fanout, ids[0], CANARY_NEW_TOKENS)
        tmp = work / router_model()
        _write_folder(tmp, "router",
                      {"canary.npz": {"input_ids": ids.numpy(), "logits": expected.numpy(),
                                      "greedy_prompt": ids[0].numpy(),
                                      "greedy_tokens": greedy.numpy()},
                       "moe.json": meta},
                      triton_config(router_model(), version, cfg, router_instances))
        _save(router_weights, tmp / WEIGHTS, advance)
        (tmp / "hf").mkdir()
        for f in HF_FILES:
            if (ckpt.src / f).is_file():
                shutil.copyfile(ckpt.src / f, tmp / "hf" / f)
        folders[router_model()] = tmp
        tmp = work / experts_model()  # its weights are the expert folders
        _write_folder(tmp, "experts", {"moe.json": meta},
                      triton_config(experts_model(), version, cfg))
        folders[experts_model()] = tmp
        tmp = work / generate_model()  # its weights and tokenizer are the router's
        _write_folder(tmp, "generate", {"moe.json": meta},
                      triton_config(generate_model(), version, cfg))
        folders[generate_model()] = tmp
    return folders


def _publish(repository: Path, work: Path, version: int, folders: Mapping[str, Path]) -> None:
    """Rename each model's version folder into place, the router's last; undo on failure."""
    order = sorted(folders, key=lambda m: m == router_model())
    placed: list[Path] = []
    try:
        for model in order:
            pinned = folders[model] / "config.json"
            config = json.loads(pinned.read_text()) if pinned.exists() else None
            final = repository / model / str(version)
            (repository / model).mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            folders[model].rename(final)
            placed.append(final)
            if config is not None:  # a Triton model, not a folder of weights
                (repository / model / "config.pbtxt").write_text(to_pbtxt(config))
    except BaseException:
        for p in placed:
            shutil.rmtree(p, ignore_errors=True)
        raise


def build(repository: Path, name: str, version: int, spec: TinySpec,
          router_instances: int = 2, force: bool = False) -> Built:
    """The built-in tiny model at ``version`` unless it is already there (same name and
    shape): a checkpoint written offline, then imported like any other."""
    marker = repository / router_model() / str(version) / "moe.json"
    tiny = as_dict(spec)
    if not force and marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("tiny") == tiny and meta.get("name") == name \
                and meta.get("layout") == LAYOUT:
            return Built(repository, name, version, ModelConfig.from_dict(meta["config"]),
                         created=False)
    with tempfile.TemporaryDirectory(prefix="autoglm-tiny-") as src:
        write_tiny_checkpoint(Path(src), spec, name, version)
        built = import_checkpoint(Path(src), repository, version, name, router_instances,
                                  force=True, progress=False)
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "tiny": tiny}, indent=1))
    return built


def router_server_models(repository: Path, version: int) -> dict[str, int]:
    """What a router server loads, in order: ``generate`` where the version has it and a
    tokenizer to go with it (a checkpoint without one serves logits only), then ``router``.
    Router last: the models load one after another, and a router pod is Ready once its
    ``router`` version is, so by then every model it serves is (a pod that took generations
    before its ``generate`` was loaded answered 503, seen on the real node)."""
    models: dict[str, int] = {}
    if (repository / generate_model() / str(version)).is_dir() and \
            (repository / router_model() / str(version) / "hf" / "tokenizer.json").is_file():
        models[generate_model()] = version
    models[router_model()] = version
    return models


def read_meta(repository: Path, version: int) -> dict[str, Any]:
    return dict(json.loads((repository / router_model() / str(version) / "moe.json")
                           .read_text()))


def pinned_config(repository: Path, model: str, version: int) -> dict[str, Any]:
    return dict(json.loads((repository / model / str(version) / "config.json").read_text()))


def load_canary(repository: Path, version: int) -> tuple[NDArray[Any], NDArray[Any]]:
    with np.load(repository / router_model() / str(version) / "canary.npz") as z:
        return z["input_ids"], z["logits"]


def load_weights(folder: Path, device: str = "cpu",
                 dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """One part's tensors (``dtype`` None: the checkpoint's own, e.g. bf16 on a GPU)."""
    with safe_open(str(folder / WEIGHTS), framework="pt", device=device) as st:
        return {k: st.get_tensor(k) if dtype is None else st.get_tensor(k).to(dtype)
                for k in st.keys()}  # noqa: SIM118


def load_part_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    meta = json.loads((folder / "moe.json").read_text())
    return meta, ModelConfig.from_dict(meta["config"])


def load_reference(repository: Path, version: int) -> Model:
    """The single-process model from the weights stored in the repository."""
    folder = repository / router_model() / str(version)
    _, cfg = load_part_config(folder)
    router = RouterTier(cfg, load_weights(folder))
    experts = [ExpertSlice(cfg, i, load_weights(repository / expert_folder(i) / str(version)))
               for i in range(cfg.num_experts)]
    return Model(router, experts)
