#!/usr/bin/env bash
# Download, on a machine with internet, the wheels that an offline GPU node needs to run
# cryoavg when it already has PyTorch, Lightning and the scientific Python stack (numpy,
# scipy, pandas, pyarrow, einops, rich, matplotlib, tensorboard): the cryo-EM libraries,
# Hydra and their pure-Python needs. Facility clusters often have no internet on their GPU
# nodes; this is also how scripts/gpu_checks.sh reaches such a node.
#
#   scripts/wheelhouse.sh DIR [PYTHON_VERSION]        (PYTHON_VERSION: e.g. 3.12, default 3.12)
#
# DIR also gets cryoavg's own wheel (built from this checkout). On the node:
#   python3 -m pip install --no-index --no-deps DIR/*.whl          (then: cryoavg class2d ...)
# or, without touching the node's environment:
#   python3 -m pip install --no-index --no-deps --target SITE DIR/*.whl
#   PYTHONPATH=SITE python3 -m cryoavg.cli.main class2d ...
set -euo pipefail
dir=${1:?usage: scripts/wheelhouse.sh DIR [PYTHON_VERSION]}
version=${2:-3.12}
py=${PYTHON:-python3}
mkdir -p "$dir"
# versions as pyproject.toml allows them, pinned to what CI tests
pure=(
    torch-fourier-slice==0.6.0 torch-ctf==0.6.0 torch-fourier-shift==0.6.0
    torch-grid-utils==0.6.0 torch-fourier-shell-correlation==0.6.0
    torch-image-interpolation==0.6.0 mrcfile==1.5.4 starfile==0.5.13
    hydra-core==1.3.8 omegaconf==2.3.1
)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation py --platform any -d "$dir" "${pure[@]}"
# antlr4's runtime (for Hydra's override parser) is published as a source archive only
"$py" -m pip wheel --quiet --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
"$py" -m pip wheel --quiet --no-deps -w "$dir" "$(dirname "$0")/.."
ls "$dir"
