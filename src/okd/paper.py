"""The published top-1 accuracies okd reproduces, each labelled with its source and protocol.

PCL's comparison table (docs/methods.md §10) is the grid the planner and
``run_table.sh`` walk; its rows and columns are written here once and read by
the report, the planner and the script (through ``python -m okd.paper
--methods`` / ``--backbones`` / ``--all-methods``). The papers after PCL
(MCL, SwitOKD, OKDPH, AHBF) report under their own protocols and settings:
their CIFAR-100 numbers are rows of their own in ``PUBLISHED``, each with the
table it comes from, what the number is (which model, which epoch, how many
runs) and the setting (networks, teacher or student), so the report prints
them beside okd's runs of the same cell and never mixes them with PCL's.
A cohort's backbone is its label (``switokd_wrn16_2+mobilenetv2``: teacher, student).
"""
import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

METHOD_COLUMNS = ("dml", "cl", "one", "ffl", "okddip", "kdcl", "pcl")
BACKBONE_ROWS = ("resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8")
TABLE_METHODS = ("vanilla", *METHOD_COLUMNS)  # the table's columns: the baseline, then the paper's
AFTER_PCL = ("mcl", "switokd", "okdph", "ahbf")  # in order of publication
ALL_METHODS = (*TABLE_METHODS, *AFTER_PCL)  # the report's column order

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

# (dataset, backbone, method) -> top-1 % of the method's reported model in PCL's table
PAPER_TOP1: Dict[Tuple[str, str, str], float] = {
    (dataset, backbone, method): float(value)
    for dataset, text in _TABLE.items()
    for backbone, row in zip(BACKBONE_ROWS, text.strip().splitlines())
    for method, value in zip(METHOD_COLUMNS, row.split())
}


@dataclass(frozen=True)
class Published:
    dataset: str
    backbone: str  # okd's backbone name, or a cohort's label
    method: str
    top1: float  # %
    source: str  # paper and table
    protocol: str  # which model, which epoch, over how many runs
    setting: str = ""  # what differs from okd's defaults (networks, the role of the reported network)
    checked: bool = True  # False: read from a secondary source, not from the paper's table

    def label(self) -> str:
        return ", ".join(x for x in (self.setting, self.protocol, self.source) if x) + \
            ("" if self.checked else " (not checked against the paper's table)")


PCL_SOURCE = "PCL (Wu & Gong, AAAI 2021), Tables 1-2"
PCL_PROTOCOL = "reported model's best epoch, mean over runs"
MCL_SOURCE = "MCL (Yang et al., AAAI 2022), the authors' README table (CIFAR-100)"
MCL_PROTOCOL = "best network at the best test epoch, mean of 3 runs"
SWITOKD_SOURCE = "SwitOKD (Qian et al., ECCV 2022), Table 4"
SWITOKD_PROTOCOL = "best test epoch, mean of 3 runs"
SECONDARY = "a third-party summary of the paper"

# MCL's table: backbone -> (baseline, x2, x4); its baseline has the same sampler and max-of-2 selection
_MCL = {"resnet32": (70.91, 72.96, 74.04), "resnet56": (73.15, 74.48, 75.74), "resnet110": (75.29, 77.12, 78.82),
        "wrn16_2": (72.55, 74.56, 75.79), "wrn40_2": (76.89, 77.51, 78.84),
        "shufflenetv2_x0_5": (67.39, 69.55, 70.92), "shufflenetv2": (70.93, 73.26, 75.18)}
# SwitOKD's CIFAR-100 pair (teacher WRN-16-2, student MobileNetV2 x0.5): method -> (student, teacher)
_SWITOKD = {"vanilla": (60.07, 72.90), "dml": (66.23, 73.85), "kdcl": (66.83, 73.75), "switokd": (67.24, 73.90)}
SWITOKD_PAIR = "switokd_wrn16_2+mobilenetv2"  # the code's own teacher (okd.models.switokd_wrn)

PUBLISHED: Tuple[Published, ...] = (
    *(Published(d, b, m, v, PCL_SOURCE, PCL_PROTOCOL, "3 members") for (d, b, m), v in PAPER_TOP1.items()),
    *(Published("cifar100", b, m, v, MCL_SOURCE, MCL_PROTOCOL, s)
      for b, row in _MCL.items()
      for m, v, s in zip(("vanilla", "mcl", "mcl"), row,
                         ("2 networks trained without distillation", "2 networks",
                          "4 networks sharing stem and stage 1 in the authors' code"))),
    *(Published("cifar100", SWITOKD_PAIR, m, v, SWITOKD_SOURCE, SWITOKD_PROTOCOL, f"{role} {name}")
      for m, pair in _SWITOKD.items()
      for v, role, name in zip(pair, ("student", "teacher"), ("mobilenetv2", "switokd_wrn16_2"))),
    # the papers' tables could not be read here (searched 2026-12-08: the page corpus holds OKDPH's paper,
    # "Generalization Matters: Loss Minima Flattening via Parameter Hybridization for Efficient Online Knowledge
    # Distillation", CVPR 2023, arXiv 2303.14666, and AHBF's AAAI page, but every excerpt stops at the abstract
    # or the introduction, and neither repository's README has a number); each number below is 100 - the error
    # or the accuracy one secondary source quotes, and stays unchecked
    Published("cifar100", "resnet110", "okdph", 79.68, "OKDPH (Zhang et al., CVPR 2023), via " + SECONDARY,
              "best test epoch", "2 students", checked=False),
    Published("cifar100", "resnet110", "ahbf", 100 - 20.96, "AHBF-OKD (Gong et al., AAAI 2023), via " + SECONDARY,
              "target branch, best test epoch (the paper quotes 20.96 % error)", "4 branches", checked=False),
)


def published(dataset: str, backbone: str, method: str) -> List[Published]:
    """Every published number of a cell; CIFAR-10 in an ImageFolder copy counts as cifar10."""
    dataset = "cifar10" if dataset in ("cifar10", "imagefolder_cifar10") else dataset
    return [p for p in PUBLISHED if (p.dataset, p.backbone, p.method) == (dataset, backbone, method)]


def paper_top1(dataset: str, backbone: str, method: str) -> Optional[float]:
    """The number a result record is compared with: PCL's table, else the method's own paper's first
    row for the cell (its default setting: MCL x2, SwitOKD's student)."""
    dataset = "cifar10" if dataset in ("cifar10", "imagefolder_cifar10") else dataset
    if (dataset, backbone, method) in PAPER_TOP1:
        return PAPER_TOP1[(dataset, backbone, method)]
    rows = [p for p in published(dataset, backbone, method) if p.source != PCL_SOURCE and method != "vanilla"]
    return rows[0].top1 if rows else None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m okd.paper", description="The papers' tables: columns and rows.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", action="store_true", help="PCL's table's methods, space-separated")
    which.add_argument("--all-methods", action="store_true",
                       help="PCL's table's methods and those after PCL, space-separated")
    which.add_argument("--backbones", action="store_true", help="PCL's table's backbones, space-separated")
    which.add_argument("--published", action="store_true", help="every published number with its source")
    args = p.parse_args(argv)
    if args.published:
        for row in PUBLISHED:
            print(f"{row.dataset:<9} {row.backbone:<20} {row.method:<8} {row.top1:6.2f}  {row.label()}")
        return 0
    print(" ".join(TABLE_METHODS if args.methods else ALL_METHODS if args.all_methods else BACKBONE_ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
