"""Compare finished runs: accuracy and loss against round (as in the chapter's figure), and accuracy against the
megabytes clients uploaded (or uploaded and downloaded: --bytes total), which is what compression buys. Or print the
runs as a markdown table.

    python -m utils.plot RUN_DIR [RUN_DIR ...] -o FILE.png [--title TEXT] [--bytes upload|total]
                                                          [--x round|time|epsilon]
    python -m utils.plot RUN_DIR [RUN_DIR ...] --table [--target 0.89]

--x time and --target read the simulated clock's columns (clock=simulated): accuracy against simulated seconds, and
time to accuracy. --x epsilon reads differential privacy's (dp_clip set): accuracy against the privacy spent.
"""
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: draw to files, never to a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

import codec  # noqa: E402
from utils import cli, config, run_files  # noqa: E402
from utils.run_files import RunError  # noqa: E402

MARKERS = "o*^sDvx+p<>h"
PLOTTED_COLUMNS = ("round", "accuracy", "loss", "upload_bytes", "dense_upload_bytes", "download_bytes")
SPARSIFIER_KEYS = {key for cls in codec.SPARSIFIERS.values() for key in cls.keys}
QUANTIZER_KEYS = {key for cls in codec.QUANTIZERS.values() for key in cls.keys}
ERROR_FEEDBACK_KEYS = {"error_feedback", "residual_decay"}
COMPRESSED_DOWNLOAD_KEYS = {"download_sparsifier", "download_prop", "download_quantize", "download_topk_scope",
                            "download_error_feedback"}
DEFENSE_KEYS = {"norm_bound": {"clip_norm", "clip_multiple"}, "trimmed_mean": {"trim_fraction"}}
ATTACK_KEYS = {"attack", "attack_scale", "attack_from", "attack_until"}


def unused_keys(conf):
    """Keys that do not act under this run's method, left out of its label."""
    unused = SPARSIFIER_KEYS - set(codec.SPARSIFIERS[conf["sparsifier"]].keys)
    unused |= QUANTIZER_KEYS - set(codec.QUANTIZERS[conf["quantize"]].keys)
    if conf["download"] != "compressed":
        unused |= COMPRESSED_DOWNLOAD_KEYS | ({"download_first_contact"} if conf["download"] == "dense" else set())
    unused |= set().union(*DEFENSE_KEYS.values()) - DEFENSE_KEYS.get(conf["defense"], set())
    if not conf["attackers"]:
        unused |= ATTACK_KEYS
    lossless = (codec.SPARSIFIERS[conf["sparsifier"]] is codec.Dense
                and codec.QUANTIZERS[conf["quantize"]] is codec.Float32)
    return unused | ERROR_FEEDBACK_KEYS if lossless else unused  # nothing is lost, so nothing is fed back


