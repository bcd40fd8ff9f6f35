#!/usr/bin/env bash
# The GPU check: three measurements at the paper's sizes on one GPU, with random weights built from
# configs (no downloads). Expected 2-4 minutes; each part has a time limit, 440 s in all (7.3 min).
#
#   bash tests/gpu/check.sh               # on a CUDA machine, from the repository root
#   bash tests/gpu/check.sh --cpu-smoke   # the same code at tiny sizes on the CPU (tests/gpu/test_check.py)
#
# Needs python with torch, transformers, peft and accelerate; nothing is installed and xmas is
# found through PYTHONPATH (the repository root and tools/). The modules the check imports need no
# pandas, pyarrow, pillow or faiss; the preflight lists which of those are missing all the same.
#
# 1. trajectory-bench: `tools/bench.py trajectory --shape paper --dtype bfloat16` (64 examples in
#    batches of 8): (a) a plain forward, (b) our extraction in bf16, (c) the eager
#    output_attentions reference in float32; examples/s and peak memory of each, the line
#    `extraction_vs_eager=... overhead_vs_forward=... agree=...`, and fails when agree (the largest
#    relative difference of an example's block, bf16 extraction vs fp32 reference) exceeds
#    XMAS_CHECK_MAX_DISAGREEMENT (default 0.05; 2-layer paper widths on a CPU give 3e-3).
# 2. proxy-step: one training step of the paper's proxy (TinyLLaVA: StableLM-2-1.6B + CLIP
#    ViT-L/14-336) through xmas's engine, fp32 weights under bf16 autocast, global batch 32 in 4
#    micro-batches of 8 (tests/gpu/train_step.py proxy).
# 3. lora-7b-step: one LoRA step (r=128, alpha 256, projector in full, gradient checkpointing) of a
#    LLaVA-1.5-7B-shaped target built on the GPU in bf16, one micro-batch of 16 (train_step.py lora).
#    Steps 2 and 3 run a warm-up step, then the measured one; each checks a finite loss and that
#    the trained weights changed and the frozen ones did not.
# 4. proxy-step-fsdp: step 2 through accelerate's FSDP (version 2, full_shard) in one process, as
#    `training.fsdp` runs it (train_step.py proxy --fsdp full_shard); GPUs only, so --cpu-smoke
#    reports it as SKIP.
#
# Output: versions (python, torch, CUDA, transformers, peft, accelerate), the GPU and missing
# optional modules; each part's own output under a `== <part>` header; then a summary, one line
# per part:
#   RESULT trajectory-bench PASS|FAIL extraction_vs_eager=.. overhead_vs_forward=.. agree=.. ...
#   RESULT proxy-step PASS|FAIL step_s=.. first_step_s=.. peak_gib=.. tokens_per_s=.. loss=.. examples=..
#          tokens=.. parameters_m=.. trainable_m=..
#   RESULT lora-7b-step PASS|FAIL (the same figures)
#   RESULT proxy-step-fsdp PASS|FAIL|SKIP (the same figures)
# and `check: PASS` or `check: FAIL (...)`; the exit status is 1 when any part fails. peak_gib is
# torch.cuda.max_memory_allocated during the step (on a CPU, the peak resident set). Each part's
# log is written to $XMAS_CHECK_LOGS (default $OUT when set, else a new temporary folder).
#
# Environment: PYTHON (default python, else python3); time limits in seconds XMAS_CHECK_BENCH_S
# (200), XMAS_CHECK_PROXY_S (110), XMAS_CHECK_LORA_S (130), XMAS_CHECK_FSDP_S (100) (120 each with
# --cpu-smoke);
# XMAS_CHECK_BENCH_EXAMPLES (64); XMAS_CHECK_MAX_DISAGREEMENT (0.05).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$PWD
SMOKE=0
case "${1:-}" in
    "") ;;
    --cpu-smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check: unknown option $1 (use --cpu-smoke or --help)" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
[[ -n $PYTHON ]] || { echo "check: no python found (set PYTHON)" >&2; exit 1; }
export PYTHONPATH="$REPO:$REPO/tools${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
MAX_DISAGREEMENT=${XMAS_CHECK_MAX_DISAGREEMENT:-0.05}
if ((SMOKE)); then
    export CUDA_VISIBLE_DEVICES=""
    BENCH_ARGS=(--shape tiny --examples 4 --batch-size 2)
    STEP_ARGS=(--smoke)
    LIMITS=("${XMAS_CHECK_BENCH_S:-120}" "${XMAS_CHECK_PROXY_S:-120}" "${XMAS_CHECK_LORA_S:-120}")
else
    BENCH_ARGS=(--shape paper --examples "${XMAS_CHECK_BENCH_EXAMPLES:-64}" --batch-size 8)
    STEP_ARGS=()
    LIMITS=("${XMAS_CHECK_BENCH_S:-200}" "${XMAS_CHECK_PROXY_S:-110}" "${XMAS_CHECK_LORA_S:-130}")
fi
FSDP_LIMIT=${XMAS_CHECK_FSDP_S:-100}
LOGS=${XMAS_CHECK_LOGS:-${OUT:-$(mktemp -d -t xmas-gpu-check.XXXXXX)}}
mkdir -p "$LOGS"
START=$SECONDS
RESULTS=()

