#!/usr/bin/env bash
# GPU check for a machine with no network, within about 10 minutes:
#   1. extracts the CIFAR-10 JPEG copy from local_data/cifar10-jpeg.tar.gz (an ignored folder: copy
#      ../shared/data/cifar10-jpeg.tar.gz there first),
#   2. prints the throughput table for PCL ResNet-32 and ResNet-110 against the seed-style reference,
#   3. trains PCL ResNet-32 on that CIFAR-10 copy for as many epochs as fit in the remaining time,
#      with the schedule scaled to them (milestones at 50 % / 75 %, ramp-up 80/300 of the run), in the
#      benchmark's fast configuration, and prints the reported accuracy.
#
#   bash benchmarks/gpu_check.sh                 # BUDGET_S=570 seconds in all
# Knobs (environment): BUDGET_S, DEVICE (auto), BENCH_ARGS / TRAIN_ARGS (extra arguments),
# BENCH_MODELS ("resnet32 resnet110"), N_TRAIN (50000: images per epoch, for the epoch estimate).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
DEVICE=${DEVICE:-auto}
N_TRAIN=${N_TRAIN:-50000}
BENCH_MODELS=${BENCH_MODELS:-resnet32 resnet110}
archive=local_data/cifar10-jpeg.tar.gz
data=local_data/cifar10-jpeg
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

for model in $BENCH_MODELS; do
    python benchmarks/throughput.py --model "$model" --device "$DEVICE" --rounds 3 --steps 10 --warmup 3 \
        --json "local_data/bench_${model}.json" ${BENCH_ARGS:-}
    echo "gpu_check: benchmark $model done after $(elapsed) s"
done

first=$(echo $BENCH_MODELS | cut -d' ' -f1)
read -r epochs milestones rampup ema variant <<<"$(python - "$first" "$BUDGET_S" "$(elapsed)" "$N_TRAIN" <<'PY'
import json, sys
model, budget, elapsed, n_train = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
bench = json.load(open(f"local_data/bench_{model}.json"))
fast = bench["fast_variant"]
img_s = bench["train_step"][fast]["median_img_per_s"]
left = budget - elapsed - 45          # data decode/cache, start-up and final evaluation
epochs = int(max(1, min(300, left * img_s * 0.85 / n_train)))  # 0.85: per-epoch evaluation and logging
milestones = f"[{max(1, epochs // 2)},{max(1, (3 * epochs) // 4)}]"
rampup = round(80 * epochs / 300)
ema = 0.999 if epochs >= 30 else 0.99  # the temporal mean's memory must fit the run
print(epochs, milestones, rampup, ema, fast)
PY
)"
flags=()
case $variant in *cl*) flags+=(train.channels_last=true);; esac
case $variant in *fused*) flags+=(method.fused_views=true);; esac
case $variant in *bf16*) flags+=(train.precision=bf16);; esac
echo "gpu_check: training PCL $first for $epochs epochs (milestones $milestones, ramp-up $rampup, EMA cap $ema, $variant) after $(elapsed) s"
python main.py --config configs/cifar10_imagefolder.yml --data-root "$data" --model "$first" --save_dir "gpu_check_$first" \
    --overwrite --device "$DEVICE" output.root=local_data/runs train.log_every=100000 train.eval_every=5 \
    train.epochs="$epochs" "schedule.milestones=$milestones" method.rampup_epochs="$rampup" method.ema_decay="$ema" \
    "${flags[@]}" ${TRAIN_ARGS:-}
echo "gpu_check: finished after $(elapsed) s (budget $BUDGET_S s)"
