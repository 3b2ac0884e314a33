"""Results table of a set of runs, in the shape of the papers' comparison tables.

    python -m okd.report runs/                       # Markdown, best-epoch and last-epoch tables
    python -m okd.report runs/ --format csv          # one row per cell and variant
    python -m okd.report runs/ --figure figs/curves_resnet32.png --backbone resnet32

Rows are backbones, columns methods (a method run with its authors' recipe, or a mix, has a column of
its own: ``MCL (authors' recipe)``, okd.recipes), cells ``mean ± std (n)`` over seeds of
the method's *reported* model (``summary.reported`` in ``metrics.jsonl``:
network/branch 1, OKDDip's leader, PCL's temporal-mean peer 1). "best" is the
best test accuracy over epochs (the field's protocol), "last" the final epoch's.
The std is the sample standard deviation (n - 1). Only finished runs count
unless ``--include-unfinished``; a cell with none is marked ``—`` (no run) or
``running (k)`` (k unfinished runs).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import OkdError
from .methods import METHODS
from .paper import ALL_METHODS, BACKBONE_ROWS, paper_top1, published
from .recipes import COMMON, recipe_label
from .results import read_records
from .runs import ReportError, Run, find_run_dirs, read_run

MISSING = "—"


def split_column(column: str) -> Tuple[str, str]:
    """(method, recipe) of a report column (``Run.column``; recipe "" for the common protocol)."""
    method, _, recipe = column.partition(" [")
    return method, recipe.rstrip("]")


def method_title(column: str) -> str:
    """A column header: the method's registered title (``@METHODS.register(name, title=...)``), and the recipe
    where it is not the common protocol."""
    method, recipe = split_column(column)
    title = METHODS.meta(method)["title"] if method in METHODS else method  # every method registers one
    return f"{title} ({recipe})" if recipe else title


def rank(name: str, order: Sequence[str]) -> Tuple[int, str]:
    method, recipe = split_column(name)
    return (order.index(method), recipe) if method in order else (len(order), name)


def ordered(names: Iterable[str], order: Sequence[str]) -> List[str]:
    return sorted(set(names), key=lambda n: rank(n, order))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


@dataclass
class Cell:
    values: List[float]
    seeds: List[int]
    unfinished: int  # runs not counted (or counted, with --include-unfinished) that are not finished

    def text(self) -> str:
        if not self.values:
            return f"running ({self.unfinished})" if self.unfinished else MISSING
        mean, std = mean_std(self.values)
        body = f"{mean:.2f} ± {std:.2f}" if len(self.values) > 1 else f"{mean:.2f}"
        return f"{body} (n={len(self.values)})"


def build_cells(runs: Sequence[Run], variant: str, include_unfinished: bool) -> Dict[Tuple[str, str, str], Cell]:
    cells: Dict[Tuple[str, str, str], Cell] = {}
    for run in sorted(runs, key=lambda r: (r.seed, str(r.path))):
        cell = cells.setdefault((run.dataset, run.backbone, run.column), Cell([], [], 0))
        if not run.finished:
            cell.unfinished += 1
        if run.curve and (run.finished or include_unfinished):
            cell.values.append(run.best if variant == "best" else run.last)
            cell.seeds.append(run.seed)
    return cells


def markdown(runs: Sequence[Run], include_unfinished: bool = False) -> str:
    out = []
    for dataset in sorted({r.dataset for r in runs}):
        subset = [r for r in runs if r.dataset == dataset]
        backbones = ordered({r.backbone for r in subset}, BACKBONE_ROWS)
        methods = ordered({r.column for r in subset}, ALL_METHODS)
        for variant, title in (("best", "best epoch"), ("last", "last epoch")):
            cells = build_cells(subset, variant, include_unfinished)
            out.append(f"### {dataset}: top-1 % of the reported model, {title} (mean ± std over seeds)\n")
            out.append("| backbone | " + " | ".join(method_title(m) for m in methods) + " |")
            out.append("|---|" + "---|" * len(methods))
            for b in backbones:
                row = [cells.get((dataset, b, m), Cell([], [], 0)).text() for m in methods]
                out.append(f"| {b} | " + " | ".join(row) + " |")
            out.append("")
        out += published_beside(subset, dataset, build_cells(subset, "best", include_unfinished))
    out.append(f"{MISSING}: no run. running (k): k runs not finished yet"
               + ("" if include_unfinished else " (not counted)") + ".")
    return "\n".join(out) + "\n"


def published_beside(runs: Sequence[Run], dataset: str, best: Dict) -> List[str]:
    """The published numbers of the cells these runs fill, each with its source, beside okd's best epoch."""
    rows = []
    for b, m in sorted({(r.backbone, r.column) for r in runs},
                       key=lambda bm: (rank(bm[0], BACKBONE_ROWS), rank(bm[1], ALL_METHODS))):
        for p in published(dataset, b, split_column(m)[0]):
            rows.append(f"| {b} | {method_title(m)} | {p.top1:.2f} | {best[(dataset, b, m)].text()} | {p.label()} |")
    if not rows:
        return []
    return [f"### {dataset}: published top-1 % of these cells, beside okd's best epoch\n",
            "| backbone | method | published | okd (best epoch) | setting, protocol, source |",
            "|---|---|---|---|---|", *rows, ""]


