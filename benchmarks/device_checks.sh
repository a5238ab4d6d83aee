#!/usr/bin/env bash
# The GPU checks and measurements of a device session, in the order they pay off, each bounded in time. Every
# log and result goes into $OUT/results.tgz, packed again after each step, so that a call cut short still
# returns what finished (at most 8 files come back from the device tool). Run from the repository root:
#
#   benchmarks/device_checks.sh tests    # one GPU: TRITON and MARLIN GPU tests (~9 min at most)
#   benchmarks/device_checks.sh sweep    # one GPU: the benchmark sweep with MARLIN and bf16 (~9 min at most)
#   benchmarks/device_checks.sh multi    # two GPUs: NCCL tests, EP=2 with counted and fixed-buffer all-to-all
#   benchmarks/device_checks.sh pair     # two GPUs: 'tests' with MARLIN on one GPU, TRITON on the other, then 'multi'
#   benchmarks/device_checks.sh quad     # four GPUs: the sweep split over three; a kernel profile, the W8A16
#                                        # bench, TRITON's and MARLIN's GPU tests (parallel processes) on the fourth
#   benchmarks/device_checks.sh decode   # two GPUs: the decode sweep (M <= 512), the W8A16 bench
#   benchmarks/device_checks.sh w8a16-sweep # four GPUs: the W8A16 sweep, one shape per GPU
#   benchmarks/device_checks.sh confirm  # four GPUs: the shipped table as served, int4 and W8A16, one shape per GPU
#   benchmarks/device_checks.sh served   # one GPU: the shipped table as served ($SCHEMES, e.g. "int4 int8_g128_sym";
#                                        # default $SCHEME or int4), the shapes in turn ($SERVED_SHAPES, default the
#                                        # four of the table; then $OFF_TABLE_SHAPES, default glm-4.5-air, on its
#                                        # defaults, ~40 s; int4 ~245 s, W8A16 ~170 s on
#                                        # an H200), then the TRITON backend's and the decode kernel's GPU tests
#                                        # ($SERVED_TESTS: other test files) in the time left of $BUDGET (560 s)
#   benchmarks/device_checks.sh probe    # two GPUs: read ceiling by size, kernel profile; the W8A16 bench
#   benchmarks/device_checks.sh ab       # the bench of source trees build/ab/*/src (A/B of kernel versions), in
#                                        # turns on every GPU but the last; TRITON's GPU tests on the last
#   benchmarks/device_checks.sh ab-sweep # four GPUs: the A/B on one, the decode sweep on two, tests + profile
#   benchmarks/device_checks.sh ab-trees # one GPU: benchmarks/ab_trees.py (the src tree build/ab/<name>/src against
#                                        # the working tree's, processes in turn, $AB_CASES), then TRITON's GPU tests
#   benchmarks/device_checks.sh search   # every GPU: bench --search (coordinate search), one process per shape
#                                        # and M; $SEARCH_CASES: "shape:M,M shape:M | shape:M ..." ('|' between
#                                        # GPUs; default: the four shapes at M = 1 8 32 128, one per GPU);
#                                        # $SEARCH_SCHEME: a weight scheme (default: the bench's)
#   benchmarks/device_checks.sh gluon    # two GPUs: the Gluon decode kernel's tests (and TRITON's with
#                                        # $GLUON_TRITON_TESTS set); try_configs with its variants (and the
#                                        # read-pattern probe with $READ_PATTERN set)
#   benchmarks/device_checks.sh ab-env   # two GPUs: TRITON's GPU tests; try_configs under each $AB_ENV setting
#   benchmarks/device_checks.sh ship     # two GPUs: tests and the W8A16 bench; try_configs, --trials, int4 served
#   benchmarks/device_checks.sh ab-try   # one GPU: try_configs ($TRY_CASES, $TRY_VARIANTS) in this tree and in
#                                        # each build/ab/<name>/src, alternating
#   benchmarks/device_checks.sh chain    # one GPU: back-to-back forwards against the bench's single one
#   benchmarks/device_checks.sh between  # every GPU: the table's entry against the defaults between its rows
#                                        # (try_configs --variant default at $BETWEEN_M, default 768,1400,3000,
#                                        # 5600,12000: inner points of the prefill entries' spans), the shapes
#                                        # ($SERVED_SHAPES) dealt over the GPUs; $BETWEEN_SCHEME: a weight scheme
#   benchmarks/device_checks.sh span     # every GPU: one-field trials of table entries across their spans
#                                        # (try_configs --span, three rounds); $SPAN_TRIALS: "shape:M@variant[+variant]
#                                        # ...", e.g. "kimi-k2:8192@num_stages2=2 mixtral:2048@num_stages=4+carry=1",
#                                        # dealt over the GPUs; $SPAN_SCHEME: a weight scheme
#   benchmarks/device_checks.sh peer     # one GPU: vLLM's Triton WNA16 kernel against the shipped table
#                                        # (benchmarks/vllm_triton_peer.py), every shape and M
#   SCRIPT=build/x.sh benchmarks/device_checks.sh script # one GPU: a call script of one's own, its $OUT packed
#                                        # like the modes' (v85 lost 4 of 12 files to the 8-file limit), MARLIN's
#                                        # library set; its output's last $SCRIPT_TAIL (40) lines printed
#
# One device call runs at most 10 minutes, hence one mode per call.
#
# MARLIN needs vLLM's op library (carry it, ~44 MiB; build/ is git-ignored):
#   pip download vllm==0.33.0 --no-deps -d build/vllm-wheel
#   unzip -o -j build/vllm-wheel/vllm-0.33.0-*.whl vllm/_moe_C_stable_libtorch.abi3.so -d build/marlin
# vLLM's Triton WNA16 kernel (the 'peer' mode) is read from its fused_moe.py (carry build/vllm_triton):
#   unzip -o -j build/vllm-wheel/vllm-0.33.0-*.whl vllm/model_executor/layers/fused_moe/fused_moe.py -d build/vllm_triton
# Its kernels are sm_80 PTX that the driver JIT-compiles on Hopper (minutes for the whole test file): the
# compute cache is written to $OUT/nvcache.tgz, beside the results (it comes back only under 16 MB); carry it
# back as build/nvcache.tgz to skip that next time.
# Each step's limit is in seconds; a step that runs out is reported and the next one still runs.
set -u
RESULTS=${OUT:-/tmp/out}  # what comes back: results.tgz (and nvcache.tgz)
OUT=$(mktemp -d /tmp/device-checks.XXXXXX)  # where the steps write
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
export WNA16MOE_COMMIT=${WNA16MOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_CACHE_MAXSIZE=4294967296 CUDA_CACHE_PATH=/tmp/nvcache
if [ -f build/nvcache.tgz ]; then mkdir -p "$CUDA_CACHE_PATH" && tar -xzf build/nvcache.tgz -C "$CUDA_CACHE_PATH"; fi
if [ -f build/marlin/_moe_C_stable_libtorch.abi3.so ]; then
    export WNA16MOE_MARLIN_LIB="$PWD/build/marlin/_moe_C_stable_libtorch.abi3.so"
fi
start=$(date +%s)

pack() {  # everything the steps wrote so far into $RESULTS/results.tgz, replaced whole (steps running beside
    # each other may pack at once: each into a file of its own, then renamed)
    local tmp
    tmp=$(mktemp "$RESULTS/.results.XXXXXX") || return
    tar -czf "$tmp" -C "$OUT" . 2>/dev/null
    if [ $? -le 1 ]; then mv "$tmp" "$RESULTS/results.tgz"; else rm -f "$tmp"; fi  # (1: a file grew meanwhile)
}
trap pack EXIT

step() {  # step NAME LIMIT COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log, print the tail, pack
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc ($(( $(date +%s) - start )) s since start)"
    grep -E "passed|failed|error|FAILED|wrote" "$OUT/$name.log" | tail -4
    pack
}

triton_tests() {  # triton_tests LIMIT: TRITON's GPU tests, one process each (LIMIT seconds per test; in one
    # process they ran past 330 s once the table held decode-kernel entries to compile, v27)
    parallel_tests triton-tests "$1" tests/test_kernels_dequant.py tests/test_experts_triton.py
}

marlin_tests() {  # the tests no earlier device run reached first, then the sweep over shapes and M
    step marlin-tests-a "$1" python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_experts_marlin.py \
        -k "not matches_emulation or batched"
    step marlin-tests-b "$1" python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_experts_marlin.py \
        -k "matches_emulation and not batched"
    tar -czf "$RESULTS/nvcache.tgz" -C "$CUDA_CACHE_PATH" . 2>/dev/null
}

parallel_tests() {  # parallel_tests NAME LIMIT FILES...: one pytest process per GPU test, $PARALLEL (8) at a time,
    # each within LIMIT seconds, all of them within $TESTS_LIMIT (default: no bound beyond the call's)
    local name=$1 limit=$2
    shift 2
    python3 -m pytest -m gpu -p no:cacheprovider --collect-only "$@" 2>/dev/null | grep '::' > "$OUT/$name-ids.txt"
    timeout "${TESTS_LIMIT:-0}" xargs -P "${PARALLEL:-8}" -I{} sh -c "timeout $limit python3 -m pytest \
        -p no:cacheprovider -rfE '{}' 2>&1 | tail -2 | sed 's|^|{} :: |'" < "$OUT/$name-ids.txt" > "$OUT/$name.log"
    echo "== $name: $(grep -c ' passed' "$OUT/$name.log") passed," \
        "$(grep -c -E 'failed|error' "$OUT/$name.log") with failures or errors, of $(wc -l < "$OUT/$name-ids.txt")"
    grep -E 'failed|error' "$OUT/$name.log" | head -5
    pack
}

ab_rounds() {  # ab_rounds GPU OFFSET: the bench of the trees build/ab/<name>/src on GPU, one per round over
    # $AB_ROUNDS (3) rounds, starting at tree OFFSET (GPUs started at different offsets rotate the trees)
    local gpu=$1 offset=$2 trees=(build/ab/*/)
    for round in $(seq 0 $(( ${AB_ROUNDS:-3} - 1 ))); do
        local tree=${trees[$(( (offset + round) % ${#trees[@]} ))]}
        local name
        name=$(basename "$tree")
        CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH="$PWD/$tree/src:$PWD/tests" \
            WNA16MOE_COMMIT=$(cat "$tree/COMMIT" 2>/dev/null || echo "$name") \
            step "ab-$name-gpu$gpu-r$round" 200 python3 -m wna16moe.bench \
            --shapes ${AB_SHAPES:-mixtral qwen3-30b-a3b deepseek-v3 kimi-k2} --tokens ${AB_TOKENS:-1 8 32 128} \
            --out "$OUT/ab-$name-gpu$gpu-r$round.json"
    done
}

tree_tests() {  # TRITON's GPU tests (one process each) of $TEST_TREE (src/ and tests/; default: the working tree)
    (cd "${TEST_TREE:-.}" && export PYTHONPATH="$PWD/src:$PWD/tests" && parallel_tests triton-tests 400 \
         tests/test_kernels_dequant.py tests/test_experts_triton.py tests/test_kernels_moe_gemm_decode.py \
         tests/test_bench.py)
}

SHAPES=(${SERVED_SHAPES:-mixtral deepseek-v3 kimi-k2 qwen3-30b-a3b})
per_shape() {  # per_shape NAME LIMIT BENCH_ARGS...: the bench of SHAPES[i] on GPU i, all four at once, each
    # to $OUT/NAME-<shape>.json
    local name=$1 limit=$2 gpu
    shift 2
    for gpu in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$gpu step "$name-${SHAPES[$gpu]}" "$limit" python3 -m wna16moe.bench \
            --shapes "${SHAPES[$gpu]}" "$@" --out "$OUT/$name-${SHAPES[$gpu]}.json" &
    done
    wait
}

deal_over_gpus() {  # deal_over_gpus COUNT FUNCTION: FUNCTION 0 .. COUNT-1, item i on GPU i mod the GPU count,
    # each GPU's items in turn, all GPUs at once
    nvidia-smi -L
    local count=$1 fn=$2 gpus gpu i
    gpus=$(nvidia-smi -L | wc -l)
    for gpu in $(seq 0 $(( gpus - 1 ))); do
        (export CUDA_VISIBLE_DEVICES=$gpu
         for i in $(seq "$gpu" "$gpus" $(( count - 1 ))); do "$fn" "$i"; done) &
    done
    wait
}

multi() {
    step nccl-tests 180 python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_distributed.py
    step ep2-counted 150 torchrun --nproc-per-node 2 -m wna16moe.bench --ep 2 --dp --shapes deepseek-v3 kimi-k2 \
        --tokens 1 8 32 128 512 2048 --out "$OUT/ep2-counted.json"
    step ep2-fixed 150 torchrun --nproc-per-node 2 -m wna16moe.bench --ep 2 --dp --max-tokens-per-rank 32 \
        --shapes deepseek-v3 kimi-k2 --tokens 1 8 32 --out "$OUT/ep2-fixed.json"
    step one-gpu 150 python3 -m wna16moe.bench --shapes deepseek-v3 kimi-k2 --tokens 2 16 64 256 1024 4096 \
        --out "$OUT/one-gpu.json"
}

case "${1:-tests}" in
tests)
    nvidia-smi -L
    triton_tests 240
    marlin_tests 150
    ;;
pair)
    nvidia-smi -L
    (export CUDA_VISIBLE_DEVICES=0; marlin_tests 130) &
    (export CUDA_VISIBLE_DEVICES=1; triton_tests 260) &
    wait
    step nccl-tests 130 python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_distributed.py
    step ep2-fixed 100 torchrun --nproc-per-node 2 -m wna16moe.bench --ep 2 --dp --max-tokens-per-rank 32 \
        --shapes deepseek-v3 kimi-k2 --tokens 1 8 32 --out "$OUT/ep2-fixed.json"
    step one-gpu 70 python3 -m wna16moe.bench --shapes deepseek-v3 kimi-k2 --tokens 2 16 64 --out "$OUT/one-gpu.json"
    ;;
quad)
    nvidia-smi -L
    sweep_on() {  # sweep_on GPU NAME SHAPES...
        local gpu=$1 name=$2
        shift 2
        CUDA_VISIBLE_DEVICES=$gpu step "$name" 560 python3 -m wna16moe.bench --sweep --shapes "$@" \
            --out "$OUT/$name.json"
    }
    sweep_on 0 sweep-a mixtral qwen3-30b-a3b &
    sweep_on 1 sweep-b deepseek-v3 &
    sweep_on 2 sweep-c kimi-k2 &
    (export CUDA_VISIBLE_DEVICES=3
     step profile 60 python3 benchmarks/profile_layer.py --shapes qwen3-30b-a3b deepseek-v3 kimi-k2 --tokens 1 8
     step w8a16 120 python3 -m wna16moe.bench --scheme int8_g128_sym --shapes mixtral deepseek-v3 \
         --out "$OUT/w8a16.json"
     triton_tests 360 &
     # Marlin's PTX is JIT-compiled per kernel on first use, on the CPU: one process per test spreads that.
     PARALLEL=16 parallel_tests marlin-tests 420 tests/test_experts_marlin.py
     wait) &
    wait
    ;;
final)  # four GPUs: the sweep, one shape per GPU; then TRITON's and the alignment's GPU tests and a profile
    nvidia-smi -L
    per_shape sweep 300 --sweep
    # then the checks: TRITON's GPU tests, the alignment's (and its timing), a kernel profile
    (export CUDA_VISIBLE_DEVICES=0; tree_tests) &
    (export CUDA_VISIBLE_DEVICES=1
     step align-tests 90 python3 -m pytest -m gpu -p no:cacheprovider -rfE tests/test_kernels_moe_align.py
     step bench-align 120 python3 benchmarks/bench_align.py --out "$OUT/align.json") &
    CUDA_VISIBLE_DEVICES=2 step profile 200 python3 benchmarks/profile_layer.py \
        --shapes qwen3-30b-a3b kimi-k2 mixtral --tokens 8 128 512 2048 &
    wait
    ;;
ab)  # the bench of each tree build/ab/<name>/src on every GPU but the last, trees rotated over $AB_ROUNDS (3)
     # rounds so that a GPU's own speed cancels out; TRITON's GPU tests on the last GPU
    nvidia-smi -L
    gpus=$(nvidia-smi -L | wc -l)
    bench_gpus=$(( gpus > 1 ? gpus - 1 : 1 ))
    for gpu in $(seq 0 $(( bench_gpus - 1 ))); do
        ab_rounds "$gpu" "$gpu" &
    done
    (export CUDA_VISIBLE_DEVICES=$(( gpus - 1 )); tree_tests) &
    wait
    ;;
ab-sweep)  # four GPUs: the A/B of 'ab' on GPU 0 (trees alternating), the decode sweep of $SWEEP_TREE (default:
           # the working tree) on GPUs 1 and 2, TRITON's GPU tests of $TEST_TREE and a profile on GPU 3
    nvidia-smi -L
    ab_rounds 0 0 &
    sweep_tree=${SWEEP_TREE:-.}
    for spec in "1 decode-a mixtral deepseek-v3" "2 decode-b kimi-k2 qwen3-30b-a3b"; do
        set -- $spec
        CUDA_VISIBLE_DEVICES=$1 PYTHONPATH="$PWD/$sweep_tree/src:$PWD/tests" step "$2" 480 python3 -m wna16moe.bench \
            --sweep --shapes "$3" "$4" --tokens 1 8 32 128 512 --out "$OUT/$2.json" &
    done
    (export CUDA_VISIBLE_DEVICES=3
     tree_tests
     PYTHONPATH="$PWD/$sweep_tree/src:$PWD/tests" step profile 120 python3 benchmarks/profile_layer.py \
         --shapes qwen3-30b-a3b kimi-k2 --tokens 128 512 2048) &
    wait
    ;;
confirm)  # four GPUs: the shipped table as served (no sweep), int4 then W8A16, one shape per GPU
    nvidia-smi -L
    per_shape served 200
    per_shape served-w8a16 200 --scheme int8_g128_sym
    ;;
served)  # one GPU: the table as served, the shapes in turn, MARLIN in the same run, for each of $SCHEMES
    # ("int4 int8_g128_sym": both in one call, ~420 s on an H200; default: $SCHEME, else the bench's int4); then
    # GPU tests as time allows
    nvidia-smi -L
    serve() {  # serve NAME SCHEME SHAPE: one shape's bench as served into $OUT/NAME.json; fails when out of time
        local left=$(( ${BUDGET:-560} - ($(date +%s) - start) ))
        [ "$left" -lt 30 ] && return 1
        step "$1" "$(( left < 200 ? left : 200 ))" python3 -m wna16moe.bench --shapes "$3" \
            $([ "$2" != int4 ] && echo --scheme "$2") --out "$OUT/$1.json"
        return 0
    }
    for scheme in ${SCHEMES:-${SCHEME:-int4}}; do
        for shape in "${SHAPES[@]}"; do
            serve "served-$scheme-$shape" "$scheme" "$shape" || break 2
        done
        # A shape the table does not hold runs the defaults, which no table shape exercises (v47: a kernel
        # change left them 2.2-4.5x slow unseen). Named apart so that `wna16moe.tuning` never reads it as served.
        for shape in ${OFF_TABLE_SHAPES-glm-4.5-air}; do
            serve "off-table-$scheme-$shape" "$scheme" "$shape" || break 2
        done
    done
    left=$(( ${BUDGET:-560} - ($(date +%s) - start) ))
    if [ "$left" -gt 60 ]; then  # (bounded as a whole: bounded per test only, they once outran the call)
        TESTS_LIMIT=$(( left - 10 )) PARALLEL=16 parallel_tests triton-tests 300 \
            ${SERVED_TESTS:-tests/test_experts_triton.py tests/test_kernels_moe_gemm_decode.py}
    fi
    ;;
w8a16-sweep)  # four GPUs: the W8A16 (int8, group 128) sweep, one shape per GPU
    nvidia-smi -L
    per_shape w8a16-sweep 420 --sweep --scheme int8_g128_sym
    ;;
decode)  # two GPUs: the decode sweep (M <= 512) of two shapes each, then the W8A16 bench of one shape each
    nvidia-smi -L
    for spec in "0 decode-a mixtral deepseek-v3" "1 decode-b kimi-k2 qwen3-30b-a3b"; do
        set -- $spec
        (export CUDA_VISIBLE_DEVICES=$1
         step "$2" 420 python3 -m wna16moe.bench --sweep --shapes "$3" "$4" --tokens 1 8 32 128 512 \
             --out "$OUT/$2.json"
         [ "$1" = 0 ] && shape=mixtral || shape=deepseek-v3
         step "w8a16-$1" 120 python3 -m wna16moe.bench --scheme int8_g128_sym --shapes $shape \
             --out "$OUT/w8a16-$1.json"
         [ "$1" = 1 ] && step swap-int8-tests 120 python3 -m pytest -m gpu -p no:cacheprovider -rfE \
             tests/test_experts_triton.py -k "swap_ab and int8") &
    done
    wait
    ;;
probe)  # two GPUs: the read ceiling by size and a kernel profile on one, the W8A16 bench on the other
    nvidia-smi -L
    (export CUDA_VISIBLE_DEVICES=0
     step read-bandwidth 120 python3 benchmarks/read_bandwidth.py --out "$OUT/reads.json"
     step profile 150 python3 benchmarks/profile_layer.py --shapes qwen3-30b-a3b mixtral deepseek-v3 kimi-k2 \
         --tokens 1 8 128) &
    CUDA_VISIBLE_DEVICES=1 step w8a16 400 python3 -m wna16moe.bench --scheme int8_g128_sym \
        --shapes mixtral deepseek-v3 --out "$OUT/w8a16.json" &
    wait
    ;;
ab-trees)  # one GPU: the working tree's src against build/ab/<name>/src (the first such tree), then the tests
    nvidia-smi -L
    base=(build/ab/*/src)
    step ab-trees "${AB_LIMIT:-300}" python3 benchmarks/ab_trees.py "${base[0]}" \
        ${AB_CASES:-deepseek-v3:1,8,32,128 mixtral:1,8,32 kimi-k2:1,8,32 qwen3-30b-a3b:1,8,32,128} \
        --budget-s $(( ${AB_LIMIT:-300} * 2 / 3 )) --logs "$OUT" --out "$OUT/ab-trees.json"
    grep -E "base .* new" "$OUT/ab-trees.log"
    tree_tests
    ;;
search)  # every GPU: the coordinate search (bench --search) per shape and M; then tuning takes the rows
    nvidia-smi -L
    IFS='|' read -ra per_gpu <<< "${SEARCH_CASES:-mixtral:1,8,32,128 | deepseek-v3:1,8,32,128 | kimi-k2:1,8,32,128 | qwen3-30b-a3b:1,8,32,128}"
    for gpu in "${!per_gpu[@]}"; do
        (export CUDA_VISIBLE_DEVICES=$gpu
         for case in ${per_gpu[$gpu]}; do
             shape=${case%%:*} ms=${case#*:}
             for m in ${ms//,/ }; do
                 [ $(( $(date +%s) - start )) -lt "${DEADLINE:-540}" ] || continue  # leave time to pack
                 step "search-$shape-$m" 200 python3 -m wna16moe.bench --search --shapes "$shape" --tokens "$m" \
                     ${SEARCH_SCHEME:+--scheme "$SEARCH_SCHEME"} --out "$OUT/search-$shape-$m.json"
             done
         done) &
    done
    wait
    ;;
between)  # every GPU: entries against the defaults at M between the table's rows, shapes dealt over the GPUs
    between_shape() {
        step "between-${SHAPES[$1]}" "${BETWEEN_LIMIT:-280}" python3 benchmarks/try_configs.py \
            "${SHAPES[$1]}:${BETWEEN_M:-768,1400,3000,5600,12000}" --variant default \
            ${BETWEEN_SCHEME:+--scheme "$BETWEEN_SCHEME"} --out "$OUT/between-${SHAPES[$1]}.json"
    }
    deal_over_gpus ${#SHAPES[@]} between_shape
    ;;
span)  # every GPU: entries changed one field at a time, timed at their M and inside the span they run
    read -ra trials <<< "${SPAN_TRIALS:?set SPAN_TRIALS, e.g. kimi-k2:8192@num_stages2=2}"
    span_trial() {
        local case=${trials[$1]%%@*} variants=${trials[$1]#*@}
        local name="span-${case/:/-}-${variants//[=+,]/-}"
        step "$name" "${SPAN_LIMIT:-200}" python3 benchmarks/try_configs.py --span "$case" --rounds 3 \
            $(printf -- '--variant %s ' ${variants//+/ }) ${SPAN_SCHEME:+--scheme "$SPAN_SCHEME"} \
            --out "$OUT/$name.json"
    }
    deal_over_gpus ${#trials[@]} span_trial
    ;;
peer)  # one GPU: vLLM's Triton WNA16 kernel and the shipped TRITON table, same tokens and routing
    nvidia-smi -L
    every_m=1,8,32,128,512,2048,8192
    step vllm-triton 560 python3 benchmarks/vllm_triton_peer.py --source build/vllm_triton/fused_moe.py \
        kimi-k2:$every_m qwen3-30b-a3b:$every_m deepseek-v3:$every_m mixtral:$every_m --out "$OUT/vllm-triton.json"
    ;;
gluon)  # two GPUs: the Gluon decode kernel's GPU tests on one; on the other, try_configs with its variants
    # ($GLUON_CASES, default the four shapes at M = 1 8 32 128; $GLUON_VARIANTS, space-separated)
    nvidia-smi -L
    (export CUDA_VISIBLE_DEVICES=0; parallel_tests decode-tests 300 tests/test_kernels_moe_gemm_decode.py
     [ -n "${GLUON_TRITON_TESTS:-}" ] && triton_tests 240) &
    variants=()
    for v in ${GLUON_VARIANTS:-decode=1,block_m=8,block_n1=64,block_n2=128 decode=1,block_m=8,block_n1=128,block_n2=128}; do
        variants+=(--variant "$v")
    done
    if [ -n "${READ_PATTERN:-}" ]; then
        CUDA_VISIBLE_DEVICES=1 step read-pattern 120 python3 benchmarks/read_pattern.py --out "$OUT/read-pattern.json"
    fi
    CUDA_VISIBLE_DEVICES=1 step gluon-try 420 python3 benchmarks/try_configs.py \
        ${GLUON_CASES:-mixtral:1,8,32,128 deepseek-v3:1,8,32,128 kimi-k2:1,8,32,128 qwen3-30b-a3b:1,8,32,128} \
        "${variants[@]}" --out "$OUT/gluon-try.json"
    wait
    ;;
ab-env)  # two GPUs: TRITON's GPU tests ($TEST_FILES, one process each) on one; on the other, try_configs of the
    # shipped table ($TRY_CASES) under each setting of $AB_ENV ("NAME=value ..."), alternating over two rounds
    nvidia-smi -L
    (export CUDA_VISIBLE_DEVICES=0; parallel_tests tests 300 ${TEST_FILES:-tests/test_kernels_moe_gemm_decode.py \
        tests/test_kernels_dequant.py tests/test_experts_triton.py}) &
    for round in 0 1; do
        for setting in $AB_ENV; do
            name="try-${setting//=/-}-r$round"  # (no '=' in the names of files that come back)
            (export "$setting" CUDA_VISIBLE_DEVICES=1
             step "$name" 240 python3 benchmarks/try_configs.py $TRY_CASES --out "$OUT/$name.json")
        done
    done
    wait
    ;;
ship)  # two GPUs: TRITON's GPU tests, then the W8A16 bench of $W8_SHAPES, on one; on the other try_configs
    # ($TRY_CASES, $TRY_VARIANTS), `tuning --trials` on its result, and the table as served (int4, with MARLIN),
    # one file per shape; the table comes back as tuned_triton.json
    nvidia-smi -L
    (export CUDA_VISIBLE_DEVICES=0; parallel_tests tests 300 tests/test_kernels_grid_dependence.py \
         tests/test_kernels_moe_gemm_decode.py tests/test_kernels_dequant.py tests/test_experts_triton.py \
         tests/test_kernels_moe_align.py
     step served-w8 "${W8_LIMIT:-150}" python3 -m wna16moe.bench --shapes ${W8_SHAPES:-deepseek-v3 qwen3-30b-a3b} \
         --scheme int8_g128_sym --out "$OUT/served-w8.json") &
    variants=()
    for v in ${TRY_VARIANTS:-}; do
        variants+=(--variant "$v")
    done
    export CUDA_VISIBLE_DEVICES=1
    step try 200 python3 benchmarks/try_configs.py $TRY_CASES "${variants[@]}" --out "$OUT/try.json"
    step trials 30 python3 -m wna16moe.tuning --trials "$OUT/try.json"
    cp src/wna16moe/tuned_triton.json "$OUT/"
    for shape in "${SHAPES[@]}"; do
        step "served-$shape" 150 python3 -m wna16moe.bench --shapes "$shape" --out "$OUT/served-$shape.json"
    done
    wait
    ;;
ab-try)  # one GPU: try_configs ($TRY_CASES, $TRY_VARIANTS as for gluon) in this tree, then in each tree
    # build/ab/<name>/src, then this tree again: a kernel change A/B'd on configurations the table may not hold
    variants=()
    for v in ${TRY_VARIANTS:-}; do
        variants+=(--variant "$v")
    done
    for tree in . build/ab/*/ .; do
        name=$(basename "$(cd "$tree" && pwd)")
        PYTHONPATH="$PWD/$tree/src:$PWD/tests" step "try-$name-$(date +%s)" 240 python3 benchmarks/try_configs.py \
            $TRY_CASES "${variants[@]}" --out "$OUT/try-$name-$(date +%s).json"
    done
    ;;
script)  # one GPU: $SCRIPT with $OUT the folder that is packed, within $SCRIPT_LIMIT seconds (580)
    step script "${SCRIPT_LIMIT:-580}" bash "$SCRIPT"
    tail -n "${SCRIPT_TAIL:-40}" "$OUT/script.log"
    ;;
chain)  # one GPU: is a forward's time in the bench its time among other layers?
    nvidia-smi -L
    step chain 300 python3 benchmarks/back_to_back.py --out "$OUT/chain.json"
    ;;
sweep)
    nvidia-smi -L
    step bench-sweep 560 python3 -m wna16moe.bench --sweep --out "$OUT/sweep.json"
    ;;
multi)
    nvidia-smi -L
    multi
    ;;
*)
    echo "usage: $0 tests|sweep|multi|pair|quad|final|ab|ab-sweep|ab-trees|search|gluon|ab-env|ship|ab-try|chain|confirm|served|w8a16-sweep|decode|probe|peer|between|span|script" >&2
    exit 2
    ;;
esac
