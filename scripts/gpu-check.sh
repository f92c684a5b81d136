#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, with binaries prebuilt by scripts/build-gpu-bundle.sh
# into .gpu/ and the PyTorch peer in .peer/. Writes every log and JSON result under $OUT.
#
# Usage: scripts/gpu-check.sh [STAGE...]   (`next` = the stages docs/perf.md asks the next GPU call for)
#   stages: smi check synth bench packed benchoff benchnostream benchpdl csplit rope fold qll combo keys264 mlp blocks99 ring2 ncustream peer stream tma tma4 attn2 prefetch split pdl keys swiglu sessiongraphs ampere shapes sweep sanitize ncu benchexp dream7b moe7b kvariant summary pack
# (default: smi check synth bench summary, about 2 minutes; the PyTorch peer is opt-in and the
# summary falls back to the peer numbers measured on 2026-11-27 when it did not run).
# The opt-in stages exercise the Hopper kernels of session 3, each in its own process so a fault in
# one cannot take the other results down: the TMA weight-streaming GEMM for M <= 32
# (cuda/gemm_stream.cu; default since session 4, DLLM_GEMM_STREAM=0 turns it off), the
# TMA-multicast cluster GEMM for M > 64 (cuda/gemm_tma.cu; default since 2026-11-27,
# DLLM_GEMM_TMA=0 turns it off) and split-KV attention (cuda/attention.cu; default since
# 2026-11-27, DLLM_ATTN_SPLIT=0 turns it off):
#   stream / tma  gemm + model checks (and the gemm benches) with that kernel asked for explicitly
#   split         attention + model checks (and the attention benches) with split-KV on
#   pdl           every check with programmatic dependent launch asked for explicitly (DLLM_PDL=1,
#                 the default since session 5; benchpdl times the workloads without it)
#   sessiongraphs the Session path's layers as CUDA graphs (DLLM_SESSION_GRAPHS=1, opt-in): model
#                 checks and the b1 workloads through `dllm bench --session` with it
#   ampere        every check and the b1 dual workload on the Ampere build (DLLM_CUDA_ARCH=80)
#   keys          attention + model checks with the key-group attention asked for explicitly
#                 (DLLM_ATTN_KEYS=1, the default since session 5)
#   shapes        `dllm-gpu-check --gemm-shape` on the real shapes, previous kernel vs new one
#   sweep         `dllm-gpu-check --gemm-sweep`: every GEMM launch plan on the real shapes
#   sanitize      compute-sanitizer memcheck and racecheck on the GEMM self-test with each on
#   ncu           Nsight Compute sections of previous vs new kernels on the real shapes
#   benchoff      the three workloads with those three, key-group attention and PDL turned off
#                 (the 8B checkpoint: run synth first)
#   benchnostream the three workloads with only the stream GEMM turned off
#   benchexp      the three workloads with the variables in $EXP_ENV (e.g. EXP_ENV="DLLM_PDL=1")
#   dream7b       the b1 workloads on a random Dream-7B (synthesized here first)
#   kvariant      kernels compiled here with KDEFS="-D NAME=VALUE ..." (DLLM_KERNEL_DIR): every
#                 check and the three workloads with them
# The bench stage runs every workload twice: CUDA graphs on (default) and off (DLLM_CUDA_GRAPH=0,
# files *_nograph.json; NOGRAPH=0 skips them); the summary shows both and whether their final
# canvases hash equal.
# Each stage has its own timeout (seconds, overridable: T_CHECK=200 ...) so a hang cannot eat the
# lease; a failed stage is recorded and the script goes on. Exit status: 0 when every stage ran
# with status 0.
set -u -o pipefail
OUT=${OUT:-/tmp/dllm-gpu-out}
mkdir -p "$OUT"
BIN=${BIN:-.gpu}
MODEL8B=${MODEL8B:-/tmp/llada8b}
TINY=${TINY:-models/tiny-llada-code}
# scripts/build-gpu-bundle.sh ships the binaries as $BIN/bin.tar.xz (the carry limit): unpack once.
if [ -f "$BIN/bin.tar.xz" ] && [ ! -x "$BIN/dllm" ]; then
    tar xJf "$BIN/bin.tar.xz" -C "$BIN" || { echo "cannot unpack $BIN/bin.tar.xz" >&2; exit 2; }
fi
STAGES=${*:-smi check synth bench summary}
# `next`: the first call docs/perf.md ("Session 12 … the GPU plan") asks for, as one word; `next2`
# the second. The PyTorch peer runs right after the default workloads: the ratios need both from
# one call, and a call cut off at the device's limit keeps every stage packed before it.
STAGES=${STAGES//next2/synth qll fold csplit rope mlp moe7b blocks99 keys264 ring2 ncustream summary pack}
STAGES=${STAGES//next/smi check synth bench peer combo sanitize packed summary pack}
# Profilers of the device image (on PATH, or their usual install folders).
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n1)}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n1)}
STATUS="$OUT/stages.tsv"
: > "$STATUS"
FAILED=0

# stage NAME LIMIT_S CMD... : runs CMD with a timeout, stdout+stderr teed to $OUT/NAME.log.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== [$name] limit ${limit}s: $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    local secs
    secs=$(python3 -c "print(f'{$t1-$t0:.1f}')" 2>/dev/null || echo "?")
    printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$STATUS"
    echo "=== [$name] exit $rc after ${secs}s"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    # With RESULTS set, what has run so far is packed after every stage, so a call the device
    # tool cuts off at its time limit still returns it (the pack stage packs the end state).
    if [ -n "${RESULTS:-}" ]; then
        mkdir -p "$RESULTS"
        tar czf "$RESULTS/all.tgz.part" -C "$OUT" . 2>/dev/null && mv -f "$RESULTS/all.tgz.part" "$RESULTS/all.tgz"
    fi
    return 0
}

