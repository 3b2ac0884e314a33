#!/usr/bin/env bash
# Launch the papers' comparison table for one dataset: every method x backbone x seed, then print
# the table. Cells are a queue (python -m okd.table, the same cells a Slurm submission takes): with
# several GPUs, one worker per GPU takes the next cell until none is left (GPUS="0 1 2 3"; default:
# every GPU here, else one worker on the CPU). Finished
# cells are skipped (without loading any data) and interrupted ones continue from their last
# checkpoint, so rerunning this script picks up where it stopped. A failed cell is reported and
# the rest go on. Before starting, it prints a time estimate for the whole table from measured
# speed (python -m okd.plan: finished epochs of existing runs, else a few timed steps per cell).
#
#   ./run_table.sh cifar100 "0 1 2"                       # the full table, 3 seeds, all GPUs
#   GPUS="0 1" METHODS="dml pcl" BACKBONES=resnet32 ./run_table.sh cifar10 0 train.epochs=10 'schedule.milestones=[5,8]'
#   ESTIMATE_ONLY=1 ./run_table.sh cifar100 "0 1 2"      # only the estimate
#   METHODS=all BACKBONES="resnet32 wrn16_2 wrn16_2+mobilenetv2" ./run_table.sh cifar100 0   # the methods after PCL too
#
# A backbone joined by '+' is a cohort (one backbone per network, for the methods of independent networks);
# a method that cannot take a cell's backbone (AHBF on ShuffleNetV2, PCL on a cohort) fails that cell in one line.
# PYTHON names the interpreter (default python3). Extra key=value overrides are passed to every run. Runs go to
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
[ "$methods" = all ] && methods=$($PYTHON -m okd.paper --all-methods)  # PCL's table and the methods after it
backbones=${BACKBONES:-$($PYTHON -m okd.paper --backbones)}
gpus=${GPUS-$($PYTHON -c "import torch; print(' '.join(map(str, range(torch.cuda.device_count()))))")}
overrides=()
for arg in "$@"; do case $arg in *=*) overrides+=("$arg");; esac; done

$PYTHON -m okd.plan --config "$config" --name "$dataset" --seeds "$seeds" --methods "$methods" --backbones "$backbones" \
    --gpus "$(echo ${gpus:-cpu} | wc -w)" --measure "${overrides[@]}" || true
[ -n "${ESTIMATE_ONLY:-}" ] && exit 0

# the cells go through okd's table engine (python -m okd.table): one worker per GPU takes the next
# cell from one queue; a Slurm cluster takes the same cells with --engine slurm (docs/cluster.md)
$PYTHON -m okd.table submit --engine local --config "$config" --name "$dataset" --methods "$methods" \
    --backbones "$backbones" --seeds "$seeds" --gpus "${gpus:-cpu}" "$@"
status=$?

root=runs
for arg in "$@"; do case $arg in output.root=*) root=${arg#output.root=};; esac; done
$PYTHON -m okd.report "$root" || true
exit $status
