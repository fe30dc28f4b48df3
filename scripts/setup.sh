#!/usr/bin/env bash
# Create ./.venv and install cryoavg into it (editable).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   with the test/lint tools
# Without a GPU, torch is constrained to the CPU build (constraints/cpu.txt): pip takes the
# local CPU wheel when its find-links has one, else PyTorch's CPU index, and never the
# multi-GB CUDA build. With an NVIDIA GPU (nvidia-smi works), pip installs the normal CUDA
# torch from PyPI. Set CRYOAVG_TORCH=cpu or CRYOAVG_TORCH=cuda to force either choice.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip)

mode=${CRYOAVG_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
args=()
if [ "$mode" = cpu ]; then
  args+=(-c constraints/cpu.txt)
  # a local CPU wheel (pip's find-links) is used when present; otherwise ask PyTorch's CPU index
  tmp=$(mktemp -d)
  if ! "${pip[@]}" download -q --no-deps --no-index -d "$tmp" -c constraints/cpu.txt torch >/dev/null 2>&1; then
    args+=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  rm -rf "$tmp"
fi
echo "cryoavg setup: torch build = $mode"
"${pip[@]}" install -q "${args[@]}" -e ".${extras}"
.venv/bin/python -c "import torch, cryoavg; print('cryoavg', cryoavg.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
