#!/usr/bin/env bash
# Builds the emulated CUDA driver (cuda/emu/libcuda_emu.cpp: dllm's kernels run on the CPU behind
# the driver API) into DIR as libcuda.so.1 (+ libcuda.so), for
#   LD_LIBRARY_PATH=DIR dllm generate --backend cuda ...
# on a machine without a GPU (slow: seconds per step of the tiny model). Needs a C++20 compiler
# (CXX, else c++). Usage: scripts/emu-driver.sh DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: scripts/emu-driver.sh DIR}
cxx=${CXX:-c++}
mkdir -p "$out"
emu="$root/cuda/emu"

# The kernel table: every `extern "C"` kernel of the preprocessed sources, and the module constants.
: > "$out/kernel_table.inc"
"$cxx" -std=c++20 -E -DDLLM_EMU_FIBERS -I"$emu" -I"$out" "$emu/libcuda_emu.cpp" |
    tr '\n' ' ' |
    grep -oE 'extern "C" +void +[A-Za-z_0-9]+ *\(' |
    sed -E 's/.*void +([A-Za-z_0-9]+).*/\1/' |
    grep -v -e '^__' -e '^dllm_emu' |
    sort -u |
    sed 's/.*/DLLM_EMU_KERNEL(&)/' > "$out/kernel_table.tmp"
grep -ohE 'DLLM_MODULE_INT\([A-Za-z_0-9]+,' "$root"/cuda/*.cu |
    sed -E 's/DLLM_MODULE_INT\(([A-Za-z_0-9]+),/DLLM_EMU_GLOBAL(\1)/' >> "$out/kernel_table.tmp"
mv "$out/kernel_table.tmp" "$out/kernel_table.inc"

# -fno-strict-aliasing: the kernels type-pun through pointers, as device code may.
"$cxx" -std=c++20 -O2 -fno-strict-aliasing -ffp-contract=off -shared -fPIC -pthread \
    -Wall -Werror -Wno-unknown-pragmas -Wno-psabi -Wno-maybe-uninitialized \
    -DDLLM_EMU_FIBERS -I"$emu" -I"$out" "$emu/libcuda_emu.cpp" -o "$out/libcuda.so.1.tmp"
mv "$out/libcuda.so.1.tmp" "$out/libcuda.so.1"
ln -sf libcuda.so.1 "$out/libcuda.so"
echo "built $out/libcuda.so.1 ($(grep -c KERNEL "$out/kernel_table.inc") kernels)"