# bench NAME GRAPH LIMIT_S ARGS... : one `dllm bench` on the 8B checkpoint with DLLM_CUDA_GRAPH=GRAPH,
# JSON to $OUT/NAME.json.
bench() {
    local name=$1 graph=$2 limit=$3
    shift 3
    stage "$name" "$limit" env DLLM_CUDA_GRAPH="$graph" ${BENCH_ENV:-} bash -c "set -o pipefail; '$BIN/dllm' bench --model '$MODEL8B' --backend cuda --prompt-len 128 --gen-len 256 --block-len 32 --json $* > '$OUT/$name.json'; rc=\$?; cat '$OUT/$name.json'; exit \$rc"
}

# workloads SUFFIX GRAPH [ARGS...]: the three workloads (b1 dual K=4, b8 dual K=4, b1 none K=1)
# in one `dllm bench --suite` process (the 8B checkpoint loads once instead of three times, ~25 s
# of device time saved per call), files bench_<workload>SUFFIX.json, ARGS added to each
# (BENCH_ENV as set), DLLM_CUDA_GRAPH=GRAPH.
workloads() {
    local suffix=$1 graph=$2
    shift 2
    stage "bench_suite$suffix" "${T_SUITE:-240}" env DLLM_CUDA_GRAPH="$graph" ${BENCH_ENV:-} "$BIN/dllm" bench --model "$MODEL8B" --backend cuda --suite "$OUT" --suffix "$suffix" "$@"
}

