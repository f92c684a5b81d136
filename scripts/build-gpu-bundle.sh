#!/usr/bin/env bash
# Builds the binaries the GPU machine runs (it has the NVIDIA driver and torch but no Rust) and
# gathers them, stripped, into the git-ignored .gpu/ folder, plus the PyTorch peer into .peer/.
# Pass `.gpu` and `.peer` in the device run's `carry`; then run `scripts/gpu-check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_SRC=${PEER_SRC:-/work/shared/bench/peer_llada_torch.py}
cargo build --release --bin dllm --bin dllm-gpu-check
# The device tool carries at most 64 MiB with the working tree, and the binaries (each embeds
# every kernel image) are ~30 MB stripped: they travel as one xz archive that gpu-check.sh unpacks.
rm -rf .gpu && mkdir -p .gpu/stage .peer
for b in dllm dllm-gpu-check; do
    cp target/release/$b .gpu/stage/$b
    strip .gpu/stage/$b 2>/dev/null || true
done
tar cJf .gpu/bin.tar.xz -C .gpu/stage dllm dllm-gpu-check
rm -rf .gpu/stage
if [ -f "$PEER_SRC" ]; then
    install -m 644 "$PEER_SRC" .peer/peer_llada_torch.py
else
    echo "warning: peer script $PEER_SRC not found; .peer/ left as is" >&2
fi
ls -la .gpu .peer
du -sh .gpu .peer
