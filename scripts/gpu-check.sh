#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, with binaries prebuilt by scripts/build-gpu-bundle.sh
# into .gpu/ and the PyTorch peer in .peer/. Writes every log and JSON result under $OUT.
#
# Usage: scripts/gpu-check.sh [STAGE...]   stages: smi check synth bench peer summary (default: all)
# Each stage has its own timeout (seconds, overridable: T_CHECK=200 ...) so a hang cannot eat the
# lease; a failed stage is recorded and the script goes on. Exit status: 0 when every stage ran
# with status 0.
set -u -o pipefail
OUT=${OUT:-/tmp/dllm-gpu-out}
mkdir -p "$OUT"
BIN=${BIN:-.gpu}
MODEL8B=${MODEL8B:-/tmp/llada8b}
TINY=${TINY:-models/tiny-llada-code}
STAGES=${*:-smi check synth bench peer summary}
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
    return 0
}

# bench NAME LIMIT_S ARGS... : one `dllm bench` on the 8B checkpoint, JSON to $OUT/NAME.json.
bench() {
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" bash -c "set -o pipefail; '$BIN/dllm' bench --model '$MODEL8B' --backend cuda --prompt-len 128 --gen-len 256 --block-len 32 --json $* > '$OUT/$name.json'; rc=\$?; cat '$OUT/$name.json'; exit \$rc"
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
    bench)
        bench bench_b1_dual_k4 "${T_BENCH:-120}" --batch 1 --tokens-per-step 4 --cache dual
        bench bench_b8_dual_k4 "${T_BENCH:-120}" --batch 8 --tokens-per-step 4 --cache dual
        bench bench_b1_none_k1 "${T_BENCH_NONE:-180}" --batch 1 --tokens-per-step 1 --cache none
        ;;
    peer)
        stage peer "${T_PEER:-300}" env OUT="$OUT" python3 .peer/peer_llada_torch.py
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
        if x["name"].startswith("model."):
            print(f"  {'PASS' if x['passed'] else 'FAIL'} {x['name']}: {x['detail']}")
else:
    print("\ngpu-check: no results", c.get("_error", ""))
p = load("peer.json")
peer_key = {"bench_b1_dual_k4": "B1_P128_G256_blk32_steps64_dual",
            "bench_b8_dual_k4": "B8_P128_G256_blk32_steps64_dual",
            "bench_b1_none_k1": "B1_P128_G256_blk32_steps256_none"}
print(f"\n{'workload':<18} {'tok/s':>9} {'ms/step':>9} {'roofline':>9} {'copy GB/s':>10} {'peer tok/s':>11}")
for name, pk in peer_key.items():
    b = load(name + ".json")
    pv = p.get(pk, {}).get("tok_s", "-") if pk else "-"
    if "tok_per_s" in b:
        rf = b.get("roofline_fraction")
        print(f"{name[6:]:<18} {b['tok_per_s']:>9.1f} {b['ms_per_step']:>9.2f} {rf if rf is None else round(rf, 3)!s:>9} {round(b.get('copy_gbps') or 0):>10} {pv!s:>11}")
    else:
        print(f"{name[6:]:<18} {'failed':>9} {'':>9} {'':>9} {'':>10} {pv!s:>11}")
if "_error" not in p:
    print("\npeer:", {k: v for k, v in p.items() if not isinstance(v, dict)})
    for k, v in p.items():
        if isinstance(v, dict):
            print(f"  {k}: {v}")
PY
        ;;
    *)
        echo "unknown stage $s (smi check synth bench peer summary)" >&2
        FAILED=$((FAILED + 1))
        ;;
    esac
done
echo "stages failed: $FAILED"
[ "$FAILED" -eq 0 ]