# sweep_stage NAME SHAPES [VAR=VALUE...]: `dllm-gpu-check --gemm-sweep` on each M,N,K:EPILOGUE of
# SHAPES (one space-separated string) with the variables set, as stage NAME.
sweep_stage() {
    local name=$1 shapes=$2
    shift 2
    stage "$name" "${T_SWEEP:-150}" env "$@" bash -c "rc=0
        for s in $shapes; do
            '$BIN/dllm-gpu-check' --gemm-sweep \${s%%:*} --epilogue \${s#*:} --repeat 20 || rc=1
        done
        exit \$rc"
}

# kvariant NAME DEFINES [ONLY]: the kernels compiled here with DEFINES into /tmp/dllm-kernels-NAME
# (KDIR overrides), every check (or the parts in ONLY) and the three workloads with them.
kvariant() {
    local name=$1 defs=$2 only=${3:-}
    local dir=${KDIR:-/tmp/dllm-kernels-$name}
    stage "${name}_build" "${T_KBUILD:-300}" "$BIN/dllm-gpu-check" --compile-kernels "$dir" $defs --images ptx,sm90a
    stage "$name" "${T_CHECK:-180}" env DLLM_KERNEL_DIR="$dir" "$BIN/dllm-gpu-check" --model "$TINY" ${only:+--only "$only"} --json "$OUT/check_$name.json"
    BENCH_ENV="DLLM_KERNEL_DIR=$dir" workloads "_$name" 1
}

# ncu_specs VAR:M,N,K...: Nsight Compute sections of each GEMM shape with VAR=0 then VAR=1.
ncu_specs() {
    local spec var s on
    for spec in "$@"; do
        var=${spec%%:*}
        s=${spec#*:}
        for on in 0 1; do
            stage "ncu_${s//,/x}_${var#DLLM_GEMM_}$on" "${T_NCU:-120}" bash -c "set -o pipefail; $var=$on '${NCU:-ncu}' --clock-control none -k regex:'gemm_(skinny|stream|wgmma|tma)' --launch-count 80 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats '$BIN/dllm-gpu-check' --gemm-shape $s --repeat 2 | python3 scripts/ncu-filter.py"
        done
    done
}

for s in $STAGES; do
    case $s in
    smi)
        stage smi "${T_SMI:-30}" nvidia-smi
        ;;
    check)
        stage check "${T_CHECK:-180}" "$BIN/dllm-gpu-check" --model "$TINY" --json "$OUT/check.json"
        ;;
    synth)
        if [ -f "$MODEL8B/config.json" ]; then
            echo "=== [synth] $MODEL8B exists, skipped"
        else
            stage synth "${T_SYNTH:-240}" "$BIN/dllm" synth --arch llada --preset 8b --out "$MODEL8B"
        fi
        ;;
    benchoff)
        # The three workloads with the kernels and launches made default since 2026-11-27 turned
        # off (stream GEMM, TMA GEMM, split-KV attention; key-group attention and PDL since
        # session 5): what the defaults gained, in the same call.
        OFF="DLLM_GEMM_STREAM=0 DLLM_GEMM_TMA=0 DLLM_ATTN_SPLIT=0 DLLM_ATTN_KEYS=0 DLLM_PDL=0"
        BENCH_ENV="$OFF" workloads _off 1
        ;;
    benchnostream)
        # Only the stream GEMM off (the skinny kernels serve M <= 32): what it alone gains.
        BENCH_ENV="DLLM_GEMM_STREAM=0" bench bench_b1_dual_k4_nostream 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual
        BENCH_ENV="DLLM_GEMM_STREAM=0" bench bench_b1_none_k1_nostream 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none
        ;;
    bench)
        # Graphs on first (the numbers that count), then the same workloads with graphs off.
        # --profile: after the timed run, one eager run with every operation event-timed.
        workloads "" 1 --profile
        # The Session path (what `dllm generate` runs) on the batch-1 workloads.
        bench bench_b1_dual_k4_session 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual --session
        bench bench_b1_none_k1_session 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none --session
        [ "${NOGRAPH:-1}" = 1 ] || continue
        workloads _nograph 0
        ;;
    packed)
        # Packed cached sessions (DLLM_PACKED_SESSIONS=1, opt-in, written in session 16 without a
        # GPU: the span steps of a Session batch as one forward, each canvas against its own
        # cache slot). `check` runs model.packed / dream.packed (the checks turn it on
        # themselves); here b8 dual through the Session path (what a batch file and
        # dllm_sessions_run do): the sessions one after another (the default), then packed.
        bench bench_b8_dual_k4_session 1 "${T_BENCH:-90}" --batch 8 --tokens-per-step 4 --cache dual --session
        BENCH_ENV="DLLM_PACKED_SESSIONS=1" bench bench_b8_dual_k4_session_packed 1 "${T_BENCH:-90}" --batch 8 --tokens-per-step 4 --cache dual --session
        ;;
    benchpdl)
        # The same workloads without programmatic dependent launch (DLLM_PDL=0; PDL is the
        # default since session 5), graphs on.
        BENCH_ENV="DLLM_PDL=0" workloads _nopdl 1
        ;;
    peer)
        stage peer "${T_PEER:-300}" env OUT="$OUT" python3 .peer/peer_llada_torch.py
        ;;
    stream)
        stage stream "${T_STREAM:-240}" env DLLM_GEMM_STREAM=1 "$BIN/dllm-gpu-check" --model "$TINY" --only gemm,model --json "$OUT/check_stream.json"
        ;;
    tma)
        stage tma "${T_TMA:-240}" env DLLM_GEMM_TMA=1 "$BIN/dllm-gpu-check" --model "$TINY" --only gemm,model --json "$OUT/check_tma.json"
        ;;
    tma4)
        # The 2 x 2 quad TMA GEMM (DLLM_GEMM_TMA4=1, opt-in, written in session 6 without a GPU:
        # the A tile multicast along N as well as the W tile along M). Its load-time self-test
        # runs in each process first (a protocol bug would hang there: the stage timeout ends
        # it). The GEMM and model checks with it, the wide shapes' plan sweep (quads listed beside
        # their pairs), then the three workloads.
        stage tma4 "${T_TMA4:-240}" env DLLM_GEMM_TMA4=1 "$BIN/dllm-gpu-check" --model "$TINY" --only gemm,model --json "$OUT/check_tma4.json"
        sweep_stage sweep_tma4 "384,12288,4096:bf16 384,4096,4096:add_f32 384,24576,4096:bf16 384,4096,12288:add_f32 256,12288,4096:bf16 256,4096,12288:add_f32 3072,12288,4096:bf16 3072,4096,12288:add_f32" DLLM_GEMM_TMA4=1
        BENCH_ENV="DLLM_GEMM_TMA4=1" workloads _tma4 1
        ;;
    csplit)
        # The cluster-split wgmma GEMM (DLLM_GEMM_CLUSTER_SPLIT=1, opt-in, written in session 10
        # without a GPU: the K splits of a tile as one cluster, summed through distributed shared
        # memory). `check` already compares it with the workspace reduction bit for bit
        # (gemm.cluster_split) and times both on the 8B's 4096-column projections at M = 384 and 256; here
        # its load-time self-test and the gemm + model checks with it on, the plan sweep of the
        # split shapes (cluster twins beside their workspace plans), then the three workloads
        # (b1 none is the one it is for: the attention-output projection runs 2 splits there).
        stage csplit "${T_CHECK:-180}" env DLLM_GEMM_CLUSTER_SPLIT=1 "$BIN/dllm-gpu-check" --model "$TINY" --only gemm,model --json "$OUT/check_csplit.json"
        sweep_stage sweep_csplit "384,4096,4096:add_f32 384,4096,12288:add_f32 256,4096,4096:add_f32 256,4096,12288:add_f32" DLLM_GEMM_CLUSTER_SPLIT=1
        BENCH_ENV="DLLM_GEMM_CLUSTER_SPLIT=1" workloads _csplit 1
        ;;
    combo)
        # Sessions 10 to 12's opt-ins together (cluster split, RoPE epilogue, per-shape stream
        # blocks, the RMSNorm fold, the narrowed last layer):
        # the three workloads, for the combined gain once each has passed its own stage.
        # The model checks with all of them on first: each stage checks one switch alone.
        # Then the same with the fused MLP, which with the fold is the batch-1 layer tail; then with
        # the layer chain too (DLLM_LAYER_CHAIN=1, session 13: each tail launch also runs the next
        # layer's QKV projection with the RoPE epilogue, two launches per layer in a b1 block step).
        COMBO="DLLM_GEMM_CLUSTER_SPLIT=1 DLLM_FUSED_ROPE=1 DLLM_GEMM_STREAM_BLOCKS=auto DLLM_NORM_FOLD=1 DLLM_QUERY_LAST_LAYER=1"
        stage combo "${T_CHECK:-180}" env $COMBO "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_combo.json"
        BENCH_ENV="$COMBO" workloads _combo 1
        stage combotail "${T_CHECK:-180}" env $COMBO DLLM_FUSED_MLP=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_combotail.json"
        # (With the per-operation profile: where the time goes with everything on.)
        BENCH_ENV="$COMBO DLLM_FUSED_MLP=1" workloads _combotail 1 --profile
        stage combochain "${T_CHECK:-180}" env $COMBO DLLM_FUSED_MLP=1 DLLM_LAYER_CHAIN=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_combochain.json"
        BENCH_ENV="$COMBO DLLM_FUSED_MLP=1 DLLM_LAYER_CHAIN=1" workloads _combochain 1
        ;;
    fold)
        # The RMSNorm fold (DLLM_NORM_FOLD=1, opt-in, written in session 11 without a GPU: the
        # residual-adding GEMM writes x ⊙ γ and per-row partial sums of squares, the next GEMM
        # scales its rows; 63 of a step's 65 norm launches go). `check` already compares each half
        # with host twins and the chain with rmsnorm + gemm (gemm.norm_fold), and the fused MLP
        # with the fold against its two launches bit for bit, and the layer tail (the fused MLP
        # with the attention-output projection as a first job, which the fold makes possible)
        # against its three; here the model checks with the model running it (alone, and with
        # the fused MLP: the layer tail), its kernels under memcheck (the tail's grid barriers
        # under racecheck too), then the three workloads both ways.
        # (Its kernels under compute-sanitizer: the sanitize stage.)
        stage fold "${T_CHECK:-180}" env DLLM_NORM_FOLD=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_fold.json"
        stage fold_mlp "${T_CHECK:-180}" env DLLM_NORM_FOLD=1 DLLM_FUSED_MLP=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_fold_mlp.json"
        BENCH_ENV="DLLM_NORM_FOLD=1" workloads _fold 1
        BENCH_ENV="DLLM_NORM_FOLD=1 DLLM_FUSED_MLP=1" workloads _tail 1
        ;;
    qll)
        # The last layer of a full step only for the rows it predicts (DLLM_QUERY_LAST_LAYER=1,
        # opt-in, written in session 12 without a GPU: keys and values still for every row).
        # `check` already runs model.query last layer (two models differing only in the switch:
        # step logits within bf16 tolerance, a refresh's cache bit for bit, greedy generation);
        # here every model check with the switch on, then the three workloads (b1 none and the
        # refreshes are what it is for: ~1-2 % of a full step expected).
        stage qll "${T_CHECK:-180}" env DLLM_QUERY_LAST_LAYER=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_qll.json"
        BENCH_ENV="DLLM_QUERY_LAST_LAYER=1" workloads _qll 1
        ;;
    keys264)
        # The key-group attention on the b1 full step's grid too (DLLM_ATTN_KEYS_UNITS=264: plain
        # grids under 264 blocks take key groups): 384 blocks of 32 query rows instead of the
        # plain kernel's 192 blocks of 64, which 132 SMs hold unevenly (60 SMs with two, 72 with
        # one). The attention and model checks with it, then the two batch-1 workloads (b8's
        # grids are larger and unaffected).
        stage keys264 "${T_CHECK:-180}" env DLLM_ATTN_KEYS_UNITS=264 "$BIN/dllm-gpu-check" --model "$TINY" --only attention,model --json "$OUT/check_keys264.json"
        BENCH_ENV="DLLM_ATTN_KEYS_UNITS=264" bench bench_b1_dual_k4_keys264 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual
        BENCH_ENV="DLLM_ATTN_KEYS_UNITS=264" bench bench_b1_none_k1_keys264 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none
        ;;
    rope)
        # RoPE and the K/V cache write in the QKV GEMM's epilogue (DLLM_FUSED_ROPE=1, opt-in,
        # written in session 10 without a GPU: q and k rows uploaded in the grouped pair order).
        # `check` already compares the epilogue with GEMM + rope_qkv on the grouped layout
        # (gemm.rope_epilogue) and rope_qkv's grouped path with the CPU; here the elementwise,
        # gemm and model checks with the model built that way, then the three workloads.
        stage rope "${T_CHECK:-180}" env DLLM_FUSED_ROPE=1 "$BIN/dllm-gpu-check" --model "$TINY" --only elementwise,gemm,model --json "$OUT/check_rope.json"
        BENCH_ENV="DLLM_FUSED_ROPE=1" workloads _rope 1
        ;;
    mlp)
        # The batch-1 MLP as one launch (DLLM_FUSED_MLP=1, opt-in, written in session 9 without a
        # GPU): `check` already compares it with the two stream launches bit for bit
        # (gemm.fused_mlp) and times both; here the model checks and the three workloads with it
        # (b1 dual is the one it is for). A barrier bug hangs until the watchdog traps: the stage
        # timeouts bound it.
        stage mlp "${T_MLP:-180}" env DLLM_FUSED_MLP=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_mlp.json"
        BENCH_ENV="DLLM_FUSED_MLP=1" workloads _mlp 1
        ;;
    blocks99)
        # The stream GEMM on 99 blocks instead of one per SM (DLLM_GEMM_STREAM_BLOCKS=99): the
        # plan sweeps of sessions 5 and 9 (H200) found it 5-8 % faster on the QKV and down
        # projections of the block step and 2-4 % slower on the gate/up; the three workloads
        # with it, to decide on a per-shape block count.
        BENCH_ENV="DLLM_GEMM_STREAM_BLOCKS=99" workloads _blocks99 1
        # The per-shape count (DLLM_GEMM_STREAM_BLOCKS=auto, session 10): 99 blocks for weights up
        # to 128 MiB (QKV, attention output, down), one per SM above (gate/up, LM head).
        BENCH_ENV="DLLM_GEMM_STREAM_BLOCKS=auto" workloads _blocksauto 1
        ;;
    attn2)
        # The three workloads with the plain attention kernel's 2-slot K/V ring (as before
        # session 6; the 3-slot ring is the default): the ring's end-to-end effect.
        BENCH_ENV="DLLM_ATTN_STAGES=2" workloads _attn2 1
        ;;
    prefetch)
        # Block steps requesting each layer's attention-output weights into L2 during RoPE and
        # attention (DLLM_L2_PREFETCH=1, opt-in, session 6): the elementwise checks run the
        # prefetching launch whatever the variable says; the model checks and workloads with it.
        stage prefetch "${T_PREFETCH:-180}" env DLLM_L2_PREFETCH=1 "$BIN/dllm-gpu-check" --model "$TINY" --only elementwise,model --json "$OUT/check_prefetch.json"
        BENCH_ENV="DLLM_L2_PREFETCH=1" workloads _prefetch 1
        ;;
    sessiongraphs)
        # The Session path's layers as CUDA graphs (DLLM_SESSION_GRAPHS=1, opt-in): checks, then
        # the b1 workloads through the Session path with and without them.
        stage sessiongraphs "${T_SGRAPH:-240}" env DLLM_SESSION_GRAPHS=1 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_sessiongraphs.json"
        BENCH_ENV="DLLM_SESSION_GRAPHS=1" bench bench_b1_dual_k4_sessiongraphs 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual --session
        BENCH_ENV="DLLM_SESSION_GRAPHS=1" bench bench_b1_none_k1_sessiongraphs 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none --session
        ;;
    swiglu)
        # The SwiGLU fused into the gate/up GEMM is the default since session 9 (verified on an
        # H200): the model checks and the three workloads with it turned off (the separate SwiGLU
        # kernel, DLLM_FUSED_SWIGLU=0), then the fused gate/up shapes timed against the plain ones.
        # The GEMM checks (gemm.swiglu: every kernel, split-K, poisoned outputs) run in `check`.
        stage swiglu "${T_SWIGLU:-240}" env DLLM_FUSED_SWIGLU=0 "$BIN/dllm-gpu-check" --model "$TINY" --only model --json "$OUT/check_swiglu.json"
        BENCH_ENV="DLLM_FUSED_SWIGLU=0" workloads _noswiglu 1
        stage sweep_swiglu "${T_SWEEP:-150}" bash -c "rc=0
            for s in 32,24576,4096 384,24576,4096 3072,24576,4096; do
                for e in bf16 swiglu_bf16; do '$BIN/dllm-gpu-check' --gemm-sweep \$s --epilogue \$e --repeat 20 || rc=1; done
            done
            exit \$rc"
        ;;
    ampere)
        # The Ampere build (DLLM_CUDA_ARCH=80: the sm_80 fatbins' compute_80 PTX, JIT-compiled on
        # this Hopper; no wgmma / TMA / stream GEMMs, no PDL, no L2 prefetch; written in session 7
        # without a GPU): every check, then the b1 dual workload on it (what an A100 runs, not its
        # speed: this card's bandwidth and clocks).
        stage ampere "${T_AMPERE:-240}" env DLLM_CUDA_ARCH=80 "$BIN/dllm-gpu-check" --model "$TINY" --json "$OUT/check_ampere.json"
        # Attention as selected on compute capability 8.6 / 8.9 (99 KiB per block: the 2-slot
        # ring only, no split or key groups).
        stage ampere_99k "${T_AMPERE:-240}" env DLLM_CUDA_ARCH=80 DLLM_ATTN_SMEM_LIMIT=101376 "$BIN/dllm-gpu-check" --model "$TINY" --only attention,model --json "$OUT/check_ampere_99k.json"
        BENCH_ENV="DLLM_CUDA_ARCH=80" bench bench_b1_dual_k4_ampere 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual
        ;;
    keys)
        stage keys "${T_KEYS:-180}" env DLLM_ATTN_KEYS=1 "$BIN/dllm-gpu-check" --model "$TINY" --only attention,model --json "$OUT/check_keys.json"
        ;;
    pdl)
        stage pdl "${T_PDL:-240}" env DLLM_PDL=1 "$BIN/dllm-gpu-check" --model "$TINY" --json "$OUT/check_pdl.json"
        ;;
    split)
        stage split "${T_SPLIT:-180}" env DLLM_ATTN_SPLIT=1 "$BIN/dllm-gpu-check" --model "$TINY" --only attention,model --json "$OUT/check_split.json"
        ;;
    shapes)
        # name=VAR: shapes; each shape timed with VAR=0 then VAR=1 (default kernel, experimental).
        stage shapes "${T_SHAPES:-150}" bash -c "rc=0
            for spec in DLLM_GEMM_STREAM:1,12288,4096:32,12288,4096:32,4096,12288:32,24576,4096:1,126464,4096:32,126464,4096 DLLM_GEMM_TMA:384,12288,4096:384,4096,12288:384,24576,4096:384,4096,4096:256,4096,12288:3072,12288,4096:384,126464,4096; do
                var=\${spec%%:*}
                for s in \$(echo \${spec#*:} | tr ':' ' '); do
                    for on in 0 1; do env \$var=\$on '$BIN/dllm-gpu-check' --gemm-shape \$s --repeat 30 || rc=1; done
                done
            done
            exit \$rc"
        ;;
    sanitize)
        # (DLLM_GEMM_CLUSTER_SPLIT: the load-time self-test runs its three kernels on split plans.
        # The quads, opt-in and slower, were clean in session 9: SANITIZE_GEMMS adds them back.)
        for exp in ${SANITIZE_GEMMS:-DLLM_GEMM_STREAM DLLM_GEMM_TMA DLLM_GEMM_CLUSTER_SPLIT}; do
            for tool in memcheck racecheck; do
                stage "sanitize_${exp#DLLM_GEMM_}_$tool" "${T_SANITIZE:-150}" env "$exp=1" "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 3 "$BIN/dllm-gpu-check" --gemm-shape 133,392,776 --repeat 2
            done
        done
        # The fused MLP (its grid barrier, both jobs' reductions) on a small odd shape.
        for tool in memcheck racecheck; do
            stage "sanitize_MLP_$tool" "${T_SANITIZE:-150}" "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 3 "$BIN/dllm-gpu-check" --mlp-shape 17,520,1392
        done
        # The RMSNorm fold's prep and row scale (every gemm.norm_fold case), and the layer tail
        # (three jobs, two grid barriers; racecheck may flag the release / acquire word its
        # producer and consumers share: read the report before calling that a race).
        stage sanitize_FOLD_memcheck "${T_SANITIZE:-150}" "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 3 "$BIN/dllm-gpu-check" --only norm_fold --no-bench
        for tool in memcheck racecheck; do
            stage "sanitize_TAIL_$tool" "${T_SANITIZE:-150}" "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 3 "$BIN/dllm-gpu-check" --mlp-shape 28,384,1024
        done
        stage sanitize_SPLIT_memcheck "${T_SANITIZE:-150}" env DLLM_ATTN_SPLIT=1 "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 3 "$BIN/dllm-gpu-check" --only attention --no-bench
        # The attention checks run the key-group kernel on every case (named barriers, a shared-memory merge).
        for tool in memcheck racecheck synccheck; do
            stage "sanitize_KEYS_$tool" "${T_SANITIZE:-150}" "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 3 "$BIN/dllm-gpu-check" --only attention --no-bench
        done
        # The mixture's routing, grouping, grouped GEMM and combine (session 21, written without
        # a GPU): every moe.* check under memcheck.
        stage sanitize_MOE_memcheck "${T_SANITIZE:-150}" "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 3 "$BIN/dllm-gpu-check" --only moe --no-bench
        ;;
    sweep)
        # Every launch plan of the GEMM kernels on the 8B model's shapes (full step M = 384, b8
        # block step M = 256, b8 full step M = 3072, b1 block step M = 32), the default marked;
        # SHAPE:EPILOGUE, the residual-adding projections (N = 4096) with the add epilogue.
        sweep_stage sweep "${SWEEP_SHAPES:-384,12288,4096:bf16 384,4096,4096:add_f32 384,24576,4096:bf16 384,4096,12288:add_f32 256,12288,4096:bf16 256,4096,4096:add_f32 256,24576,4096:bf16 256,4096,12288:add_f32 3072,4096,4096:add_f32 3072,4096,12288:add_f32 32,12288,4096:bf16 32,4096,4096:add_f32 32,24576,4096:bf16 32,4096,12288:add_f32}"
        ;;
    ncu)
        # Default vs experimental kernel per shape; the last launches of each process are the
        # timed ones (the load-time self-test runs first, on small grids that ncu-filter drops).
        # NCU_SPECS="VAR:M,N,K ..." replaces the list (e.g. DLLM_GEMM_TMA:384,4096,4096 for the
        # weak N = 4096 projections of the full step).
        ncu_specs ${NCU_SPECS:-DLLM_GEMM_STREAM:1,12288,4096 DLLM_GEMM_STREAM:32,12288,4096 DLLM_GEMM_STREAM:32,126464,4096 DLLM_GEMM_TMA:384,12288,4096 DLLM_GEMM_TMA:384,4096,12288}
        ;;
    ncustream)
        # The stream GEMM (and the skinny kernel it replaced) on the b1 block step's QKV and
        # attention-output shapes: 2.4 and 1.3 TB/s in isolation against 4.1 for the LM head.
        ncu_specs DLLM_GEMM_STREAM:32,12288,4096 DLLM_GEMM_STREAM:32,4096,4096
        ;;
    dream7b)
        # Dream-7B's shape (28 query / 4 K/V heads, q/k/v biases, shifted logits; random weights
        # from `dllm synth --preset dream-7b`, 15 GB, into $MODEL_DREAM) through the b1 workloads:
        # the engine's other architecture, which the LLaDA peer does not cover. Files
        # bench_dream_*.json.
        MODEL_DREAM=${MODEL_DREAM:-/tmp/dream7b}
        if [ ! -f "$MODEL_DREAM/config.json" ]; then
            stage synth_dream "${T_SYNTH:-240}" "$BIN/dllm" synth --arch dream --preset 7b --out "$MODEL_DREAM"
        fi
        MODEL8B=$MODEL_DREAM bench bench_dream_b1_dual_k4 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual
        MODEL8B=$MODEL_DREAM bench bench_dream_b1_none_k1 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none
        ;;
    moe7b)
        # LLaDA-MoE-7B-A1B's shape (64 experts of 1024, 8 per token, q/k head norms; random
        # weights from `dllm synth --arch llada-moe --preset 7b`, 15 GB, into $MODEL_MOE; the
        # CUDA mixture written in session 21 without a GPU: `check` runs its kernel checks and the
        # tiny model's llada-moe.* checks) through the b1 workloads and b8 dual, then its
        # PyTorch peer. Files bench_moe_*.json, peer_moe.json.
        MODEL_MOE=${MODEL_MOE:-/tmp/lladamoe7b}
        if [ ! -f "$MODEL_MOE/config.json" ]; then
            stage synth_moe "${T_SYNTH:-240}" "$BIN/dllm" synth --arch llada-moe --preset 7b --out "$MODEL_MOE"
        fi
        MODEL8B=$MODEL_MOE bench bench_moe_b1_dual_k4 1 "${T_BENCH:-60}" --batch 1 --tokens-per-step 4 --cache dual --profile
        MODEL8B=$MODEL_MOE bench bench_moe_b1_none_k1 1 "${T_BENCH_NONE:-90}" --batch 1 --tokens-per-step 1 --cache none
        MODEL8B=$MODEL_MOE bench bench_moe_b8_dual_k4 1 "${T_BENCH:-60}" --batch 8 --tokens-per-step 4 --cache dual
        # The same model and schedule in PyTorch eager (the reference's loop over the experts),
        # in this call, for the ratios.
        stage peer_moe "${T_PEER:-300}" env OUT="$OUT" python3 scripts/peer_lladamoe_torch.py
        ;;
    kvariant)
        # Kernels compiled on this machine (its nvcc) from the carried cuda/ sources with the
        # defines in KDEFS (e.g. KDEFS="-D DLLM_EXP_X=1"; empty: the same kernels as embedded, a
        # control) through `dllm-gpu-check --compile-kernels` (build.rs's targets and flags), then
        # every check and the three workloads with DLLM_KERNEL_DIR pointing at them (files
        # check_<KNAME>.json, bench_*_<KNAME>.json; KNAME defaults to kvariant). A define may only
        # change what the host does not mirror (see src/backend/cuda/kernel_dir.rs): today
        # DLLM_PREFETCH_CHUNK and STREAM_STAGES (e.g. KDEFS="-D STREAM_STAGES=2" KNAME=ring2).
        # KONLY=gemm,model (say) limits the check to those parts.
        kvariant "${KNAME:-kvariant}" "${KDEFS:-}" "${KONLY:-}"
        ;;
    ring2)
        # The stream GEMM with a 2-stage ring (81 KiB at M = 32: the next GEMM's block, launched
        # early by PDL, fits beside it on the SM), as a kernel variant: GEMM and model checks,
        # then the three workloads.
        kvariant ring2 "-D STREAM_STAGES=2" gemm,model
        ;;
    benchexp)
        if [ -z "${EXP_ENV:-}" ]; then
            echo "=== [benchexp] EXP_ENV is empty (no experiment named), skipped"
            continue
        fi
        BENCH_ENV="$EXP_ENV" workloads _exp 1
        ;;
    pack)
        # The device tool returns only a handful of files per call: with RESULTS set (the
        # tool's $OUT, while OUT points at a scratch folder), everything goes there as one
        # all.tgz, plus summary.txt to read at once.
        if [ -n "${RESULTS:-}" ]; then
            mkdir -p "$RESULTS"
            tar czf "$RESULTS/all.tgz" -C "$OUT" . && cp -f "$OUT/summary.txt" "$RESULTS/" 2>/dev/null
            echo "=== [pack] $(du -h "$RESULTS/all.tgz" | cut -f1) in $RESULTS/all.tgz"
        else
            echo "=== [pack] RESULTS is not set, skipped"
        fi
        ;;
    summary)
        OUT="$OUT" python3 - <<'PY' | tee "$OUT/summary.txt"
