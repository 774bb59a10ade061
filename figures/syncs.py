"""How a run's downloads split between the kinds of sync: a markdown row per run, from its metrics.csv.

    python figures/syncs.py RUN_DIR [RUN_DIR ...]

A sync is what one sampled client downloads in one round: a replay of the rounds it missed (a client already up to
date replays nothing), the entries changed since its last sync, or the dense model (downloads.py). "Rounds behind"
is how many rounds' changes a client lacks when it is sampled (its first model is the initial one, from the seed).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import run_files  # noqa: E402


def main(run_dirs):
    print("| run | syncs | replay | changed entries | dense | rounds behind: mean | max | downloaded MB | kB per sync |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        rows = run_files.read_metrics(run_dir)
        kinds = [sum(row.get(f"syncs_{kind}", 0) for row in rows) for kind in ("replay", "changed", "dense")]
        syncs = sum(kinds)
        received = sum(row["download_bytes"] for row in rows)
        held, behind = {}, []  # client -> the rounds its model has gone through (0: the initial model)
        for row in rows:
            for client in row["clients"].split():
                behind.append(row["round"] - 1 - held.get(client, 0))
                held[client] = row["round"] - 1
        print(f"| {run_dir} | {syncs:.0f} | " + " | ".join(f"{count:.0f}" for count in kinds) +
              f" | {sum(behind) / len(behind):.1f} | {max(behind):.0f} | {received / 1e6:.3f} | "
              f"{received / syncs / 1e3:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
