#!/usr/bin/env bash
# Launch the papers' comparison table for one dataset: every method x backbone x seed,
# one after another, then print the table. Finished cells are skipped (without loading
# any data) and interrupted ones continue from their last checkpoint, so rerunning
# this script picks up where it stopped. A failed cell is reported and the rest go on.
#
#   ./run_table.sh cifar100 "0 1 2"                       # the full table, 3 seeds
#   METHODS="dml pcl" BACKBONES=resnet32 ./run_table.sh cifar10 0 train.epochs=10 'schedule.milestones=[5,8]'
#
# Extra arguments are passed to every run (flags or key=value overrides).
# Runs go to runs/<dataset>_<backbone>_<method>_seed<seed>/ (under output.root if you pass one).
set -uo pipefail
cd "$(dirname "$0")"
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
methods=${METHODS:-vanilla dml cl one ffl okddip kdcl pcl}
backbones=${BACKBONES:-resnet32 resnet110 vgg16 densenet40_12 wrn20_8}
failed=()
for backbone in $backbones; do
    for method in $methods; do
        for seed in $seeds; do
            echo "=== $dataset $backbone $method seed $seed"
            if ! python main.py --config "$config" --model "$backbone" --method "$method" --seed "$seed" \
                    --save_dir "${dataset}_${backbone}_${method}_seed${seed}" "$@"; then
                failed+=("$backbone/$method/seed$seed")
            fi
        done
    done
done
root=runs
for arg in "$@"; do case $arg in output.root=*) root=${arg#output.root=};; esac; done
python -m okd.report "$root" || true
if [ ${#failed[@]} -gt 0 ]; then
    echo "run_table.sh: ${#failed[@]} cell(s) failed: ${failed[*]}" >&2
    exit 1
fi