import json, os
out = os.environ["OUT"]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"_error": str(e)}
def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"
print("stage status (name, exit, seconds):")
try:
    print(open(os.path.join(out, "stages.tsv")).read().rstrip())
except Exception:
    pass
c = load("check.json")
if "checks" in c:
    bad = [x for x in c["checks"] if not x["passed"]]
    print(f"\ngpu-check: {len(c['checks'])} checks, {len(bad)} failed")
    for x in bad:
        print(f"  FAIL {x['name']}: rel_err {x['rel_err']} tol {x['tol']} {x['detail']}")
    for x in c["checks"]:
        if x["name"].startswith(("model.", "dream.", "llada-moe.", "gemm.load_self_test")):
            print(f"  {'PASS' if x['passed'] else 'FAIL'} {x['name']}: {x['detail']}")
    print("\nkernel benches (ms, GB/s, TFLOP/s):")
    for x in c.get("benches", []):
        print(f"  {x['name']:<48} {fmt(x.get('ms'), 4):>9} {fmt(x.get('gbps'), 0):>7} {fmt(x.get('tflops'), 1):>7}  {x.get('detail', '')}")
else:
    print("\ngpu-check: no results", c.get("_error", ""))
# The other stages' check runs (check_<stage>.json): totals and failures.
for f in sorted(os.listdir(out)):
    if f.startswith("check_") and f.endswith(".json"):
        o = load(f)
        if "checks" in o:
            bad = [x for x in o["checks"] if not x["passed"]]
            print(f"{f}: {len(o['checks'])} checks, {len(bad)} failed")
            for x in bad:
                print(f"  FAIL {x['name']}: rel_err {x['rel_err']} tol {x['tol']} {x['detail']}")
