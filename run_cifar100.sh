#!/usr/bin/env bash
# PCL on CIFAR-100 with the five backbones of the paper, one after another.
# Data: data/cifar-100-python/ (or set OKD_DATA / pass --data-root). Extra args are passed through,
# e.g. ./run_cifar100.sh --seed 1   or   ./run_cifar100.sh train.epochs=10 'schedule.milestones=[5,8]'
set -euo pipefail
cd "$(dirname "$0")"
for model in resnet32 vgg16 densenet40_12 resnet110 wrn20_8; do
    python main.py --model "$model" --save_dir "cifar100_${model}" --config_path ./configs/cifar100.yml "$@"
done
