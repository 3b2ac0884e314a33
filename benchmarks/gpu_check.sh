#!/usr/bin/env bash
# GPU check for a machine with no network and a few minutes of one GPU. Everything it learns is
# written under $OUT as it goes (else under results/gpu_check/), so a command killed at its limit
# still returns what was measured:
#   gpu_check.log         everything this script printed
#   preflight.json        python -m okd.preflight: versions, device, graphed vs eager on both data paths
#   bench.json            benchmarks/throughput.py of every model in BENCH_MODELS, merged after each
#   train_log.txt         the training run's log.txt, copied every few seconds while it trains
#   train_metrics.jsonl   its metrics.jsonl, likewise
#   <record>.json         python -m okd.results record of the run (finished, or up to its last epoch)
#   data_throughput.json  benchmarks/data_throughput.py (CPU only, so it runs last)
# Seven files: the device tool returns at most eight. The run directory itself (checkpoints)
# stays in local_data/runs/.
#
# Order: 1. the preflight; a failed check stops here with one line. 2. the throughput table of
# PCL ResNet-32 (every variant against the seed-style reference) and the device's defaults for
# ResNet-110, WRN-20-8 and DenseNet-40-12. 3. PCL ResNet-32 on the CIFAR-10 JPEG copy: the paper's
# protocol (300 epochs, milestones 150/225, ramp-up 80) when the measured speed says it fits,
# else as many epochs as fit with the schedule scaled (milestones at 50 % / 75 %, ramp-up 80/300 of
# the run), under a hard time limit from the budget: at the limit it is stopped with SIGTERM
# (okd checkpoints and exits) and the record keeps its last finished epoch. 4. the record and
# the report. 5. the data benchmark.
#
#   cp ../shared/data/cifar10-jpeg.tar.gz local_data/ && bash benchmarks/gpu_check.sh
# Knobs (environment): BUDGET_S (540: leaves 60 s of a 600 s command), PYTHON (python3),
# DEVICE (auto), DATA (an extracted ImageFolder root; default: local_data/cifar10-jpeg from the
# archive), BENCH_MODELS ("resnet32 resnet110 wrn20_8 densenet40_12"; the first is trained),
# BENCH_ARGS / TRAIN_ARGS / DATA_BENCH_ARGS (extra arguments), EPOCHS (skip the estimate),
# N_TRAIN (50000: images per epoch, for the estimate), RESERVE_S (60: kept after training for the
# record, report and data benchmark), TRAIN_S (a cap on the training's limit), PREFLIGHT_S (180),
# BENCH_S (per benchmark, 150).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
DEVICE=${DEVICE:-auto}
N_TRAIN=${N_TRAIN:-50000}
RESERVE_S=${RESERVE_S:-60}
PREFLIGHT_S=${PREFLIGHT_S:-180}
BENCH_S=${BENCH_S:-150}
BENCH_MODELS=${BENCH_MODELS:-resnet32 resnet110 wrn20_8 densenet40_12}
dest=${OUT:-results/gpu_check}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # python -m okd.* without installing okd
export PYTHONUNBUFFERED=1
mkdir -p "$dest" local_data
exec > >(tee -a "$dest/gpu_check.log") 2>&1
tee_pid=$!
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( BUDGET_S - $(date +%s) + start )); }
say() { echo "gpu_check: $*"; }
work=$(mktemp -d)
# on exit: no temporaries, and the log complete before the command returns
trap 'rm -rf "$work"; exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null' EXIT

if [ -n "${DATA:-}" ]; then
    data=$DATA
else
    data=local_data/cifar10-jpeg
    if [ ! -d "$data/train" ]; then
        if [ ! -f local_data/cifar10-jpeg.tar.gz ]; then
            say "put the CIFAR-10 copy at local_data/cifar10-jpeg.tar.gz (cp ../shared/data/cifar10-jpeg.tar.gz local_data/)"
            exit 2
        fi
        tar xzf local_data/cifar10-jpeg.tar.gz -C local_data
    fi
fi
say "data $data ready after $(elapsed) s; budget $BUDGET_S s; $PYTHON is $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true

# 1. preflight: a CUDA path that does not train correctly is not worth timing
timeout --kill-after=10 "$PREFLIGHT_S" $PYTHON -m okd.preflight --device "$DEVICE" --json "$dest/preflight.json"
status=$?
if [ $status -ne 0 ]; then
    say "preflight failed (exit $status); stopping before the benchmarks and the training (see the lines above)"
    exit 1
fi
say "preflight passed after $(elapsed) s"

# 2. throughput, merged into one bench.json after each model
first=$(echo $BENCH_MODELS | cut -d' ' -f1)
for model in $BENCH_MODELS; do
    if [ $(( $(left) - RESERVE_S )) -lt 60 ]; then
        say "skipping the benchmark of $model: $(left) s left"
        continue
    fi
    if [ "$model" = "$first" ]; then
        args=(--rounds 3 --steps 10 --warmup 5)
    else  # the device's defaults only: the full variant table of one model is enough
        args=(--rounds 2 --steps 5 --warmup 5 --variants okd+auto)
    fi
    timeout --kill-after=10 "$BENCH_S" $PYTHON benchmarks/throughput.py --model "$model" --device "$DEVICE" \
        "${args[@]}" --json "$work/bench_$model.json" ${BENCH_ARGS:-} || say "benchmark $model failed or timed out"
    $PYTHON - "$dest/bench.json" "$work" <<'PY'