p = load("peer.json")
# PyTorch eager peer measured on an NVIDIA H200 on 2026-11-27, used when the peer stage did not run.
peer_fallback = {"B1_P128_G256_blk32_steps64_dual": 117.9, "B8_P128_G256_blk32_steps64_dual": 891.0,
                 "B1_P128_G256_blk32_steps256_none": 47.6}
peer_key = {"bench_b1_dual_k4": "B1_P128_G256_blk32_steps64_dual",
            "bench_b8_dual_k4": "B8_P128_G256_blk32_steps64_dual",
            "bench_b1_none_k1": "B1_P128_G256_blk32_steps256_none"}
print(f"\n{'workload':<14} {'graph':>5} {'tok/s':>8} {'vs on':>7} {'ms/step':>8} {'full ms':>8} {'block ms':>8} {'roofline':>8} {'copy GB/s':>9} {'graphs':>6} {'peer tok/s':>10}  canvas hash")
for name, pk in peer_key.items():
    if "_error" in p:
        pv = f"{peer_fallback[pk]}*"
    else:
        pv = p.get(pk, {}).get("tok_s", "-")
    hashes = {}
    base = load(name + ".json").get("tok_per_s")  # the defaults' rate, for the "vs on" column
    known = (("", "on"), ("_nograph", "off"), ("_nopdl", "noPDL"), ("_swiglu", "swiglu"), ("_noswiglu", "noswi"), ("_blocks99", "blk99"), ("_blocksauto", "blkA"), ("_mlp", "mlp"), ("_csplit", "cspl"), ("_rope", "rope"), ("_keys264", "k264"), ("_combo", "combo"), ("_combotail", "cmbT"), ("_combochain", "cmbC"), ("_fold", "fold"), ("_tail", "tail"), ("_qll", "qll"), ("_tma4", "tma4"), ("_attn2", "attn2"), ("_prefetch", "pref"), ("_exp", "exp"), ("_off", "off2"), ("_nostream", "nostr"), ("_session", "sess"), ("_sessiongraphs", "sessg"), ("_ampere", "amp"))
    # Any other suffix (kvariant stages: _<KNAME>) is listed after the known ones.
    extra = sorted({f[len(name):-5] for f in os.listdir(out) if f.startswith(name + "_") and f.endswith(".json")} - {k for k, _ in known})
    for suffix, graph in known + tuple((x, x[1:]) for x in extra):
        b = load(name + suffix + ".json")
        if "tok_per_s" not in b and suffix != "":
            continue
        if "tok_per_s" not in b and not os.path.exists(os.path.join(out, name + ".log")):
            continue  # the bench stage did not run in this call
        if "tok_per_s" in b:
            hashes[graph] = b.get("canvas_hash")
            vs = f"{100 * (b['tok_per_s'] / base - 1):+.1f}%" if base else "-"
            print(f"{name[6:]:<14} {graph:>5} {b['tok_per_s']:>8.1f} {vs:>7} {b['ms_per_step']:>8.2f} {fmt(b.get('full_step_ms')):>8} {fmt(b.get('block_step_ms')):>8} {fmt(b.get('roofline_fraction'), 3):>8} {round(b.get('copy_gbps') or 0):>9} {b.get('graph_count')!s:>6} {pv!s:>10}  {b.get('canvas_hash')}")
            if b.get("graph_error"):
                print(f"{'':<14} graph capture FAILED, ran eagerly: {b['graph_error']}")
        else:
            print(f"{name[6:]:<14} {graph:>5} {'failed':>8}")
    for other in [g for g in hashes if g not in ("on", "amp")]:
        if "on" in hashes and other in hashes:
            same = hashes["on"] == hashes[other]
            print(f"{'':<14} canvases on vs {other} {'IDENTICAL' if same else 'DIFFER'}")
