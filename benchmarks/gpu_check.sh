#!/usr/bin/env bash
# GPU check for a machine with no network and a few minutes of one GPU. The record comes first:
# everything it learns is written under $OUT as it goes (else under results/gpu_check/), so a command
# killed at its limit still returns what was measured:
#   gpu_check.log         everything this script printed
#   preflight.json        python -m okd.preflight: versions, device, graphed vs eager on both data paths
#   bench.json            benchmarks/throughput.py: the speed probe ("<model> (probe)"), then each model
#                         of BENCH_MODELS, merged after each
#   train_log.txt         the training run's log.txt, copied every few seconds while it trains
#   train_metrics.jsonl   its metrics.jsonl, likewise
#   <record>.json         python -m okd.results record of the run (finished, or up to its last epoch),
#                         labelled with the preflight's result
#   data_throughput.json  benchmarks/data_throughput.py (CPU only, so it runs last)
# Seven files: the device tool returns at most eight. The run directory itself (checkpoints)
# stays in local_data/runs/.
#
# Order: 1. the preflight; when a check fails the run still trains, eagerly (train.cuda_graphs=false),
# and its record names the failed checks. 2. the speed probe: PCL on the first model with the device's
# defaults, what the epoch estimate needs. 3. PCL on the CIFAR-10 JPEG copy: the paper's protocol (300
# epochs, milestones 150/225, ramp-up 80) when the measured speed says it fits, else as many epochs as fit
# with the schedule scaled (milestones at 50 % / 75 %, ramp-up 80/300 of the run), under a hard time limit:
# at the limit it is stopped with SIGTERM (okd checkpoints and exits) and the record keeps its last
# finished epoch. 4. the record and the report. 5. if time is left: the first model's full variant table
# (every combination of fused views, batched branches and graphs) and the device's defaults on the other
# models. 6. the data benchmark. The last line says whether a record was written; the exit code is 1 when
# none was.
#
#   cp ../shared/data/cifar10-jpeg.tar.gz local_data/ && bash benchmarks/gpu_check.sh
# Knobs (environment): BUDGET_S (540: leaves 60 s of a 600 s command), PYTHON (python3),
# DEVICE (auto), DATA (an extracted ImageFolder root; default: local_data/cifar10-jpeg from the
# archive), BENCH_MODELS ("resnet32 resnet110 wrn20_8 densenet40_12"; the first is probed and trained),
# BENCH_ARGS / TRAIN_ARGS / DATA_BENCH_ARGS / PREFLIGHT_ARGS (extra arguments), EPOCHS (skip the
# estimate), N_TRAIN (50000: images per epoch, for the estimate), RESERVE_S (30: kept after training for
# the record and the report), AFTER_S (120: kept after those for the benchmarks and the data benchmark; 0: none),
# TRAIN_S (a cap on the training's limit), PREFLIGHT_S (180), PROBE_S (90), BENCH_S (per benchmark, 150).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
DEVICE=${DEVICE:-auto}
N_TRAIN=${N_TRAIN:-50000}
RESERVE_S=${RESERVE_S:-30}
AFTER_S=${AFTER_S:-120}
PREFLIGHT_S=${PREFLIGHT_S:-180}
PROBE_S=${PROBE_S:-90}
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
record=""
# on exit: no temporaries, and the log complete before the command returns
trap 'rm -rf "$work"; exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null' EXIT
finish() {  # the last line: whether the record exists, and the exit code that says so
    if [ -n "$record" ]; then
        say "finished after $(elapsed) s (budget $BUDGET_S s): record $record"
        exit 0
    fi
    say "no record was written ($*) after $(elapsed) s (budget $BUDGET_S s)"
    exit 1
}
merge_bench() {  # bench.json: every benchmark JSON of $work, keyed by its name
    $PYTHON - "$dest/bench.json" "$work" <<'PY'
import json, pathlib, sys
merged = {}
for p in sorted(pathlib.Path(sys.argv[2]).glob("bench_*.json")):
    try:
        merged[p.stem[len("bench_"):].replace("__probe", " (probe)")] = json.loads(p.read_text())
    except ValueError:
        pass  # a benchmark killed while writing
pathlib.Path(sys.argv[1]).write_text(json.dumps(merged, indent=1) + "\n")
PY
}

if [ -n "${DATA:-}" ]; then
    data=$DATA
else
    data=local_data/cifar10-jpeg
    if [ ! -d "$data/train" ]; then
        if [ ! -f local_data/cifar10-jpeg.tar.gz ]; then
            say "put the CIFAR-10 copy at local_data/cifar10-jpeg.tar.gz (cp ../shared/data/cifar10-jpeg.tar.gz local_data/)"
            finish "no data"
        fi
        tar xzf local_data/cifar10-jpeg.tar.gz -C local_data
    fi
