"""Compare finished runs: accuracy and loss against round (as in the chapter's figure), and accuracy against the
megabytes clients uploaded, which is what sparsification buys. Or print the runs as a markdown table.

    python -m utils.plot RUN_DIR [RUN_DIR ...] -o FILE.png [--title TEXT]
    python -m utils.plot RUN_DIR [RUN_DIR ...] --table
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: draw to files, never to a window
import matplotlib.pyplot as plt  # noqa: E402

from utils import config, run_files  # noqa: E402

MARKERS = "o*^sDvx+p<>h"


# keys that do not act under a sparsifier, left out of its runs' labels
UNUSED_KEYS = {"none": {"prop", "mask", "topk_scope", "error_feedback", "residual_decay"},
               "random": {"topk_scope"}, "topk": {"mask"}}


def labels_for(run_dirs):
    """Label each run by the config keys whose values differ between the runs (else by its folder name)."""
    confs = [{**config.DEFAULTS, **run_files.read_config(d)} for d in run_dirs]  # older runs lack newer keys
    differing = [key for key in confs[0] if len({repr(c.get(key)) for c in confs}) > 1 and key != "data_dir"]
    if not differing:
        return [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [", ".join(f"{key}={conf[key]}" for key in differing
                      if key not in UNUSED_KEYS.get(conf["sparsifier"], ())) for conf in confs]


def plot_runs(run_dirs, path, title=None):
    runs = [run_files.read_metrics(d) for d in run_dirs]
    figure, (accuracy_axis, loss_axis, bytes_axis) = plt.subplots(1, 3, figsize=(18, 5))
    for i, (rows, label) in enumerate(zip(runs, labels_for(run_dirs))):
        style = dict(marker=MARKERS[i % len(MARKERS)], markersize=4, label=label)
        rounds = [row["round"] for row in rows]
        accuracy = [row["accuracy"] for row in rows]
        accuracy_axis.plot(rounds, accuracy, **style)
        loss_axis.plot(rounds, [row["loss"] for row in rows], **style)
        megabytes, total = [], 0.0
        for row in rows:
            total += row["upload_bytes"] / 1e6
            megabytes.append(total)
        bytes_axis.plot(megabytes, accuracy, **style)
    bytes_axis.set_xscale("log")
    for axis, x, y in ((accuracy_axis, "Round", "Accuracy"), (loss_axis, "Round", "Loss"),
                       (bytes_axis, "Uploaded MB, cumulative (log scale)", "Accuracy")):
        axis.set(xlabel=x, ylabel=y)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(run_dirs):
    """Markdown rows: run, final and best accuracy, total uploaded MB and its share of a dense upload, and the
    mean accuracy of the last 5 rounds (steadier than the final one when rounds fluctuate, as under non-IID data)."""
    lines = ["| run | final accuracy | best accuracy | uploaded MB | of dense | last 5 rounds |",
             "|---|---|---|---|---|---|"]
    for run_dir, label in zip(run_dirs, labels_for(run_dirs)):
        rows = run_files.read_metrics(run_dir)
        sent, dense = run_files.upload_totals(rows)
        last = [row["accuracy"] for row in rows[-5:]]
        lines.append(f"| {label} | {rows[-1]['accuracy']:.4f} | {max(r['accuracy'] for r in rows):.4f} | "
                     f"{sent / 1e6:.2f} | {sent / dense:.2%} | {sum(last) / len(last):.4f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders holding config.json and metrics.csv")
    parser.add_argument("-o", "--output", help="figure file to write (PNG)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--table", action="store_true", help="print a markdown table instead of drawing")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        for name in ("config.json", "metrics.csv"):
            if not os.path.isfile(os.path.join(run_dir, name)):
                print(f"error: {run_dir} is not a run folder (no {name})", file=sys.stderr)
                return 2
    if args.table:
        print(table(args.runs))
    elif args.output:
        plot_runs(args.runs, args.output, args.title)
        print(f"figure: {args.output}")
    else:
        print("error: give -o FILE.png or --table", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