# LLaDA-MoE's workloads against its own PyTorch peer (scripts/peer_lladamoe_torch.py), same call.
peer_moe = load("peer_moe.json")
for f in sorted(x for x in os.listdir(out) if x.startswith(("bench_dream_", "bench_moe_")) and x.endswith(".json")):
    b = load(f)
    pk = {"bench_moe_b1_dual_k4.json": "B1_P128_G256_blk32_steps64_dual",
          "bench_moe_b8_dual_k4.json": "B8_P128_G256_blk32_steps64_dual",
          "bench_moe_b1_none_k1.json": "B1_P128_G256_blk32_steps256_none"}.get(f)
    peer = peer_moe.get(pk, {}).get("tok_s") if pk else None
    vs = f"  peer {peer} tok/s ({b['tok_per_s'] / peer:.2f}x)" if peer and "tok_per_s" in b else ""
    if "tok_per_s" in b:
        print(f"{f[6:-5]:<20} {b['tok_per_s']:>8.1f} tok/s {b['ms_per_step']:>8.2f} ms/step  full {fmt(b.get('full_step_ms'))}  block {fmt(b.get('block_step_ms'))}  roofline {fmt(b.get('roofline_fraction'), 3)}{vs}")
    else:
        print(f"{f[6:-5]:<20} failed")