def labels_for(run_dirs):
    """Label each run by the config keys whose values differ between the runs and are not at their default (all of
    them when that leaves nothing), or by its folder name when no key differs."""
    confs = [{**config.DEFAULTS, **read_config(d)} for d in run_dirs]  # older runs lack newer keys
    differing = [key for key in confs[0] if len({repr(c.get(key)) for c in confs}) > 1 and key != "data_dir"]
    if not differing:
        return [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    labels = []
    for conf in confs:
        shown = [key for key in differing if key not in unused_keys(conf)]
        changed = [key for key in shown if conf[key] != config.DEFAULTS[key]]
        labels.append(", ".join(f"{key}={conf[key]}" for key in changed or shown))
    return labels


def read_config(run_dir):
    """A run's config.json; RunError when it cannot be read."""
    try:
        return run_files.read_config(run_dir)
    except (OSError, ValueError) as e:  # ValueError includes JSON errors
        raise RunError(f"cannot read {os.path.join(run_dir, 'config.json')}: {e}") from None


def read_rows(run_dir):
    """A run's metrics rows, each holding every column this tool reads; RunError says what is wrong otherwise."""
    path = os.path.join(run_dir, "metrics.csv")
    try:
        rows = run_files.read_metrics(run_dir)
    except (OSError, ValueError, csv.Error) as e:
        raise RunError(f"cannot read {path}: {e}") from None
    if not rows:
        raise RunError(f"{path} holds no round, only its header")
    for number, row in enumerate(rows, 1):
        missing = [column for column in PLOTTED_COLUMNS if column not in row]
        if missing:
            raise RunError(f"{path}: row {number} has no {missing[0]}")
    return rows


def ratio(numerator, denominator, form):
    """`form` filled with numerator / denominator, or '-' when the denominator is 0 (a run whose every upload
    failed sent 0 bytes)."""
    return form.format(numerator / denominator) if denominator else "-"


def times(numerator, denominator):
    """How many times fewer bytes: '110x', or '1.33x' below 10, where whole numbers would hide the difference."""
    if denominator and numerator / denominator < 10:
        return ratio(numerator, denominator, "{:.2f}x")
    return ratio(numerator, denominator, "{:.0f}x")


def check_output(path):
    """Refuse, before anything is drawn, a figure file that cannot be written: a missing folder, or an extension
    matplotlib has no writer for (without one it would add '.png' to the name, so the name printed would be wrong)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise RunError(f"-o {path}: the folder {folder} does not exist")
    extension = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise RunError(f"-o {path}: the file name must end in one of {', '.join('.' + f for f in sorted(formats))}")


def color(i, count):
    """Ten distinct colours, or for more runs twenty: the dark shades of tab20 first, then the light ones."""
    if count <= 10:
        return plt.get_cmap("tab10")(i)
    return plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20)


def traffic(row, bytes_shown):
    """A row's bytes: uploaded, or uploaded plus downloaded ('total')."""
    return row["upload_bytes"] + (row["download_bytes"] if bytes_shown == "total" else 0)


# --x: the column of the first two panels' x axis, its label, and what a run needs to have it
X_AXES = {"round": ("round", "Round", None),
          "time": ("sim_seconds", "Simulated seconds", "without the simulated clock (no sim_seconds): run it with "
                                                       "--set clock=simulated"),
          "epsilon": ("epsilon", "Epsilon, privacy spent so far (log scale)", "without differential privacy (no "
                                                                                "epsilon): run it with dp_clip set")}


def check_column(run_dirs, runs, x):
    """RunError naming the first run that lacks the column `x` plots against."""
    column, _, missing = X_AXES[x]
    for run_dir, rows in zip(run_dirs, runs):
        if any(column not in row for row in rows):
            raise RunError(f"{run_dir} was made {missing}, or plot against rounds")


def plot_runs(run_dirs, path, title=None, bytes_shown="upload", labels=None, x="round"):
    """Accuracy and loss against round (x 'round'), simulated seconds ('time') or the privacy spent ('epsilon'), and
    accuracy against bytes."""
    runs = [read_rows(d) for d in run_dirs]
    check_column(run_dirs, runs, x)
    column, x_label, _ = X_AXES[x]
    figure, (accuracy_axis, loss_axis, bytes_axis) = plt.subplots(1, 3, figsize=(18, 5))
    for i, (rows, label) in enumerate(zip(runs, labels or labels_for(run_dirs))):
        style = dict(marker=MARKERS[i % len(MARKERS)], markersize=4, label=label, color=color(i, len(runs)))
        xs = [row[column] for row in rows]
        accuracy = [row["accuracy"] for row in rows]
        accuracy_axis.plot(xs, accuracy, **style)
        loss_axis.plot(xs, [row["loss"] for row in rows], **style)
        megabytes, total = [], 0.0
        for row in rows:
            total += traffic(row, bytes_shown) / 1e6
            megabytes.append(total)
        bytes_axis.plot(megabytes, accuracy, **style)
    bytes_axis.set_xscale("log")
    if x == "epsilon":  # it grows fast in the first rounds, then slowly: a noise level's runs span decades of it
        accuracy_axis.set_xscale("log")
        loss_axis.set_xscale("log")
    bytes_label = "Uploaded MB" if bytes_shown == "upload" else "Uploaded + downloaded MB"
    for axis, x_text, y in ((accuracy_axis, x_label, "Accuracy"), (loss_axis, x_label, "Loss"),
                            (bytes_axis, f"{bytes_label}, cumulative (log scale)", "Accuracy")):
        axis.set(xlabel=x_text, ylabel=y)
        axis.grid(alpha=0.3)
    # one legend for the three panels, below them, in as many columns as fit
    columns = min(len(runs), 4)
    legend_rows = math.ceil(len(runs) / columns)
    figure.legend(*accuracy_axis.get_legend_handles_labels(), loc="lower center", ncol=columns, fontsize=9,
                  frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.02 + 0.045 * legend_rows, 1, 0.96 if title else 1))
    try:
        figure.savefig(path, dpi=110)
    except OSError as e:
        raise run_files.SaveError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(figure)