import json, pathlib, sys
merged = {p.stem[len("bench_"):]: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[2]).glob("bench_*.json"))}
pathlib.Path(sys.argv[1]).write_text(json.dumps(merged, indent=1) + "\n")
PY
    say "benchmark $model done after $(elapsed) s"
done

# 3. training under a hard limit
train_s=$(( $(left) - RESERVE_S ))
if [ "$train_s" -lt 20 ]; then
    say "no time left to train ($(left) s of the budget left, $RESERVE_S s reserved)"
    exit 1
fi
if [ -n "${TRAIN_S:-}" ] && [ "$TRAIN_S" -lt "$train_s" ]; then train_s=$TRAIN_S; fi
read -r epochs protocol milestones rampup ema <<<"$($PYTHON - "$dest/bench.json" "$first" "$train_s" "$N_TRAIN" "${EPOCHS:-}" <<'PY'
import json, sys
path, model, seconds, n_train, forced = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
try:
    bench = json.load(open(path))[model]
    img_s = bench["train_step"][bench["fast_variant"]]["median_img_per_s"]
except (OSError, ValueError, KeyError):
    img_s = 1000.0  # no benchmark: assume a slow device, train a short scaled run
left = seconds - 40                       # start-up, data decode/cache, graph capture
per_epoch = n_train / (img_s * 0.9) + 0.6  # 0.9: the real loader and logging; 0.6 s: evaluation of 8 models
epochs = int(forced) if forced else int(max(1, min(300, left / per_epoch)))
if epochs == 300:
    print(300, "paper", "[150,225]", 80, 0.999)
else:
    ema = 0.999 if epochs >= 30 else 0.99  # the temporal mean's memory must fit the run
    milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    print(epochs, "scaled", "[" + ",".join(map(str, milestones)) + "]", round(80 * epochs / 300), ema)
PY
)"
run_name=gpu_check_$first
run_dir=local_data/runs/$run_name
say "training PCL $first on $data for $epochs epochs ($protocol protocol: milestones $milestones, ramp-up $rampup, EMA cap $ema, device defaults) within $train_s s, after $(elapsed) s"
mirror() {  # the run's log and metrics under $dest, every few seconds while it trains
    while true; do
        cp "$run_dir/log.txt" "$dest/train_log.txt" 2>/dev/null
        cp "$run_dir/metrics.jsonl" "$dest/train_metrics.jsonl" 2>/dev/null
        sleep 5
    done
}
mirror &
mirror_pid=$!
run_start=$(date +%s)
timeout --signal=TERM --kill-after=20 "$train_s" $PYTHON main.py --config configs/cifar10_imagefolder.yml \
    --data-root "$data" --model "$first" --save_dir "$run_name" --overwrite --device "$DEVICE" \
    output.root=local_data/runs train.log_every=100000 train.epochs="$epochs" "schedule.milestones=$milestones" \
    method.rampup_epochs="$rampup" method.ema_decay="$ema" ${TRAIN_ARGS:-}
train_status=$?
wall=$(( $(date +%s) - run_start ))
kill "$mirror_pid" 2>/dev/null; wait "$mirror_pid" 2>/dev/null
cp "$run_dir/log.txt" "$dest/train_log.txt" 2>/dev/null
cp "$run_dir/metrics.jsonl" "$dest/train_metrics.jsonl" 2>/dev/null
case $train_status in
    0) say "training finished in $wall s"; unfinished=() ;;
    124|143) say "training stopped at its time limit ($train_s s) after $wall s; recording its last finished epoch"
             unfinished=(--unfinished) ;;
    *) say "training failed (exit $train_status) after $wall s; recording its last finished epoch if any"
       unfinished=(--unfinished) ;;
esac

# 4. the record and the report
$PYTHON -m okd.results record "$run_dir" --protocol "$protocol" --dataset cifar10 --wall-seconds "$wall" \
    --out "$dest" "${unfinished[@]}" || say "no record written"
$PYTHON -m okd.report "$dest" || true

# 5. the CPU-only data benchmark, last
if [ "$(left)" -gt 15 ]; then
    workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
    timeout --kill-after=5 $(( $(left) > 60 ? 60 : $(left) - 5 )) $PYTHON benchmarks/data_throughput.py --images 768 \
        --rounds 2 --workers "$workers" --json "$dest/data_throughput.json" ${DATA_BENCH_ARGS:-} \
        || say "data benchmark failed or timed out"
else
    say "skipping the data benchmark: $(left) s left"
fi
say "finished after $(elapsed) s (budget $BUDGET_S s)"