preflight() {  # versions, the device, missing modules; fails without torch/transformers/peft (or CUDA)
    "$PYTHON" - "$SMOKE" <<'EOF'
import importlib.util
import platform
import sys

smoke = sys.argv[1] == "1"
print(f"python {platform.python_version()} ({sys.executable})")
missing = [name for name in ("torch", "transformers", "peft", "accelerate") if importlib.util.find_spec(name) is None]
if missing:
    print(f"RESULT preflight FAIL missing={','.join(missing)}")
    sys.exit(1)
import accelerate  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, accelerate {accelerate.__version__}")
optional = ("numpy", "yaml", "pandas", "pyarrow", "PIL", "faiss", "flash_attn", "deepspeed")
print("optional modules missing: " + (", ".join(n for n in optional if importlib.util.find_spec(n) is None) or "none"))
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
          f"{torch.cuda.device_count()} visible")
elif smoke:
    print(f"GPU: none (CPU smoke run, {torch.get_num_threads()} threads)")
else:
    print("RESULT preflight FAIL no CUDA device visible to torch (use --cpu-smoke on a CPU)")
    sys.exit(1)
EOF
}

run_part() {  # name limit command... -> runs it under the time limit, its output to the screen and a log
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (limit ${limit} s)"
    local part_start=$SECONDS
    set +e
    if command -v timeout >/dev/null; then
        timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    else
        "$@" 2>&1 | tee "$LOGS/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    set -e
    echo "== $name: exit $rc after $((SECONDS - part_start)) s"
    return "$rc"
}

field() {  # log pattern -> the first line of the log matching the pattern (empty when none)
    grep -m1 -E "$2" "$1" || true
}

bench_result() {  # rc -> the bench's summary line from its log
    local log=$LOGS/trajectory-bench.log ratios peaks=""
    ratios=$(field "$log" '^extraction_vs_eager=')
    for mode in plain extract eager; do
        local pattern line
        case $mode in
            plain) pattern='^\(a\) ' ;;
            extract) pattern='^\(b\) ' ;;
            eager) pattern='^\(c\) ' ;;
        esac
        line=$(field "$log" "$pattern")
        peaks+=" ${mode}_examples_per_s=$(sed -nE 's/.* ([0-9.]+) examples\/s.*/\1/p' <<<"$line")"
        peaks+=" ${mode}_peak_gib=$(sed -nE 's/.*peak memory \+([0-9.]+) GiB.*/\1/p' <<<"$line")"
    done
    if [[ $1 == 0 && -n $ratios ]]; then
        echo "RESULT trajectory-bench PASS $ratios max_disagreement=$MAX_DISAGREEMENT$peaks"
    else
        echo "RESULT trajectory-bench FAIL exit=$1 ${ratios:-no ratio line} max_disagreement=$MAX_DISAGREEMENT$peaks"
    fi
}

step_result() {  # name rc limit -> the step's RESULT line, or why there is none
    local line
    line=$(grep -E "^RESULT $1 " "$LOGS/$1.log" | tail -n1 || true)
    if [[ $2 == 0 && $line == "RESULT $1 PASS"* ]]; then
        echo "$line"
    elif [[ -n $line ]]; then
        echo "${line/ PASS / FAIL } exit=$2"
    elif [[ $2 == 124 || $2 == 137 ]]; then
        echo "RESULT $1 FAIL timed out after $3 s"
    else
        echo "RESULT $1 FAIL exit=$2 (no RESULT line; see $LOGS/$1.log)"
    fi
}

echo "== preflight"
preflight
echo "logs: $LOGS"

rc=0
run_part trajectory-bench "${LIMITS[0]}" "$PYTHON" tools/bench.py trajectory "${BENCH_ARGS[@]}" \
    --dtype bfloat16 --build-on-device --max-disagreement "$MAX_DISAGREEMENT" || rc=$?
RESULTS+=("$(bench_result "$rc")")

rc=0
run_part proxy-step "${LIMITS[1]}" "$PYTHON" tests/gpu/train_step.py proxy "${STEP_ARGS[@]}" || rc=$?
RESULTS+=("$(step_result proxy-step "$rc" "${LIMITS[1]}")")

rc=0
run_part lora-7b-step "${LIMITS[2]}" "$PYTHON" tests/gpu/train_step.py lora "${STEP_ARGS[@]}" || rc=$?
RESULTS+=("$(step_result lora-7b-step "$rc" "${LIMITS[2]}")")

if ((SMOKE)); then
    RESULTS+=("RESULT proxy-step-fsdp SKIP accelerate runs FSDP on GPUs only")
else
    rc=0
    run_part proxy-step-fsdp "$FSDP_LIMIT" "$PYTHON" tests/gpu/train_step.py proxy --fsdp full_shard || rc=$?
    RESULTS+=("$(step_result proxy-step-fsdp "$rc" "$FSDP_LIMIT")")
fi

echo "== summary ($((SECONDS - START)) s in all; logs in $LOGS)"
printf '%s\n' "${RESULTS[@]}" | tee "$LOGS/summary.txt"
failed=$(printf '%s\n' "${RESULTS[@]}" | awk '$3 == "FAIL" {print $2}' | paste -sd, -)
if [[ -n $failed ]]; then
    echo "check: FAIL ($failed)"
    exit 1
fi
echo "check: PASS"
