#!/usr/bin/env bash
# Launch the papers' comparison table for one dataset: every method x backbone x seed, then print
# the table. Cells are a queue: with several GPUs, one process per GPU takes the next cell until
# none is left (GPUS="0 1 2 3"; default: every GPU here, else one process on the CPU). Finished
# cells are skipped (without loading any data) and interrupted ones continue from their last
# checkpoint, so rerunning this script picks up where it stopped. A failed cell is reported and
# the rest go on. Before starting, it prints a time estimate for the whole table from measured
# speed (python -m okd.plan: finished epochs of existing runs, else a few timed steps per cell).
#
#   ./run_table.sh cifar100 "0 1 2"                       # the full table, 3 seeds, all GPUs
#   GPUS="0 1" METHODS="dml pcl" BACKBONES=resnet32 ./run_table.sh cifar10 0 train.epochs=10 'schedule.milestones=[5,8]'
#   ESTIMATE_ONLY=1 ./run_table.sh cifar100 "0 1 2"      # only the estimate
#
# PYTHON names the interpreter (default python3). Extra arguments are passed to every run (flags or key=value overrides). Runs go to
# runs/<dataset>_<backbone>_<method>_seed<seed>/ (under output.root if you pass one); each
# cell's output is in its run directory's log.txt, and the console shows one line per cell.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}  # the interpreter of every step (e.g. a venv's, without activating it)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -lt 1 ]; then
    echo "usage: $0 DATASET [SEEDS] [extra args...]   e.g. $0 cifar100 \"0 1 2\"" >&2
    exit 2
fi
dataset=$1
seeds=${2:-0}
shift $(( $# >= 2 ? 2 : 1 ))
config=configs/${dataset}.yml
if [ ! -f "$config" ]; then
    echo "run_table.sh: no config '$config'; use a dataset with a file in configs/ (cifar10, cifar100)" >&2
    exit 2
fi
methods=${METHODS:-$($PYTHON -m okd.paper --methods)}
backbones=${BACKBONES:-$($PYTHON -m okd.paper --backbones)}
gpus=${GPUS-$($PYTHON -c "import torch; print(' '.join(map(str, range(torch.cuda.device_count()))))")}
overrides=()
for arg in "$@"; do case $arg in *=*) overrides+=("$arg");; esac; done

$PYTHON -m okd.plan --config "$config" --name "$dataset" --seeds "$seeds" --methods "$methods" --backbones "$backbones" \
    --gpus "$(echo ${gpus:-cpu} | wc -w)" --measure "${overrides[@]}" || true
[ -n "${ESTIMATE_ONLY:-}" ] && exit 0

queue=$(mktemp -d)
trap 'rm -rf "$queue"' EXIT
for backbone in $backbones; do for method in $methods; do for seed in $seeds; do
    echo "$backbone $method $seed"
done; done; done > "$queue/cells"
echo 0 > "$queue/next"
total=$(wc -l < "$queue/cells")

next_cell() {  # the next line of the queue, under a lock shared by all workers; empty when done
    $PYTHON - "$queue" <<'PY'
import fcntl, pathlib, sys
queue = pathlib.Path(sys.argv[1])
with open(queue / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    n = int((queue / "next").read_text())
    (queue / "next").write_text(str(n + 1))
    cells = (queue / "cells").read_text().splitlines()
    print(cells[n] if n < len(cells) else "")
PY
}

worker() {  # $1: a GPU index, or "cpu"; the rest: arguments of every run
    local where=$1
    shift
    while true; do
        cell=$(next_cell)
        [ -z "$cell" ] && break
        read -r backbone method seed <<< "$cell"
        name="${dataset}_${backbone}_${method}_seed${seed}"
        echo "[$where] start $name"
        if [ "$where" = cpu ]; then visible=""; else visible=$where; fi
        if CUDA_VISIBLE_DEVICES=$visible $PYTHON main.py --config "$config" --model "$backbone" --method "$method" \
                --seed "$seed" --save_dir "$name" "$@" > "$queue/$name.out" 2>&1; then
            echo "[$where] done  $name: $(grep -h '^.*final |' "$queue/$name.out" | tail -1 | sed 's/.*final | //')"
        else
            echo "$name" >> "$queue/failed"
            echo "[$where] FAILED $name: $(tail -1 "$queue/$name.out")"
        fi
    done
}

echo "run_table.sh: $total cell(s) on ${gpus:-the CPU} ($(echo ${gpus:-cpu} | wc -w) at a time)"
for g in ${gpus:-cpu}; do
    worker "$g" "$@" &
done
wait

root=runs
for arg in "$@"; do case $arg in output.root=*) root=${arg#output.root=};; esac; done
$PYTHON -m okd.report "$root" || true
if [ -s "$queue/failed" ]; then
    echo "run_table.sh: $(wc -l < "$queue/failed") cell(s) failed: $(tr '\n' ' ' < "$queue/failed")" >&2
    exit 1
fi
