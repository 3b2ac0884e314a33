"""Draw figs/pcl_overview.png, the PCL architecture diagram used in the README.

    python figs/make_overview.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STUDENT, EMA, TEACHER, DATA = "#dbe9f6", "#fde7c8", "#e3f2d9", "#eeeeee"


def box(ax, x, y, w, h, text, color, size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#444444", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, style="-|>", color="#333333", ls="-", text=None, rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=1.1,
                                 linestyle=ls, connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, fontsize=7.5, color=color,
                ha="center")


def main(out=Path(__file__).with_name("pcl_overview.png")):
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6.4)
    ax.axis("off")
    rows = [4.9, 3.6, 2.3]
    box(ax, 0.1, 3.35, 1.2, 0.8, "image x", DATA)
    for j, y in enumerate(rows):
        box(ax, 1.8, y, 1.3, 0.6, f"view $x^{j + 1}$\ncrop+flip", DATA, 8)
        arrow(ax, (1.3, 3.75), (1.8, y + 0.3))
        arrow(ax, (3.1, y + 0.3), (3.6, 3.75 + (y - 3.6) * 0.25))
        box(ax, 5.1, y, 1.5, 0.6, f"branch {j + 1}\n(last stage + FC)", STUDENT, 8)
        arrow(ax, (4.9, 3.75 + (y - 3.6) * 0.25), (5.1, y + 0.3))
        box(ax, 7.0, y, 1.0, 0.6, f"$z_{j + 1}$", STUDENT)
        arrow(ax, (6.6, y + 0.3), (7.0, y + 0.3))
        arrow(ax, (6.6, y + 0.15), (8.55, 1.25), color="#7a7a7a", ls=":")
    box(ax, 3.6, 3.35, 1.3, 0.8, "shared trunk\n(one pass\nper view)", STUDENT, 8)
    box(ax, 8.4, 0.6, 1.6, 0.65, "concat $f_1,f_2,f_3$\n→ Linear $FC_e$", TEACHER, 8)
    box(ax, 10.3, 0.6, 1.5, 0.65, "peer ensemble\nteacher $z_e$", TEACHER, 8)
    arrow(ax, (10.0, 0.92), (10.3, 0.92))
    box(ax, 9.2, 4.45, 2.6, 1.4, "temporal mean (EMA) of the\nwhole network: trunk' +\nbranch' $l$ on view $x^l$\n"
        r"→ peer mean teachers $z'_l$", EMA, 8)
    ax.text(10.5, 6.05, r"$\theta' \leftarrow \alpha_t\theta' + (1-\alpha_t)\theta$,  "
            r"$\alpha_t=\min(1-\frac{1}{t+1}, 0.999)$", fontsize=8, ha="center")
    for y in rows:
        arrow(ax, (9.2, 4.9), (8.0, y + 0.45), color="#c07000", ls="--", rad=0.1)
        arrow(ax, (10.4, 1.25), (8.0, y + 0.1), color="#2f7d1e", ls="--", rad=-0.15)
    ax.text(7.0, 5.75, "KD$_{T=3}(z_j \\leftarrow sg(z'_l))$, $l \\neq j$", color="#c07000", fontsize=8)
    ax.text(8.2, 1.75, "KD$_{T=3}(z_j \\leftarrow sg(z_e))$", color="#2f7d1e", fontsize=8)
    ax.text(0.1, 0.95, "L = CE($z_e$,y) + Σ_j [ CE($z_j$,y) + w(e)·KD($z_j$←$z_e$)\n"
            "        + w(e)/(m−1) Σ_{l≠j} KD($z_j$←$z'_l$) ]\n"
            "w(e) = exp(−5(1−e/80)²) for e < 80, else 1;  sg = stop-gradient\n"
            "Test: temporal-mean peer 1 on the clean image (one backbone's size)", fontsize=8.5,
            family="monospace", va="center")
    ax.set_title("PCL: peer collaborative learning (m = 3 peers) as built in okd", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
