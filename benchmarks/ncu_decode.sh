#!/usr/bin/env bash
# Nsight Compute on the decode GEMMs of TRITON and MARLIN (benchmarks/ncu_layer.py), one GPU; the report goes to
# $OUT/ncu.txt. Run from the repository root on the device: bash benchmarks/ncu_decode.sh deepseek-v3:32 kimi-k2:128
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks" PYTHONUNBUFFERED=1
if [ -f build/marlin/_moe_C_stable_libtorch.abi3.so ]; then
    export WNA16MOE_MARLIN_LIB="$PWD/build/marlin/_moe_C_stable_libtorch.abi3.so"
fi
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${ncu:-none}"
timeout "${NCU_LIMIT:-420}" "$ncu" --clock-control none --profile-from-start off \
    --kernel-name regex:'_moe_gemm|[Mm]arlin' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/ncu_layer.py "$@" > "$OUT/ncu.txt" 2>&1
echo "rc=$?"
grep -E "profiled|==PROF==|==ERROR==|Error" "$OUT/ncu.txt" | head -20
