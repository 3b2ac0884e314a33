#!/usr/bin/env bash
# GPU check for a machine with no network, within about 10 minutes of one GPU:
#   1. extracts the CIFAR-10 JPEG copy from local_data/cifar10-jpeg.tar.gz (an ignored folder: copy
#      ../shared/data/cifar10-jpeg.tar.gz there first),
#   2. prints the throughput table of PCL ResNet-32 (every variant against the seed-style reference)
#      and of ResNet-110, WRN-20-8 and DenseNet-40-12 (the device's defaults against the reference),
#      with img/s and achieved TFLOP/s,
#   3. measures the streaming (ImageNet) data path against ImageFolder + PIL on this machine's cores,
#   4. trains PCL ResNet-32 on that CIFAR-10 copy with the paper's protocol (300 epochs, milestones
#      150/225, ramp-up 80, EMA cap 0.999) when the measured speed says it fits the time left, else for
#      as many epochs as fit with the schedule scaled (milestones at 50 % / 75 %, ramp-up 80/300 of the run),
#   5. writes the run's record (python -m okd.results) and the benchmark JSON files under $OUT when it is
#      set (the device tool returns what is written there), else under results/.
#
#   bash benchmarks/gpu_check.sh                 # BUDGET_S=570 seconds in all
# Knobs (environment): BUDGET_S, DEVICE (auto), BENCH_ARGS / TRAIN_ARGS (extra arguments),
# BENCH_MODELS ("resnet32 resnet110 wrn20_8 densenet40_12"; the first is the one trained),
# N_TRAIN (50000: images per epoch, for the epoch estimate).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
DEVICE=${DEVICE:-auto}
N_TRAIN=${N_TRAIN:-50000}
BENCH_MODELS=${BENCH_MODELS:-resnet32 resnet110 wrn20_8 densenet40_12}
archive=local_data/cifar10-jpeg.tar.gz
data=local_data/cifar10-jpeg
dest=${OUT:-results}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # python -m okd.* without installing okd
mkdir -p "$dest/bench" local_data
elapsed() { echo $(( $(date +%s) - start )); }

if [ ! -d "$data/train" ]; then
    if [ ! -f "$archive" ]; then
        echo "gpu_check: put the CIFAR-10 copy at $archive (cp ../shared/data/cifar10-jpeg.tar.gz local_data/)" >&2
        exit 2
    fi
    tar xzf "$archive" -C local_data
fi
echo "gpu_check: data ready after $(elapsed) s"
python -c "import torch; print('gpu_check: torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

first=$(echo $BENCH_MODELS | cut -d' ' -f1)
for model in $BENCH_MODELS; do
    if [ "$model" = "$first" ]; then
        args=(--rounds 3 --steps 10 --warmup 5)
    else  # the device's defaults only: the full variant table of one model is enough
        args=(--rounds 2 --steps 5 --warmup 5 --variants okd+auto)
    fi
    python benchmarks/throughput.py --model "$model" --device "$DEVICE" "${args[@]}" \
        --json "$dest/bench/bench_${model}.json" ${BENCH_ARGS:-} || echo "gpu_check: benchmark $model failed" >&2
    echo "gpu_check: benchmark $model done after $(elapsed) s"
done

workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
python benchmarks/data_throughput.py --images 768 --rounds 2 --workers "$workers" \
    --json "$dest/bench/data_throughput.json" || echo "gpu_check: data benchmark failed" >&2
echo "gpu_check: data benchmark done after $(elapsed) s"

read -r epochs protocol milestones rampup ema <<<"$(python - "$dest/bench/bench_$first.json" "$BUDGET_S" "$(elapsed)" "$N_TRAIN" <<'PY'
import json, sys
path, budget, elapsed, n_train = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
try:
    bench = json.load(open(path))
    img_s = bench["train_step"][bench["fast_variant"]]["median_img_per_s"]
except (OSError, ValueError, KeyError):
    img_s = 1000.0  # no benchmark: assume a slow device, train a short scaled run
left = budget - elapsed - 60          # data decode/cache, start-up, graph capture, the record
per_epoch = n_train / (img_s * 0.9) + 0.6  # 0.9: the real loader and logging; 0.6 s: evaluation of 8 models
epochs = int(max(1, min(300, left / per_epoch)))
if epochs == 300:
    print(300, "paper", "[150,225]", 80, 0.999)
else:
    ema = 0.999 if epochs >= 30 else 0.99  # the temporal mean's memory must fit the run
    milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    print(epochs, "scaled", "[" + ",".join(map(str, milestones)) + "]", round(80 * epochs / 300), ema)
PY
)"
echo "gpu_check: training PCL $first on CIFAR-10 for $epochs epochs ($protocol protocol: milestones $milestones, ramp-up $rampup, EMA cap $ema, device defaults) after $(elapsed) s"
run_start=$(date +%s)
run_dir=local_data/runs/gpu_check_$first
python main.py --config configs/cifar10_imagefolder.yml --data-root "$data" --model "$first" --save_dir "gpu_check_$first" \
    --overwrite --device "$DEVICE" output.root=local_data/runs train.log_every=100000 \
    train.epochs="$epochs" "schedule.milestones=$milestones" method.rampup_epochs="$rampup" method.ema_decay="$ema" \
    ${TRAIN_ARGS:-}
wall=$(( $(date +%s) - run_start ))
python -m okd.results record "$run_dir" --protocol "$protocol" --dataset cifar10 --wall-seconds "$wall" --out "$dest"
cp "$run_dir/log.txt" "$dest/bench/train_log_${first}.txt" 2>/dev/null || true
python -m okd.report "$dest"
echo "gpu_check: finished after $(elapsed) s (budget $BUDGET_S s)"