for name in [n + suffix for suffix in ("", "_combotail") for n in peer_key]:
    b = load(name + ".json")
    if b.get("profile"):
        print(f"\nprofile {name[6:]} (eager, ms per step; each op includes the gap before it):")
        for r in b["profile"]:
            print(f"  {r['step']:<6} {r['op']:<16} {r['ms_per_step']:>9.4f} {r['calls_per_step']:>7.1f} {100 * r['share']:>5.1f}%")
for exp, var, prefixes in (("stream", "DLLM_GEMM_STREAM", ("gemm.stream", "gemm.skinny_v2")),
                           ("tma", "DLLM_GEMM_TMA", ("gemm.tma_vs", "gemm.wgmma_vs")),
                           ("tma4", "DLLM_GEMM_TMA4", ("gemm.tma4_vs", "gemm.tma_vs", "gemm.wgmma_vs")),
                           ("split", "DLLM_ATTN_SPLIT", ("attention Split", "attention Mma b1 sq32", "attention Mma b8 sq32")),
                           ("pdl", "DLLM_PDL", ("gemm.stream", "gemm.shape")),
                           ("keys", "DLLM_ATTN_KEYS", ("attention Keys", "attention Mma b1 sq32", "attention Mma b8 sq32")),
                           ("sessiongraphs", "DLLM_SESSION_GRAPHS", ()),
                           ("prefetch", "DLLM_L2_PREFETCH", ()),
                           ("swiglu", "DLLM_FUSED_SWIGLU", ()),
                           ("mlp", "DLLM_FUSED_MLP", ())):
    setting = "0" if exp == "swiglu" else "1"
    cs = load(f"check_{exp}.json")
    if "checks" not in cs:
        continue
    bad = [x for x in cs["checks"] if not x["passed"]]
    print(f"\n{exp} kernel ({var}={setting}): {len(cs['checks'])} checks, {len(bad)} failed")
    for x in bad[:40]:
        print(f"  FAIL {x['name']}: rel_err {x['rel_err']} tol {x['tol']} {x['detail']}")
    for x in cs.get("benches", []):
        if x["name"].startswith(prefixes):
            print(f"  {x['name']:<48} {fmt(x.get('ms'), 4):>9} {fmt(x.get('gbps'), 0):>7} {fmt(x.get('tflops'), 1):>7}  {x.get('detail', '')}")
