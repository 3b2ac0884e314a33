#!/usr/bin/env bash
# PCL on CIFAR-10 with the five backbones of the paper, one after another.
# Data: data/cifar-10-batches-py/ (or set OKD_DATA / pass --data-root). Extra args are passed through,
# e.g. ./run_cifar10.sh --seed 1   or   ./run_cifar10.sh train.epochs=10 'schedule.milestones=[5,8]'
set -euo pipefail
cd "$(dirname "$0")"
for model in resnet32 vgg16 densenet40_12 resnet110 wrn20_8; do
    python main.py --model "$model" --save_dir "cifar10_${model}" --config_path ./configs/cifar10.yml "$@"
done
