#!/usr/bin/env bash
# The step-time, round-overhead and time-to-accuracy benchmarks on a CUDA GPU, as one command.
#
#     bash bench/gpu.sh DATA_DIR OUT_DIR [EPOCHS] [SECONDS]
#
# DATA_DIR is the extracted CIFAR-10 JPEG copy (train/ and test/), OUT_DIR gets the card's name, the
# logs and the tables. EPOCHS (default 50) is each side's schedule in the time-to-accuracy run. SECONDS
# (default 600) bounds that run: if it is stopped there, the centralized epochs in its log and the
# federation's metrics.jsonl copied to OUT_DIR are what it reached. A one-epoch synthetic run goes
# first, so that a broken set-up fails within a minute rather than after the centralized side.
# On an NVIDIA H200 the 50-epoch run trained for 343 s centralized and 163 s federated, inside the default,
# when each step still read its batch from host memory.
# BENCH_DEVICE=cpu runs the same steps without a GPU, to try the script out.
# BENCH_ROUND=0 leaves out the round-overhead benchmark (about half a minute); BENCH_STEPS=N times loops of N steps (100).
# BENCH_SIDE_BY_SIDE=1 trains the federation beside the centralized side rather than after it: on a GPU
# both are bound by their host's work per step, so the pair takes about as long as the centralized side alone.
# EPOCHS "auto" takes the most epochs, up to 100 in steps of 5, that fit SECONDS at the step time measured here.
# BENCH_COMPILE=1 also times the compiled step, then trains both sides compiled (--compile), sizing "auto" by the
# compiled step time with two minutes set aside for compiling.
# BENCH_COMMIT=HASH names the commit in the reports where the tree was copied without its git history.
set -uo pipefail
data=${1:?usage: bash bench/gpu.sh DATA_DIR OUT_DIR [EPOCHS] [SECONDS]}
out=${2:?usage: bash bench/gpu.sh DATA_DIR OUT_DIR [EPOCHS] [SECONDS]}
epochs=${3:-50}
seconds=${4:-600}
device=${BENCH_DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TMPDIR=$(mktemp -d)  # the federation's run directory lands here, found again if it is stopped

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1
python3 -c 'import grpc, torch, google.protobuf as pb
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, grpcio {grpc.__version__}, "
      f"protobuf {pb.__version__}, {card}")' >> "$out/gpu.txt" || exit 1
cat "$out/gpu.txt"

python3 -m bench.time_to_accuracy --dataset synthetic --model tiny-cnn --epochs 1 --warmup 0 --device "$device" \
    > "$out/smoke.log" 2>&1 || { tail -30 "$out/smoke.log"; exit 1; }
echo "smoke run passed"

compile=()
[ "${BENCH_COMPILE:-0}" = 1 ] && compile=(--compile)
python3 -m bench.step_time --device "$device" --steps "${BENCH_STEPS:-100}" "${compile[@]}" > "$out/step-time.md" 2>&1 || { tail -30 "$out/step-time.md"; exit 1; }
grep "^|\|^host split" "$out/step-time.md"

if [ "${BENCH_ROUND:-1}" != 0 ]; then
    python3 -m bench.round --rounds 10 --device "$device" 2>&1 | tee "$out/round.md" || exit 1
fi

side=()
[ "${BENCH_SIDE_BY_SIDE:-0}" = 1 ] && side=(--side-by-side)
if [ "$epochs" = auto ]; then
    # per epoch: the centralized side's 391 steps (and the federation's 196 after it, unless side by side) at the
    # measured step time, with 30% to spare for sharing the GPU, plus a second for testing; a minute for loading
    # the data, and two more for compiling with BENCH_COMPILE=1
    epochs=$(python3 -c 'import re, sys
row = "device split, compiled" if sys.argv[4] == "1" else "device split"
ms = float(re.search(rf"^\| {row} \| ([0-9.]+)", open(sys.argv[1]).read(), re.M).group(1))
per_epoch = 1.3 * (391 if sys.argv[3] == "1" else 391 + 196) * ms / 1000 + 1
setup = 60 + (120 if sys.argv[4] == "1" else 0)
print(max(5, min(100, int((float(sys.argv[2]) - setup) / per_epoch) // 5 * 5)))' "$out/step-time.md" "$seconds" "${BENCH_SIDE_BY_SIDE:-0}" "${BENCH_COMPILE:-0}") || exit 1
    echo "epochs: $epochs"
fi

timeout "$seconds" python3 -m bench.time_to_accuracy --data-dir "$data" --device "$device" --epochs "$epochs" --warmup 2 \
    --target 0.85 "${side[@]}" "${compile[@]}" --out "$out/time-to-accuracy.md" > "$out/time-to-accuracy.log" 2>&1
status=$?
cp "$TMPDIR"/fl-tta-*/metrics.jsonl "$out/" 2>/dev/null
grep -v "^federated (none) epoch" "$out/time-to-accuracy.log" | tail -80
echo "time_to_accuracy exit status: $status (124: stopped after $seconds s)"
exit "$status"