def table(run_dirs, labels=None, target=None):
    """Markdown rows: run, final accuracy and the mean of the last 5 rounds (steadier than the final one when rounds
    fluctuate, as under non-IID data), the best round, uploaded MB, its share of dense uploads and how many times
    fewer bytes that is; then downloaded and total MB, and how many times fewer than dense FedAvg's total, which
    downloads the dense model as many times as it uploads one. With a `target` accuracy (runs on the simulated clock):
    the round and the simulated second at which the test accuracy first reaches it, the run's simulated seconds, and
    where a round's time goes (time_split). Where a run used differential privacy: the epsilon it spent."""
    header = ("| run | final accuracy | last 5 rounds | best accuracy | uploaded MB | of dense | x fewer than dense "
              "| downloaded MB | total MB | x fewer total |")
    if target is not None:
        header += f" round to {target:g} | simulated s to {target:g} | simulated s | down / compute / up |"
    runs = [read_rows(d) for d in run_dirs]
    private = any("epsilon" in rows[-1] for rows in runs)  # differential privacy's: the epsilon spent, per run
    if private:
        header += " epsilon |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    if target is not None:
        check_column(run_dirs, runs, "time")
    for run_dir, rows, label in zip(run_dirs, runs, labels or labels_for(run_dirs)):
        sent, dense = run_files.upload_totals(rows)
        received = sum(row["download_bytes"] for row in rows)
        last = [row["accuracy"] for row in rows[-5:]]
        line = (f"| {label} | {rows[-1]['accuracy']:.4f} | {sum(last) / len(last):.4f} | "
                f"{max(r['accuracy'] for r in rows):.4f} | {sent / 1e6:.3f} | {ratio(sent, dense, '{:.2%}')} | "
                f"{times(dense, sent)} | {received / 1e6:.3f} | {(sent + received) / 1e6:.3f} | "
                f"{times(2 * dense, sent + received)} |")
        if target is not None:
            reached = next((row for row in rows if row["accuracy"] >= target), None)
            split = " / ".join(f"{share:.0%}" for share in time_split(run_dir))
            line += (f" {int(reached['round'])} | {reached['sim_seconds']:.1f} |" if reached else
                     " not reached | not reached |") + f" {rows[-1]['sim_seconds']:.1f} | {split} |"
        if private:
            line += f" {rows[-1]['epsilon']:.3g} |" if "epsilon" in rows[-1] else " - |"
        lines.append(line)
    return "\n".join(lines)


def time_split(run_dir):
    """(download, compute, upload): their shares of the time of each round's last client to arrive, the one the round
    waited for, summed over rounds (clients.csv)."""
    path = os.path.join(run_dir, "clients.csv")
    last = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["arrived"] == "1" and (row["round"] not in last or
                                              float(row["finish_s"]) > float(last[row["round"]]["finish_s"])):
                    last[row["round"]] = row
        parts = [sum(float(row[column]) for row in last.values()) for column in ("download_s", "compute_s", "upload_s")]
    except (OSError, KeyError, ValueError, csv.Error) as e:
        raise RunError(f"cannot read {path}: {e}") from None
    total = sum(parts)
    return [part / total if total else 0.0 for part in parts]


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("runs", nargs="+", help="run folders holding config.json and metrics.csv")
    parser.add_argument("-o", "--output", help="figure file to write (PNG)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--table", action="store_true", help="print a markdown table instead of drawing")
    parser.add_argument("--bytes", choices=("upload", "total"), default="upload",
                        help="third panel: uploaded MB, or uploaded + downloaded MB")
    parser.add_argument("--x", choices=tuple(X_AXES), default="round",
                        help="first two panels against rounds, simulated seconds (clock=simulated) or epsilon (dp_clip)")
    parser.add_argument("--target", type=float, metavar="ACCURACY",
                        help="--table: add the round and simulated second at which each run first reaches it")
    parser.add_argument("--labels", help="comma-separated names of the runs, in order (default: the differing keys)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        print(f"error: --labels names {len(labels)} runs, {len(args.runs)} were given", file=sys.stderr)
        return 2
    for run_dir in args.runs:
        for name in ("config.json", "metrics.csv"):
            if not os.path.isfile(os.path.join(run_dir, name)):
                print(f"error: {run_dir} is not a run folder (no {name})", file=sys.stderr)
                return 2
    if args.target is not None and not (0 < args.target <= 1 and args.table):
        print("error: --target is an accuracy above 0 and at most 1, and goes with --table", file=sys.stderr)
        return 2
    if not args.table and not args.output:
        print("error: give -o FILE.png or --table", file=sys.stderr)
        return 2
    try:
        if args.table:
            print(table(args.runs, labels, args.target))
        else:
            check_output(args.output)
            plot_runs(args.runs, args.output, args.title, args.bytes, labels, args.x)
            print(f"figure: {args.output}")
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