try:
    lines = []
    for log in ("sweep.log", "sweep_swiglu.log"):
        if os.path.exists(os.path.join(out, log)):
            lines += [l for l in open(os.path.join(out, log)) if l.startswith("gemm.sweep")]
    print("\nGEMM plan sweep (ms, plan; * = fastest of its shape):")
    best = {}
    for l in lines:
        shape, rest = l.split(":", 1)
        try:
            ms = float(rest.split("ms")[0])
        except ValueError:
            continue
        if ms == ms and (shape not in best or ms < best[shape]):
            best[shape] = ms
    for l in lines:
        shape, rest = l.split(":", 1)
        star = "*" if rest.strip().startswith(f"{best.get(shape, -1):.4f} ms") else " "
        print(f" {star}{l.rstrip()}")
except Exception:
    pass
try:
    print("\nshapes (new kernel off, then on, per shape):")
    print("".join("  " + l for l in open(os.path.join(out, "shapes.log")) if l.startswith("gemm.shape")))
except Exception:
    pass
if "_error" in p:
    print("* peer: fallback numbers of the 2026-11-27 H200 run (peer stage not run)")
else:
    print("\npeer:", {k: v for k, v in p.items() if not isinstance(v, dict)})
    for k, v in p.items():
        if isinstance(v, dict):
            print(f"  {k}: {v}")
PY
        ;;
    *)
        echo "unknown stage $s (smi check synth bench benchoff benchnostream benchpdl csplit rope fold qll combo keys264 mlp blocks99 ring2 ncustream peer stream tma tma4 attn2 prefetch split pdl keys swiglu sessiongraphs ampere shapes sweep sanitize ncu benchexp dream7b moe7b kvariant summary pack)" >&2
        FAILED=$((FAILED + 1))
        ;;
    esac
done
echo "stages failed: $FAILED"
[ "$FAILED" -eq 0 ]
