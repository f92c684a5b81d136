#!/usr/bin/env bash
# Builds the binaries the GPU machine runs (it has the NVIDIA driver and torch but no Rust) and
# gathers them, stripped, into the git-ignored .gpu/ folder, plus the PyTorch peer into .peer/.
# Pass `.gpu` and `.peer` in the device run's `carry`; then run `scripts/gpu-check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_SRC=${PEER_SRC:-/work/shared/bench/peer_llada_torch.py}
cargo build --release --bin dllm --bin dllm-gpu-check
mkdir -p .gpu .peer
for b in dllm dllm-gpu-check; do
    cp target/release/$b .gpu/$b
    strip .gpu/$b 2>/dev/null || true
done
if [ -f "$PEER_SRC" ]; then
    install -m 644 "$PEER_SRC" .peer/peer_llada_torch.py
else
    echo "warning: peer script $PEER_SRC not found; .peer/ left as is" >&2
fi
ls -la .gpu .peer
du -sh .gpu .peer