def csv_text(runs: Sequence[Run], include_unfinished: bool = False) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "backbone", "method", "variant", "mean", "std", "n", "seeds", "unfinished", "recipe"])
    for variant in ("best", "last"):
        cells = build_cells(runs, variant, include_unfinished)
        keys = sorted(cells, key=lambda k: (k[0], rank(k[1], BACKBONE_ROWS), rank(k[2], ALL_METHODS)))
        for key in keys:
            cell = cells[key]
            if cell.values:
                mean, std = mean_std(cell.values)
                row = [f"{mean:.4f}", f"{std:.4f}", len(cell.values), " ".join(map(str, cell.seeds))]
            else:
                row = ["", "", 0, ""]
            method, recipe = split_column(key[2])
            writer.writerow([key[0], key[1], method, variant, *row, cell.unfinished, recipe or COMMON])
    return buf.getvalue()


def curves_figure(runs: Sequence[Run], backbone: str, dataset: Optional[str], path: Path) -> None:
    """Test accuracy of the reported model per epoch, mean over seeds (band: min-max), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in runs if r.backbone == backbone and (dataset is None or r.dataset == dataset) and r.curve]
    datasets = sorted({r.dataset for r in chosen})
    if not chosen:
        raise ReportError(f"no runs with backbone '{backbone}'" + (f" on '{dataset}'" if dataset else ""))
    if len(datasets) > 1:
        raise ReportError(f"runs of several datasets ({', '.join(datasets)}) for '{backbone}'; pick one with --dataset")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ordered({r.column for r in chosen}, ALL_METHODS):
        by_epoch: Dict[int, List[float]] = {}
        seeds = [r for r in chosen if r.column == method]
        for r in seeds:
            for epoch, value in r.curve:
                by_epoch.setdefault(epoch, []).append(value)
        epochs = sorted(by_epoch)
        mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        (line,) = ax.plot(epochs, mean, label=f"{method_title(method)} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 % (reported model)")
    ax.set_title(f"{datasets[0]} / {backbone}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(records: List[Dict]) -> str:
    """The records as a markdown table beside the published number of each cell."""
    def num(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v)

    lines = ["| dataset | model | method | epochs | seed | reported best | last | paper | best − paper | img/s | "
             "wall | device | precision | commit |", "|" + "---|" * 14]
    for r in sorted(records, key=lambda r: (r["dataset"], r["model"], r["method"], r["epochs"], r["seed"])):
        paper = paper_top1(r["dataset"], r["model"], r["method"])
        delta = None if paper is None or r["reported_best"] is None else r["reported_best"] - paper
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") is not None else "—"
        epochs = f"{r['epochs']}" if r.get("finished", True) else f"{r['epochs_done']} of {r['epochs']}, stopped"
        device = r["device"] + ("" if r.get("preflight", {}).get("passed", True) else
                                f" (preflight failed: {len(r['preflight']['failed'])} check(s))")
        recipe = r.get("recipe") or recipe_label(r.get("config") or {})  # older records: from their config
        method = r["method"] if recipe == COMMON else f"{r['method']} ({recipe})"
        lines.append(f"| {r['dataset']} | {r['model']} | {method} | {epochs} ({r['protocol']}) | "
                     f"{r['seed']} | {num(r['reported_best'])} | {num(r['reported_last'])} | {num(paper)} | "
                     f"{num(delta, '{:+.2f}')} | {num(r.get('img_per_s'), '{:,.0f}')} | {wall} | {device} | "
                     f"{r['precision']} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="okd-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders searched for them (e.g. runs/), "
                                               "and result records (results/, see okd.results)")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    p.add_argument("--dataset", help="only runs on this dataset")
    p.add_argument("--include-unfinished", action="store_true", help="count runs that have not finished")
    p.add_argument("--output", "-o", help="write the table here instead of stdout")
    p.add_argument("--figure", help="also write a PNG of test-accuracy curves per method (needs --backbone)")
    p.add_argument("--backbone", help="backbone of the --figure")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [r for r in (read_run(d) for d in find_run_dirs(args.run_dirs)) if r is not None]
        records = read_records([Path(p) for p in args.run_dirs])
        if args.dataset:
            runs = [r for r in runs if r.dataset == args.dataset]
            records = [r for r in records if r["dataset"] == args.dataset]
        if not runs and not records:
            raise ReportError(f"no okd runs or result records found under {', '.join(args.run_dirs)}"
                              + (f" for dataset '{args.dataset}'" if args.dataset else ""))
        if args.figure and not args.backbone:
            raise ReportError("--figure needs --backbone (e.g. --backbone resnet32)")
        text = results_markdown(records) if records else ""
        if runs:
            text += ("\n" if text else "") + (csv_text if args.format == "csv" else markdown)(
                runs, args.include_unfinished)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        if args.figure:
            curves_figure(runs, args.backbone, args.dataset, Path(args.figure))
            print(f"okd-report: wrote {args.figure}", file=sys.stderr)
    except (ReportError, OkdError) as exc:  # OkdError: e.g. a broken method file, named by the registry
        print(f"okd-report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
