"""The robustness grid: test accuracy after the last round, per attack (rows) and defense (columns), one panel per k and
kind of upload; a markdown table of the same numbers (final and last-5 mean) on stdout.

    python figures/robust.py runs/robust -o figures/robust.png

Reads RUNS/k<k>/<uploads>/<attack>-<defense>/metrics.csv as `bash figures/reproduce.sh robust` writes them; a run
that is missing or unfinished is left blank (and said so on stderr), never drawn from a partial curve.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import run_files  # noqa: E402

ATTACKS = {  # folder prefix -> what the row says
    "honest": "honest",
    "boost100": "1 booster (100x)",
    "2boost100": "2 boosters (100x)",
    "signflip": "1 sign flip",
    "2signflip": "2 sign flips",
    "noise100": "1 noise (100 std)",
    "2noise100": "2 noise (100 std)",
}
DEFENSES = {"none": "none", "norm_bound": "norm bound", "median": "median", "trimmed_mean": "trimmed mean",
            "geometric_median": "geometric median"}
SHADES = (0.85, 0.92)  # accuracies the colours spread over: a point of difference shows; anything lower is red
PANELS = [(5, "dense", "dense"), (5, "stc0.04", "STC 4%"), (2, "dense", "dense"), (2, "stc0.04", "STC 4%")]
LAST = 5  # rounds in the steadier mean


def accuracies(run_dir, rounds):
    """(final, mean of the last LAST rounds) of a finished run, else None."""
    if not os.path.exists(os.path.join(run_dir, "metrics.csv")):
        return None
    rows = run_files.read_metrics(run_dir)
    if len(rows) < rounds:
        return None
    curve = [row["accuracy"] for row in rows[:rounds]]
    return curve[-1], sum(curve[-LAST:]) / LAST


def grid(runs, k, uploads, rounds):
    """{(attack, defense): (final, last 5)} of one panel's finished runs."""
    out = {}
    for attack in ATTACKS:
        for defense in DEFENSES:
            run_dir = os.path.join(runs, f"k{k}", uploads, f"{attack}-{defense}")
            result = accuracies(run_dir, rounds)
            if result is None:
                print(f"not shown: {run_dir} (missing or unfinished)", file=sys.stderr)
            else:
                out[attack, defense] = result
    return out


def print_table(panels):
    print("| k | uploads | attack | " + " | ".join(DEFENSES.values()) + " |")
    print("|---|---|---|" + "---|" * len(DEFENSES))
    for (k, _, label), cells in panels:
        for attack, row_label in ATTACKS.items():
            shown = [f"{cells[attack, d][0]:.4f} / {cells[attack, d][1]:.4f}" if (attack, d) in cells else "not run"
                     for d in DEFENSES]
            print(f"| {k} | {label} | {row_label} | " + " | ".join(shown) + " |")


def draw(panels, path, rounds):
    figure, axes = plt.subplots(2, 2, figsize=(13, 10.5), constrained_layout=True)
    for axis, ((k, _, label), cells) in zip(axes.flat, panels):
        values = np.full((len(ATTACKS), len(DEFENSES)), np.nan)
        for i, attack in enumerate(ATTACKS):
            for j, defense in enumerate(DEFENSES):
                if (attack, defense) in cells:
                    values[i, j] = cells[attack, defense][0]
        image = axis.imshow(values, cmap="RdYlGn", vmin=SHADES[0], vmax=SHADES[1], aspect="auto")
        for i in range(len(ATTACKS)):
            for j in range(len(DEFENSES)):
                text = "not run" if np.isnan(values[i, j]) else f"{values[i, j]:.3f}"
                dark = not np.isnan(values[i, j]) and not SHADES[0] + 0.01 < values[i, j] < SHADES[1] - 0.01
                axis.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
        axis.set_xticks(range(len(DEFENSES)), [name.replace(" ", "\n") for name in DEFENSES.values()])
        axis.set_yticks(range(len(ATTACKS)), ATTACKS.values())
        axis.set_title(f"k={k} of 10, {label} uploads")
    figure.colorbar(image, ax=axes, shrink=0.6, extend="min", label=f"test accuracy after round {rounds}")
    figure.suptitle(f"Fashion-MNIST, CNN, IID: accuracy after {rounds} rounds, attack (row) against defense (column)")
    figure.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the folder reproduce.sh robust writes (runs/robust)")
    parser.add_argument("-o", "--output", help="the PNG to draw; without it only the table is printed")
    parser.add_argument("--rounds", type=int, default=30, help="the rounds of a finished run (default 30)")
    args = parser.parse_args(argv)
    panels = [((k, uploads, label), grid(args.runs, k, uploads, args.rounds)) for k, uploads, label in PANELS]
    print_table(panels)
    if args.output:
        draw(panels, args.output, args.rounds)


if __name__ == "__main__":
    main()
