#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into the git-ignored .nvcc/ folder of the repository
# (.cargo/config.toml points NVCC there). About 100 MB; no GPU or driver needed to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .nvcc/nvidia/cu13/bin/nvcc ]; then
    echo "nvcc already installed: $(.nvcc/nvidia/cu13/bin/nvcc --version | tail -1)"
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target .nvcc \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
.nvcc/nvidia/cu13/bin/nvcc --version | tail -1
