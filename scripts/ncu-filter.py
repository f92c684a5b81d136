#!/usr/bin/env python3
"""Keeps the profiles of the big launches from Nsight Compute's text output (stdin -> stdout).

`dllm-gpu-check --gemm-shape` first runs the GEMM load-time self-test on tiny shapes (grids of a
few blocks), then the timed launches on the real shape. ncu profiles all of them; this keeps
only the kernel sections whose grid has at least MIN_BLOCKS blocks (default 64), at most the
last KEEP (default 2) per kernel name, plus ncu's own ==PROF==/==ERROR== lines.
"""
import os
import re
import sys

MIN_BLOCKS = int(os.environ.get("MIN_BLOCKS", "64"))
KEEP = int(os.environ.get("KEEP", "2"))
HEADER = re.compile(r"^\s{2}(\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")

blocks = []  # (kernel name, grid blocks, lines)
for line in sys.stdin:
    m = HEADER.match(line)
    if m:
        grid = int(m.group(2)) * int(m.group(3)) * int(m.group(4))
        blocks.append((m.group(1), grid, [line]))
    elif blocks and not line.startswith("=="):
        blocks[-1][2].append(line)
    else:
        sys.stdout.write(line)
kept = {}
for name, grid, lines in blocks:
    if grid >= MIN_BLOCKS:
        kept.setdefault(name, []).append(lines)
for name, runs in kept.items():
    for lines in runs[-KEEP:]:
        sys.stdout.write("".join(lines))
print(f"[ncu-filter] {len(blocks)} profiled launches, kept {sum(min(len(r), KEEP) for r in kept.values())}"
      f" with >= {MIN_BLOCKS} blocks")