fi
say "data $data ready after $(elapsed) s; budget $BUDGET_S s; $PYTHON is $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
first=$(echo $BENCH_MODELS | cut -d' ' -f1)

# 1. preflight: a failed check does not stop the record, it turns the graph off and labels the record
timeout --kill-after=10 "$PREFLIGHT_S" $PYTHON -m okd.preflight --device "$DEVICE" --json "$dest/preflight.json" \
    ${PREFLIGHT_ARGS:-}
status=$?
graphs=()
if [ $status -eq 0 ]; then
    say "preflight passed after $(elapsed) s"
else
    say "preflight failed (exit $status) after $(elapsed) s; the run trains eagerly (train.cuda_graphs=false) and its record names the failed checks"
    graphs=(train.cuda_graphs=false)
fi

# 2. the speed probe: the device's defaults on the first model, for the epoch estimate
timeout --kill-after=10 "$PROBE_S" $PYTHON benchmarks/throughput.py --model "$first" --device "$DEVICE" \
    --rounds 2 --steps 5 --warmup 5 --variants okd+auto --json "$work/bench_${first}__probe.json" ${BENCH_ARGS:-} \
    || say "speed probe of $first failed or timed out; the estimate assumes a slow device"
merge_bench
say "speed probe done after $(elapsed) s"

# 3. training under a hard limit
train_s=$(( $(left) - RESERVE_S - AFTER_S ))
if [ -n "${TRAIN_S:-}" ] && [ "$TRAIN_S" -lt "$train_s" ]; then train_s=$TRAIN_S; fi
if [ "$train_s" -lt 20 ]; then
    say "no time left to train ($(left) s of the budget left, $RESERVE_S + $AFTER_S s reserved)"
    finish "no time to train"
fi
read -r epochs protocol milestones rampup ema <<<"$($PYTHON - "$work/bench_${first}__probe.json" "$train_s" "$N_TRAIN" "${EPOCHS:-}" <<'PY'
import json, sys
path, seconds, n_train, forced = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    bench = json.load(open(path))
    img_s = bench["train_step"][bench["fast_variant"]]["median_img_per_s"]
except (OSError, ValueError, KeyError):
    img_s = 1000.0  # no probe: assume a slow device, train a short scaled run
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
say "training PCL $first on $data for $epochs epochs ($protocol protocol: milestones $milestones, ramp-up $rampup, EMA cap $ema, device defaults ${graphs[*]:-}) within $train_s s, after $(elapsed) s"
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
    method.rampup_epochs="$rampup" method.ema_decay="$ema" "${graphs[@]}" ${TRAIN_ARGS:-}
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

# 4. the record, labelled with the preflight, and the report
out=$($PYTHON -m okd.results record "$run_dir" --protocol "$protocol" --dataset cifar10 --wall-seconds "$wall" \
      --out "$dest" --preflight "$dest/preflight.json" "${unfinished[@]}")
echo "$out"
record=$(echo "$out" | sed -n 's/^okd-results: wrote \([^ ]*\) .*/\1/p')
[ -n "$record" ] && $PYTHON -m okd.report "$dest" || true

# 5. the benchmarks, while time is left: the first model's full variant table, the others' defaults
[ "$AFTER_S" -gt 0 ] || BENCH_MODELS=""  # AFTER_S=0: nothing after the record
for model in $BENCH_MODELS; do
    if [ "$(left)" -lt 45 ]; then
        say "skipping the benchmark of $model: $(left) s left"
        continue
    fi
    if [ "$model" = "$first" ]; then
        args=(--rounds 3 --steps 10 --warmup 5)
    else  # the device's defaults only: the full variant table of one model is enough
        args=(--rounds 2 --steps 5 --warmup 5 --variants okd+auto)
    fi
    limit=$(( $(left) - 15 < BENCH_S ? $(left) - 15 : BENCH_S ))
    timeout --kill-after=5 "$limit" $PYTHON benchmarks/throughput.py --model "$model" --device "$DEVICE" \
        "${args[@]}" --json "$work/bench_$model.json" ${BENCH_ARGS:-} || say "benchmark $model failed or timed out"
    merge_bench
    say "benchmark $model done after $(elapsed) s"
done

# 6. the CPU-only data benchmark, last
if [ "$AFTER_S" -gt 0 ] && [ "$(left)" -gt 15 ]; then
    workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
    timeout --kill-after=5 $(( $(left) > 60 ? 60 : $(left) - 5 )) $PYTHON benchmarks/data_throughput.py --images 768 \
        --rounds 2 --workers "$workers" --json "$dest/data_throughput.json" ${DATA_BENCH_ARGS:-} \
        || say "data benchmark failed or timed out"
else
    say "skipping the data benchmark: $(left) s left"
fi
finish "the training left no finished epoch to record"
