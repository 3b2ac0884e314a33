"""The published top-1 accuracies okd reproduces: PCL's comparison table (docs/methods.md §10).

Its rows and columns are written here once; the report, the planner and
``run_table.sh`` read them (the script through ``python -m okd.paper --methods``
/ ``--backbones``). A method or backbone not in the paper's table goes after
these, by name.
"""
import argparse
import sys
from typing import Dict, List, Optional, Tuple

METHOD_COLUMNS = ("dml", "cl", "one", "ffl", "okddip", "kdcl", "pcl")
BACKBONE_ROWS = ("resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8")
TABLE_METHODS = ("vanilla", *METHOD_COLUMNS)  # the table's columns: the baseline, then the paper's

_TABLE = {
    "cifar100": """
        73.68 72.33 73.79 72.18 73.25 73.76 74.14
        77.86 78.83 78.40 77.22 78.54 78.28 79.98
        75.52 74.33 74.37 70.87 74.68 75.67 76.89
        73.06 71.45 71.60 71.25 71.23 72.52 73.09
        79.77 79.40 79.10 78.22 78.83 79.37 80.51""",
    "cifar10": """
        93.94 94.02 94.20 94.01 94.17 94.01 94.33
        94.53 95.19 95.16 94.72 95.14 95.11 95.53
        94.13 94.14 94.14 93.22 93.98 94.09 94.74
        93.59 93.05 93.08 93.28 92.64 93.87 94.13
        95.20 94.59 94.70 94.72 94.83 95.27 95.42""",
}

# (dataset, backbone, method) -> top-1 % of the method's reported model
PAPER_TOP1: Dict[Tuple[str, str, str], float] = {
    (dataset, backbone, method): float(value)
    for dataset, text in _TABLE.items()
    for backbone, row in zip(BACKBONE_ROWS, text.strip().splitlines())
    for method, value in zip(METHOD_COLUMNS, row.split())
}


def paper_top1(dataset: str, backbone: str, method: str) -> Optional[float]:
    """The published number for a cell; CIFAR-10 in an ImageFolder copy counts as cifar10."""
    dataset = "cifar10" if dataset in ("cifar10", "imagefolder_cifar10") else dataset
    return PAPER_TOP1.get((dataset, backbone, method))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m okd.paper", description="The paper's table: its columns and rows.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", action="store_true", help="the table's methods, space-separated")
    which.add_argument("--backbones", action="store_true", help="the table's backbones, space-separated")
    args = p.parse_args(argv)
    print(" ".join(TABLE_METHODS if args.methods else BACKBONE_ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
